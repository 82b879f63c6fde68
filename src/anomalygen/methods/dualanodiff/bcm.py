"""BCM, the background compensation module (DualAnoDiff, Jin et al. CVPR 2025, §3.3, Eq. 5).

The background image I_b = (1 − M_f)·I (M_f the object's foreground) is noised to the same
timestep as the branches and runs through the UNet with the whole-image branch's weights, without
SAIM. At every self-attention layer its input features φ(z_b) enter the whole-image branch's keys
and values:

- ``"paper"`` (Eq. 5, default): K/V source = φ(z) + γ·MLP(φ(z_b)), γ learnable, initialised to 0.1;
- ``"official"`` (the official code): K/V source = (1 − a)·φ(z) + a·MLP(φ(z_b)), a learnable,
  initialised to 0.

MLP = Linear(C, h) → Linear(h, C) (no activation, as the official code; h = the UNet's first block
width, 320 on SD 1.x). Plugged into the core's ``ReferenceKV`` hook as its mix function.
"""

from __future__ import annotations

import torch
from torch import nn

BCM_MIXES = ("paper", "official")
GAMMA_INIT = {"paper": 0.1, "official": 0.0}


class BackgroundMix(nn.Module):
    """``mix(φ(z), φ(z_b))`` of Eq. 5 (``formula="paper"``) or of the official code."""

    def __init__(self, dim: int, hidden: int, formula: str = "paper") -> None:
        super().__init__()
        if formula not in BCM_MIXES:
            raise ValueError(f"formula must be one of {BCM_MIXES}, got {formula!r}")
        self.formula = formula
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Linear(hidden, dim))
        self.gamma = nn.Parameter(torch.tensor([GAMMA_INIT[formula]]))

    def forward(self, own: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        injected = self.gamma * self.mlp(background.to(own.dtype))
        return own + injected if self.formula == "paper" else (1 - self.gamma) * own + injected
