"""Masked diffusion loss of AnomalyDiffusion (Hu et al., AAAI 2024, Eqs. 5-6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask (B, 1, H, W) in {0, 1} -> soft weights (B, 1, h, w): the fraction of each latent
    cell the anomaly covers (area resampling keeps thin defects that nearest would drop)."""
    return F.interpolate(mask.float(), size=size, mode="area")


def masked_diffusion_loss(eps_pred: torch.Tensor, eps: torch.Tensor,
                          weight: torch.Tensor) -> torch.Tensor:
    """Eq. 5: L = ||m ⊙ (ε − ε_θ(z_t, t, e))||² / ||m||, the ε-MSE inside the latent mask only.

    ``weight`` (B, 1, h, w) comes from ``latent_mask`` (all ones gives the plain LDM loss, the
    ablation without the masked loss). Latent cells outside the mask get exactly zero gradient.
    """
    weight = weight.to(eps_pred.dtype)
    squared = (eps_pred.float() - eps.float()) ** 2 * weight
    return squared.sum() / (weight.sum() * eps_pred.shape[1]).clamp_min(1e-8)
