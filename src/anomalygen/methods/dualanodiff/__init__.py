"""DualAnoDiff (Jin et al., CVPR 2025): dual-interrelated diffusion for few-shot anomaly image generation.

Modules follow the paper: ``config`` (the options, paper and official values named), ``saim``
(self-attention interaction between the branches, Eq. 3), ``bcm`` (background compensation, Eq. 5),
``segment`` (the mask from the anomaly-part image), ``generator`` (nested prompts, Eq. 2; dual
LoRA training, Eq. 4; joint sampling; save / load) on the diffusion kit (``methods/kit``).
"""

from anomalygen.methods.dualanodiff.generator import DualAnoDiff

__all__ = ["DualAnoDiff"]
