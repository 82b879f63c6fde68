"""Masks at another size: nearest-neighbour, so they stay binary; or any-pixel pooling, so that no
defect disappears when a mask is made smaller (labels)."""

from __future__ import annotations

import cv2
import numpy as np


def resize_mask(mask: np.ndarray, shape: tuple[int, int], *, any_pixel: bool = False) -> np.ndarray:
    """A bool mask resized to ``shape`` (H, W); returned as is when it fits. Nearest-neighbour, or
    with ``any_pixel`` a pixel is set when any source pixel it covers is (each source pixel falls in
    exactly one cell along an axis made smaller): a 1-px line stays a line at any size."""
    mask = np.asarray(mask, bool)
    if mask.shape == tuple(shape):
        return mask
    if any_pixel and (shape[0] < mask.shape[0] or shape[1] < mask.shape[1]):
        for axis, size in enumerate(shape):
            mask = _any_pixel_axis(mask, size, axis)
        return mask
    return cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)


def _any_pixel_axis(mask: np.ndarray, size: int, axis: int) -> np.ndarray:
    """``mask`` at ``size`` along ``axis``: cell i pools source pixels floor(i·n/size) .. floor((i+1)·n/size) - 1
    when smaller, takes source pixel floor(i·n/size) when larger (nearest)."""
    n = mask.shape[axis]
    starts = np.arange(size) * n // size
    return np.logical_or.reduceat(mask, starts, axis=axis) if size < n else np.take(mask, starts, axis=axis)
