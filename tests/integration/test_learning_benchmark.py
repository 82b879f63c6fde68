"""benchmarks/learning.py: every row (methods + untrained controls) in the table, resumed cells, one-line errors."""

import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image


torch.set_num_threads(1)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "learning.py"
TINY = ["--model", "tiny", "--seeds", "0", "--num-per-type", "1", "--resolution", "32", "--steps", "2",
        "--sampling-steps", "1", "--batch-size", "2", "--epochs", "1", "--samples-per-epoch", "2", "--unet-base", "4",
        "--set", "dualanodiff.max_steps=1", "--set", "dualanodiff.rank=2",
        # one draw per sample: random tiny models' samples fail the validity checks, and redrawing them
        # (test_validity's) only repeated the generation
        "--max-attempts", "1", "--keep-failing"]


@pytest.fixture(scope="module")
def learning():
    return runpy.run_path(str(SCRIPT))


@pytest.mark.slow
def test_table_has_every_row_controls_train_zero_steps_and_a_rerun_resumes_every_cell(learning, demo_root, tmp_path,
                                                                                      monkeypatch, capsys):
    """The tiny benchmark, checked, then run again (one test: a fixture shared by two was built on both xdist workers)."""
    argv = ["--data", str(demo_root / "fabric"), "--out", str(tmp_path), *TINY]
    assert learning["main"](argv) == 0
    out = tmp_path
    rows = ["cutpaste", "croppaste", "draem", "textual-inversion", "textual-inversion (untrained)", "anomalydiffusion",
            "anomalydiffusion (untrained)", "dualanodiff", "dualanodiff (untrained)"]
    result = json.loads((out / "learning.json").read_text())
    assert [r["row"] for r in result["tables"]["results"]] == rows
    assert all(0.0 <= r["pixel_ap"] <= 1.0 and 0.0 <= r["pixel_au_pro"] <= 1.0 for r in result["cells"])
    steps = {r["row"]: r["steps"] for r in result["cells"]}
    assert steps["textual-inversion"] == steps["anomalydiffusion"] == 2 and steps["dualanodiff"] == 3  # 1 step × 3 types
    assert steps["textual-inversion (untrained)"] == steps["anomalydiffusion (untrained)"] == steps["dualanodiff (untrained)"] == 0
    # trained and control differ only by the zero-step budget
    options = {r["row"]: r["options"] for r in result["cells"]}
    assert {k: v for k, v in options["dualanodiff (untrained)"].items() if k not in ("time_budget_s", "work_dir")} == \
        {k: v for k, v in options["dualanodiff"].items() if k != "work_dir"}
    markdown = (out / "learning.md").read_text()
    assert all(f"| {row} |" in markdown for row in rows)
    assert "| textual-inversion | fabric − untrained | " not in markdown and "| method | fabric − untrained | fabric − croppaste |" in markdown
    assert (out / "samples-fabric.png").stat().st_size > 0

    # a rerun resumes every cell
    capsys.readouterr()
    before = (out / "learning.json").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setitem(learning["run_cell"].__globals__, "benchmark", refuse)
    assert learning["main"](argv) == 0
    assert capsys.readouterr().out.count("(resumed)") == 9
    assert json.loads((out / "learning.json").read_text())["cells"] == [
        {**c, "resumed": True} for c in json.loads(before)["cells"]]


def test_deltas_are_paired_by_seed_with_sign(learning):
    records = [{"dataset": "d", "row": row, "seed": s, "pixel_ap": ap, "pixel_au_pro": 0.5, "steps": None}
               for row, aps in {"croppaste": (0.30, 0.20), "textual-inversion": (0.25, 0.40),
                                "textual-inversion (untrained)": (0.20, 0.10)}.items() for s, ap in enumerate(aps)]
    table = learning["tables"](records, ["d"], ["croppaste", "textual-inversion", "textual-inversion (untrained)"], [0, 1])
    (delta,) = table["deltas"]
    assert delta["d − untrained"] == "+0.175 (+0.050, +0.300)"
    assert delta["d − croppaste"] == "+0.075 (-0.050, +0.200)"
    assert table["results"][1]["d pixel AP"] == "0.325 (0.250, 0.400)"


@pytest.mark.parametrize("argv, message", [
    (["--data", "/nonexistent/tile"], "--data /nonexistent/tile: folder not found"),
    (["--prior", "tile=/nowhere"], "--prior 'tile=/nowhere'"),
    (["--methods", "cutpaste,bogus"], "--methods: unknown bogus"),
    (["--set", "textual-inversion.lr=-1"], "textual-inversion"),
])
def test_a_broken_run_reports_one_line(argv, message, demo_root, tmp_path, monkeypatch, capsys):
    base = ["--data", str(demo_root / "fabric"), "--out", str(tmp_path / "out"), *TINY]
    monkeypatch.setattr("sys.argv", [str(SCRIPT), *base, *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_crashing_cell_is_one_line_and_the_others_run(learning, demo_root, tmp_path, monkeypatch, capsys):
    real = learning["run_cell"].__globals__["benchmark"]

    def crash_croppaste(data, methods, *args, **kwargs):
        if methods == ["croppaste"]:
            raise RuntimeError("stack expects each tensor to be equal size\nsecond line")
        return real(data, methods, *args, **kwargs)

    monkeypatch.setitem(learning["run_cell"].__globals__, "benchmark", crash_croppaste)
    argv = ["--data", str(demo_root / "fabric"), "--out", str(tmp_path), *TINY, "--methods", "cutpaste,croppaste"]
    assert learning["main"](argv) == 1
    failed = [line for line in capsys.readouterr().err.splitlines() if "FAILED" in line or "Traceback" in line]
    assert failed == ["FAILED fabric seed 0 croppaste: RuntimeError: stack expects each tensor to be equal size"]
    assert "Traceback" in (tmp_path / "cells" / "fabric" / "seed-0" / "croppaste" / "error.txt").read_text()
    result = json.loads((tmp_path / "learning.json").read_text())
    assert [c["row"] for c in result["cells"]] == ["cutpaste"] and len(result["failures"]) == 1


def test_resized_copy_keeps_layout_and_masks(learning, demo_root, tmp_path):
    from anomalygen.data import load_category, load_defects

    source = tmp_path / "fabric"
    shutil.copytree(demo_root / "fabric", source)
    gray = sorted((source / "train" / "good").glob("*.png"))[0]
    Image.open(gray).convert("L").save(gray)
    copy = learning["resized_copy"](source, 64, tmp_path / "copy")
    original, resized = load_category(source), load_category(copy)
    assert resized.defect_types == original.defect_types and len(resized.train_good) == len(original.train_good)
    defects = load_defects([r for records in resized.defects.values() for r in records])
    assert all(d.image.shape == (64, 64, 3) and d.mask.shape == (64, 64) and d.mask.any() for d in defects)
    assert Image.open(copy / "train" / "good" / gray.name).mode == "L"  # grayscale stays one channel (smaller files)
    assert Image.open(resized.train_good[-1].path).mode == "RGB"


def test_each_seed_seeds_the_unet_too(learning, demo_root, tmp_path):
    argv = ["--data", str(demo_root / "fabric"), "--out", str(tmp_path), *TINY, "--methods", "cutpaste"]
    argv[argv.index("--seeds") + 1] = "1"
    assert learning["main"](argv) == 0
    report = json.loads((tmp_path / "cells" / "fabric" / "seed-1" / "cutpaste" / "cutpaste" / "fabric" / "report.json").read_text())
    assert report["localization"]["config"]["seed"] == 1


@pytest.mark.parametrize("flag", [False, True])
def test_prior_defects_reaches_pretrain(learning, demo_root, tmp_path, monkeypatch, flag):
    seen = []

    def fake_pretrain(data, out, config, say):
        seen.append(config.include_defects)
        return {}

    monkeypatch.setitem(learning["prior_for"].__globals__, "pretrain", fake_pretrain)
    args = learning["parse"](["--data", str(demo_root / "fabric"), "--out", str(tmp_path), *(["--prior-defects"] if flag else [])])
    learning["prior_for"]("fabric", demo_root / "fabric", args)
    assert seen == [flag]
