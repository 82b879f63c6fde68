"""Crash-safe file primitives: atomic writes, folder locks, state files, PNGs, the manifest's reader.

Every file anomalygen writes is written atomically (temporary file in the same folder, fsync,
``os.replace``): a reader sees the old file or the whole new one. ``folder_lock`` holds a folder for
one process (``flock``, released by the kernel however the process ends). OS errors become one-line
``DataError``s naming the file (``os_error``). The MVTec-layout sample writer built on these is
``anomalygen.generation.writer``.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalygen.errors import AnomalygenError, DataError

MANIFEST = "manifest.jsonl"
LOCK_FILE = ".anomalygen.lock"
TMP_SUFFIX = ".partial"
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp's own 0600 would hide outputs from other users

_OS_PROBLEMS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists",
    errno.ENOENT: "not found",
    errno.ELOOP: "is a symbolic link (refused) or a link loop",
    errno.ENAMETOOLONG: "name too long",
    errno.EIO: "input/output error (failing disk or network file system?)",
    errno.EMFILE: "too many open files",
}


def os_problem(error: OSError) -> str:
    """What an OS error means, in a few words ("disk full", "permission denied", ...)."""
    return _OS_PROBLEMS.get(error.errno, error.strerror or str(error))


def os_error(error: OSError, path: str | Path | None = None) -> DataError:
    """The one-line user error for an OS error: ``PATH: problem``; when a file stands where a
    folder is needed, the path named is that file."""
    path = path if path is not None else error.filename
    if path is None:
        return DataError(None, os_problem(error))
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        path = Path(path)
        for candidate in [*reversed(path.parents), path]:
            if candidate.exists() and not candidate.is_dir():
                return DataError(candidate, "not a folder (a file is in the way)")
    return DataError(path, os_problem(error))


_HELD: set[Path] = set()  # folders this process holds locked (a nested lock on one of them is a no-op)


@contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold ``folder`` (created if needed) for this process while the block runs.

    A second process that asks for the same folder gets an ``AnomalygenError`` naming the holder
    (pid, host, command, start time). The lock is ``flock`` on ``folder/.anomalygen.lock``: the
    kernel releases it when its process ends in any way (kill -9 included), so a stale lock file
    never blocks a later run. ``what`` names the job in the holder's record ("generate", "fit").
    A job that ends with nothing in the folder but the lock file it made (refused, say, by a model
    that does not load) removes that file and the folders it created.
    """
    folder = Path(folder)
    key = folder.resolve()
    if key in _HELD:
        yield
        return
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    lock_is_new = not (folder / LOCK_FILE).exists()
    fd = _take_lock(folder)
    try:
        record = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": shlex.join(sys.argv)[:500]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError as error:
            raise os_error(error, folder / LOCK_FILE) from error
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            with suppress(OSError):  # emptying the record is cosmetic; the lock goes with the descriptor
                os.ftruncate(fd, 0)
    finally:
        if lock_is_new:  # a job refused before it wrote anything leaves no folder of its making behind
            with suppress(OSError):
                if os.listdir(folder) == [LOCK_FILE]:
                    (folder / LOCK_FILE).unlink()
                    for path in created:
                        path.rmdir()
        os.close(fd)


def check_own_folder(folder: str | Path, option: str = "out", *, overwrite: bool = False) -> None:
    """Refuse to write into ``folder`` when it holds files and no lock file of ours (a folder
    anomalygen did not make: the user's own files), unless ``overwrite``; nothing is written."""
    folder = Path(folder)
    if overwrite or not folder.is_dir() or (folder / LOCK_FILE).exists():
        return
    with os.scandir(folder) as entries:
        foreign = sorted(entry.name for entry in entries)
    if foreign:
        raise DataError(folder, f"holds files anomalygen did not write ({', '.join(foreign[:3])}"
                                f"{', ...' if len(foreign) > 3 else ''}); give a new or empty `{option}`, "
                                "or add `overwrite` to write into it anyway")


def _take_lock(folder: Path) -> int:
    """A descriptor of ``folder/LOCK_FILE`` (both created if needed) holding its ``flock``. The
    holder removes a lock file it made when it leaves the folder empty (``folder_lock``): a lock
    taken on a file unlinked in between is given up and taken on the file that is there now."""
    path = folder / LOCK_FILE
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except OSError as error:
            raise os_error(error) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise AnomalygenError(f"{folder}: in use by {holder}; wait for it to finish (or stop it), then re-run") from None
        with suppress(FileNotFoundError):
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)


def _holder(fd: int, tries: int = 20) -> str:
    """Who holds a lock, from the record its holder wrote (it writes it just after taking the lock:
    an empty record is read again for up to ``tries`` x 25 ms)."""
    for attempt in range(tries):
        try:
            record = json.loads(os.pread(fd, 4096, 0))
            return (f"another anomalygen {record['what']} (pid {record['pid']} on {record['host']}, "
                    f"started {record['started']}: {record['command']})")
        except (OSError, ValueError, TypeError, KeyError):
            if attempt + 1 < tries:
                time.sleep(0.025)
    return "another anomalygen process"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def corrupt(path: str | Path, what: str) -> DataError:
    """``PATH: corrupt (what)``: a state file that was damaged or tampered with."""
    return DataError(path, f"corrupt ({what})")


def read_json(path: str | Path, kind: type = dict) -> Any:
    """The JSON value of a state file anomalygen wrote, which must be a ``kind`` (dict or list);
    a damaged or tampered file is ``PATH: corrupt (what is wrong)``."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DataError(path, "missing: the folder is incomplete") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise corrupt(path, f"not valid JSON: {error}") from None
    if not isinstance(value, kind):
        raise corrupt(path, f"not a JSON {'object' if kind is dict else 'array'}")
    return value


def remove_partials(folder: str | Path) -> None:
    """Delete the temporary files of atomic writes a killed run left in ``folder`` (never a finished file)."""
    for tmp in Path(folder).rglob(f".*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# zlib level 3, not PIL's 6: a 256 px image in 5 ms instead of 14.5 ms (at 9 generated images/s, level 6
# took an eighth of the time), files 5 % smaller on the real data in ../shared, 11 % larger on the demo's
# textures (benchmarks/png_speed.py)
PNG_LEVEL = 3


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image (H, W, 3) or a bool/uint8 mask (H, W) saved as 0/255."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise AnomalygenError(f"cannot save an image of dtype {array.dtype}; expected uint8 or bool")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_LEVEL)
    return buffer.getvalue()


def save_png(path: str | Path, array: np.ndarray) -> None:
    """Atomically save an image or mask as PNG (see ``encode_png``)."""
    atomic_write_bytes(path, encode_png(array))


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a manifest; a torn (unterminated or unparsable) last line is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    entries = []
    lines = path.read_bytes().split(b"\n")
    # Everything after the last newline is an unfinished append.
    for number, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(lines) - 1:
                break
            raise DataError(path, f"corrupt (line {number} is not valid JSON)")
        if not isinstance(entry, dict):
            raise DataError(path, f"corrupt (line {number} is not a JSON object)")
        entries.append(entry)
    return entries
