"""CutPaste (Li et al. 2021, CVPR, "CutPaste: self-supervised learning for anomaly detection
and localization", Sec. 3.1): cut a patch of the good image, colour-jitter it and paste it back
elsewhere. The mask is the pasted region.

Variants: ``"patch"`` (a rectangle of 2-15 % of the image area, aspect ratio in [0.3, 1/0.3]) and
``"scar"`` (a thin rectangle, width 2-16 px and length 10-25 px at 256 px, rotated by
U(-45, 45) degrees). Scar sizes scale with the short image side over ``reference_size``.
Pastes are centred on a foreground pixel, cuts are taken anywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from anomalygen.synthesis.blending import blend, place, random_point, rotate_patch
from anomalygen.methods.modelfree import FOREGROUND, ModelFreeGenerator
from anomalygen.options import Float, Int, OptionSpec, Range, Subset
from anomalygen.synthesis.photometric import color_jitter

VARIANTS = ("patch", "scar")


class CutPaste(ModelFreeGenerator):
    """CutPaste patch / scar anomalies. ``defect_type``: a variant name, or any other label (e.g.
    ``"cutpaste"``) to draw the variant at random per sample; ``None`` cycles ``variants``."""

    name = "cutpaste"

    OPTIONS = OptionSpec(
        variants=Subset(list(VARIANTS), VARIANTS, sampling=True),
        area=Range([0.02, 0.15], 0, 1, low_open=True, sampling=True),  # patch area / image area
        aspect=Float(0.3, 0, 1, low_open=True, sampling=True),
        scar_width=Range([2, 16], 0, low_open=True, sampling=True),  # px at reference_size
        scar_length=Range([10, 25], 0, low_open=True, sampling=True),
        scar_rotation=Float(45.0, 0, 180, sampling=True),  # degrees
        reference_size=Int(256, 1, sampling=True),
        jitter=Float(0.1, 0, 1, sampling=True),
        foreground=FOREGROUND,
    )

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._defect_types = list(self.options["variants"])

    def _cut(self, image: np.ndarray, rng: np.random.Generator, ph: int, pw: int) -> np.ndarray:
        """A colour-jittered ``ph`` x ``pw`` patch from a random location of ``image``."""
        h, w = image.shape[:2]
        top, left = int(rng.integers(h - ph + 1)), int(rng.integers(w - pw + 1))
        j = self.options["jitter"]
        return color_jitter(image[top : top + ph, left : left + pw], rng, j, j, j, j)

    def _patch_size(self, shape: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
        """Eq. of Sec. 3.1: area ``U(area) * H * W``, aspect ``exp U(log a, -log a)``."""
        h, w = shape
        area = rng.uniform(*self.options["area"]) * h * w
        ratio = np.exp(rng.uniform(np.log(self.options["aspect"]), -np.log(self.options["aspect"])))
        ph = int(np.clip(round(np.sqrt(area * ratio)), 1, h))
        pw = int(np.clip(round(np.sqrt(area / ratio)), 1, w))
        return ph, pw

    def _scar(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        k = min(h, w) / self.options["reference_size"]
        pw = int(np.clip(round(rng.uniform(*self.options["scar_width"]) * k), 1, w))
        ph = int(np.clip(round(rng.uniform(*self.options["scar_length"]) * k), 1, h))
        patch = self._cut(image, rng, ph, pw)
        angle = rng.uniform(-self.options["scar_rotation"], self.options["scar_rotation"])
        patch, alpha = rotate_patch(patch, np.ones((ph, pw), np.float32), angle)
        return patch, (alpha >= 0.5).astype(np.float32)

    def _anomaly(
        self, image, foreground, mask, label, rng, good
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        h, w = image.shape[:2]
        variants = self.options["variants"]
        variant = label if label in VARIANTS else variants[int(rng.integers(len(variants)))]
        if mask is not None:
            ys, xs = np.nonzero(mask)
            top, left = ys.min(), xs.min()
            patch = self._cut(image, rng, ys.max() - top + 1, xs.max() - left + 1)
            canvas, alpha = place(
                (h, w), patch, mask[top : ys.max() + 1, left : xs.max() + 1].astype(np.float32), top, left
            )
            return blend(image, canvas, alpha), mask, {"variant": "mask"}
        if variant == "patch":
            ph, pw = self._patch_size((h, w), rng)
            patch, alpha = self._cut(image, rng, ph, pw), np.ones((ph, pw), np.float32)
        else:
            patch, alpha = self._scar(image, rng)
        ph, pw = alpha.shape
        cy, cx = random_point(rng, foreground)
        top = int(np.clip(cy - ph // 2, 0, max(h - ph, 0)))
        left = int(np.clip(cx - pw // 2, 0, max(w - pw, 0)))
        canvas, alpha = place((h, w), patch, alpha, top, left)
        return blend(image, canvas, alpha), alpha > 0, {"variant": variant, "box": [top, left, ph, pw]}
