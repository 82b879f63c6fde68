"""CAGen (Jiang et al., "CAGen: Controllable Anomaly Generator using Diffusion Model", ICASSP 2024).

Modules follow the paper: ``config`` (the options, the paper's values named), ``control`` (stage
1, anomaly-guided generation: a ControlNet on the binary mask and the prompt, Eq. 1),
``generator`` (training, stage 2's anomaly feature fusion with the normal image's latents,
Eqs. 2-5, the location masks, save / load) on the diffusion kit (``methods/kit``). No official
code exists.
"""

from anomalygen.methods.cagen.generator import CAGen

__all__ = ["CAGen"]
