"""Crop-Paste (Lin et al. 2021, "Few-shot defect segmentation leveraging abundant defect-free
training samples through normal background regularization and crop-and-paste operation",
Sec. 3.3): crop the real defects out of the few-shot training images by their masks, augment
them (flip, rotate, scale, colour) and paste them onto good images at foreground positions.

Each connected component of a training mask (at least ``min_area`` pixels) is one crop; crops
are rescaled by the ratio of the short sides of the good and the source image. Pasting uses a
feathered alpha (``feather`` px ramp inside the crop mask), no Poisson blending. The mask is the
pasted region (cut to the object for object categories).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from skimage import measure

from anomalygen.data.images import as_rgb, load_image
from anomalygen.errors import AnomalygenError, DataError
from anomalygen.io import atomic_write_text, corrupt, read_json
from anomalygen.methods.base import malformed_as_corrupt, model_path
from anomalygen.methods.modelfree import FOREGROUND, ModelFreeGenerator, fit_mask
from anomalygen.options import Bool, Float, Int, OptionSpec, Range
from anomalygen.synthesis.blending import blend, feather_alpha, place, random_point, rotate_patch
from anomalygen.synthesis.photometric import color_jitter
from anomalygen.types import DefectExample

CROPS_FILE = "crops.json"


@dataclass
class Crop:
    """A defect cut out of a training image: its bounding box pixels, mask, type, source size."""

    image: np.ndarray
    mask: np.ndarray
    defect_type: str
    source_shape: tuple[int, int]


def extract_crops(defect: DefectExample, min_area: int, what: str) -> list[Crop]:
    """One crop per connected component (8-connectivity) of ``defect.mask`` with at least
    ``min_area`` pixels; the whole mask's box when no component is that large."""
    image = as_rgb(defect.image, what)
    if defect.mask.shape[:2] != image.shape[:2]:
        raise DataError(what, f"mask shape {defect.mask.shape} differs from image shape {image.shape[:2]}")
    mask = fit_mask(defect.mask, image.shape[:2], what)
    regions = [r for r in measure.regionprops(measure.label(mask, connectivity=2)) if r.area >= min_area]
    boxes = [r.bbox for r in regions] or [measure.regionprops(mask.astype(np.uint8))[0].bbox]
    return [
        Crop(image[y0:y1, x0:x1].copy(), mask[y0:y1, x0:x1].copy(), defect.defect_type, image.shape[:2])
        for y0, x0, y1, x1 in boxes
    ]


class CropPaste(ModelFreeGenerator):
    """Paste augmented real defect crops; keeps the defect type (types cycle when not given)."""

    name = "croppaste"
    needs_fit = True

    OPTIONS = OptionSpec(
        flip=Bool(True, sampling=True),
        rotate=Float(180.0, 0, 180, sampling=True),  # degrees
        scale=Range([0.8, 1.2], 0, low_open=True, sampling=True),
        jitter=Float(0.1, 0, 1, sampling=True),
        feather=Float(3.0, 0, sampling=True),  # px; 0 = hard edge
        min_area=Int(16, 1),  # px of a mask component to be a crop
        foreground=FOREGROUND,
    )

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._crops: list[Crop] = []

    def fit(self, defects: Sequence[DefectExample], good: Sequence[np.ndarray]) -> None:
        """Cut every training defect into crops (one per mask component)."""
        if len(defects) == 0:
            raise AnomalygenError("croppaste: fit needs at least one training defect with a mask")
        self._crops = [
            crop
            for k, d in enumerate(defects)
            for crop in extract_crops(d, self.options["min_area"], str(d.source or f"training defect {k}"))
        ]
        self._defect_types = list(dict.fromkeys(c.defect_type for c in self._crops))

    def _label(self, index: int, rng: np.random.Generator, defect_type: str | None) -> str:
        if defect_type is not None and defect_type not in self.defect_types:
            raise AnomalygenError(
                f"croppaste: defect type {defect_type!r} not learned; have {', '.join(self.defect_types)}"
            )
        return super()._label(index, rng, defect_type)

    def _augment(
        self, crop: Crop, shape: tuple[int, int], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Flip, colour-jitter, rotate U(-rotate, rotate) and scale U(scale) x size ratio a crop;
        returns the patch and its hard mask."""
        patch, mask = crop.image, crop.mask
        if self.options["flip"]:
            if rng.random() < 0.5:
                patch, mask = patch[:, ::-1], mask[:, ::-1]
            if rng.random() < 0.5:
                patch, mask = patch[::-1], mask[::-1]
        j = self.options["jitter"]
        patch = color_jitter(np.ascontiguousarray(patch), rng, j, j, j, j / 2)
        size_ratio = min(shape) / min(crop.source_shape)
        scale = rng.uniform(*self.options["scale"]) * size_ratio
        scale = min(scale, 0.9 * shape[0] / patch.shape[0], 0.9 * shape[1] / patch.shape[1])
        rotate = self.options["rotate"]
        patch, alpha = rotate_patch(
            patch, np.ascontiguousarray(mask, dtype=np.float32), rng.uniform(-rotate, rotate), scale
        )
        hard = alpha >= 0.5
        if not hard.any():
            hard = alpha >= alpha.max()
        return patch, hard

    def _anomaly(
        self, image, foreground, mask, label, rng, good
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        h, w = image.shape[:2]
        choices = [k for k, c in enumerate(self._crops) if c.defect_type == label]
        k = choices[int(rng.integers(len(choices)))]
        patch, hard = self._augment(self._crops[k], (h, w), rng)
        if mask is not None:
            ys, xs = np.nonzero(mask)
            top, left = ys.min(), xs.min()
            size = (int(xs.max() - left + 1), int(ys.max() - top + 1))
            patch = cv2.resize(patch, size, interpolation=cv2.INTER_LINEAR)
            canvas, _ = place((h, w), patch, np.ones(patch.shape[:2], np.float32), top, left)
            alpha = feather_alpha(mask, self.options["feather"])
            return blend(image, canvas, alpha), mask, {"crop_index": k}
        ay, ax = random_point(rng, hard)
        cy, cx = random_point(rng, foreground)
        canvas, alpha = place((h, w), patch, feather_alpha(hard, self.options["feather"]), cy - ay, cx - ax)
        alpha = alpha * foreground
        return blend(image, canvas, alpha), alpha > 0, {"crop_index": k, "anchor": [cy, cx]}

    def save_state(self, directory: Path) -> None:
        """Crops as PNG (image + 0/255 mask) and their types and source sizes in ``crops.json``."""
        crops_dir = directory / "crops"
        crops_dir.mkdir(parents=True, exist_ok=True)
        entries = []
        for k, crop in enumerate(self._crops):
            Image.fromarray(crop.image).save(crops_dir / f"{k:04d}.png")
            Image.fromarray(crop.mask.astype(np.uint8) * 255).save(crops_dir / f"{k:04d}_mask.png")
            entries.append(
                {
                    "image": f"crops/{k:04d}.png",
                    "mask": f"crops/{k:04d}_mask.png",
                    "defect_type": crop.defect_type,
                    "source_shape": list(crop.source_shape),
                }
            )
        atomic_write_text(directory / CROPS_FILE, json.dumps(entries, indent=2))

    def load_state(self, directory: Path) -> None:
        path = directory / CROPS_FILE
        self._crops = []
        for entry in read_json(path, list):
            with malformed_as_corrupt(path):
                image = load_image(model_path(directory, entry["image"], path))
                mask = load_image(model_path(directory, entry["mask"], path))[..., 0] > 127
                height, width = (int(v) for v in entry["source_shape"])
                if not isinstance(entry["defect_type"], str) or mask.shape != image.shape[:2] or min(height, width) < 1:
                    raise ValueError(f"crop {entry['image']}: bad defect_type, mask size or source_shape")
            self._crops.append(Crop(image, mask, entry["defect_type"], (height, width)))
        if not self._crops:
            raise corrupt(path, "no crops (fit saves one per training defect component)")
        self._defect_types = list(dict.fromkeys(c.defect_type for c in self._crops))
