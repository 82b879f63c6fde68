"""Masks at another size: nearest-neighbour, so they stay binary."""

from __future__ import annotations

import cv2
import numpy as np


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask resized nearest-neighbour to ``shape`` (H, W); returned as is when it fits."""
    mask = np.asarray(mask, bool)
    if mask.shape == tuple(shape):
        return mask
    return cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
