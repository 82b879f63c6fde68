"""Anomaly mask generation of AnomalyDiffusion (Hu et al., AAAI 2024, §3.4, Eq. 9).

A mask embedding e_m of k' tokens per defect type is learned by textual inversion on the
training masks (Eq. 9: L = E‖ε − ε_θ(z_t, t, e_m)‖², z = VAE encoding of the mask drawn as an
image, diffusion model frozen). New masks are sampled from e_m (the official code: DDIM 100 steps,
classifier-free guidance 5), thresholded at 0.8 and rejected when degenerate: empty, hugging the
image border, or with an area far outside the range of the training masks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


def binarize(decoded: torch.Tensor, threshold: float = 0.8) -> torch.Tensor:
    """Decoded mask images (B, 3, H, W) in [-1, 1] -> bool masks (B, H, W): mean intensity in
    [0, 1] above ``threshold``."""
    return (decoded.float().mean(1) + 1) / 2 > threshold


def border_contact(mask: np.ndarray) -> float:
    """Fraction of the image's one-pixel frame the mask covers."""
    frame = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    return float(frame.mean())


@dataclass
class MaskStats:
    """What an acceptable generated mask looks like, from the training masks of one type.

    Areas are fractions of the image; a mask is accepted with area in
    [min_area / tolerance, max_area · tolerance] and border contact at most
    max(border_floor, 1.5 · the training masks' largest contact).
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
