"""Anomaly mask generation of AnomalyDiffusion (Hu et al., AAAI 2024, §3.4, Eq. 9).

A mask embedding e_m of k' tokens per defect type is learned by textual inversion on the
training masks (Eq. 9: L = E‖ε − ε_θ(z_t, t, e_m)‖², z = VAE encoding of the mask drawn as an
image, diffusion model frozen). New masks are sampled from e_m as the official code does
(``generate_mask.py``): DDIM 100 steps, η = 1, classifier-free guidance 5; the decoded image's
channel mean, on the decoder's [-1, 1] scale, above 0.8 is the mask; a mask is rejected when it
covers more than a third of any side of the image border (``check_mask``). Two rules are ours:
an empty mask is rejected too (the official script keeps it: a "defect" sample without a defect),
and ``MaskStats`` (``mask_filter="ours"``) also rejects masks whose area is far outside the
training masks' range.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

OFFICIAL_THRESHOLD = 0.8  # generate_mask.py: mask.mean(0) > 0.8 on the decoded [-1, 1] image
OURS_THRESHOLD = 0.6  # our earlier default: 0.8 on [0, 1], i.e. 0.6 on [-1, 1]
MASK_FILTERS = ("official", "ours")


def binarize(decoded: torch.Tensor, threshold: float = OFFICIAL_THRESHOLD) -> torch.Tensor:
    """Decoded mask images (B, 3, H, W) on the decoder's [-1, 1] scale -> bool masks (B, H, W):
    channel mean above ``threshold`` (on that same [-1, 1] scale)."""
    return decoded.float().mean(1) > threshold


def border_contact(mask: np.ndarray) -> float:
    """Fraction of the image's one-pixel frame the mask covers."""
    frame = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    return float(frame.mean())


def official_rejection(mask: np.ndarray) -> str | None:
    """The official rule (``generate_mask.py`` ``check_mask``): rejected when more than a third of
    the pixels of any one border side (first / last row or column) are in the mask; and, ours,
    when the mask is empty."""
    if not mask.any():
        return "empty"
    for name, side in (("top", mask[0]), ("bottom", mask[-1]), ("left", mask[:, 0]), ("right", mask[:, -1])):
        if np.count_nonzero(side) > len(side) / 3:
            return f"covers {np.count_nonzero(side)}/{len(side)} px of the {name} border (> a third)"
    return None


@dataclass
class MaskStats:
    """Our rule (``mask_filter="ours"``): what an acceptable generated mask looks like, from the
    training masks of one type.

    Areas are fractions of the image; a mask is accepted with area in
    [min_area / tolerance, max_area · tolerance] and border contact at most
    max(border_floor, 1.5 · the training masks' largest contact). The constants are ours.
    """

    min_area: float
    max_area: float
    max_border: float
    tolerance: float = 2.0
    border_floor: float = 0.1

    @classmethod
    def from_masks(cls, masks: list[np.ndarray], **options: float) -> "MaskStats":
        areas = [float(m.mean()) for m in masks]
        return cls(min(areas), max(areas), max(border_contact(m) for m in masks), **options)

    def rejection(self, mask: np.ndarray) -> str | None:
        """Why ``mask`` (bool, H×W) is rejected, or None when it is acceptable."""
        area = float(mask.mean())
        if area == 0:
            return "empty"
        if area < self.min_area / self.tolerance or area > self.max_area * self.tolerance:
            return f"area {area:.4f} outside [{self.min_area / self.tolerance:.4f}, {self.max_area * self.tolerance:.4f}]"
        limit = max(self.border_floor, 1.5 * self.max_border)
        if border_contact(mask) > limit:
            return f"touches the border ({border_contact(mask):.2f} of the frame > {limit:.2f})"
        return None

    def to_json(self) -> dict[str, float]:
        return asdict(self)
