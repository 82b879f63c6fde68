"""Perlin-noise anomaly masks, as DRAEM draws them (Zavrtanik et al. 2021, ICCV, Sec. 3.3).

The noise is gradient noise (Perlin 2002, "Improving noise", SIGGRAPH: quintic fade
``6t^5 - 15t^4 + 10t^3``); DRAEM draws the lattice resolution per axis as ``2^k`` with ``k``
uniform in ``[min_exp, max_exp)`` (their code: ``torch.randint(0, 6)``), rotates the noise by a
random angle in [-90, 90] degrees and thresholds it at 0.5.
"""

from __future__ import annotations

import cv2
import numpy as np

from anomalygen.errors import AnomalygenError


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's (2002) quintic interpolant ``6t^5 - 15t^4 + 10t^3``."""
    return ((6 * t - 15) * t + 10) * t**3


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient noise of ``shape`` on a ``res`` (rows, cols) lattice, values in [-1, 1].

    Random unit gradients sit on the lattice corners; each pixel blends the dot products of
    its four corner gradients with its offset from them using the quintic fade (Perlin 2002).
    Any ``shape`` is accepted (the lattice need not divide it). Scaled by sqrt(2) to span
    [-1, 1], as DRAEM's ``rand_perlin_2d_np`` does, which its 0.5 threshold assumes.
    """
    h, w = shape
    ry, rx = res
    angles = rng.uniform(0, 2 * np.pi, size=(ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = (np.arange(h) + 0.5) * ry / h
    x = (np.arange(w) + 0.5) * rx / w
    y0 = np.minimum(y.astype(int), ry - 1)
    x0 = np.minimum(x.astype(int), rx - 1)
    fy = (y - y0)[:, None]
    fx = (x - x0)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[(y0 + dy)[:, None], (x0 + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return np.sqrt(2) * (top * (1 - uy) + bottom * uy)


def _rotate(array: np.ndarray, degrees: float) -> np.ndarray:
    h, w = array.shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(
        array.astype(np.float32), matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    min_exp: int = 0,
    max_exp: int = 6,
    threshold: float = 0.5,
    rotate: float = 90.0,
    foreground: np.ndarray | None = None,
    min_area: int = 16,
    tries: int = 50,
) -> np.ndarray:
    """A non-empty DRAEM Perlin mask (Zavrtanik et al. 2021, Sec. 3.3): ``noise > threshold``.

    The lattice is ``2^k`` cells per axis, ``k ~ U{min_exp, .., max_exp-1}`` independently per
    axis; the noise is rotated by ``U(-rotate, rotate)`` degrees. With ``foreground`` the mask is
    intersected with it (CAGen's Perlin x object mask). Draws again until at least ``min_area``
    pixels (or all of a smaller foreground) are set.
    """
    h, w = shape
    if foreground is not None and foreground.shape != (h, w):
        raise AnomalygenError(f"foreground mask shape {foreground.shape} differs from image shape {(h, w)}")
    limit = max(1, min(min_area, int(foreground.sum()) if foreground is not None else h * w))
    for _ in range(tries):
        res = (2 ** int(rng.integers(min_exp, max_exp)), 2 ** int(rng.integers(min_exp, max_exp)))
        noise = _rotate(perlin_noise((h, w), res, rng), rng.uniform(-rotate, rotate))
        mask = noise > threshold
        if foreground is not None:
            mask &= foreground
        if mask.sum() >= limit:
            return mask
    raise AnomalygenError(
        f"no Perlin mask with at least {limit} pixels in {tries} draws (threshold {threshold}); "
        "lower the threshold or check the foreground mask"
    )
