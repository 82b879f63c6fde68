"""DRAEM's simulated anomalies as a generator (Zavrtanik et al. 2021, ICCV, Sec. 3.3, Eq. 1; the
simulator is ``synthesis.draem``): a Perlin mask (times the object foreground for object
categories, as CAGen does) filled with an augmented anomaly source at opacity ``beta``. The source
is ``texture_source``: ``"skimage"`` (scikit-image's bundled CC0 textures brick, grass, gravel; the
paper uses DTD), ``"good"`` (another good image of the category) or a folder of images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from anomalygen.data.images import as_rgb
from anomalygen.methods.modelfree import FOREGROUND, ModelFreeGenerator
from anomalygen.options import Float, Int, OptionSpec, Range, Text, require
from anomalygen.synthesis.draem import load_textures, pick_texture, simulate
from anomalygen.synthesis.photometric import RAND_AUGMENT_OPS


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

    def _source(self, rng: np.random.Generator, good: Sequence[np.ndarray]) -> tuple[str, np.ndarray]:
        """The anomaly source image ``A`` (name, RGB)."""
        if self.options["texture_source"] == "good":
            k = int(rng.integers(len(good)))
            return f"good:{k}", as_rgb(good[k], f"good image {k}")
        if self._textures is None:
            self._textures = load_textures(self.options["texture_source"])
        return pick_texture(self._textures)(rng)

    def _anomaly(
        self, image, foreground, mask, label, rng, good
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        settings = {key: self.options[key] for key in ("beta", "ops", "threshold", "min_exp", "max_exp")}
        return simulate(image, rng, lambda r: self._source(r, good), mask=mask,
                        foreground=None if foreground.all() else foreground, **settings)
