"""AnomalyDiffusion (Hu et al., AAAI 2024): few-shot anomaly image + mask generation.

Modules follow the paper: ``spatial_encoder`` (E, §3.2), ``embedding`` (e_a / e_m tokens),
``loss`` (masked diffusion loss, Eqs. 5-6), ``aar`` (Adaptive Attention Re-weighting,
Eqs. 7-8), ``mask_model`` (mask generation, Eq. 9), ``augment`` (joint training augmentation),
``prompts`` (the official prompt templates), ``generator`` (fit / generate / save / load on the
shared diffusion core).
"""

from anomalygen.methods.anomalydiffusion.generator import AnomalyDiffusion

__all__ = ["AnomalyDiffusion"]
