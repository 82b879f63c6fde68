"""Crash-safe output: atomic file writes, the MVTec-layout sample writer, its manifest, resume.

Output of one run, for one category::

    OUT/<category>/test/<type>/NNNNNN.png               generated image (NNNNNN = global sample index)
    OUT/<category>/ground_truth/<type>/NNNNNN_mask.png  its mask, 0/255
    OUT/<category>/manifest.jsonl                       one JSON line per finished sample
    OUT/<category>/run.json                             what made the run (method, seed, config, ...)
    OUT/<category>/.anomalygen.lock                     locked while a run writes (empty when none does)

A sample counts only once its image, its mask and its manifest line exist, written in that
order; image and mask are written atomically (temporary file in the same folder, fsync,
``os.replace``). After a kill, the next run reads the manifest, drops a torn last line and any
sample whose files are gone, and continues at ``start = done``: generators make sample ``i`` from
``(seed, i)`` alone, so the resumed output is byte-identical to an uninterrupted one.

Names have six digits for any count (sorted names pair images and masks, as anomalib expects); a
folder written with the old three-digit names (``000.png``) keeps them when it is resumed. The
writer refuses a symbolic link anywhere inside ``OUT/<category>`` (it would write outside), a
folder another process is writing (``folder_lock``) and a manifest line that is not exactly what
it would have written for that index (tampered or corrupt).
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalygen.errors import AnomalygenError, DataError
from anomalygen.types import AnomalySample

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = ".anomalygen.lock"
TMP_SUFFIX = ".partial"
NAME_WIDTH = 6  # sample names 000000.png ... 999999.png
LEGACY_WIDTH = 3  # names of folders written before: 000.png ... 999.png, 1000.png, ...
MAX_SAMPLES = 10**NAME_WIDTH
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


def check_own_folder(folder: str | Path, option: str = "--out", *, overwrite: bool = False) -> None:
    """Refuse to write into ``folder`` when it holds files and no lock file of ours (a folder
    anomalygen did not make: the user's own files), unless ``overwrite``; nothing is written."""
    folder = Path(folder)
    if overwrite or not folder.is_dir() or (folder / LOCK_FILE).exists():
        return
    with os.scandir(folder) as entries:
        foreign = sorted(entry.name for entry in entries)
    if foreign:
        raise DataError(folder, f"holds files anomalygen did not write ({', '.join(foreign[:3])}"
                                f"{', ...' if len(foreign) > 3 else ''}); give a new or empty {option}, "
                                "or add --overwrite to write into it anyway")


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


def _normalise(value: Any) -> Any:
    """JSON round trip, so that a run description compares equal to the one read back."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class SampleWriter:
    """Writes the samples of one run into ``out/<category>`` and resumes an interrupted run.

    ``run`` describes what makes the samples (method, seed, generator config, data, ...). An
    existing output made with a different ``run`` is refused unless ``overwrite=True``, which
    deletes it and starts over. ``done`` is the number of samples already complete. The folder
    stays locked until ``close()`` (or the end of a ``with`` block). OS errors come out as
    ``DataError`` naming the file.
    """

    def __init__(self, out: str | Path, category: str, run: Mapping[str, Any], *, overwrite: bool = False):
        self.root = Path(out) / category
        self.run = _normalise(dict(run))
        self.manifest_path = self.root / MANIFEST
        self._stack = ExitStack()
        try:
            self._open(overwrite)
        except OSError as error:
            self.close()
            raise os_error(error) from error
        except BaseException:
            self.close()
            raise

    def _open(self, overwrite: bool) -> None:
        for folder in (self.root.parent, self.root):
            if folder.exists() and not folder.is_dir():
                raise DataError(folder, "not a folder (a file is in the way)")
        self._refuse_links()  # before the lock file is created: OUT/<category> itself may be a link
        run_path = self.root / RUN_FILE
        if not run_path.is_file() and any((self.root / name).exists() for name in ("train", "test", "ground_truth", MANIFEST)):
            raise AnomalygenError(f"{self.root}: holds files anomalygen did not write (no {RUN_FILE}); choose another --out")
        self._stack.enter_context(folder_lock(self.root, "generate"))
        if run_path.is_file():
            if overwrite:
                self._clear()
            else:
                try:
                    previous = read_json(run_path)
                except DataError as error:
                    raise DataError(run_path, f"{error.problem}; use --overwrite to start over") from None
                if previous != self.run:
                    raise AnomalygenError(
                        f"{self.root}: holds the output of a different run ({_difference(previous, self.run)}); "
                        "use --overwrite to replace it or choose another --out"
                    )
        remove_partials(self.root)
        self.width = LEGACY_WIDTH if _has_legacy_names(self.root) else NAME_WIDTH
        if not run_path.is_file():
            atomic_write_text(run_path, json.dumps(self.run, indent=2, sort_keys=True))
        self.entries = self._recover()

    def __enter__(self) -> "SampleWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the folder's lock."""
        self._stack.close()

    @property
    def done(self) -> int:
        return len(self.entries)

    def paths(self, index: int, defect_type: str) -> tuple[Path, Path]:
        """Relative image and mask paths of sample ``index``."""
        _check_type_name(defect_type)
        name = f"{index:0{self.width}d}"
        return Path("test") / defect_type / f"{name}.png", Path("ground_truth") / defect_type / f"{name}_mask.png"

    def add(self, sample: AnomalySample, *, source: str | Path | None = None, index: int | None = None) -> dict[str, Any]:
        """Write sample number ``done`` (image, mask, then its manifest line) and return the line."""
        index = self.done if index is None else index
        if index != self.done:
            raise AnomalygenError(f"{self.manifest_path}: sample {index} written out of order (expected {self.done})")
        if index >= MAX_SAMPLES:
            raise AnomalygenError(f"{self.root}: at most {MAX_SAMPLES} samples fit in one folder")
        mask = np.asarray(sample.mask, dtype=bool)
        if mask.shape != sample.image.shape[:2]:
            raise AnomalygenError(
                f"sample {index}: mask shape {mask.shape} does not match image shape {sample.image.shape[:2]}"
            )
        image_rel, mask_rel = self.paths(index, sample.defect_type)
        entry = {
            "index": index,
            "image": image_rel.as_posix(),
            "mask": mask_rel.as_posix(),
            "method": self.run.get("method"),
            "seed": self.run.get("seed"),
            "source": None if source is None else str(source),
            "defect_type": sample.defect_type,
            "prompt": sample.prompt,
            "meta": _normalise(sample.meta),
        }
        try:
            save_png(self.root / image_rel, sample.image)
            save_png(self.root / mask_rel, mask)
            with open(self.manifest_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            raise DataError(
                self.root,
                f"{os_problem(error)} after {index} samples"
                + ("" if full else f" (writing {error.filename or self.manifest_path})")
                + f"; {'free space' if full else 'fix that'} and re-run to resume",
            ) from error
        self.entries.append(entry)
        return entry

    def _recover(self) -> list[dict[str, Any]]:
        """The valid prefix of the manifest: consecutive indices whose image and mask exist.

        A complete line that names other files than the writer would have written for its index
        is refused as corrupt: it never counts as a finished sample, and it is never read.
        """
        entries = read_manifest(self.manifest_path)
        valid = []
        for position, entry in enumerate(entries):
            if entry.get("index") != position:
                break
            try:
                expected = [p.as_posix() for p in self.paths(position, entry.get("defect_type"))]
            except (AnomalygenError, TypeError):
                raise DataError(self.manifest_path, f"corrupt (sample {position}: defect_type "
                                                    f"{entry.get('defect_type')!r} is not a folder name)") from None
            for key, path in zip(("image", "mask"), expected):
                if entry.get(key) != path:
                    raise DataError(self.manifest_path,
                                    f"corrupt (sample {position}: {key} {entry.get(key)!r}, expected {path!r})")
            if not all((self.root / path).is_file() for path in expected):
                break
            valid.append(entry)
        if len(valid) != len(entries) or _has_torn_tail(self.manifest_path):
            text = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in valid)
            atomic_write_text(self.manifest_path, text)
        return valid

    def _refuse_links(self) -> None:
        link = _first_link(self.root)
        if link is not None:
            raise DataError(link, f"is a symbolic link (to {os.readlink(link)}); anomalygen never writes through "
                                  "links inside its output folder: replace it with a real folder or choose another --out")

    def _clear(self) -> None:
        """Delete the previous run's files (a failure is an error, not stale samples left behind)."""
        for name in ("train", "test", "ground_truth"):
            if (self.root / name).exists():
                shutil.rmtree(self.root / name)
        for name in (MANIFEST, RUN_FILE):
            (self.root / name).unlink(missing_ok=True)


def _first_link(path: Path) -> Path | None:
    """``path`` itself or the first symbolic link found under it (links are never followed)."""
    if path.is_symlink():
        return path
    if not path.is_dir():
        return None
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_symlink():
                return Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                found = _first_link(Path(entry.path))
                if found is not None:
                    return found
    return None


def _has_legacy_names(root: Path) -> bool:
    """Whether ``root`` holds samples with the three-digit names of earlier versions (``000.png``);
    ``test/good`` holds copies of real images (``--with-good``), not samples."""
    pattern = re.compile(r"\d{%d}\.png" % LEGACY_WIDTH)
    return any(pattern.fullmatch(p.name) for p in root.glob("test/*/*.png") if p.parent.name != "good")


def _has_torn_tail(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


def _check_type_name(defect_type: str) -> None:
    if not defect_type or defect_type in (".", "..") or "/" in defect_type or "\\" in defect_type:
        raise AnomalygenError(f"defect type {defect_type!r} cannot be used as a folder name")


def _difference(previous: dict[str, Any], current: dict[str, Any]) -> str:
    keys = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    return "; ".join(f"{k}: {previous.get(k)!r} there, {current.get(k)!r} now" for k in keys)
