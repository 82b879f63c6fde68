"""SIGKILL `anomalygen fit` (AnomalyDiffusion, tiny preset) at random moments, re-run it to the end and
compare with an uninterrupted fit: the model folder byte-identical (weights, generator.json, the
loss log in anomalydiffusion.json) and the work_dir's loss.csv identical except ``elapsed_s``
(wall time, which a killed run cannot reproduce).

Few kills in CI; ``ANOMALYGEN_KILLS=N`` for more, ``ANOMALYGEN_KILL_SEED`` for other moments.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import anomalygen
from anomalygen.data.demo import make_demo_dataset

from tests.helpers.cli_harness import run_cli, snapshot

# the package under test, whatever the subprocess's cwd (PYTHONPATH=src is relative)
ENV = {"PYTHONPATH": str(Path(anomalygen.__file__).parents[1]), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

KILLS = int(os.environ.get("ANOMALYGEN_KILLS", "2"))
SEED = int(os.environ.get("ANOMALYGEN_KILL_SEED", "0"))


def _command(data: Path) -> list[str]:
    # relative --out / work_dir: generator.json stores them as given, so both folders compare equal
    return ["fit", "--method", "anomalydiffusion", "--data", str(data), "--category", "fabric", "--out", "model",
            "--model", "tiny", "--max-steps", "8", "--device", "cpu", "--set", "resolution=32", "--set", "batch_size=2",
            "--set", "checkpoint_every=2", "--set", 'spatial_encoder="tiny"', "--set", 'mask_source="augment"',
            "--set", "num_anomaly_tokens=2", "--set", "work_dir=work"]


def _popen(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "NO_COLOR": "1", **ENV}
    return subprocess.Popen([sys.executable, "-m", "anomalygen.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _log(work: Path) -> list[list[str]]:
    """loss.csv without the elapsed_s column."""
    with (work / "loss.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "loss", "lr", "elapsed_s"]
    return [row[:3] for row in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data"), n_good=3, n_test_good=1, n_defect=3, size=64,
                             categories=("fabric",))


@pytest.mark.slow
def test_killed_fit_rerun_equals_uninterrupted(data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    # the uninterrupted fit (in this process: no interpreter start), and its training time
    assert run_cli(*_command(data), cwd=straight, env=ENV).returncode == 0
    with (straight / "work" / "loss.csv").open(newline="") as handle:
        span = float(list(csv.DictReader(handle))[-1]["elapsed_s"])

    rng = random.Random(SEED)
    moments, startup = [], None
    for kill in range(KILLS):
        # the first kill while training (it times a process's start), then half of them anywhere
        # (the start included), half while training or saving
        before = _inode(killed / "work" / "loss.csv")
        process, began = _popen(_command(data), killed), time.monotonic()
        if kill and rng.random() < 0.5:
            time.sleep(rng.uniform(0, startup + span))
        else:
            while _inode(killed / "work" / "loss.csv") == before and process.poll() is None:
                time.sleep(0.005)
            startup = startup or time.monotonic() - began
            time.sleep(rng.uniform(0, span))
        process.send_signal(signal.SIGKILL)
        process.wait()
        moments.append(process.returncode)
    finished = run_cli(*_command(data), cwd=killed, env=ENV)
    assert finished.returncode == 0, finished.output

    assert -signal.SIGKILL in moments or KILLS == 0  # at least one run really died mid-way
    assert snapshot(killed / "model") == snapshot(straight / "model")
    assert _log(killed / "work") == _log(straight / "work")
    assert [row[0] for row in _log(killed / "work")[1:]] == [str(s) for s in range(1, 9)]


def test_a_save_killed_midway_leaves_nothing_behind_after_the_next_save(data, tmp_path):
    """Every model file is written atomically (``.NAME.*.partial`` then rename); the next save
    removes a killed save's temporaries, so the folder equals an uninterrupted save's."""
    from anomalygen import pipeline
    from anomalygen.methods.base import create

    _, defects, goods = pipeline.load_training(data, "fabric")
    generator = create("croppaste")
    generator.fit(defects, goods)
    generator.save(tmp_path / "clean")
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / ".crops.json.abc.partial").write_text("half")
    generator.save(tmp_path / "killed")
    assert snapshot(tmp_path / "killed") == snapshot(tmp_path / "clean")
