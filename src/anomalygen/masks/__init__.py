"""Mask sources: Perlin noise (DRAEM), object foreground, random shapes, real-mask augmentation.

Masks are bool arrays of shape (H, W); every function takes its randomness from a
``numpy.random.Generator`` so that callers control determinism.
"""

from anomalygen.masks.augment import augment_mask, augment_onto
from anomalygen.masks.foreground import (
    FOREGROUND_MODES,
    foreground_mask,
    is_object,
    object_mask,
    resolve_mode,
)
from anomalygen.masks.perlin import perlin_mask, perlin_noise
from anomalygen.masks.resize import resize_mask
from anomalygen.masks.shapes import brush_mask, ellipse_mask

__all__ = [
    "FOREGROUND_MODES",
    "augment_mask",
    "augment_onto",
    "brush_mask",
    "ellipse_mask",
    "foreground_mask",
    "is_object",
    "object_mask",
    "perlin_mask",
    "perlin_noise",
    "resize_mask",
    "resolve_mode",
]
