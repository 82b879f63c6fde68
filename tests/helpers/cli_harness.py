"""The robustness harness: run the real CLI and check what a user would see.

``run_cli(*args)`` runs ``anomalygen ARGS`` in this process, through the console script's own entry
point (``anomalygen.cli.main``, so every error goes through the handlers a user hits) with its
argv, environment, cwd and file descriptors 1 and 2 of its own; an exception escaping ``main`` is
reported the way the interpreter would (a traceback on stderr, exit 1). ``run_cli_process(*args)``
runs ``python -m anomalygen.cli ARGS`` in a fresh interpreter (seconds of imports each: kept for the
cases about the process itself). ``assert_user_error(result, *fragments)``
checks exit code 2, no traceback, one ``error:`` line naming every fragment (a path or an option);
``snapshot(root)`` / ``assert_unchanged(before, root)`` prove nothing outside the output folder (and
nothing written before) changed, byte for byte, mode and symlink targets included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import cli_faults

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


def run_cli_process(*args, cwd: str | Path | None = None, env: dict | None = None, timeout: float = 300,
                    fault: str | None = None) -> CliResult:
    """``anomalygen ARGS`` in a fresh interpreter; ``fault``: a simulated OS fault (see ``cli_faults``)."""
    done = subprocess.run(cli_command(*args, fault=fault), cwd=cwd, env=cli_env(env, fault),
                          capture_output=True, text=True, timeout=timeout)
    return CliResult(done.returncode, done.stdout, done.stderr)


# the interpreter's own warning filters (pytest's are replaced for the call, as a fresh process has them)
DEFAULT_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                           ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                           ("ignore", ResourceWarning, "")]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextmanager
def _own_process_state(argv: list[str], cwd: str | Path | None, env: dict) -> Iterator[None]:
    """sys.argv, the environment, the cwd and the warning filters of the call, restored afterwards."""
    saved_argv, saved_env, saved_cwd = sys.argv, dict(os.environ), os.getcwd()
    sys.argv = argv
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in reversed(DEFAULT_WARNING_FILTERS):
                warnings.filterwarnings(action, category=category, module=module)
            warnings.showwarning = _show_warning
            yield
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)


@contextmanager
def _captured_output() -> Iterator[list[str]]:
    """File descriptors 1 and 2 (and sys.stdout / sys.stderr on them) into temporary files, so
    output from C code and child processes is caught too; yields [stdout, stderr], filled at the end."""
    captured: list[str] = []
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush(), sys.stderr.flush()
        saved_fds, saved_streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
        try:
            os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
            sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
            sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
            yield captured
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            sys.stdout, sys.stderr = saved_streams
            for fd, saved in zip((1, 2), saved_fds):
                os.dup2(saved, fd)
                os.close(saved)
            for file in (out, err):
                file.seek(0)
                captured.append(file.read().decode("utf-8", errors="replace"))


def run_cli(*args, cwd: str | Path | None = None, env: dict | None = None, fault: str | None = None) -> CliResult:
    """``anomalygen ARGS`` in this process (see the module docstring); ``fault``: a simulated OS
    fault (``cli_faults``), in place for the call only."""
    from anomalygen import cli

    with _captured_output() as captured:
        with _own_process_state(["anomalygen", *map(str, args)], cwd, cli_env(env)), cli_faults.installed(fault):
            try:
                cli.main()
                code = 0
            except SystemExit as done:  # as the interpreter exits: None 0, an int itself, else printed, 1
                code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
                if code == 1 and not isinstance(done.code, int):
                    print(done.code, file=sys.stderr)
            except KeyboardInterrupt:  # pytest's own Ctrl-C
                raise
            except BaseException:  # what reaches the user as a traceback
                traceback.print_exc()
                code = 1
    return CliResult(code, *captured)


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
