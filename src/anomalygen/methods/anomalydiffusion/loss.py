"""Masked diffusion loss of AnomalyDiffusion (Hu et al., AAAI 2024, Eqs. 5-6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# How each sample's masked squared error S_b = ||m_b ⊙ (ε − ε_θ)||² is scaled (then averaged over
# the batch), named for what it is:
#   "latent_size": S_b / (C·h·w), the official code (``ddpm.py`` ``p_losses``: ``mse(out*mask,
#                  target*mask).mean([1, 2, 3])``, then the batch mean) — the default;
#   "sum":         S_b, Eq. 5 as written (the same as "latent_size" up to the constant C·h·w);
#   "mask_area":   S_b / (C·||m_b||₁), a per-mask-area mean (ours): small defects weigh as much
#                  as large ones.
NORMALISATIONS = ("latent_size", "sum", "mask_area")


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask (B, 1, H, W) in {0, 1} -> soft weights (B, 1, h, w): the fraction of each latent
    cell the anomaly covers (area resampling keeps thin defects that nearest would drop)."""
    return F.interpolate(mask.float(), size=size, mode="area")


def masked_diffusion_loss(eps_pred: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor,
                          normalise: str = "latent_size") -> torch.Tensor:
    """Eq. 5 per sample, scaled as ``normalise`` says (``NORMALISATIONS``), averaged over the batch.

    Per-sample values, so the mean of the losses of a batch's parts equals the loss of the whole
    batch (what DDP averages). ``weight`` (B, 1, h, w) comes from ``latent_mask`` (all ones gives
    the plain LDM loss, the ablation without the masked loss). Latent cells outside the mask get
    exactly zero gradient.
    """
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    weight = weight.to(eps_pred.dtype)
    squared = ((eps_pred.float() - eps.float()) ** 2 * weight).flatten(1).sum(1)
    if normalise == "sum":
        return squared.mean()
    if normalise == "mask_area":
        area = weight.flatten(1).sum(1) * eps_pred.shape[1]
    else:
        area = torch.full_like(squared, eps_pred[0].numel())
    return (squared / area.clamp_min(1e-8)).mean()
