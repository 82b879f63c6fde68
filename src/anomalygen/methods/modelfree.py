"""The generation loop shared by the model-free generators (CutPaste, Crop-Paste, DRAEM).

Sample ``i`` draws everything from ``sample_rng(seed, i)``: first the good image, then what the
method needs. The foreground mode (``"auto"`` resolved over all good images by ``masks.is_object``,
once per list of good images) decides where anomalies may go.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from anomalygen.data.images import as_rgb
from anomalygen.errors import AnomalygenError
from anomalygen.masks import FOREGROUND_MODES, foreground_mask, resize_mask, resolve_mode
from anomalygen.methods.base import AnomalyGenerator
from anomalygen.options import Choice
from anomalygen.seeding import sample_rng
from anomalygen.types import AnomalySample, DefectExample

# Where anomalies may go: "auto" (decide by ``is_object``), "object" or "texture".
FOREGROUND = Choice("auto", FOREGROUND_MODES, sampling=True)  # acts at generation


def fit_mask(mask: np.ndarray, shape: tuple[int, int], what: str) -> np.ndarray:
    """A user mask as bool (H, W) of ``shape`` (resized nearest-neighbour if needed); never empty."""
    mask = np.asarray(mask).astype(bool)
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    mask = resize_mask(mask, shape)
    if not mask.any():
        raise AnomalygenError(f"{what}: the mask is empty (no anomalous pixel)")
    return mask


class ModelFreeGenerator(AnomalyGenerator):
    """An ``AnomalyGenerator`` that builds each sample from one good image with hand-made rules.

    Subclasses declare ``OPTIONS`` (with ``foreground=FOREGROUND``), implement ``_anomaly`` and may
    override ``_label`` and ``fit``.
    """

    needs_fit = False

    def __init__(self, **options: Any):
        super().__init__(**self.OPTIONS.validate(self.name, options))

    def fit(self, defects: Sequence[DefectExample], good: Sequence[np.ndarray]) -> None:
        """Nothing to learn: the anomalies come from rules, not from the training defects."""

    def _label(self, index: int, rng: np.random.Generator, defect_type: str | None) -> str:
        """The defect type of sample ``index``: the requested one, else the learned types in turn."""
        if defect_type is not None:
            return defect_type
        return self.defect_types[index % len(self.defect_types)]

    @abstractmethod
    def _anomaly(
        self,
        image: np.ndarray,
        foreground: np.ndarray,
        mask: np.ndarray | None,
        label: str,
        rng: np.random.Generator,
        good: Sequence[np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Return (anomalous image, its bool mask, meta) for one good ``image``; ``mask`` (if
        given) is where the anomaly must go; ``foreground`` where it may go."""

    def _foregrounds(self, good: Sequence[np.ndarray]) -> tuple[str, dict[int, np.ndarray]]:
        """The foreground mode resolved over ``good`` and a cache of each image's foreground mask, kept
        while ``generate`` is given the same ``good`` sequence (the validity filter's redraws call it
        once per draw: recomputing both was most of a redraw's time)."""
        if getattr(self, "_good", None) is not good:
            self._good, self._foreground_cache = good, (resolve_mode(self.options["foreground"], good), {})
        return self._foreground_cache

    def generate(
        self,
        good: Sequence[np.ndarray],
        n: int,
        *,
        masks: Sequence[np.ndarray] | None = None,
        seed: int = 0,
        start: int = 0,
        defect_type: str | None = None,
    ) -> Iterator[AnomalySample]:
        if len(good) == 0:
            raise AnomalygenError(f"{self.name}: no good images to build anomalies on")
        if masks is not None and len(masks) == 0:
            raise AnomalygenError(f"{self.name}: an empty list of masks was given")
        if not self.defect_types:
            raise AnomalygenError(f"{self.name}: no defect types; call fit() with training defects first")
        mode, foregrounds = self._foregrounds(good)
        for i in range(start, start + n):
            rng = sample_rng(seed, i)
            source = int(rng.integers(len(good)))
            image = as_rgb(good[source], f"good image {source}")
            if source not in foregrounds:
                foregrounds[source] = foreground_mask(image, mode)
            mask = (
                None
                if masks is None
                else fit_mask(masks[i % len(masks)], image.shape[:2], f"mask {i % len(masks)}")
            )
            label = self._label(i, rng, defect_type)
            out, out_mask, meta = self._anomaly(image, foregrounds[source], mask, label, rng, good)
            meta = {"source_index": source, "foreground": mode, **meta}
            yield AnomalySample(image=out, mask=out_mask, defect_type=label, prompt=None, meta=meta)
