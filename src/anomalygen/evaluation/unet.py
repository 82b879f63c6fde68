"""DRAEM's two sub-networks (Zavrtanik et al., ICCV 2021, Sec. 3.1-3.2, Fig. 3) and its focal loss.

The discriminative sub-network is the downstream segmentation network of every protocol; the
reconstructive one is used by the DRAEM-augmentation protocol (``draem_augmentation``).

Six encoder levels with widths (b, 2b, 4b, 8b, 8b, 8b) for base width b (64 in the papers: 28.4 M
parameters with 3 input channels), five bilinear up-sampling decoder stages that
concatenate the matching encoder features, and a 2-class (normal / anomalous) output at full
resolution. Input sides must be multiples of 32.

Both networks start from DRAEM's ``weights_init`` (``train_DRAEM.py``, also used by the
official AnomalyDiffusion ``train-localization.py``): every convolution's weight ~ N(0, 0.02),
every batch norm's weight ~ N(1, 0.02) and bias 0; convolution biases keep PyTorch's init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def weights_init(module: nn.Module) -> None:
    """DRAEM's initialisation of one module (apply it with ``network.apply(weights_init)``)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class DiscriminativeUNet(nn.Module):
    """DRAEM's discriminative sub-network with ``in_channels`` inputs and ``out_channels`` classes."""

    def __init__(self, in_channels: int = 3, out_channels: int = 2, base: int = 64):
        super().__init__()
        widths = [base, 2 * base, 4 * base, 8 * base, 8 * base, 8 * base]
        self.encoder = nn.ModuleList(
            _double_conv(c_in, c_out) for c_in, c_out in zip([in_channels, *widths[:-1]], widths)
        )
        # Decoder stage k goes from level 5-k to 4-k: up-sample, then merge with that skip.
        outs = [8 * base, 4 * base, 2 * base, base, base]
        ins = [widths[-1], *outs[:-1]]
        self.ups = nn.ModuleList(_up(c_in, c_out) for c_in, c_out in zip(ins, outs))
        skips = widths[-2::-1]
        self.merges = nn.ModuleList(_double_conv(c_out + skip, c_out) for c_out, skip in zip(outs, skips))
        self.head = nn.Conv2d(base, out_channels, 3, padding=1)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else F.max_pool2d(x, 2))
            features.append(x)
        x = features.pop()
        for up, merge in zip(self.ups, self.merges):
            x = merge(torch.cat([up(x), features.pop()], dim=1))
        return self.head(x)


def _decode(c_in: int, c_out: int) -> nn.Sequential:
    """A reconstructive decoder block: two 3x3 convolutions, the second narrowing to ``c_out``."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, padding=1), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class ReconstructiveNet(nn.Module):
    """DRAEM's reconstructive sub-network (Sec. 3.1): an encoder-decoder without skip connections.

    Five encoder levels (b, 2b, 4b, 8b, 8b; base b = 128 in DRAEM, 69 M parameters), four
    bilinear up-sampling decoder stages down to b channels, and a 3x3 convolution to the
    ``channels`` output (no activation). Input sides must be multiples of 16.
    """

    def __init__(self, channels: int = 3, base: int = 128):
        super().__init__()
        widths = [base, 2 * base, 4 * base, 8 * base, 8 * base]
        self.encoder = nn.ModuleList(_double_conv(c_in, c_out) for c_in, c_out in zip([channels, *widths[:-1]], widths))
        outs = [4 * base, 2 * base, base, base]
        self.ups = nn.ModuleList(_up(c, c) for c in [8 * base, 4 * base, 2 * base, base])
        self.decoder = nn.ModuleList(_decode(c_in, c_out) for c_in, c_out in zip([8 * base, *outs[:-1]], outs))
        self.head = nn.Conv2d(base, channels, 3, padding=1)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else F.max_pool2d(x, 2))
        for up, block in zip(self.ups, self.decoder):
            x = block(up(x))
        return self.head(x)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Softmax focal loss FL(p_t) = -(1 - p_t)^gamma log p_t (Lin et al., ICCV 2017, Eq. 5), mean
    over pixels; ``logits`` (N, C, H, W), ``target`` (N, H, W) class indices. DRAEM uses gamma = 2.
    """
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None].long()).squeeze(1)
    return (-(1.0 - log_p.exp()).pow(gamma) * log_p).mean()
