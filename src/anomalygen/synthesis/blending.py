"""Placing a patch on an image: canvas placement with clipping, feathered alpha, alpha blending.

Shared by the model-free generators (CutPaste, Crop-Paste, DRAEM). Blending never touches a
pixel where alpha is 0, so a generated image equals its source exactly outside the mask.
"""

from __future__ import annotations

import cv2
import numpy as np


def feather_alpha(mask: np.ndarray, radius: float) -> np.ndarray:
    """Soft alpha inside ``mask``: ``clip(d / radius, 0, 1)`` with ``d`` the distance (px) to the
    nearest pixel outside it, so alpha is > 0 exactly on the mask and ramps up over ``radius``
    pixels from its edge (feathered, Poisson-free pasting). ``radius <= 0`` gives a hard mask."""
    mask = mask.astype(bool)
    if radius <= 0:
        return mask.astype(np.float32)
    padded = np.pad(mask, 1).astype(np.uint8)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]
    return np.where(mask, np.clip(distance / radius, 0, 1), 0).astype(np.float32)


def blend(image: np.ndarray, patch: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``(1 - alpha) * image + alpha * patch`` rounded to uint8 where ``alpha > 0``; elsewhere the
    pixels of ``image`` unchanged."""
    out = image.copy()
    where = alpha > 0
    a = alpha[where][:, None]
    out[where] = np.clip(np.rint((1 - a) * image[where] + a * patch[where]), 0, 255).astype(np.uint8)
    return out


def place(
    shape: tuple[int, int], patch: np.ndarray, alpha: np.ndarray, top: int, left: int
) -> tuple[np.ndarray, np.ndarray]:
    """Put ``patch`` (h, w, 3) and its ``alpha`` (h, w) with their top-left corner at
    (``top``, ``left``) on an empty canvas of ``shape``, cropping what falls outside."""
    h, w = shape
    canvas = np.zeros((h, w, 3), np.uint8)
    canvas_alpha = np.zeros((h, w), np.float32)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + patch.shape[0], h), min(left + patch.shape[1], w)
    if y1 > y0 and x1 > x0:
        canvas[y0:y1, x0:x1] = patch[y0 - top : y1 - top, x0 - left : x1 - left]
        canvas_alpha[y0:y1, x0:x1] = alpha[y0 - top : y1 - top, x0 - left : x1 - left]
    return canvas, canvas_alpha


def rotate_patch(
    patch: np.ndarray, alpha: np.ndarray, degrees: float, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate and scale a patch and its alpha about their centre onto a canvas that holds the
    whole result (no corner is cut off); the new corners get alpha 0."""
    h, w = alpha.shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, scale)
    cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
    nw, nh = max(1, int(np.ceil(h * sin + w * cos))), max(1, int(np.ceil(h * cos + w * sin)))
    matrix[:, 2] += (nw / 2 - w / 2, nh / 2 - h / 2)
    out = cv2.warpAffine(patch, matrix, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    out_alpha = cv2.warpAffine(
        alpha.astype(np.float32),
        matrix,
        (nw, nh),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    out_alpha[out_alpha < 0.5 / 255] = 0
    return out, out_alpha


def random_point(rng: np.random.Generator, region: np.ndarray) -> tuple[int, int]:
    """A uniformly random (row, col) among the True pixels of ``region`` (any pixel if none)."""
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return int(rng.integers(region.shape[0])), int(rng.integers(region.shape[1]))
    k = int(rng.integers(len(ys)))
    return int(ys[k]), int(xs[k])
