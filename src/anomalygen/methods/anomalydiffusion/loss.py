"""Masked diffusion loss of AnomalyDiffusion (Hu et al., AAAI 2024, Eqs. 5-6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# How each sample's masked squared error is normalised (then averaged over the batch).
NORMALISATIONS = ("mask", "latent")


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask (B, 1, H, W) in {0, 1} -> soft weights (B, 1, h, w): the fraction of each latent
    cell the anomaly covers (area resampling keeps thin defects that nearest would drop)."""
    return F.interpolate(mask.float(), size=size, mode="area")


def masked_diffusion_loss(eps_pred: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor,
                          normalise: str = "mask") -> torch.Tensor:
    """Eq. 5 per sample, averaged over the batch: ``mean_b ||m_b ⊙ (ε − ε_θ)||² / (C·||m_b||₁)``.

    ``normalise="mask"`` divides by the sample's mask area (Eq. 5, the default); ``"latent"``
    divides by the latent size C·h·w instead, as the official code does
    (``ddpm.py`` ``p_losses``: ``mse(out*mask, target*mask).mean([1, 2, 3])``, then the batch
    mean), which weights large defects more. Both are per-sample means, so the mean of the losses
    of a batch's parts equals the loss of the whole batch (what DDP averages). ``weight``
    (B, 1, h, w) comes from ``latent_mask`` (all ones gives the plain LDM loss, the ablation
    without the masked loss). Latent cells outside the mask get exactly zero gradient.
    """
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    weight = weight.to(eps_pred.dtype)
    squared = ((eps_pred.float() - eps.float()) ** 2 * weight).flatten(1).sum(1)
    area = weight.flatten(1).sum(1) if normalise == "mask" else torch.full_like(squared, weight[0].numel())
    return (squared / (area * eps_pred.shape[1]).clamp_min(1e-8)).mean()
