"""Textual inversion per defect type + blended latent sampling (Gal et al., "An Image is Worth One
Word", ICLR 2023): the "no components" row of AnomalyDiffusion's ablation.

Modules: ``config`` (the options), ``generator`` (Eq. 2's training, blended sampling, save / load)
on the diffusion kit (``methods/kit``); the per-type tokens are the core's ``diffusion.tokens.TypeTokens``.
"""

from anomalygen.methods.textual_inversion.generator import TextualInversionGenerator

__all__ = ["TextualInversionGenerator"]
