"""Object foreground masks for object-on-plain-background images; textures are all foreground.

An object category (MVTec "hazelnut", "screw", ...) shows one object on a plain background, so
the pixels that differ from the border colour, cleaned by morphology and reduced to the largest
connected component, are the object. A texture category ("grid", "carpet") has no background:
its foreground is the whole image. ``is_object`` decides which kind a set of images is.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from scipy import ndimage
from skimage import filters, measure

from anomalygen.errors import AnomalygenError

FOREGROUND_MODES = ("auto", "object", "texture")


def _border(image: np.ndarray, width: int) -> np.ndarray:
    """The pixels of the ``width``-pixel frame of ``image``, as (N, C) float."""
    img = image.reshape(image.shape[0], image.shape[1], -1).astype(np.float32)
    frame = np.ones(img.shape[:2], bool)
    frame[width:-width, width:-width] = False
    return img[frame]


def border_distance(image: np.ndarray, width: int = 4) -> np.ndarray:
    """Per-pixel max-over-channels distance to the median border colour."""
    img = image.reshape(image.shape[0], image.shape[1], -1).astype(np.float32)
    colour = np.median(_border(image, width), axis=0)
    return np.abs(img - colour).max(axis=-1)


def object_mask(image: np.ndarray, *, min_contrast: float = 12.0, radius: int | None = None) -> np.ndarray:
    """The object of an object-on-plain-background image as a bool (H, W) mask.

    Threshold: Otsu on the distance to the median border colour, at least ``min_contrast``
    grey levels; then closing + opening with a disc of ``radius`` (default 1% of the short
    side), hole filling and the largest connected component. Empty when nothing stands out.
    """
    distance = border_distance(image)
    if distance.max() < min_contrast:
        return np.zeros(distance.shape, bool)
    threshold = max(float(filters.threshold_otsu(distance)), min_contrast)
    mask = distance > threshold
    r = radius if radius is not None else max(1, round(0.01 * min(mask.shape)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    mask = ndimage.binary_fill_holes(mask)
    labels = measure.label(mask)
    if labels.max() == 0:
        return mask
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return labels == largest


def looks_like_object(
    image: np.ndarray, *, border_std: float = 10.0, coverage: tuple[float, float] = (0.01, 0.9)
) -> bool:
    """True when the border is plain (per-channel std below ``border_std``) and an object mask
    covering a fraction of the image within ``coverage`` stands out from it."""
    if _border(image, 4).std(axis=0).max() > border_std:
        return False
    fraction = object_mask(image).mean()
    return coverage[0] <= fraction <= coverage[1]


def is_object(images: Sequence[np.ndarray], *, max_images: int = 8) -> bool:
    """Majority vote of ``looks_like_object`` over up to ``max_images`` evenly spaced images."""
    if len(images) == 0:
        raise AnomalygenError("is_object needs at least one image")
    picks = np.unique(np.linspace(0, len(images) - 1, min(max_images, len(images))).round().astype(int))
    votes = [looks_like_object(images[i]) for i in picks]
    return 2 * sum(votes) > len(votes)


def foreground_mask(image: np.ndarray, mode: str = "auto") -> np.ndarray:
    """The region anomalies may go on: the object for ``"object"``, all pixels for ``"texture"``;
    ``"auto"`` decides per image with ``looks_like_object``. An object image whose object cannot
    be found falls back to the whole image."""
    if mode not in FOREGROUND_MODES:
        raise AnomalygenError(f"foreground mode {mode!r} unknown; use one of {', '.join(FOREGROUND_MODES)}")
    whole = np.ones(image.shape[:2], bool)
    if mode == "texture" or (mode == "auto" and not looks_like_object(image)):
        return whole
    mask = object_mask(image)
    return mask if mask.any() else whole


def resolve_mode(mode: str, images: Sequence[np.ndarray]) -> str:
    """``"auto"`` becomes ``"object"`` or ``"texture"`` by ``is_object(images)``; others pass."""
    if mode not in FOREGROUND_MODES:
        raise AnomalygenError(f"foreground mode {mode!r} unknown; use one of {', '.join(FOREGROUND_MODES)}")
    if mode != "auto":
        return mode
    return "object" if is_object(images) else "texture"
