"""Image and mask I/O with validation: every problem is a ``DataError`` naming the file.

Images come back as (H, W, 3) uint8 RGB whatever is on disk (PNG/JPG/BMP/TIFF; grayscale,
palette, RGBA, 16-bit). Masks come back as (H, W) bool, the union of a record's mask files.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from anomalygen.errors import AnomalygenError, DataError
from anomalygen.types import DefectExample, ImageRecord

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# Pillow's errors for unreadable, truncated or corrupt files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        image = Image.open(path)
        image.load()
    except _DECODE_ERRORS as error:
        raise DataError(path, f"unreadable or truncated image ({error})") from error
    return image


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file, read from its header only."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except _DECODE_ERRORS as error:
        raise DataError(path, f"unreadable image ({error})") from error
    return height, width


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; 16-bit data is scaled to 8 bits (/257)."""
    path = Path(path)
    image = _open(path)
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.rint(np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if image.mode == "F":
        raise DataError(path, "unsupported image mode F (floating-point pixels)")
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def _mask_levels(path: Path) -> np.ndarray:
    """A mask file's raw integer levels as (H, W); colour masks take the max over channels."""
    image = _open(path)
    levels = np.asarray(image)
    if image.mode == "1":
        levels = levels.astype(np.uint8)
    elif image.mode in ("RGBA", "LA"):
        levels = levels[..., :-1]
    if levels.ndim == 3:
        levels = levels.max(axis=2)
    return levels


def _is_binary(levels: np.ndarray) -> bool:
    values = set(np.unique(levels).tolist())
    return any(values <= {0, high} for high in (1, 255, 65535))


def load_mask(record: ImageRecord) -> np.ndarray:
    """The (H, W) bool mask of a defect record: the union of its mask files (MVTec LOCO).

    Raises ``DataError`` naming the file for: no mask, a mask whose size differs from the
    image, a non-binary mask (levels other than 0 and 1/255; label maps excepted), an all-zero
    union.
    """
    if not record.mask_paths:
        raise DataError(record.path, "defect image without a mask")
    height, width = image_size(record.path)
    union = np.zeros((height, width), dtype=bool)
    for mask_path in record.mask_paths:
        levels = _mask_levels(Path(mask_path))
        if levels.shape != (height, width):
            raise DataError(
                mask_path,
                f"mask is {levels.shape[1]}x{levels.shape[0]} but its image {record.path.name} "
                f"is {width}x{height}",
            )
        if not record.mask_labels and not _is_binary(levels):
            shown = ", ".join(str(v) for v in np.unique(levels)[:6])
            raise DataError(mask_path, f"non-binary mask (levels {shown}, ...; expected 0 and 255, or 0 and 1)")
        union |= levels > 0
    if not union.any():
        raise DataError(record.mask_paths[0], "mask is all zero (no anomalous pixel)")
    return union


def load_defect(record: ImageRecord) -> DefectExample:
    """Image + validated mask of one defect record."""
    mask = load_mask(record)
    return DefectExample(image=load_image(record.path), mask=mask, defect_type=record.defect_type, source=record.path)


def load_defects(records: Sequence[ImageRecord], skip_bad: bool = False) -> list[DefectExample]:
    """Load defect records in order; with ``skip_bad`` a bad one is warned about and skipped."""
    examples = []
    for record in records:
        try:
            examples.append(load_defect(record))
        except DataError as error:
            if not skip_bad:
                raise
            warnings.warn(f"skipped {error}", stacklevel=2)
    return examples


def load_goods(records: Sequence[ImageRecord], limit: int | None = None) -> list[np.ndarray]:
    """The first ``limit`` (default: all) good images, in record order."""
    chosen = records if limit is None else records[:limit]
    return [load_image(record.path) for record in chosen]


def check_record(record: ImageRecord) -> None:
    """Decode a record's image (and mask, for a defect) fully; raise ``DataError`` on any problem."""
    if record.is_good:
        load_image(record.path)
    else:
        load_defect(record)


def as_rgb(image: np.ndarray, what: str) -> np.ndarray:
    """``image`` as a contiguous (H, W, 3) uint8 array; grayscale (H, W) or (H, W, 1) is repeated."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise AnomalygenError(f"{what}: expected uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise AnomalygenError(f"{what}: expected an (H, W, 3) image, got shape {image.shape}")
    return np.ascontiguousarray(np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image)
