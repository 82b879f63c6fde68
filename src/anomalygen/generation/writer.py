"""The MVTec-layout sample writer: one run's samples, its manifest, resume after a kill.

Output of one run, for one category::

    OUT/<category>/test/<type>/NNNNNN.png               generated image (NNNNNN = global sample index)
    OUT/<category>/ground_truth/<type>/NNNNNN_mask.png  its mask, 0/255
    OUT/<category>/manifest.jsonl                       one JSON line per finished sample
    OUT/<category>/run.json                             what made the run (method, seed, config, ...)
    OUT/<category>/.anomalygen.lock                     locked while a run writes (empty when none does)

A sample counts only once its image, its mask and its manifest line exist, written in that
order; image and mask are written atomically (``anomalygen.io``). After a kill, the next run reads
the manifest, drops a torn last line and any sample whose files are gone, and continues at
``start = done``: generators make sample ``i`` from ``(seed, i)`` alone, so the resumed output is
byte-identical to an uninterrupted one.

Names have six digits for any count (sorted names pair images and masks, as anomalib expects); a
folder written with the old three-digit names (``000.png``) keeps them when it is resumed. The
writer refuses a symbolic link anywhere inside ``OUT/<category>`` (it would write outside), a
folder another process is writing (``folder_lock``) and a manifest line that is not exactly what
it would have written for that index (tampered or corrupt).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from anomalygen.errors import AnomalygenError, DataError
from anomalygen.io import (MANIFEST, atomic_write_text, folder_lock, os_error, os_problem, read_json, read_manifest,
                           remove_partials, save_png)
from anomalygen.types import AnomalySample

RUN_FILE = "run.json"
NAME_WIDTH = 6  # sample names 000000.png ... 999999.png
LEGACY_WIDTH = 3  # names of folders written before: 000.png ... 999.png, 1000.png, ...
MAX_SAMPLES = 10**NAME_WIDTH
RECORDED = ("outside_mask",)  # what a run records without defining it: a run.json from before lacks it and resumes


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
            raise AnomalygenError(f"{self.root}: holds files anomalygen did not write (no {RUN_FILE}); choose another `out`")
        self._stack.enter_context(folder_lock(self.root, "generate"))
        if run_path.is_file():
            if overwrite:
                self._clear()
            else:
                try:
                    previous = read_json(run_path)
                except DataError as error:
                    raise DataError(run_path, f"{error.problem}; use `overwrite` to start over") from None
                recorded = {k: self.run[k] for k in RECORDED if k in self.run and k not in previous}
                if {**recorded, **previous} != self.run:
                    raise AnomalygenError(
                        f"{self.root}: holds the output of a different run ({_difference(previous, self.run)}); "
                        "use `overwrite` to replace it or choose another `out`"
                    )
                if recorded:  # written by a version that did not record them: the same run, now recorded
                    atomic_write_text(run_path, json.dumps(self.run, indent=2, sort_keys=True))
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
                                  "links inside its output folder: replace it with a real folder or choose another `out`")

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
