"""Crash-safe output: atomic file writes, the MVTec-layout sample writer, its manifest, resume.

Output of one run, for one category::

    OUT/<category>/test/<type>/NNN.png               generated image (NNN = global sample index)
    OUT/<category>/ground_truth/<type>/NNN_mask.png  its mask, 0/255
    OUT/<category>/manifest.jsonl                    one JSON line per finished sample
    OUT/<category>/run.json                          what made the run (method, seed, config, ...)

A sample counts only once its image, its mask and its manifest line exist, written in that
order; image and mask are written atomically (temporary file in the same folder, fsync,
``os.replace``). After a kill, the next run reads the manifest, drops a torn last line and any
sample whose files are gone, and continues at ``start = done``: generators make sample ``i`` from
``(seed, i)`` alone, so the resumed output is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from anomalygen.errors import AnomalygenError, DataError
from anomalygen.types import AnomalySample

MANIFEST = "manifest.jsonl"
RUN_FILE = "run.json"
TMP_SUFFIX = ".partial"
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp's own 0600 would hide outputs from other users


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


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image (H, W, 3) or a bool/uint8 mask (H, W) saved as 0/255."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise AnomalygenError(f"cannot save an image of dtype {array.dtype}; expected uint8 or bool")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
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
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break
            raise DataError(path, f"line {number} is not valid JSON (the manifest is corrupt)")
    return entries


def _normalise(value: Any) -> Any:
    """JSON round trip, so that a run description compares equal to the one read back."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class SampleWriter:
    """Writes the samples of one run into ``out/<category>`` and resumes an interrupted run.

    ``run`` describes what makes the samples (method, seed, generator config, data, ...). An
    existing output made with a different ``run`` is refused unless ``overwrite=True``, which
    deletes it and starts over. ``done`` is the number of samples already complete.
    """

    def __init__(self, out: str | Path, category: str, run: Mapping[str, Any], *, overwrite: bool = False):
        self.root = Path(out) / category
        self.run = _normalise(dict(run))
        self.manifest_path = self.root / MANIFEST
        run_path = self.root / RUN_FILE
        if not run_path.is_file():
            if any((self.root / name).exists() for name in ("test", "ground_truth", MANIFEST)):
                raise AnomalygenError(
                    f"{self.root}: holds files anomalygen did not write (no {RUN_FILE}); choose another --out"
                )
        elif overwrite:
            self._clear()
        else:
            previous = json.loads(run_path.read_text())
            if previous != self.run:
                raise AnomalygenError(
                    f"{self.root}: holds the output of a different run ({_difference(previous, self.run)}); "
                    "use --overwrite to replace it or choose another --out"
                )
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_partials()
        if not run_path.is_file():
            atomic_write_text(run_path, json.dumps(self.run, indent=2, sort_keys=True))
        self.entries = self._recover()

    @property
    def done(self) -> int:
        return len(self.entries)

    def paths(self, index: int, defect_type: str) -> tuple[Path, Path]:
        """Relative image and mask paths of sample ``index``."""
        _check_type_name(defect_type)
        return (
            Path("test") / defect_type / f"{index:03d}.png",
            Path("ground_truth") / defect_type / f"{index:03d}_mask.png",
        )

    def add(self, sample: AnomalySample, *, source: str | Path | None = None, index: int | None = None) -> dict[str, Any]:
        """Write sample number ``done`` (image, mask, then its manifest line) and return the line."""
        index = self.done if index is None else index
        if index != self.done:
            raise AnomalygenError(f"{self.manifest_path}: sample {index} written out of order (expected {self.done})")
        mask = np.asarray(sample.mask, dtype=bool)
        if mask.shape != sample.image.shape[:2]:
            raise AnomalygenError(
                f"sample {index}: mask shape {mask.shape} does not match image shape {sample.image.shape[:2]}"
            )
        image_rel, mask_rel = self.paths(index, sample.defect_type)
        save_png(self.root / image_rel, sample.image)
        save_png(self.root / mask_rel, mask)
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
        with open(self.manifest_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.entries.append(entry)
        return entry

    def _recover(self) -> list[dict[str, Any]]:
        """The valid prefix of the manifest: consecutive indices whose image and mask exist."""
        entries = read_manifest(self.manifest_path)
        valid = []
        for position, entry in enumerate(entries):
            if entry.get("index") != position or not all(
                (self.root / entry.get(key, "")).is_file() for key in ("image", "mask")
            ):
                break
            valid.append(entry)
        if len(valid) != len(entries) or _has_torn_tail(self.manifest_path):
            text = "".join(json.dumps(entry, sort_keys=True) + "\n" for entry in valid)
            atomic_write_text(self.manifest_path, text)
        return valid

    def _remove_partials(self) -> None:
        """Delete temporary files a killed run left behind (never a finished file)."""
        for tmp in self.root.rglob(f".*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)

    def _clear(self) -> None:
        for name in ("test", "ground_truth"):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for name in (MANIFEST, RUN_FILE):
            (self.root / name).unlink(missing_ok=True)


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
