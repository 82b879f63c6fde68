"""A user's first hour (issue 32): CPU-safe presets and an up-front estimate, a method that must
train first says so and takes --max-steps, a time-budgeted bar ends with its budget, results in
sight (preview.png, next commands, tables), and readable reports."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from anomalygen import cli, pipeline
from anomalygen.evaluation import presets
from test_pipeline import fake_method, make_tiny_dataset  # noqa: F401  (fixture)

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny")) / "nut"


def _captured_evaluate(monkeypatch):
    seen = {}

    def fake(generated, data, **kwargs):
        seen.update(kwargs)
        return {"notes": [], "files": ["r.json", "r.html"], "category": "nut"}

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
    monkeypatch.setattr(presets, "throughput", lambda device: 1e3)  # a slow device: past the threshold
    presets.announce(settings, torch.device("cpu"), runs=1, say=said.append, warn=warned.append, **about)
    assert len(said) == 1 and "days" in warned[0] and "--preset quick takes about" in warned[0]


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
