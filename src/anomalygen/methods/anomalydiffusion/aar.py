"""Adaptive Attention Re-weighting (AAR) of AnomalyDiffusion (Hu et al., AAAI 2024, Eqs. 7-8).

At each denoising step a weight map W says where inside the mask the anomaly is still weak
(the prediction is still close to the good image) and boosts the cross-attention of the anomaly
tokens there, so that the whole mask gets filled. Two variants:

* ``paper_weights`` (Eq. 7): decode x̂0, per-pixel distance d = ||x̂0 − y||₂ to the good image y,
  W = ||m||₁ · Softmax(f(1/d)) over the mask pixels, W = 1 outside.
* ``latent_weights`` (the official code): squared latent distance between the current noisy
  latent and the good latent inside a mask dilated with t, 1/d normalised to mean 1 over the
  dilated mask and clamped to [1, 1.5].

Eq. 8 multiplies W onto the cross-attention of the anomaly-token positions only. Both variants
are applied to the pre-softmax logits, as the official code does (``diffusion.attention``'s
``LogitReweight``, W area-resized to each layer's resolution). The official code also blends with
the dilated mask; here blending uses the mask itself and only the weights see the dilation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AAR_VARIANTS = ("latent", "paper", "off")


def adaptive_scaling(inverse_distance: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """f in Eq. 7: divide 1/d by its mean over the mask, so the softmax sees values of order 1
    whatever the image scale (W then varies smoothly around 1)."""
    area = mask.sum(dim=(-2, -1), keepdim=True).clamp_min(1)
    mean = (inverse_distance * mask).sum(dim=(-2, -1), keepdim=True) / area
    return inverse_distance / mean.clamp_min(1e-12)


def paper_weights(x0_pred: torch.Tensor, good: torch.Tensor, mask: torch.Tensor,
                  eps: float = 1e-6) -> torch.Tensor:
    """Eq. 7: W = ||m||₁ · Softmax_{p∈m}(f(1/d_p)), d_p = ||x̂0_p − y_p||₂, W = 1 outside m.

    x0_pred, good: (B, C, H, W) images (decoded prediction and good image); mask (B, 1, H, W)
    or (B, H, W). Returns (B, H, W); inside the mask the weights sum to ||m||₁ and are larger
    where x̂0 is closer to the good image.
    """
    mask = (mask.reshape(mask.shape[0], *mask.shape[-2:]) > 0.5).float()
    distance = (x0_pred.float() - good.float()).pow(2).sum(1).sqrt()
    scaled = adaptive_scaling(1.0 / (distance + eps), mask)
    logits = scaled.masked_fill(mask == 0, float("-inf")).flatten(1)
    softmax = torch.softmax(logits, dim=1).nan_to_num(0.0).view_as(mask)
    area = mask.sum(dim=(-2, -1), keepdim=True)
    return torch.where(mask > 0, area * softmax, torch.ones_like(softmax))


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of (B, 1, h, w) masks by a square of side 2·radius + 1."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask, kernel_size=2 * radius + 1, stride=1, padding=radius)


def dilation_radius(timestep: int, scale: int = 8, num_train_timesteps: int = 1000) -> int:
    """Official schedule: radius ⌊(t + 100)·scale / T⌋ latent pixels (8 for 200 DDIM steps,
    16 for 50): wide early, none at the last steps."""
    return int((int(timestep) + 100) * scale // num_train_timesteps)


def latent_weights(latents: torch.Tensor, good_latents: torch.Tensor, mask: torch.Tensor,
                   timestep: int, *, scale: int = 8, num_train_timesteps: int = 1000,
                   low: float = 1.0, high: float = 1.5) -> torch.Tensor:
    """AAR as the official code computes it: d = mean_c (m̃ ⊙ (z_t − z_0))², m̃ = mask dilated
    with t, W = |m̃| · (1/d) / Σ_{m̃}(1/d) clamped to [low, high], W = 1 where d = 0 or outside.

    latents: current z_t (B, C, h, w); good_latents: z_0 of the good image; mask (B, 1, h, w).
    Returns (B, h, w) in [low, high].
    """
    dilated = dilate((mask > 0.5).float(), dilation_radius(timestep, scale, num_train_timesteps))
    distance = ((dilated * (latents.float() - good_latents.float())) ** 2).mean(1)
    inside = distance > 0
    inverse = torch.where(inside, 1.0 / distance.clamp_min(1e-20), torch.zeros_like(distance))
    area = dilated.flatten(1).sum(1).view(-1, 1, 1)
    total = inverse.flatten(1).sum(1).view(-1, 1, 1).clamp_min(1e-20)
    weights = torch.where(inside, area * inverse / total, torch.ones_like(inverse))
    return weights.clamp(low, high)
