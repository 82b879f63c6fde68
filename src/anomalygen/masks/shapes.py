"""Random geometric masks: ellipses, and free-form brush strokes as in DeepFill v2 (Yu et al.
2019, ICCV, "Free-form image inpainting with gated convolution", Algorithm 1)."""

from __future__ import annotations

import cv2
import numpy as np
from skimage import draw


def ellipse_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    count: tuple[int, int] = (1, 3),
    area: tuple[float, float] = (0.002, 0.03),
    foreground: np.ndarray | None = None,
) -> np.ndarray:
    """Union of ``count`` (inclusive range) random rotated ellipses, each covering a fraction of
    the image drawn from ``area``, aspect ratio in [1/3, 3]; centres on ``foreground`` pixels."""
    h, w = shape
    mask = np.zeros(shape, bool)
    centres = _centres(shape, rng, int(rng.integers(count[0], count[1] + 1)), foreground)
    for cy, cx in centres:
        a = rng.uniform(*area) * h * w
        ratio = np.exp(rng.uniform(np.log(1 / 3), np.log(3)))
        ry, rx = max(1.0, np.sqrt(a * ratio / np.pi)), max(1.0, np.sqrt(a / ratio / np.pi))
        rr, cc = draw.ellipse(cy, cx, ry, rx, shape=shape, rotation=rng.uniform(-np.pi, np.pi))
        mask[rr, cc] = True
    mask[int(centres[0][0]), int(centres[0][1])] = True
    return mask


def brush_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    strokes: tuple[int, int] = (1, 3),
    vertices: tuple[int, int] = (3, 8),
    width: tuple[float, float] = (0.01, 0.04),
    length: tuple[float, float] = (0.05, 0.15),
    foreground: np.ndarray | None = None,
) -> np.ndarray:
    """Free-form brush strokes (Yu et al. 2019, Alg. 1): each stroke is a polyline of
    ``vertices`` segments with random turning angles, a segment ``length`` and a line ``width``
    given as fractions of the short image side, drawn with round joints."""
    h, w = shape
    side = min(h, w)
    canvas = np.zeros(shape, np.uint8)
    for y, x in _centres(shape, rng, int(rng.integers(strokes[0], strokes[1] + 1)), foreground):
        thickness = max(1, round(rng.uniform(*width) * side))
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(vertices[0], vertices[1] + 1))):
            angle += rng.uniform(-np.pi / 3, np.pi / 3)
            step = rng.uniform(*length) * side
            ny = float(np.clip(y + step * np.sin(angle), 0, h - 1))
            nx = float(np.clip(x + step * np.cos(angle), 0, w - 1))
            cv2.line(canvas, (round(x), round(y)), (round(nx), round(ny)), 1, thickness, cv2.LINE_8)
            cv2.circle(canvas, (round(nx), round(ny)), thickness // 2, 1, -1)
            y, x = ny, nx
    return canvas.astype(bool)


def _centres(
    shape: tuple[int, int], rng: np.random.Generator, k: int, foreground: np.ndarray | None
) -> list[tuple[float, float]]:
    """``k`` random points, uniform over ``foreground`` pixels (or the whole image)."""
    if foreground is None or not foreground.any():
        return [(rng.uniform(0, shape[0] - 1), rng.uniform(0, shape[1] - 1)) for _ in range(k)]
    ys, xs = np.nonzero(foreground)
    picks = rng.integers(0, len(ys), size=k)
    return [(float(ys[p]), float(xs[p])) for p in picks]
