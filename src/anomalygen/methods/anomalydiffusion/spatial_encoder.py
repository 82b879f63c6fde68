"""Spatial encoder E of the Spatial Anomaly Embedding (Hu et al., AAAI 2024, §3.2, Eq. 4).

E maps the anomaly mask (not the image) to ``n`` text-space tokens: a ResNet body with a feature
pyramid (torchvision's ``BackboneWithFPN``, random init: no ImageNet weights are available), the
pyramid levels pooled to a common grid and averaged (fusion), a 1×1 reduction, then one
fully-connected head per token. As in the official code, the mask enters as a 3-channel image in
[-1, 1]. GroupNorm replaces BatchNorm: training batches are a handful of masks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

# "resnet50" is the paper's encoder; "tiny" keeps tests and the tiny diffusion preset fast.
PRESETS: dict[str, dict[str, Any]] = {
    "resnet50": {"block": "bottleneck", "layers": [3, 4, 6, 3], "fpn_channels": 256,
                 "input_size": 256, "grid": 8, "reduce_channels": 32},
    "tiny": {"block": "basic", "layers": [1, 1, 1, 1], "fpn_channels": 32,
             "input_size": 64, "grid": 4, "reduce_channels": 8},
}
_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class SpatialEncoder(nn.Module):
    """E(m): mask (B, H, W) in {0, 1} -> ``num_tokens`` embeddings (B, n, token_dim)."""

    def __init__(self, num_tokens: int, token_dim: int, *, block: str = "bottleneck",
                 layers: list[int] | tuple[int, ...] = (3, 4, 6, 3), fpn_channels: int = 256,
                 input_size: int = 256, grid: int = 8, reduce_channels: int = 32):
        super().__init__()
        block_class = _BLOCKS[block]
        body = ResNet(block_class, list(layers), norm_layer=_group_norm)
        widths = [64 * 2**i * block_class.expansion for i in range(4)]
        self.backbone = BackboneWithFPN(
            body, {f"layer{i + 1}": str(i) for i in range(4)}, widths, fpn_channels)
        self.input_size = input_size
        self.grid = grid
        self.reduce = nn.Conv2d(fpn_channels, reduce_channels, kernel_size=1)
        self.heads = nn.ModuleList(
            nn.Linear(reduce_channels * grid * grid, token_dim) for _ in range(num_tokens))

    @classmethod
    def from_preset(cls, preset: str, num_tokens: int, token_dim: int) -> "SpatialEncoder":
        if preset not in PRESETS:
            raise ValueError(f"unknown spatial encoder preset {preset!r}; known: {sorted(PRESETS)}")
        return cls(num_tokens, token_dim, **PRESETS[preset])

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        x = mask.float().unsqueeze(1) if mask.dim() == 3 else mask.float()
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="area")
        x = (x * 2 - 1).expand(-1, 3, -1, -1)
        levels = self.backbone(x).values()
        fused = torch.stack([F.adaptive_avg_pool2d(f, self.grid) for f in levels]).mean(0)
        features = self.reduce(fused).flatten(1)
        return torch.stack([head(features) for head in self.heads], dim=1)
