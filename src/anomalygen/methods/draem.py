"""DRAEM's simulated anomalies (Zavrtanik et al. 2021, ICCV, "DRAEM - a discriminatively trained
reconstruction embedding for surface anomaly detection", Sec. 3.3, Eq. 1):

    I_a = (1 - M) * I + (1 - beta) * (M * I) + beta * (M * A)

with ``M`` a thresholded Perlin-noise mask (times the object foreground for object categories,
as CAGen does), ``A`` an anomaly source image augmented by 3 random ops, and the opacity
``beta ~ U(beta_range)``. The anomaly source is ``texture_source``: ``"skimage"`` (scikit-image's
bundled CC0 textures brick, grass, gravel; the paper uses DTD), ``"good"`` (another good image
of the category) or a folder of images. On grayscale good images the anomaly is made grayscale too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from anomalygen.data.images import is_image_file, load_image
from anomalygen.errors import DataError
from anomalygen.masks import perlin_mask
from anomalygen.methods.blending import blend
from anomalygen.methods.modelfree import FOREGROUND, ModelFreeGenerator, as_rgb
from anomalygen.options import Float, Int, OptionSpec, Range, Text, require
from anomalygen.methods.photometric import RAND_AUGMENT_OPS, rand_augment

SKIMAGE_TEXTURES = ("brick", "grass", "gravel")


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


def _is_gray(image: np.ndarray) -> bool:
    """True for an RGB image whose three channels are equal (a grayscale category)."""
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())


class DraemTexture(ModelFreeGenerator):
    """DRAEM Perlin-mask texture anomalies; labelled ``"draem"`` unless ``defect_type`` is given."""

    name = "draem"

    OPTIONS = OptionSpec(
        texture_source=Text("skimage", sampling=True),  # "skimage", "good" or a folder of images
        beta=Range([0.1, 1.0], 0, 1, sampling=True),  # opacity U(beta)
        ops=Int(3, 0, len(RAND_AUGMENT_OPS), sampling=True),
        threshold=Float(0.5, 0, 1, sampling=True),  # Perlin noise > threshold
        min_exp=Int(0, 0, 10, sampling=True),  # lattice 2^k cells, k ~ U{min_exp, .., max_exp - 1}
        max_exp=Int(6, 1, 10, sampling=True),
        foreground=FOREGROUND,
    )

    def __init__(self, **options: Any):
        super().__init__(**options)
        require(self.options["min_exp"] < self.options["max_exp"], self.name,
                f"option min_exp ({self.options['min_exp']}) must be smaller than max_exp ({self.options['max_exp']})")
        self._defect_types = ["draem"]
        self._textures: list[tuple[str, np.ndarray]] | None = None

    def _source(
        self, shape: tuple[int, int], rng: np.random.Generator, good: Sequence[np.ndarray]
    ) -> tuple[str, np.ndarray]:
        """The anomaly source image ``A`` (name, RGB resized to ``shape``)."""
        if self.options["texture_source"] == "good":
            k = int(rng.integers(len(good)))
            name, image = f"good:{k}", as_rgb(good[k], f"good image {k}")
        else:
            if self._textures is None:
                self._textures = load_textures(self.options["texture_source"])
            name, image = self._textures[int(rng.integers(len(self._textures)))]
        if image.shape[:2] != shape:
            image = cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
        return name, image

    def _anomaly(
        self, image, foreground, mask, label, rng, good
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        shape = image.shape[:2]
        if mask is None:
            mask = perlin_mask(
                shape,
                rng,
                min_exp=self.options["min_exp"],
                max_exp=self.options["max_exp"],
                threshold=self.options["threshold"],
                foreground=None if foreground.all() else foreground,
            )
        name, source = self._source(shape, rng, good)
        source, ops = rand_augment(source, rng, self.options["ops"])
        if _is_gray(image):
            source = np.repeat(cv2.cvtColor(source, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
        beta = float(rng.uniform(*self.options["beta"]))
        out = blend(image, source, mask.astype(np.float32) * beta)
        return out, mask, {"texture": name, "ops": ops, "beta": round(beta, 4)}
