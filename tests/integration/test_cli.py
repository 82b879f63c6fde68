"""The command line: every bad-input case is one line + exit 2 (or a warning with --skip-bad),
nothing written is lost, and the commands run end to end."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from anomalygen.cli import app
from anomalygen.io import MANIFEST, read_manifest

from tests.integration.test_pipeline import fake_method, make_tiny_dataset, tree_bytes  # noqa: F401  (fixture)

runner = CliRunner()


@pytest.fixture()
def data(tmp_path):
    return make_tiny_dataset(tmp_path / "data")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def save(path, array):
    Image.fromarray(array).save(path)


def break_missing_mask(nut):
    (nut / "ground_truth/dent/000_mask.png").unlink()
    return "test/dent/000.png", "defect image without a mask"


def break_size_mismatch(nut):
    save(nut / "ground_truth/dent/000_mask.png", np.full((32, 48), 255, np.uint8))
    return "ground_truth/dent/000_mask.png", "mask is 48x32"


def break_truncated_defect(nut):
    path = nut / "test/dent/000.png"
    path.write_bytes(path.read_bytes()[:200])
    return "test/dent/000.png", "truncated"


def break_unreadable_good(nut):
    (nut / "train/good/002.png").write_bytes(b"this is not a png")
    return "train/good/002.png", "unreadable"


def break_all_zero_mask(nut):
    save(nut / "ground_truth/dent/000_mask.png", np.zeros((64, 64), np.uint8))
    return "ground_truth/dent/000_mask.png", "all zero"


def break_non_binary_mask(nut):
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:20] = 128
    mask[20:30, 10:20] = 255
    save(nut / "ground_truth/dent/000_mask.png", mask)
    return "ground_truth/dent/000_mask.png", "non-binary mask"


BREAKERS = [
    break_missing_mask,
    break_size_mismatch,
    break_truncated_defect,
    break_unreadable_good,
    break_all_zero_mask,
    break_non_binary_mask,
]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda b: b.__name__[6:])
def test_bad_input_is_one_line_and_skip_bad_warns(tmp_path, data, fake_method, breaker):
    out = tmp_path / "out"
    assert invoke("generate", "--method", "fake", "--data", data, "--category", "nut", "--out", out, "--num", 3).exit_code == 0
    written = tree_bytes(out)
    relative, problem = breaker(data / "nut")
    command = ["generate", "--method", "fake", "--data", data, "--category", "nut", "--out", out, "--num", 5]
    one_line_error(invoke(*command), str(data / "nut" / relative), problem)
    assert tree_bytes(out) == written  # nothing already written is lost

    result = invoke(*command, "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "warning: skipped " + str(data / "nut" / relative) in result.stderr
    assert problem in result.stderr
    entries = read_manifest(out / "nut" / MANIFEST)
    assert len(entries) == 5
    assert all(relative not in e["source"] for e in entries[3:])  # new samples avoid the bad file


def test_missing_folder_and_unknown_category(tmp_path, data, fake_method):
    one_line_error(invoke("generate", "--method", "fake", "--data", tmp_path / "nope", "--out", tmp_path / "o", "--num", 1),
                   str(tmp_path / "nope"), "folder not found")
    one_line_error(invoke("generate", "--method", "fake", "--data", data, "--category", "bolt", "--out", tmp_path / "o", "--num", 1),
                   str(data), "unknown category 'bolt'; available: nut")
    one_line_error(invoke("generate", "--method", "nosuch", "--data", data, "--out", tmp_path / "o", "--num", 1),
                   "unknown method 'nosuch'")
    one_line_error(invoke("datasets", "info", tmp_path / "nope"), "folder not found")
    assert not (tmp_path / "o").exists()


def test_other_seed_refused_then_overwrite(tmp_path, data, fake_method):
    base = ["generate", "--method", "fake", "--data", data / "nut", "--out", tmp_path, "--num", 2]
    assert invoke(*base).exit_code == 0
    one_line_error(invoke(*base, "--seed", 5), "different run", "seed: 0 there, 5 now", "--overwrite")
    result = invoke(*base, "--seed", 5, "--overwrite")
    assert result.exit_code == 0 and "2 samples" in result.stderr
    assert read_manifest(tmp_path / "nut" / MANIFEST)[0]["seed"] == 5


def test_a_summary_with_a_long_path_stays_one_line(tmp_path, data, fake_method):
    """Rich wraps at 80 columns when not on a terminal: a path in a log cut in two could not be copied."""
    out = tmp_path / ("long-folder-name-" * 8)
    result = invoke("generate", "--method", "fake", "--data", data / "nut", "--out", out, "--num", 2)
    assert result.exit_code == 0, result.output
    assert f"fake: 2 samples in {out / 'nut'} (2 new)\n" in result.stderr


def test_fit_and_generate_from_checkpoint(tmp_path, data, fake_method):
    model = tmp_path / "model"
    result = invoke("fit", "--method", "fake", "--data", data / "nut", "--out", model, "--set", "size=3", "--max-steps", 10)
    assert result.exit_code == 0, result.output
    assert '"max_steps": 10' in (model / "generator.json").read_text()
    result = invoke("generate", "--checkpoint", model, "--data", data / "nut", "--out", tmp_path / "o", "--num", 2)
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(tmp_path / "o/nut/ground_truth/dent/000000_mask.png")) > 0
    assert mask.sum() == 3 * 8


def test_methods_and_datasets_info(data):
    listed = invoke("methods").stdout.split()
    assert {"cutpaste", "croppaste", "draem"} <= set(listed)
    (data / "nut" / "ground_truth/stain/002_mask.png").unlink()
    result = invoke("datasets", "info", data)
    assert result.exit_code == 0, result.output
    assert "train/good" in result.stdout and "test/stain" in result.stdout
    assert "defect image without a mask" in result.stdout



def test_help_names_every_option_in_full_on_an_80_column_terminal():
    """A user reads an option's name off --help to type it: none may be cut short, none shown
    taking a value it does not take."""
    import typer.main
    from tests.helpers.cli_harness import run_cli

    group = typer.main.get_command(app)
    commands = [(name, command) for name, command in group.commands.items() if name != "datasets"]
    commands += [(f"datasets {name}", command) for name, command in group.commands["datasets"].commands.items()]
    for name, command in commands:
        result = run_cli(*name.split(), "--help", env={"COLUMNS": "80"})
        assert result.returncode == 0, result.output
        assert max(map(len, result.stdout.splitlines())) <= 80, name
        for param in command.params:
            for option in param.opts + param.secondary_opts:
                assert option in result.stdout, (name, option)
            if getattr(param, "is_flag", False):
                assert f"{param.opts[0]} <" not in result.stdout, (name, param.opts[0])


def test_demo_page(tmp_path, fake_method, monkeypatch):
    import anomalygen.demo

    monkeypatch.setattr(anomalygen.demo, "make_demo_dataset", lambda out, seed: make_tiny_dataset(out, categories=("nut", "fabric")))
    result = invoke("demo", "--out", tmp_path, "--methods", "fake", "--num", 2)
    assert result.exit_code == 0, result.output
    page = (tmp_path / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and "<h2>fake</h2>" in page
    assert len(read_manifest(tmp_path / "samples/fake/fabric" / MANIFEST)) == 2
    shutil.rmtree(tmp_path / "samples/fake/nut/test")  # a re-run repairs lost samples
    assert invoke("demo", "--out", tmp_path, "--methods", "fake", "--num", 2).exit_code == 0
    assert len(list((tmp_path / "samples/fake/nut/test").rglob("*.png"))) == 2


def test_ctrl_c_and_internal_errors_are_one_line(tmp_path, data, monkeypatch):
    from anomalygen import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "generate", interrupted)
    result = invoke("generate", "--method", "fake", "--data", data, "--out", tmp_path, "--num", 1)
    assert result.exit_code == 130 and result.stderr == "error: interrupted; run the same command again to resume\n"
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: {}["missing"])
    result = invoke("generate", "--method", "fake", "--data", data, "--out", tmp_path, "--num", 1)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("error: internal error (KeyError: 'missing'); this is a bug")


def test_an_option_error_is_worded_with_the_flag_of_the_command_that_sets_it():
    """The library names options (``OptionError``); each command names the flag it has for one:
    ``generate`` has no --device, ``fit`` no --num, and an option without a flag keeps its name."""
    from anomalygen import cli
    from anomalygen.errors import OptionError

    flags = {name: cli.command_flags(getattr(cli, name)) for name in ("fit", "generate", "evaluate")}
    device = OptionError("device", "got 'quantum'; allowed: auto", "m: option ", method=True)
    assert str(device) == "m: option device got 'quantum'; allowed: auto"
    assert cli.worded(device, flags["fit"], cli.METHOD_FLAGS["fit"]) == \
        "m: option device (--device or --set device=...) got 'quantum'; allowed: auto"
    assert cli.worded(device, flags["generate"], cli.METHOD_FLAGS["generate"]) == \
        "m: option device (--set device=...) got 'quantum'; allowed: auto"
    num = OptionError("num", "0: give a number")
    assert cli.worded(num, flags["generate"], {}) == "--num 0: give a number"
    assert cli.worded(num, flags["fit"], {}) == "num 0: give a number"
    assert cli.worded(OptionError("classification.epochs", "0: bad"), flags["evaluate"], {}) == "--cls-epochs 0: bad"
    # the options a message's advice names as `name`: by the command's flag, else as the library wrote them
    advice = "give `num` 3 or add `overwrite`; `classification.random_init`, `model` tiny"
    assert cli.flagged(advice, flags["generate"]) == "give --num 3 or add --overwrite; `classification.random_init`, `model` tiny"
    assert cli.flagged(advice, flags["evaluate"]) == "give `num` 3 or add `overwrite`; --cls-random-init, `model` tiny"
    assert cli.worded(OptionError("draem_augmentation.rec_base", "0: bad"), flags["evaluate"], {}) == \
        "draem_augmentation.rec_base 0: bad"
    assert cli.worded(OptionError("metrics", "unknown", sep=": "), flags["evaluate"], {}) == "--metrics: unknown"
