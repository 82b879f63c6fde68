"""Simulated OS faults for the harness: ``run_cli(..., fault=F)`` runs the CLI through ``main()``
here with ``ANOMALYGEN_TEST_FAULT=F`` set, which patches the OS calls first:

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
from pathlib import Path


def _fail(code: int, path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def _under(path, prefix: str) -> bool:
    path = os.path.abspath(os.fsdecode(path))
    return path == prefix or path.startswith(prefix + os.sep)


def _enospc(after: int) -> None:
    import anomalygen.io

    real = anomalygen.io.atomic_write_bytes
    count = {"png": 0}

    def atomic_write_bytes(path, data):
        if str(path).endswith(".png"):
            count["png"] += 1
            if count["png"] > after:
                raise _fail(errno.ENOSPC, path)
        real(path, data)

    anomalygen.io.atomic_write_bytes = atomic_write_bytes


def _deny(code: int, prefix: str) -> None:
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

    os.mkdir, os.open, builtins.open = mkdir, open_, builtin_open


def _noread(prefix: str) -> None:
    real_listdir, real_scandir = os.listdir, os.scandir

    def listdir(path="."):
        if _under(path, prefix):
            raise _fail(errno.EACCES, path)
        return real_listdir(path)

    def scandir(path="."):
        if _under(path, prefix):
            raise _fail(errno.EACCES, path)
        return real_scandir(path)

    os.listdir, os.scandir = listdir, scandir


def _bug() -> None:
    from anomalygen import pipeline

    def generate(*args, **kwargs):
        return 1 / 0

    pipeline.generate = generate


def install(fault: str) -> None:
    kind, _, rest = fault.partition(":")
    if kind == "enospc":
        _enospc(int(rest))
    elif kind == "deny":
        code, _, prefix = rest.partition(":")
        _deny(getattr(errno, code), str(Path(prefix).absolute()))
    elif kind == "noread":
        _noread(str(Path(rest).absolute()))
    elif kind == "bug":
        _bug()
    else:
        raise ValueError(f"unknown fault {fault!r}")


def main() -> None:
    install(os.environ["ANOMALYGEN_TEST_FAULT"])
    from anomalygen.cli import app

    app(prog_name="anomalygen")


if __name__ == "__main__":
    main()
