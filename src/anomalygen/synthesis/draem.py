"""DRAEM's simulated anomalies (Zavrtanik et al. 2021, ICCV, "DRAEM - a discriminatively trained
reconstruction embedding for surface anomaly detection", Sec. 3.3, Eq. 1):

    I_a = (1 - M) * I + (1 - beta) * (M * I) + beta * (M * A)

with ``M`` a thresholded Perlin-noise mask (times the object foreground for object categories,
as CAGen does), ``A`` an anomaly source image augmented by 3 random ops, and the opacity
``beta ~ U(beta_range)``. On grayscale images the anomaly is made grayscale too. Used by the DRAEM
generator (``methods.draem``) and by the DRAEM-augmentation protocol, which trains DRAEM on them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from anomalygen.data.images import as_rgb, is_image_file, load_image
from anomalygen.errors import DataError
from anomalygen.masks import perlin_mask
from anomalygen.synthesis.blending import blend
from anomalygen.synthesis.photometric import rand_augment

SKIMAGE_TEXTURES = ("brick", "grass", "gravel")
Source = Callable[[np.random.Generator], tuple[str, np.ndarray]]  # draws (name, RGB image) of an anomaly source


def load_textures(source: str) -> list[tuple[str, np.ndarray]]:
    """(name, RGB image) pairs of the anomaly-source images: ``"skimage"`` or a folder path."""
    if source == "skimage":
        from skimage import data

        return [(name, as_rgb(getattr(data, name)(), name)) for name in SKIMAGE_TEXTURES]
    folder = Path(source)
    if not folder.is_dir():
        raise DataError(folder, "texture folder not found (use 'skimage', 'good' or a folder of images)")
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not files:
        raise DataError(folder, "texture folder holds no PNG/JPG/BMP/TIFF image")
    return [(path.name, load_image(path)) for path in files]


def pick_texture(textures: list[tuple[str, np.ndarray]]) -> Source:
    """A ``Source`` drawing one of ``textures`` uniformly."""
    return lambda rng: textures[int(rng.integers(len(textures)))]


def is_gray(image: np.ndarray) -> bool:
    """True for an RGB image whose three channels are equal (a grayscale category)."""
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())


def simulate(image: np.ndarray, rng: np.random.Generator, source: Source, *, mask: np.ndarray | None = None,
             foreground: np.ndarray | None = None, beta: tuple[float, float] = (0.1, 1.0), ops: int = 3,
             threshold: float = 0.5, min_exp: int = 0, max_exp: int = 6) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Eq. 1 on RGB ``image``: (anomalous image, bool mask, meta). ``M`` is ``mask`` if given, else a
    Perlin mask (lattice 2^k cells, k ~ U{min_exp, .., max_exp - 1}, noise > ``threshold``, inside
    ``foreground``); then ``A`` is drawn from ``source``, resized to the image, given ``ops`` of
    DRAEM's augmentations; ``beta ~ U(beta)``. Every draw comes from ``rng``, in that order."""
    shape = image.shape[:2]
    if mask is None:
        mask = perlin_mask(shape, rng, min_exp=min_exp, max_exp=max_exp, threshold=threshold, foreground=foreground)
    name, anomaly = source(rng)
    if anomaly.shape[:2] != shape:
        anomaly = cv2.resize(anomaly, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    anomaly, applied = rand_augment(anomaly, rng, ops)
    if is_gray(image):
        anomaly = np.repeat(cv2.cvtColor(anomaly, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    opacity = float(rng.uniform(*beta))
    out = blend(image, anomaly, mask.astype(np.float32) * opacity)
    return out, mask, {"texture": name, "ops": applied, "beta": round(opacity, 4)}
