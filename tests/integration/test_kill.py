"""kill -9 at random moments: a killed `generate`, re-run, ends byte-identical to an uninterrupted run;
two processes on one folder never both write it.

A few kills of a model-free run in CI; set ANOMALYGEN_KILLS=50 for more, which also runs the kill loop
on a fitted tiny textual-inversion model (a minute or more: torch imports dominate each restart).
ANOMALYGEN_KILL_SEED picks the moments.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from anomalygen.io import MANIFEST, read_manifest

from tests.helpers.cli_harness import cli_command, cli_env, run_cli
from tests.integration.test_pipeline import make_tiny_dataset, tree_bytes

KILLS = int(os.environ.get("ANOMALYGEN_KILLS", "3"))
SEED = int(os.environ.get("ANOMALYGEN_KILL_SEED", "0"))


def kill_loop(args: list, kills: int, rng: random.Random) -> list[int]:
    """Start ``anomalygen ARGS`` and SIGKILL it at a random moment, ``kills`` times (or until every
    sample is written); return the number of finished samples each kill left.

    A moment is a manifest length k this process will reach (or "during start-up") and a delay: the
    kill comes that long after the manifest has k lines, so it lands anywhere in the writing of the
    next sample (its image, its mask or its manifest line) or in the exit, not mostly in the imports.
    """
    out = Path(args[args.index("--out") + 1])
    num = int(args[args.index("--num") + 1])
    left: list[int] = []
    while len(left) < kills:
        done = len(read_manifest(out / "nut" / MANIFEST))
        if done == num:
            return left  # every sample is written: the next run only checks
        process = subprocess.Popen(cli_command(*args), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        target = rng.randint(done, num)
        if target == done:
            time.sleep(rng.uniform(0.0, 3.0))
        else:
            while process.poll() is None and len(read_manifest(out / "nut" / MANIFEST)) < target:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.05))
        if process.poll() is not None:
            assert process.returncode == 0, process.stderr.read()
            return left  # finished before the kill: the run is complete
        process.send_signal(signal.SIGKILL)
        process.wait()
        left.append(len(read_manifest(out / "nut" / MANIFEST)))
    return left


def _croppaste(tmp_path: Path, data: Path) -> list:
    return ["--method", "croppaste", "--num", 12, "--keep-failing"]  # (the tiny data's one defect per type: strict checks)


def _textual_inversion(tmp_path: Path, data: Path) -> list:
    """A fitted tiny textual-inversion model (random-init backbone, 32 px, 2 denoising steps)."""
    from anomalygen import pipeline

    options = {"model": "tiny", "device": "cpu", "resolution": 32, "max_steps": 2, "batch_size": 2,
               "num_inference_steps": 2, "checkpoint_every": 0}
    model = pipeline.fit("textual-inversion", data, tmp_path / "model", category="nut", options=options)
    return ["--checkpoint", model, "--num", 8]


SLOW = pytest.mark.skipif("ANOMALYGEN_KILLS" not in os.environ, reason="set ANOMALYGEN_KILLS to run it")


@pytest.mark.parametrize("setup", [_croppaste, pytest.param(_textual_inversion, marks=SLOW)],
                         ids=["croppaste", "textual-inversion-tiny"])
def test_generate_killed_at_random_moments_ends_identical(tmp_path, setup):
    data = make_tiny_dataset(tmp_path / "data")
    base = ["generate", "--data", data, "--category", "nut", "--seed", 1, *setup(tmp_path, data)]
    assert run_cli(*base, "--out", tmp_path / "whole").returncode == 0
    rng = random.Random(SEED)
    left = []
    while len(left) < KILLS:  # a run that finishes before its kill starts over in a fresh folder
        killed = tmp_path / f"killed{len(left)}"
        left += kill_loop([*base, "--out", killed], KILLS - len(left), rng)
        result = run_cli(*base, "--out", killed)
        assert result.returncode == 0, result.output
        assert tree_bytes(killed) == tree_bytes(tmp_path / "whole")
    print(f"{len(left)} kills (samples done at each: {left}), every finished result identical")


def test_two_processes_on_one_folder_never_both_write(tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    args = ["generate", "--method", "croppaste", "--data", data, "--category", "nut", "--num", 30, "--out", tmp_path / "o",
            "--keep-failing"]
    processes = [subprocess.Popen(cli_command(*args), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in processes]
    indices = [entry["index"] for entry in read_manifest(tmp_path / "o" / "nut" / MANIFEST)]
    assert indices == list(range(30))  # each sample once
    codes = sorted(code for code, _ in results)
    refused = [err for code, err in results if code == 2]
    if codes == [0, 2]:
        assert "in use by another anomalygen generate (pid" in refused[0] and "started" in refused[0]
    else:  # the second started after the first had finished: nothing left to do
        assert codes == [0, 0] and any("(0 new)" in err for _, err in results), results
