"""Augmentation of real defect masks (flip, rotate, scale, translate) that keeps them on the
object: the transformed mask is moved so its centre lands on a random foreground pixel, and
what would fall outside the foreground is cut away."""

from __future__ import annotations

import cv2
import numpy as np

from anomalygen.errors import AnomalygenError
from anomalygen.masks.foreground import foreground_mask


def augment_mask(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    shape: tuple[int, int] | None = None,
    flip: bool = True,
    rotate: float = 180.0,
    scale: tuple[float, float] = (0.75, 1.25),
    min_inside: float = 0.7,
    tries: int = 20,
) -> np.ndarray:
    """A randomly flipped, rotated (``U(-rotate, rotate)`` degrees), scaled and translated copy
    of ``mask`` on a canvas of ``shape`` (default: the foreground's, else the mask's); a mask
    from an image of another size is first rescaled by the ratio of the short sides.

    The centre of the mask goes to a random foreground pixel; a draw is kept when at least
    ``min_inside`` of it lies on the foreground (else the best of ``tries`` draws), and the result
    is intersected with the foreground, so it never leaves it. Never empty.
    """
    if not mask.any():
        raise AnomalygenError("cannot augment an empty mask")
    if shape is None:
        shape = foreground.shape if foreground is not None else mask.shape
    if foreground is None:
        foreground = np.ones(shape, bool)
    elif foreground.shape != tuple(shape):
        raise AnomalygenError(f"foreground shape {foreground.shape} differs from target shape {tuple(shape)}")
    if not foreground.any():
        raise AnomalygenError("the foreground mask is empty")
    fy, fx = np.nonzero(foreground)
    size_ratio = min(shape) / min(mask.shape)
    best, best_inside = None, -1.0
    for _ in range(tries):
        m = mask[:, ::-1] if flip and rng.random() < 0.5 else mask
        m = np.ascontiguousarray(m[::-1] if flip and rng.random() < 0.5 else m)
        ys, xs = np.nonzero(m)
        cy, cx = ys.mean(), xs.mean()
        pick = rng.integers(0, len(fy))
        matrix = cv2.getRotationMatrix2D(
            (cx, cy), rng.uniform(-rotate, rotate), rng.uniform(*scale) * size_ratio
        )
        matrix[:, 2] += (fx[pick] - cx, fy[pick] - cy)
        warped = cv2.warpAffine(
            m.astype(np.uint8), matrix, (shape[1], shape[0]), flags=cv2.INTER_NEAREST
        ).astype(bool)
        total = warped.sum()
        inside = (warped & foreground).sum() / total if total else 0.0
        if inside > best_inside:
            best, best_inside = warped & foreground, inside
        if inside >= min_inside:
            break
    if best is None or not best.any():
        best = np.zeros(shape, bool)
        best[fy[len(fy) // 2], fx[len(fx) // 2]] = True
    return best


def augment_onto(mask: np.ndarray, image: np.ndarray, rng: np.random.Generator, mode: str = "auto") -> np.ndarray:
    """``augment_mask`` onto ``image``: at its size, on its ``foreground_mask(image, mode)`` (the object;
    every pixel of a texture, where this is ``augment_mask`` on the whole canvas), so that a defect
    painted in the mask lands on the part, as Crop-Paste's patches do."""
    return augment_mask(mask, rng, foreground=foreground_mask(image, mode))
