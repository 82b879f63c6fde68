"""The robustness harness (issue 11): malformed inputs and faults through the real CLI (its entry point, run in
this process by `cli_harness.run_cli`; a few cases in a fresh interpreter).

Each case builds its fault in a fresh copy of a small world (a tiny dataset, an output folder
holding a finished 3-sample run, and a sibling ``outside`` folder that symbolic links point to),
runs ``anomalygen`` and asserts: exit 2, no traceback, one ``error:`` line naming the offending
path or option, nothing changed in the dataset or outside, and every output written before
still byte-identical. ``cli_harness.CASES`` counts the cases run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from anomalygen import pipeline
from anomalygen.generation.writer import RUN_FILE
from anomalygen.io import LOCK_FILE, MANIFEST

from tests.helpers import cli_harness
from tests.helpers.cli_harness import (assert_kept, assert_unchanged, assert_user_error, lock_held_elsewhere, run_cli,
                                       run_cli_process, snapshot)
from tests.integration.test_cli import BREAKERS
from tests.integration.test_pipeline import make_tiny_dataset, tree_bytes

METHOD = "croppaste"  # model-free and fast


@dataclass
class World:
    root: Path
    data: Path  # dataset root; category "nut"
    out: Path  # output root; out/nut holds a finished run of 3 samples (seed 0)
    outside: Path  # a folder the tool must never touch

    @property
    def nut(self) -> Path:
        return self.out / "nut"

    def generate(self, *extra, out=None) -> list:
        out = self.out if out is None else out
        # --keep-failing: the tiny data's one real defect per type makes the validity checks strict
        return ["generate", "--method", METHOD, "--data", self.data, "--category", "nut", "--out", out, "--keep-failing", *extra]

    def fit(self, out) -> list:
        return ["fit", "--method", METHOD, "--data", self.data, "--category", "nut", "--out", out]

    def evaluate(self, *extra) -> list:
        return ["evaluate", "--generated", self.out, "--data", self.data, "--category", "nut", "--metrics", "localization",
                "--epochs", 1, "--samples-per-epoch", 2, "--resolution", 32, "--base", 4, "--device", "cpu", *extra]

    def sample(self, index: int) -> Path:
        entry = json.loads((self.nut / MANIFEST).read_text().splitlines()[index])
        return self.nut / entry["image"]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    make_tiny_dataset(root / "data")
    (root / "outside" / "victim").mkdir(parents=True)
    (root / "outside" / "victim" / "keep.txt").write_text("not anomalygen's\n")
    return root


@pytest.fixture()
def world(template, tmp_path) -> World:
    shutil.copytree(template, tmp_path / "w", symlinks=True)
    w = World(tmp_path / "w", tmp_path / "w" / "data", tmp_path / "w" / "out", tmp_path / "w" / "outside")
    pipeline.generate(METHOD, w.data, w.out, 3, category="nut", seed=0, keep_failing=True)
    return w


@dataclass
class Case:
    name: str
    setup: Callable[[World], tuple[list, list]]  # -> (CLI args, fragments the error line must hold)
    fault: str | None = None  # a simulated OS fault (cli_faults)
    hold_lock: bool = False  # another process holds out/nut's lock while the CLI runs (its pid is in the line)
    env: dict | None = None  # the CLI's environment variables


def _data_case(breaker) -> Case:
    def setup(w: World):
        relative, problem = breaker(w.data / "nut")
        return w.generate("--num", 5), [str(w.data / "nut" / relative), problem]

    return Case("data-" + breaker.__name__[6:].replace("_", "-"), setup)


def _link(w: World, inside: Path, *, copy: bool = True) -> Path:
    """Replace ``inside`` (under out/nut) by a link to a copy of it in ``outside``."""
    target = w.outside / ("copy-" + inside.name)
    if copy:
        (shutil.copytree if inside.is_dir() else shutil.copy2)(inside, target)
        shutil.rmtree(inside) if inside.is_dir() and not inside.is_symlink() else inside.unlink()
    inside.symlink_to(target)
    return inside


def _first_type(w: World) -> str:
    return sorted(p.name for p in (w.nut / "test").iterdir())[0]


def _corrupt_line(w: World, index: int, change: Callable[[dict], object], raw: bool = False) -> None:
    lines = (w.nut / MANIFEST).read_text().splitlines()
    changed = change(json.loads(lines[index]))
    lines[index] = changed if raw else json.dumps(changed)
    (w.nut / MANIFEST).write_text("\n".join(lines) + "\n")


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a file, not a folder\n")
    return path


CASES = [
    *(_data_case(b) for b in BREAKERS),
    Case("data-folder-missing", lambda w: (["generate", "--method", METHOD, "--data", w.root / "nope", "--out", w.out,
                                            "--num", 3], [str(w.root / "nope"), "folder not found"])),
    Case("data-unknown-category", lambda w: (["generate", "--method", METHOD, "--data", w.data, "--category", "bolt",
                                              "--out", w.out, "--num", 3], ["unknown category 'bolt'"])),
    Case("data-train-good-unreadable", lambda w: (w.generate("--num", 5), [str(w.data / "nut/train/good"),
                                                                           "permission denied"]),
         fault="noread:{data}/nut/train/good"),
    Case("option-unknown-method", lambda w: (["generate", "--method", "nosuch", "--data", w.data, "--out", w.out,
                                              "--num", 3], ["unknown method 'nosuch'"])),
    Case("option-set-malformed", lambda w: (w.generate("--num", 3, "--set", "novalue"), ["--set", "key=value"])),
    Case("option-checkpoint-not-a-model", lambda w: (["generate", "--checkpoint", w.data, "--data", w.data, "--out",
                                                      w.out, "--num", 3], [str(w.data), "not a saved anomalygen model"])),
    # 9: --num
    Case("num-smaller-than-done", lambda w: (w.generate("--num", 2), [str(w.nut), "holds 3 samples", "--num 2"])),
    Case("num-zero", lambda w: (w.generate("--num", 0), ["--num 0"])),
    Case("num-negative", lambda w: (w.generate("--num", -4), ["--num -4"])),
    Case("num-huge", lambda w: (w.generate("--num", 10**20), [f"--num {10**20}", "1000000"])),
    Case("num-not-an-integer", lambda w: (w.generate("--num", "1e20"), ["'--num'", "integer", "generate --help"])),
    Case("option-unknown-flag", lambda w: (w.generate("--num", "3", "--colour", "red"), ["--colour"])),
    Case("option-missing-required", lambda w: (["generate", "--method", METHOD, "--data", w.data, "--num", "3"],
                                               ["Missing option", "'--out'"])),
    Case("option-unknown-command", lambda w: (["generat", "--data", w.data], ["No such command", "'generat'"])),
    # 3: symbolic links inside the output folder
    Case("link-test-overwrite", lambda w: (w.generate("--num", 3, "--seed", 5, "--overwrite"),
                                           [str(_link(w, w.nut / "test")), "symbolic link"])),
    Case("link-type-folder", lambda w: (w.generate("--num", 6),
                                        [str(_link(w, w.nut / "ground_truth" / _first_type(w))), "symbolic link"])),
    Case("link-sample-file", lambda w: (w.generate("--num", 3, "--seed", 5, "--overwrite"),
                                        [str(_link(w, w.sample(0))), "symbolic link"])),
    Case("link-manifest", lambda w: (w.generate("--num", 6), [str(_link(w, w.nut / MANIFEST)), "symbolic link"])),
    Case("link-run-json", lambda w: (w.generate("--num", 6), [str(_link(w, w.nut / RUN_FILE)), "symbolic link"])),
    Case("link-lock-file", lambda w: (w.generate("--num", 6), [str(_link(w, w.nut / LOCK_FILE)), "symbolic link"])),
    Case("link-category", lambda w: (w.generate("--num", 6), [str(_link(w, w.nut)), "symbolic link"])),
    # 4: output-side OS errors
    Case("out-is-a-file", lambda w: (w.generate("--num", 3, out=_file(w.root / "f")), [str(w.root / "f"), "not a folder"])),
    Case("out-inside-a-file", lambda w: (w.generate("--num", 3, out=_file(w.root / "f") / "sub"),
                                         [str(w.root / "f") + ":", "not a folder"])),
    Case("out-category-is-a-file", lambda w: (w.generate("--num", 3, out=_file(w.root / "o2" / "nut").parent),
                                              [str(w.root / "o2" / "nut"), "not a folder"])),
    Case("out-permission-denied", lambda w: (w.generate("--num", 6), [str(w.nut), "permission denied"]),
         fault="deny:EACCES:{out}"),
    Case("out-read-only-file-system", lambda w: (w.generate("--num", 6), [str(w.nut), "read-only file system"]),
         fault="deny:EROFS:{out}"),
    Case("out-new-folder-permission-denied", lambda w: (w.generate("--num", 3, out=w.root / "new"),
                                                        [str(w.root / "new"), "permission denied"]),
         fault="deny:EACCES:{root}/new"),
    Case("out-disk-full", lambda w: (w.generate("--num", 6), [str(w.nut), "disk full after 5 samples",
                                                             "free space and re-run to resume"]), fault="enospc:4"),
    Case("fit-out-is-a-file", lambda w: (w.fit(_file(w.root / "model")), [str(w.root / "model"), "not a folder"])),
    Case("demo-out-is-a-file", lambda w: (["demo", "--out", _file(w.root / "d"), "--methods", METHOD, "--num", 1],
                                          [str(w.root / "d"), "not a folder"])),
    Case("fit-out-permission-denied", lambda w: (w.fit(w.root / "model"), [str(w.root / "model"), "permission denied"]),
         fault="deny:EACCES:{root}/model"),
    # 5: a folder in use
    Case("lock-held", lambda w: (w.generate("--num", 6), [str(w.nut), "in use by another anomalygen generate"]),
         hold_lock=True),
    # 7, 10: tampered or corrupt state files
    Case("run-json-not-json", lambda w: ((w.nut / RUN_FILE).write_text("{oops") and w.generate("--num", 6),
                                         [str(w.nut / RUN_FILE), "corrupt (not valid JSON"])),
    Case("run-json-not-an-object", lambda w: ((w.nut / RUN_FILE).write_text("[1, 2]") and w.generate("--num", 6),
                                              [str(w.nut / RUN_FILE), "corrupt (not a JSON object)"])),
    Case("manifest-line-not-json", lambda w: (_corrupt_line(w, 1, lambda e: "not json {", raw=True) or w.generate("--num", 6),
                                              [str(w.nut / MANIFEST), "corrupt (line 2 is not valid JSON)"])),
    Case("manifest-line-not-an-object", lambda w: (_corrupt_line(w, 1, lambda e: [e]) or w.generate("--num", 6),
                                                   [str(w.nut / MANIFEST), "corrupt (line 2 is not a JSON object)"])),
    Case("manifest-image-null", lambda w: (_corrupt_line(w, 0, lambda e: {**e, "image": None}) or w.generate("--num", 6),
                                           [str(w.nut / MANIFEST), "corrupt (sample 0: image None"])),
    Case("manifest-image-escapes", lambda w: (_corrupt_line(w, 2, lambda e: {**e, "image": "../../../etc/passwd"})
                                              or w.generate("--num", 6),
                                              [str(w.nut / MANIFEST), "sample 2: image '../../../etc/passwd'"])),
    Case("manifest-mask-absolute", lambda w: (_corrupt_line(w, 1, lambda e: {**e, "mask": str(w.outside / "m.png")})
                                              or w.generate("--num", 6), [str(w.nut / MANIFEST), "sample 1: mask"])),
    Case("manifest-defect-type-escapes", lambda w: (_corrupt_line(w, 0, lambda e: {**e, "defect_type": "../.."})
                                                    or w.generate("--num", 6),
                                                    [str(w.nut / MANIFEST), "defect_type '../..'"])),
    # evaluation: output-side and option errors
    Case("evaluate-report-dir-is-a-file", lambda w: (w.evaluate("--report-dir", _file(w.root / "r")),
                                                     [str(w.root / "r"), "not a folder"])),
    Case("evaluate-epochs-zero", lambda w: (w.evaluate("--epochs", 0), ["--epochs got 0"])),
    # launched as several processes (accelerate launch, torchrun): only fit trains across them
    Case("launch-generate-as-two-processes", lambda w: (w.generate("--num", 6), ["`anomalygen generate` runs as one process, not 2",
                                                                                "--processes N"]), env={"WORLD_SIZE": "2", "RANK": "1"}),
    Case("launch-world-size-malformed", lambda w: (w.fit(w.root / "model"), ["WORLD_SIZE='two'"]), env={"WORLD_SIZE": "two"}),
    # seeds outside [0, 2**32 - 1], through every command that takes one; each writes into `outside`,
    # which must stay unchanged (a refused command creates nothing)
    Case("seed-negative", lambda w: (w.generate("--num", 3, "--seed", -1, out=w.outside / "new"),
                                     ["--seed -1", "from 0 to 4294967295"])),
    Case("seed-too-large", lambda w: (w.generate("--num", 3, "--seed", 2**32, out=w.outside / "new"), ["--seed 4294967296"])),
    Case("seed-option-too-large", lambda w: (["fit", "--method", "textual-inversion", "--model", "tiny", "--data", w.data,
                                              "--category", "nut", "--out", w.outside / "new", "--set", f"seed={2**32}"],
                                             ["option seed", "got 4294967296", "<= 4294967295"])),
    Case("pretrain-seed-negative", lambda w: (["pretrain", "--data", w.data, "--out", w.outside / "new", "--seed", -1,
                                               "--size", "tiny", "--resolution", 32, "--vae-steps", 1, "--max-steps", 0],
                                              ["--seed -1"])),
    Case("evaluate-seed-too-large", lambda w: (w.evaluate("--seed", 2**40, "--report-dir", w.outside / "new"),
                                               [f"--seed {2**40}"])),
    Case("demo-seed-negative", lambda w: (["demo", "--out", w.outside / "new", "--methods", METHOD, "--num", 1, "--seed", -3],
                                          ["--seed -3"])),
    Case("benchmark-seed-too-large", lambda w: (["benchmark", "--data", w.data, "--category", "nut", "--methods", METHOD,
                                                 "--out", w.outside / "new", "--seed", 2**64], [f"--seed {2**64}"])),
    # a model that does not load is found after the output folder was locked: the folder goes again
    Case("fit-model-not-a-model", lambda w: (["fit", "--method", "textual-inversion", "--model", w.data, "--data", w.data,
                                              "--category", "nut", "--out", w.outside / "new" / "model"],
                                             [str(w.data), "has no component folders"])),
    Case("evaluate-inception-weights-missing", lambda w: (w.evaluate("--metrics", "is", "--inception-weights",
                                                                     w.root / "nope.pth"), [str(w.root / "nope.pth")])),
]


def _fault(case: Case, w: World) -> str | None:
    return None if case.fault is None else case.fault.format(out=w.out, data=w.data, root=w.root)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_is_one_clear_line_and_damages_nothing(world, case):
    cli_harness.CASES.append(case.name)
    args, fragments = case.setup(world)
    with lock_held_elsewhere(world.nut, "generate") if case.hold_lock else nullcontext() as holder:
        before = {path: snapshot(path) for path in (world.data, world.outside)}
        written = snapshot(world.out)  # the holder's lock record included: it stays when the holder is killed
        result = run_cli(*args, fault=_fault(case, world), env=case.env)
    assert_user_error(result, *fragments, *([f"pid {holder.pid}"] if holder else []))
    for path, state in before.items():
        assert_unchanged(state, path)
    assert_kept(written, world.out, appended=("nut/" + MANIFEST,))


def test_case_count():
    """Every defect category of the issue has cases (a guard against losing some in a refactor)."""
    prefixes = {case.name.split("-")[0] for case in CASES}
    assert {"data", "option", "num", "link", "out", "fit", "demo", "lock", "run", "manifest"} <= prefixes
    assert len(CASES) >= 35


def test_disk_full_then_resume_is_identical(world):
    """After "disk full after N samples", freeing space and re-running finishes the run as if
    nothing happened."""
    assert_user_error(run_cli(*world.generate("--num", 6), fault="enospc:2"), "disk full after 4 samples")
    assert run_cli(*world.generate("--num", 6)).returncode == 0
    pipeline.generate(METHOD, world.data, world.root / "clean", 6, category="nut", seed=0, keep_failing=True)
    assert tree_bytes(world.nut) == tree_bytes(world.root / "clean" / "nut")


def test_stale_lock_does_not_block(world):
    """A lock file left by a killed run (its record still there) does not stop the next run."""
    (world.nut / LOCK_FILE).write_text(json.dumps({"what": "generate", "pid": 999999, "host": "h", "started": "t",
                                                   "command": "anomalygen generate"}))
    result = run_cli(*world.generate("--num", 4))
    assert result.returncode == 0, result.output
    assert (world.nut / LOCK_FILE).read_bytes() == b""  # emptied when the run ended


@pytest.mark.parametrize("run", [run_cli, run_cli_process], ids=["in-process", "subprocess"])
def test_internal_error_is_one_line_unless_debug(world, run):
    """Also the harness's own check: a traceback that reaches the user in this process is reported
    as the interpreter reports it (exit 1, "Traceback" on stderr), so ``assert_user_error`` fails."""
    result = run(*world.generate("--num", 4), fault="bug")
    assert result.returncode == 1 and "Traceback" not in result.output, result.output
    assert "error: internal error (ZeroDivisionError: division by zero)" in result.stderr
    assert "ANOMALYGEN_DEBUG=1" in result.stderr
    debug = run(*world.generate("--num", 4), fault="bug", env={"ANOMALYGEN_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ZeroDivisionError" in debug.stderr
    with pytest.raises(AssertionError, match="exit 1"):
        assert_user_error(debug)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits (the fault-injected cases cover it)")
def test_real_read_only_folder(world):
    os.chmod(world.nut, 0o555)
    try:
        written = snapshot(world.out)
        assert_user_error(run_cli(*world.generate("--num", 6)), str(world.nut), "permission denied")
        assert_kept(written, world.out)
    finally:
        os.chmod(world.nut, 0o755)


@pytest.mark.parametrize("size", [32, 24, 7])
def test_thin_defect_labels_survive_a_low_evaluation_resolution(size):
    """A real test image's 1-px line mask, at a low evaluation resolution, still marks the line
    (before: nearest-neighbour resizing lost it, and the defect image was scored as a good one):
    the label the U-Net and DRAEM are scored and trained on (``tensor_masks``, ``resize_mask``)
    keeps every defect pixel in the cell that covers it, and nothing else."""
    from anomalygen.evaluation.inputs import resize_mask
    from anomalygen.evaluation.localization import tensor_masks

    line = np.zeros((256, 250), bool)
    line[:, 101] = True  # one column
    label = tensor_masks([line], size)[0].numpy()
    cell = max(i for i in range(size) if i * 250 // size <= 101)  # the cell whose span holds column 101
    assert label.shape == (size, size) and label.any()
    assert np.flatnonzero(label.any(axis=0)).tolist() == [cell]  # that column's cell, and no other
    assert label[:, cell].all()  # along the whole line
    dot = np.zeros((256, 256), bool)
    dot[255, 0] = True  # a single pixel in a corner
    assert np.flatnonzero(resize_mask(dot, size)).tolist() == [(size - 1) * size]
