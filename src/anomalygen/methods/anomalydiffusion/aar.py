"""Adaptive Attention Re-weighting (AAR) of AnomalyDiffusion (Hu et al., AAAI 2024, Eqs. 7-8).

At each denoising step a weight map W says where inside the mask the anomaly is still weak (the
prediction is still close to the good image) and boosts the cross-attention of the anomaly tokens
there, so that the whole mask gets filled. Two ways to compute W:

* ``paper_weights`` (Eq. 7): W = ||m||₁ · Softmax_{p∈m}(f(||m ⊙ (x̂0 − y)||²₂)), f(x) = 1/x, from
  the decoded prediction x̂0 of the *current* step and the good image y, bounded to
  ``WEIGHT_BOUNDS``; W = 1 outside m. Eq. 8 then multiplies W onto the post-softmax
  cross-attention map of the anomaly tokens: m'_c = W ⊙ m_c (``aar_apply="probabilities"``).
* ``latent_weights`` (the official code, ``ldm/models/diffusion/ddim.py``): d = mean_c (m̃ ⊙ (z_t −
  z_0))² in latent space inside a mask m̃ dilated with t (``dilation_radius``), W = |m̃|·(1/d)/Σ(1/d)
  clamped to [1, 1.5], multiplied onto the *pre-softmax* logits of the anomaly-token columns
  (``ldm/modules/attention.py``: ``sim = sim * weight_map``; ``aar_apply="multiply_logits"``).

How W is applied (``APPLY``, the ``aar_apply`` option; ``None`` = each variant's own way above):

* ``multiply_logits``: logits·W. Caveat: a negative logit times W > 1 becomes more negative, so
  the attention on that anomaly token *drops* there (issue 10 measured drops at 8-66 % of the
  pixels, depending on the layer). Kept because it is what the official code does.
* ``probabilities``: probabilities·W after the softmax, not renormalised (Eq. 8 as written).
* ``add_log_logits``: logits + log W, monotone (W ≥ 1 never lowers the anomaly tokens'
  attention); equal to probabilities·W renormalised over the tokens. An ablation.

Only the conditional rows of a ``[uncond; cond]`` batch are reweighted. Cost per denoising step:
``latent`` none beyond the weights; ``paper`` one extra UNet pass (two under CFG) without
reweighting to get ε_t → x̂0 → a VAE decode, so roughly twice the UNet time plus one decode.

Which token columns (``AAR_TOKENS``, the ``aar_tokens`` option): the official code's column mask
(``weight_map[..., 1:start] = 1``, ``weight_map[..., end:] = 1``, start..end the "*" expansion:
anomaly then spatial tokens) re-weights column 0 (the start token), the anomaly and the spatial
tokens (``"official"``, default); ``"anomaly"`` (ours) re-weights the anomaly tokens only.

When: the official code applies AAR only when asked (``--adaptive_mask`` of ``run-mvtec.py`` /
``generate_with_mask.py``, recommended there for texture defects such as wood/color, off for
structural ones such as capsule/squeeze): the ``aar`` option is ``"off"`` by default.

The official code also blends with the dilated mask; here blending uses the mask itself and only
the weights see the dilation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AAR_VARIANTS = ("off", "latent", "paper")
AAR_TOKENS = ("official", "anomaly")
APPLY = ("multiply_logits", "probabilities", "add_log_logits")
DEFAULT_APPLY = {"latent": "multiply_logits", "paper": "probabilities"}
HOOK_STAGE = {"multiply_logits": "logits", "probabilities": "probabilities", "add_log_logits": "log_logits"}
WEIGHT_BOUNDS = (1.0, 1.5)  # the official code's clamp, for both variants


def paper_weights(x0_pred: torch.Tensor, good: torch.Tensor, mask: torch.Tensor,
                  bounds: tuple[float, float] | None = WEIGHT_BOUNDS, eps: float = 1e-12) -> torch.Tensor:
    """Eq. 7: W = ||m||₁ · Softmax_{p∈m}(1 / d_p), d_p = ||m ⊙ (x̂0 − y)||²₂ at pixel p (summed over
    channels), clamped to ``bounds`` (``None`` = unbounded) inside m, W = 1 outside.

    x0_pred, good: (B, C, H, W) images on the same scale (the LDM's [-1, 1]); mask (B, 1, H, W)
    or (B, H, W). Returns (B, H, W). Unbounded, the weights sum to ||m||₁ over the mask and are
    largest where x̂0 is closest to the good image. f = 1/x is not scale-free: with distances
    ≪ 1 the softmax is nearly one-hot, so bounded W is 1 at most pixels and the upper bound at
    the closest ones.
    """
    mask = (mask.reshape(mask.shape[0], *mask.shape[-2:]) > 0.5).float()
    distance = (mask[:, None] * (x0_pred.float() - good.float())).pow(2).sum(1)
    inverse = 1.0 / distance.clamp_min(eps)
    softmax = torch.softmax(inverse.masked_fill(mask == 0, float("-inf")).flatten(1), dim=1)
    weights = mask.sum(dim=(-2, -1), keepdim=True) * softmax.nan_to_num(0.0).view_as(mask)
    if bounds is not None:
        weights = weights.clamp(*bounds)
    return torch.where(mask > 0, weights, torch.ones_like(weights))


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of (B, 1, h, w) masks by a square of side 2·radius + 1."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask, kernel_size=2 * radius + 1, stride=1, padding=radius)


def dilation_scale(num_inference_steps: int) -> int:
    """The official code's scale: 16 for exactly 50 DDIM steps, 8 for any other count
    (``ddim.py``: ``Dilation2d(m=int((ts[0] + 100) * 16 // 1000))`` if ``len(timesteps) == 50``)."""
    return 16 if int(num_inference_steps) == 50 else 8


def dilation_radius(timestep: int, scale: int = 8, num_train_timesteps: int = 1000) -> int:
    """Official schedule: radius ⌊(t + 100)·scale / T⌋ latent pixels: wide at the first steps (8
    for 200 DDIM steps, 17 for 50 with ``dilation_scale``), 0 at the last ones."""
    return int((int(timestep) + 100) * scale // num_train_timesteps)


def latent_weights(latents: torch.Tensor, good_latents: torch.Tensor, mask: torch.Tensor,
                   timestep: int, *, scale: int = 8, num_train_timesteps: int = 1000,
                   bounds: tuple[float, float] = WEIGHT_BOUNDS) -> torch.Tensor:
    """AAR as the official code computes it: d = mean_c (m̃ ⊙ (z_t − z_0))², m̃ = mask dilated
    with t, W = |m̃| · (1/d) / Σ_{m̃}(1/d) clamped to ``bounds``, W = 1 where d = 0 or outside.

    latents: current z_t (B, C, h, w); good_latents: z_0 of the good image; mask (B, 1, h, w).
    Returns (B, h, w) in ``bounds``.
    """
    dilated = dilate((mask > 0.5).float(), dilation_radius(timestep, scale, num_train_timesteps))
    distance = ((dilated * (latents.float() - good_latents.float())) ** 2).mean(1)
    inside = distance > 0
    inverse = torch.where(inside, 1.0 / distance.clamp_min(1e-20), torch.zeros_like(distance))
    area = dilated.flatten(1).sum(1).view(-1, 1, 1)
    total = inverse.flatten(1).sum(1).view(-1, 1, 1).clamp_min(1e-20)
    weights = torch.where(inside, area * inverse / total, torch.ones_like(inverse))
    return weights.clamp(*bounds)
