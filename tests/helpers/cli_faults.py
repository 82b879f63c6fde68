"""Simulated OS faults for the harness: ``run_cli(..., fault=F)`` runs the CLI with the OS calls
patched (in the test process: ``with installed(F)``, which undoes the patches afterwards; in a fresh
interpreter, ``run_cli_process``: ``main()`` here with ``ANOMALYGEN_TEST_FAULT=F`` set):

- ``enospc:N``            every PNG write after the first N fails with ENOSPC (disk full)
- ``deny:ERRNO:PREFIX``   creating or writing anything under PREFIX fails with ERRNO (EACCES, EROFS)
- ``noread:PREFIX``       listing a folder under PREFIX fails with EACCES
- ``bug``                 ``pipeline.generate`` raises ZeroDivisionError (an internal error)

Tests run as root here, and root ignores permission bits, so a chmod cannot stand for these.
"""

from __future__ import annotations

import builtins
import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

Patch = tuple[object, str, object]  # (module, attribute, the value it had)


def _set(patches: list[Patch], module, name: str, value) -> None:
    patches.append((module, name, getattr(module, name)))
    setattr(module, name, value)


def _fail(code: int, path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def _under(path, prefix: str) -> bool:
    path = os.path.abspath(os.fsdecode(path))
    return path == prefix or path.startswith(prefix + os.sep)


def _enospc(patches: list[Patch], after: int) -> None:
    import anomalygen.io

    real = anomalygen.io.atomic_write_bytes
    count = {"png": 0}

    def atomic_write_bytes(path, data):
        if str(path).endswith(".png"):
            count["png"] += 1
            if count["png"] > after:
                raise _fail(errno.ENOSPC, path)
        real(path, data)

    # every module bound to it (a module imported before the fault holds its own reference)
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "anomalygen" and getattr(module, "atomic_write_bytes", None) is real:
            _set(patches, module, "atomic_write_bytes", atomic_write_bytes)


def _deny(patches: list[Patch], code: int, prefix: str) -> None:
    real_mkdir, real_open, real_builtin_open = os.mkdir, os.open, builtins.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def mkdir(path, *args, **kwargs):
        if _under(path, prefix):
            if os.path.isdir(path):
                raise _fail(errno.EEXIST, path)
            raise _fail(code, path)
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if flags & writing and _under(path, prefix):
            raise _fail(code, path)
        return real_open(path, flags, *args, **kwargs)

    def builtin_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and _under(file, prefix):
            raise _fail(code, file)
        return real_builtin_open(file, mode, *args, **kwargs)

    _set(patches, os, "mkdir", mkdir)
    _set(patches, os, "open", open_)
    _set(patches, builtins, "open", builtin_open)


def _noread(patches: list[Patch], prefix: str) -> None:
    real_listdir, real_scandir = os.listdir, os.scandir

    def listdir(path="."):
        if _under(path, prefix):
            raise _fail(errno.EACCES, path)
        return real_listdir(path)

    def scandir(path="."):
        if _under(path, prefix):
            raise _fail(errno.EACCES, path)
        return real_scandir(path)

    _set(patches, os, "listdir", listdir)
    _set(patches, os, "scandir", scandir)


def _bug(patches: list[Patch]) -> None:
    from anomalygen import pipeline

    def generate(*args, **kwargs):
        return 1 / 0

    _set(patches, pipeline, "generate", generate)


def install(fault: str) -> list[Patch]:
    """Patch in ``fault``; returns what was replaced (``uninstall`` puts it back)."""
    patches: list[Patch] = []
    kind, _, rest = fault.partition(":")
    if kind == "enospc":
        _enospc(patches, int(rest))
    elif kind == "deny":
        code, _, prefix = rest.partition(":")
        _deny(patches, getattr(errno, code), str(Path(prefix).absolute()))
    elif kind == "noread":
        _noread(patches, str(Path(rest).absolute()))
    elif kind == "bug":
        _bug(patches)
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return patches


def uninstall(patches: list[Patch]) -> None:
    for module, name, value in reversed(patches):
        setattr(module, name, value)


@contextmanager
def installed(fault: str | None) -> Iterator[None]:
    """``fault`` (if any) in place while the block runs."""
    patches = install(fault) if fault else []
    try:
        yield
    finally:
        uninstall(patches)


def main() -> None:
    install(os.environ["ANOMALYGEN_TEST_FAULT"])
    from anomalygen.cli import main as cli_main

    sys.argv[0] = "anomalygen"
    cli_main()


if __name__ == "__main__":
    main()
