"""The robustness harness: run the real CLI in a subprocess and check what a user would see.

``run_cli(*args)`` runs ``python -m anomalygen.cli ARGS``; ``assert_user_error(result, *fragments)``
checks exit code 2, no traceback, one ``error:`` line naming every fragment (a path or an option);
``snapshot(root)`` / ``assert_unchanged(before, root)`` prove nothing outside the output folder (and
nothing written before) changed, byte for byte, mode and symlink targets included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CASES: list[str] = []  # names of the harness cases run in this session (for the counts in the note)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli_command(*args, fault: str | None = None) -> list[str]:
    """The argv of ``anomalygen ARGS`` (through ``cli_faults`` when a simulated OS fault is given)."""
    if fault is None:
        return [sys.executable, "-m", "anomalygen.cli", *map(str, args)]
    return [sys.executable, str(Path(__file__).with_name("cli_faults.py")), *map(str, args)]


def cli_env(env: dict | None = None, fault: str | None = None) -> dict:
    """The environment of a CLI subprocess: no ANSI colours, a wide console, the fault if any."""
    return {**os.environ, "NO_COLOR": "1", "COLUMNS": "400", "TERM": "dumb", **(env or {}),
            **({"ANOMALYGEN_TEST_FAULT": fault} if fault else {})}


def run_cli(*args, cwd: str | Path | None = None, env: dict | None = None, timeout: float = 300,
            fault: str | None = None) -> CliResult:
    """``anomalygen ARGS`` in a fresh interpreter; ``fault``: a simulated OS fault (see ``cli_faults``)."""
    done = subprocess.run(cli_command(*args, fault=fault), cwd=cwd, env=cli_env(env, fault),
                          capture_output=True, text=True, timeout=timeout)
    return CliResult(done.returncode, done.stdout, done.stderr)


def assert_user_error(result: CliResult, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one ``error:`` line on stderr holding every fragment."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.output}"
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert str(fragment) in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def snapshot(root: str | Path) -> dict[str, tuple]:
    """Every entry under ``root``: files by (mode, bytes), symlinks by target, folders by mode."""
    root = Path(root)
    state: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            state[key] = ("link", os.readlink(path))
        elif path.is_dir():
            state[key] = ("dir", path.stat().st_mode)
        elif path.is_file():
            state[key] = ("file", path.stat().st_mode, path.read_bytes())
    return state


def assert_unchanged(before: dict[str, tuple], root: str | Path) -> None:
    after = snapshot(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"changed under {root}: {changed[:10]}"


def assert_kept(before: dict[str, tuple], root: str | Path, *, appended: tuple[str, ...] = ()) -> None:
    """Everything under ``root`` in ``before`` is still there, byte for byte (new files may have
    been added); the files named in ``appended`` may only have grown at their end."""
    after = snapshot(root)
    def grown(key: str) -> bool:
        old, new = before[key], after.get(key, ())
        return key in appended and old[0] == "file" and new[:2] == old[:2] and new[2].startswith(old[2])

    lost = sorted(k for k, v in before.items() if after.get(k) != v and not grown(k))
    assert not lost, f"changed or lost under {root}: {lost[:10]}"


@contextmanager
def lock_held_elsewhere(folder: str | Path, what: str) -> Iterator[subprocess.Popen]:
    """Another process holds ``folder_lock(folder, what)`` while the block runs (yields it);
    it is killed with SIGKILL at the end, as a crash would, so its record stays behind."""
    code = ("import sys, time; from anomalygen.io import folder_lock\n"
            "with folder_lock(sys.argv[1], sys.argv[2]):\n print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder), what], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
