"""The data that flows between readers, generators, the writer and evaluation.

Images are ``numpy.ndarray`` of shape (H, W, 3), dtype uint8, RGB.
Masks are ``numpy.ndarray`` of shape (H, W), dtype bool (True = anomalous pixel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ImageRecord:
    """One image on disk, with its mask file(s) if it is a defect image.

    ``mask_paths`` holds several files for MVTec LOCO (their union is the mask), one for
    MVTec AD / VisA / generic folders, none for good images.
    """

    path: Path
    defect_type: str = "good"
    mask_paths: tuple[Path, ...] = ()
    image_id: str = ""
    # True when the mask files are label maps (VisA: a value per defect instance): any
    # non-zero pixel is anomalous; otherwise masks must hold exactly the levels 0 and 1/255.
    mask_labels: bool = False

    @property
    def is_good(self) -> bool:
        return self.defect_type == "good"


@dataclass
class DefectExample:
    """A loaded real defect: image, mask and defect type (the few-shot training unit)."""

    image: np.ndarray
    mask: np.ndarray
    defect_type: str
    source: Path | None = None


@dataclass
class AnomalySample:
    """One generated defect image with its pixel mask, as every generator returns it."""

    image: np.ndarray
    mask: np.ndarray
    defect_type: str
    prompt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
