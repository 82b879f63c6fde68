"""A user's first hour (issue 32): CPU-safe presets and an up-front estimate, a method that must
train first says so and takes --max-steps, a time-budgeted bar ends with its budget, results in
sight (preview.png, next commands, tables), and readable reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from anomalygen import cli, pipeline
from anomalygen.evaluation import presets

from tests.integration.test_pipeline import fake_method, make_tiny_dataset  # noqa: F401  (fixture)

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny")) / "nut"


def _captured_evaluate(monkeypatch):
    seen = {}

    def fake(generated, data, **kwargs):
        seen.update(kwargs)
        return {"notes": [], "files": ["r.json", "r.html"], "category": "nut", "generated_counts": {}}

    monkeypatch.setattr("anomalygen.evaluation.run.evaluate", fake)
    return seen


@pytest.mark.parametrize("preset, given, expected", [
    ("quick", [], (10, 200, 128, 16, 5)),
    ("paper", [], (200, 500, 256, 64, 30)),
    ("quick", ["--epochs", "3", "--resolution", "64"], (3, 200, 64, 16, 5)),  # an option given wins
])
def test_preset_fills_what_is_not_given(monkeypatch, tmp_path, preset, given, expected):
    seen = _captured_evaluate(monkeypatch)
    result = runner.invoke(cli.app, ["evaluate", "--generated", str(tmp_path), "--data", str(tmp_path), "--preset", preset,
                                     *given])
    assert result.exit_code == 0, result.output
    loc, cls = seen["localization"], seen["classification"]
    assert (loc.epochs, loc.samples_per_epoch, loc.resolution, loc.base, cls.epochs) == expected
    assert seen["say"] is not None and seen["warn"] is not None


def test_unknown_preset_is_one_line(tmp_path):
    result = runner.invoke(cli.app, ["evaluate", "--generated", str(tmp_path), "--data", str(tmp_path), "--preset", "fast"])
    assert result.exit_code == 2 and "--preset" in result.output and "quick" in result.output


def test_estimate_counts_steps_and_warns_past_the_threshold(monkeypatch):
    monkeypatch.setattr(presets, "throughput", lambda device: 1e9)
    settings = {"epochs": 2, "samples_per_epoch": 16, "resolution": 32, "base": 4, "batch_size": 8, "cls_epochs": 1}
    about = dict(test_images=8, generated=16, metrics=["localization"], protocol="clean", eval_every=1)
    one = presets.estimate_seconds(settings, torch.device("cpu"), **about)["localization"]
    two = presets.estimate_seconds({**settings, "epochs": 4}, torch.device("cpu"), **about)["localization"]
    assert 1.8 < two / one < 2.0  # twice the training steps, the same single test pass
    said, warned = [], []
    presets.announce(settings, torch.device("cpu"), runs=1, say=said.append, warn=warned.append, **about)
    assert said and said[0].startswith("estimated time on cpu: ") and not warned
    slow = {"epochs": 10 ** 6}  # past the threshold; the quick preset's estimate follows its settings
    monkeypatch.setattr(presets, "estimate_seconds", lambda s, *a, **k: {"localization": s["epochs"] * 3600.0})
    presets.announce({**settings, **slow}, torch.device("cpu"), runs=1, say=said.append, warn=warned.append, **about)
    assert len(said) == 1 and "41666.7 days" in warned[0] and "`preset` quick takes about 10.0 h" in warned[0]


def test_generate_that_must_train_says_so_and_takes_max_steps(monkeypatch, tmp_path, tiny, fake_method):
    result = runner.invoke(cli.app, ["generate", "--method", "fake", "--data", str(tiny), "--out", str(tmp_path),
                                     "--num", "1", "--max-steps", "7", "--time-budget", "0.5"])
    assert result.exit_code == 0, result.output
    assert "fake has no fitted model (--checkpoint): training it first" in result.output
    assert "(7 steps, at most 0.5 min)" in result.output
    assert '"max_steps": 7' in (tmp_path / "nut" / "run.json").read_text()


def test_a_time_budgeted_bar_shows_the_steps_its_budget_allows(monkeypatch):
    from anomalygen import progress

    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = progress.Bar(30000, "training", time_budget_s=10.0)
    for _ in range(4):  # 2 steps per second
        clock[0] += 0.5
        bar.update(1)
    task = bar._progress.tasks[0]
    assert task.total == 4 + 16  # 8 s left at 2 steps/s
    bar.close()
    assert task.total == 4 and not progress._active


def test_a_bar_in_a_log_writes_a_line_with_its_time_left_every_minute(monkeypatch):
    import io

    from rich.console import Console

    from anomalygen import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    for terminal in (False, True):
        log = io.StringIO()
        with progress.display(Console(file=log, force_terminal=terminal, width=200)):
            bar = progress.Bar(100, "training", initial=10)
            for step in range(1, 8):  # 20 s a step: a line at 60 s and at 120 s
                clock[0] += 20.0
                bar.set_postfix(loss=f"0.{step}")
                bar.update(1)
            bar.close()
        lines = [line for line in log.getvalue().splitlines() if "elapsed" in line]
        if terminal:
            assert lines == []  # the live bar shows it
        else:  # 87 steps left at 20 s, then 84
            assert lines == ["training: 13/100, 0:01:00 elapsed, ~0:29:00 left loss=0.3",
                             "training: 16/100, 0:02:00 elapsed, ~0:28:00 left loss=0.6"]


def test_generate_writes_a_preview_of_every_type_and_prints_the_next_commands(tmp_path, tiny, fake_method):
    from anomalygen.data import load_image

    result = runner.invoke(cli.app, ["generate", "--method", "fake", "--data", str(tiny), "--out", str(tmp_path),
                                     "--num", "10"])
    assert result.exit_code == 0, result.output
    assert f"preview: {tmp_path / 'nut-preview.png'}" in result.output
    assert f"anomalygen evaluate --generated {tmp_path} --data {tiny}" in result.output
    preview = load_image(tmp_path / "nut-preview.png")
    cell, pad, header = 160, 4, 18
    assert preview.shape[0] == header + 8 * (cell + pad) + pad  # 8 rows of 10 samples
    # the rows take each type in turn: sample 0, 1, 2 (one per type), then 3, 4, 5, ...
    from anomalygen.visualize import pick

    entries = [{"defect_type": t, "index": i} for i, t in enumerate(["a", "a", "a", "b", "c"])]
    assert [e["index"] for e in pick(entries, 4)] == [0, 3, 4, 1]
    # the overlay contrasts with the defect: cyan-ish on a red stain, red on grey
    from anomalygen.visualize import contrasting

    red = np.zeros((4, 4, 3), np.uint8) + np.array([220, 30, 0], np.uint8)
    assert contrasting(red, np.ones((4, 4), bool)) == (0, 220, 255)
    assert contrasting(np.full((4, 4, 3), 128, np.uint8), np.ones((4, 4), bool)) == (255, 0, 0)


def test_evaluate_and_benchmark_print_their_key_figures_as_a_table(monkeypatch, tmp_path):
    report = {"category": "nut", "generated_counts": {"dent": 3}, "notes": [], "files": ["r.json", "r.html"],
              "localization": {"clean": {"pixel_ap": 0.123456, "pixel_au_pro": 0.5, "pixel_auroc": 0.9, "image_auroc": None}},
              "classification": {"accuracy": 0.75}, "inception_score": {"skipped": "no weights"}, "ic_lpips": {"mean": 0.25},
              "validity": {"all": {"rejected_first": 0.4}}}
    monkeypatch.setattr("anomalygen.evaluation.run.evaluate", lambda *a, **k: report)
    result = runner.invoke(cli.app, ["evaluate", "--generated", str(tmp_path), "--data", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for row in ("U-Net pixel AP (last epoch)", "0.123", "ResNet-34 accuracy", "0.750", "IS", "skipped", "IC-LPIPS", "0.250",
                "first draws rejected by the validity checks", "40%"):
        assert row in result.stdout
    monkeypatch.setattr("anomalygen.benchmark.benchmark", lambda *a, **k: {"reports": {"nut": {"cutpaste": report}},
                                                                           "timings_s": {"cutpaste": 1.0}})
    result = runner.invoke(cli.app, ["benchmark", "--data", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "cutpaste" in result.stdout and "0.123" in result.stdout and "0.750" in result.stdout


def test_no_hub_request_for_local_folders_and_offline_once_unreachable(monkeypatch, tmp_path):
    from anomalygen import network

    attempts = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(network.socket, "create_connection", lambda *a, **k: attempts.append(a) or (_ for _ in ()).throw(OSError()))
    assert network.offline_unless_reachable([tmp_path]) and not attempts  # a local folder: no request at all
    assert network.os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert network.offline_unless_reachable([None, "some/hub-id"]) and len(attempts) == 1  # unreachable: offline
    assert network.os.environ["HF_HUB_OFFLINE"] == "1"
    assert network.offline_unless_reachable([None]) and len(attempts) == 1  # decided once: offline stays, no new try
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(network, "reachable", lambda url: True)
    assert not network.offline_unless_reachable(["some/hub-id"]) and "HF_HUB_OFFLINE" not in network.os.environ


def test_third_party_bars_and_advice_are_off_unless_the_user_set_them(monkeypatch):
    from anomalygen import network

    monkeypatch.setenv("DIFFUSERS_VERBOSITY", "info")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    network.quiet()
    assert network.os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and network.os.environ["DIFFUSERS_VERBOSITY"] == "info"


def test_a_grayscale_category_is_written_as_grayscale_pngs(tmp_path, fake_method):
    from PIL import Image

    root = make_tiny_dataset(tmp_path / "data", n_good=2)
    for path in root.rglob("*.png"):
        if "ground_truth" not in path.parts:
            Image.open(path).convert("L").save(path)
    out = pipeline.generate("fake", root / "nut", tmp_path / "out", 2)
    images = sorted((out.out / "test").rglob("*.png"))
    assert images and all(Image.open(p).mode == "L" for p in images)
    colour = pipeline.generate("fake", make_tiny_dataset(tmp_path / "rgb", n_good=2) / "nut", tmp_path / "o2", 1)
    assert all(Image.open(p).mode == "RGB" for p in (colour.out / "test").rglob("*.png"))
    rgb = np.zeros((2, 2, 3), np.uint8) + np.array([10, 20, 30], np.uint8)
    assert pipeline.to_gray(np.full((2, 2, 3), 77, np.uint8)).tolist() == [[77, 77], [77, 77]]  # exact on grey pixels
    assert pipeline.to_gray(rgb)[0, 0] == round(0.299 * 10 + 0.587 * 20 + 0.114 * 30)


def test_methods_lists_kind_base_model_paper_and_default_base():
    result = runner.invoke(cli.app, ["methods"])
    assert result.exit_code == 0
    facts = cli.method_facts()
    assert facts["cutpaste"] == {"kind": "model-free, no learning", "needs_base": False, "default_base": "—",
                                 "paper": 'Li et al. 2021, CVPR, "CutPaste: self-supervised learning for anomaly '
                                          'detection and localization", Sec. 3.1'}
    assert facts["anomalydiffusion"]["default_base"] == "CompVis/ldm-text2im-large-256"
    assert facts["dualanodiff"]["needs_base"] and facts["dualanodiff"]["paper"].endswith("CVPR 2025")
    assert facts["textual-inversion"]["paper"] == 'Gal et al., "An Image is Worth One Word", ICLR 2023'
    assert all(facts[name]["paper"] != "—" for name in facts)
    for name in facts:
        assert name in result.stdout


def test_pr_curves_carry_their_ap_and_the_chance_line(monkeypatch):
    from anomalygen.evaluation import figures

    monkeypatch.setattr(figures, "to_array", lambda figure: figure)
    curve = {"recall": [0.0, 0.5, 1.0], "precision": [1.0, 0.6, 0.1], "chance": 0.1}
    figure = figures.pr_curves({"cutpaste": curve, "draem": {"recall": [0, 1], "precision": [1, 0.1]}},
                               {"cutpaste": 0.4567, "draem": None}, "pixel")
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["cutpaste (AP 0.457)", "draem (AP undefined)",
                                                                      "chance (0.100)"]
    assert list(axes.lines[-1].get_ydata()) == [0.1, 0.1]  # the chance line, horizontal at the positive share
    matrix = figures.confusion([[3, 1], [0, 2]], ["cut", "hole"]).axes[0]
    assert [t.get_text() for t in matrix.texts] == ["3", "1", "0", "2"]
    assert matrix.images[0].get_array().tolist() == [[0.75, 0.25], [0.0, 1.0]]  # colour: share of the true type


def test_the_report_page_wires_ap_curves_training_and_per_type_figures(monkeypatch, tmp_path):
    from anomalygen.evaluation import figures, report as report_module
    from anomalygen.types import DefectExample

    calls = {}
    for name in ("pr_curves", "training_curve", "confusion"):
        monkeypatch.setattr(figures, name, lambda *a, _n=name, **k: calls.setdefault(_n, []).append(a) or np.zeros((4, 4, 3), np.uint8))
    history = [{"epoch": 1, "loss": 0.5, "pixel_ap": 0.2, "image_ap": 0.6}, {"epoch": 2, "loss": 0.3, "pixel_ap": 0.3, "image_ap": 0.7}]
    metrics = dict.fromkeys(report_module.LOCALIZATION_KEYS, 0.5)
    loc = {"config": {"base": 4, "resolution": 32, "epochs": 2, "samples_per_epoch": 4}, "test_images": {"good": 1},
           "history": history, "clean": {"epoch": 2, **metrics}, "per_type": {"dent": {**metrics, "pixel_ap": 0.875}},
           "pr_curves": {"pixel": {"recall": [0, 1], "precision": [1, 0], "chance": 0.01},
                         "image": {"recall": [0, 1], "precision": [1, 0], "chance": 0.5}}}
    example = lambda v: DefectExample(np.full((8, 8, 3), v, np.uint8), np.eye(8, dtype=bool), "dent")
    report = {"category": "nut", "generated_counts": {"dent": 1}, "notes": ["first note", "second note"], "localization": loc,
              "classification": {"weights": "random", "accuracy": 0.5, "classes": ["dent", "hole"],
                                 "confusion_matrix": [[1, 0], [1, 0]]}}
    _, page = report_module.write_report(report, tmp_path, {"dent": [example(200)]}, {"dent": [example(10), example(20)]})
    html = page.read_text()
    assert "<li>first note</li><li>second note</li>" in html
    assert "Localisation per defect type" in html and "<td>dent</td><td>0.5</td><td>0.875</td>" in html
    assert [(list(a[0]), a[1]) for a in calls["pr_curves"]] == [(["generated"], {"generated": 0.3}),
                                                                 (["generated"], {"generated": 0.7})]
    assert calls["training_curve"][0][0] is history and calls["confusion"][0] == ([[1, 0], [1, 0]], ["dent", "hole"])
    assert "2 real training defects, then 1 generated" in html


def test_a_bad_real_file_names_skip_bad_and_is_warned_about_before_the_work(monkeypatch, tmp_path, fake_method):
    from PIL import Image

    root = make_tiny_dataset(tmp_path / "data") / "nut"
    pipeline.generate("fake", root, tmp_path / "out", 2)
    mask = sorted((root / "ground_truth" / "dent").glob("*.png"))[-1]
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(mask)
    command = ["evaluate", "--generated", str(tmp_path / "out"), "--data", str(root), "--metrics", "localization"]
    result = runner.invoke(cli.app, command)
    assert result.exit_code == 2 and "mask is all zero" in result.output and "--skip-bad leaves bad real files out" in result.output
    monkeypatch.setattr("anomalygen.evaluation.run.run_localization", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    result = runner.invoke(cli.app, [*command, "--skip-bad", "--preset", "quick", "--resolution", "32", "--base", "4"])
    assert result.exit_code == 130 and f"warning: skipped bad real file: {mask}" in result.output  # before the U-Net
