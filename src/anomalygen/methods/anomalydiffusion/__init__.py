"""AnomalyDiffusion (Hu et al., AAAI 2024): few-shot anomaly image + mask generation.

Modules follow the paper: ``config`` (the options, paper and official values named),
``spatial_encoder`` (E, §3.2), ``loss`` (masked diffusion loss, Eqs. 5-6), ``aar`` (Adaptive
Attention Re-weighting, Eqs. 7-8), ``mask_model`` (mask generation, Eq. 9), ``augment`` (joint
training augmentation), ``prompts`` (the official prompt templates), ``generator`` (fit / generate /
save / load on the diffusion kit, ``methods/kit``). The e_a / e_m tokens are the core's
``diffusion.tokens.TypeTokens``.
"""

from anomalygen.methods.anomalydiffusion.generator import AnomalyDiffusion

__all__ = ["AnomalyDiffusion"]
