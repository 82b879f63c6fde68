"""Spatial encoder E of the Spatial Anomaly Embedding (Hu et al., AAAI 2024, §3.2, Eq. 4).

E maps the anomaly mask (not the image) to ``n`` text-space tokens: a ResNet body with a feature
pyramid (torchvision's ``BackboneWithFPN``), the pyramid levels pooled to a common grid and averaged
(fusion), a 1×1 reduction, then one fully-connected head per token. As in the official code, the
mask enters as a 3-channel image in [-1, 1].

Body weights: the ``resnet50`` preset loads torchvision's ResNet-50 ImageNet weights when they are
in the torch hub cache (``<torch.hub.get_dir()>/checkpoints/resnet50-*.pth``, nothing is
downloaded) and then keeps their BatchNorm statistics frozen (``FrozenBatchNorm2d``, as
torchvision's detection backbones do); otherwise the body is randomly initialised with GroupNorm
(training batches are a handful of masks). ``SpatialEncoder.source`` says which.

Token scale: each head's weight starts at zero and its bias at the initial word embedding (like
e_a), so at step 0 every spatial token *is* a word embedding of the frozen text encoder rather than
an out-of-distribution vector (a random head emits norms ~10 where CLIP's token embeddings have
~0.1-0.6). The heads' weights learn from the first step on (ControlNet-style zero initialisation;
the body receives gradients once they are non-zero).

Why the tokens exploded (issue 30) and what keeps them in range:

* Adam moves every parameter by about ``lr`` per step whatever the gradient's size (so the loss's
  scale does not matter). A plain ``nn.Linear`` head over F features then moves each token
  coordinate by up to ``lr·||f||₁`` in one step, coherently: at the first step every weight of an
  output row moves by ``lr·sign(f_i)``. With lr 5e-3 × 4 and F = 2048 pooled features that is
  hundreds of times a CLIP token's coordinates (~0.015), and once the heads are non-zero the body
  grows too: norms ~700x the vocabulary's after one step, ~1e6 after 40 (measured,
  ``benchmarks/spatial_token_norms.py``).
* The official encoder (pSp's ``GradualStyleEncoder``, ``ldm/models/psp_encoder``) ends every
  token head in an ``EqualLinear``: weights stored at unit scale and multiplied by 1/sqrt(fan_in)
  at run time, which divides Adam's per-step change of the output by sqrt(fan_in). Our heads do
  the same (``equalized``, default). Its learning rate, 5e-3 × batch, was set for LDM's BERT
  vocabulary; a step of 0.02 per coordinate is small there only if its coordinates are ~1 (not
  measurable here: no weights), and is larger than a CLIP token's coordinates.
* Ours (``bound``, the ``spatial_token_bound`` option): the token's offset v from the initial
  word is squashed radially, v·B·tanh(|v|/B)/|v| (identity for small offsets, |offset| < B), B
  = ``spatial_token_bound`` × the vocabulary's mean token norm; so a token's norm stays below
  |init word| + B over any fit. ``None`` leaves the offset free (the official code has no bound).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet50_Weights
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops.misc import FrozenBatchNorm2d

from anomalygen.errors import DataError, first_problem
from anomalygen.weights import hub_checkpoint, load_state_dict

# "resnet50" is the paper's encoder; "tiny" keeps tests and the tiny diffusion preset fast.
PRESETS: dict[str, dict[str, Any]] = {
    "resnet50": {"block": "bottleneck", "layers": [3, 4, 6, 3], "fpn_channels": 256,
                 "input_size": 256, "grid": 8, "reduce_channels": 32},
    "tiny": {"block": "basic", "layers": [1, 1, 1, 1], "fpn_channels": 32,
             "input_size": 64, "grid": 4, "reduce_channels": 8},
}
_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
RANDOM = "random init"
IMAGENET = "imagenet: "  # + the weight file's name


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def imagenet_file() -> Path | None:
    """torchvision's ResNet-50 ImageNet weights in the torch hub cache (the default version first)."""
    versions = [ResNet50_Weights.DEFAULT, *(w for w in ResNet50_Weights if w != ResNet50_Weights.DEFAULT)]
    return next((hub_checkpoint(w.url) for w in versions if hub_checkpoint(w.url).is_file()), None)


class SpatialEncoder(nn.Module):
    """E(m): mask (B, H, W) in {0, 1} -> ``num_tokens`` embeddings (B, n, D), D = ``init.shape[-1]``.

    ``init`` (D,): the token every head emits at initialisation (a word embedding).
    ``frozen_bn``: BatchNorm with frozen statistics (for ImageNet weights) instead of GroupNorm.
    ``equalized``: heads scale their weights by 1/sqrt(fan_in) at run time (the official
    ``EqualLinear``); False: plain linear heads (models saved before this option).
    ``bound``: the largest norm of a token's offset from ``init`` (radial tanh); None: unbounded.
    """

    def __init__(self, num_tokens: int, init: torch.Tensor, *, block: str = "bottleneck",
                 layers: list[int] | tuple[int, ...] = (3, 4, 6, 3), fpn_channels: int = 256,
                 input_size: int = 256, grid: int = 8, reduce_channels: int = 32, frozen_bn: bool = False,
                 equalized: bool = True, bound: float | None = None):
        super().__init__()
        block_class = _BLOCKS[block]
        body = ResNet(block_class, list(layers), norm_layer=FrozenBatchNorm2d if frozen_bn else _group_norm)
        widths = [64 * 2**i * block_class.expansion for i in range(4)]
        self.backbone = BackboneWithFPN(
            body, {f"layer{i + 1}": str(i) for i in range(4)}, widths, fpn_channels)
        self.input_size = input_size
        self.grid = grid
        self.reduce = nn.Conv2d(fpn_channels, reduce_channels, kernel_size=1)
        fan_in = reduce_channels * grid * grid
        self.heads = nn.ModuleList(nn.Linear(fan_in, init.shape[-1]) for _ in range(num_tokens))
        with torch.no_grad():
            for head in self.heads:
                head.weight.zero_()
                head.bias.copy_(init.float())
        self.gain = fan_in ** -0.5 if equalized else 1.0
        self.bound = bound
        self.register_buffer("anchor", init.detach().float().clone(), persistent=False)
        self.source = RANDOM

    @classmethod
    def from_preset(cls, preset: str, num_tokens: int, init: torch.Tensor, *, source: str | None = None,
                    equalized: bool = True, bound: float | None = None) -> "SpatialEncoder":
        """``source`` None: ImageNet weights when the preset is ``resnet50`` and they are cached,
        else random. A recorded ``source`` (a saved model's) rebuilds that architecture, weights
        to be loaded by the caller."""
        if preset not in PRESETS:
            raise ValueError(f"unknown spatial encoder preset {preset!r}; known: {sorted(PRESETS)}")
        path = imagenet_file() if source is None and preset == "resnet50" else None
        pretrained = path is not None or (source or "").startswith(IMAGENET)
        encoder = cls(num_tokens, init, frozen_bn=pretrained, equalized=equalized, bound=bound, **PRESETS[preset])
        if path is not None:
            encoder.load_imagenet(path)
        elif pretrained:
            encoder.source = source
        return encoder

    def load_imagenet(self, path: Path) -> None:
        """Copy a torchvision ResNet-50 state dict (read without pickle code) into the body."""
        state = load_state_dict(path)
        try:
            self.backbone.body.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
        except RuntimeError as error:
            raise DataError(path, f"not a torchvision ResNet-50 state dict ({first_problem(error)})") from None
        self.source = IMAGENET + path.name

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        x = mask.float().unsqueeze(1) if mask.dim() == 3 else mask.float()
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="area")
        x = (x * 2 - 1).expand(-1, 3, -1, -1)
        levels = self.backbone(x).values()
        fused = torch.stack([F.adaptive_avg_pool2d(f, self.grid) for f in levels]).mean(0)
        features = self.reduce(fused).flatten(1)
        tokens = torch.stack([F.linear(features, head.weight * self.gain, head.bias) for head in self.heads], dim=1)
        if self.bound is None:
            return tokens
        offset = tokens - self.anchor
        norm = offset.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.anchor + offset * (self.bound * torch.tanh(norm / self.bound) / norm)
