"""U²-Net (Qin et al., "U²-Net: Going Deeper with Nested U-Structure for Salient Object
Detection", Pattern Recognition 2020), the saliency model the official DualAnoDiff code segments
its anomaly-part images with (threshold 0.5) and takes BCM's foreground from.

Built here from the paper's architecture: six encoder stages of residual U-blocks (RSU-7, 6, 5, 4
and two dilated RSU-4F), five decoder stages, a 3 × 3 side output per stage upsampled to the input
and a 1 × 1 fusion of the six. ``U2Net("full")`` is U²-Net (44 M parameters), ``U2Net("small")``
U²-Net† (1.1 M). Module names follow the authors' release, so their ``u2net.pth`` / ``u2netp.pth``
state dicts load as they are (``load_u2net``: safetensors, or ``torch.load(weights_only=True)``;
a file that needs pickle code is refused). No weights ship with anomalygen.

``saliency`` is the authors' test-time recipe: resize to 320 × 320, divide by the image's
maximum, ImageNet mean / std, the fused output (sigmoid), min-max normalised per image, resized
back (bilinear).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalygen.errors import DataError
from anomalygen.weights import load_into, load_state_dict

VARIANTS = {"full": ((32, 64), (32, 128), (64, 256), (128, 512), (256, 512), (256, 512)),
            "small": ((16, 64),) * 6}  # (mid, out) channels of encoder stages 1-6
DECODER = {"full": ((256, 512), (128, 256), (64, 128), (32, 64), (16, 64)),
           "small": ((16, 64),) * 5}  # stages 5d .. 1d
SIZE = 320
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class REBNCONV(nn.Module):
    """3 × 3 conv (dilation ``d``) + BatchNorm + ReLU."""

    def __init__(self, c_in: int, c_out: int, d: int = 1):
        super().__init__()
        self.conv_s1 = nn.Conv2d(c_in, c_out, 3, padding=d, dilation=d)
        self.bn_s1 = nn.BatchNorm2d(c_out)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


class RSU(nn.Module):
    """Residual U-block of ``depth`` levels (RSU-L, L = depth): an input conv, an encoder of
    ``depth - 1`` convs with 2 × 2 max-pooling between them, a dilated bottom conv, a decoder
    upsampling back, and the input conv's output added. ``dilated`` (RSU-4F): no pooling, the
    encoder's dilation doubles per level instead."""

    def __init__(self, depth: int, c_in: int, mid: int, c_out: int, dilated: bool = False):
        super().__init__()
        self.depth, self.dilated = depth, dilated
        self.rebnconvin = REBNCONV(c_in, c_out)
        rates = [2 ** i for i in range(depth)] if dilated else [1] * (depth - 1) + [2]
        for level in range(1, depth + 1):
            setattr(self, f"rebnconv{level}", REBNCONV(c_out if level == 1 else mid, mid, rates[level - 1]))
        for level in range(depth - 1, 0, -1):
            setattr(self, f"rebnconv{level}d", REBNCONV(2 * mid, c_out if level == 1 else mid, rates[level - 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = self.rebnconvin(x)
        skips, h = [], start
        for level in range(1, self.depth):
            h = getattr(self, f"rebnconv{level}")(h)
            skips.append(h)
            if not self.dilated and level < self.depth - 1:
                h = F.max_pool2d(h, 2, 2, ceil_mode=True)
        h = getattr(self, f"rebnconv{self.depth}")(h)
        for level in range(self.depth - 1, 0, -1):
            skip = skips[level - 1]
            h = getattr(self, f"rebnconv{level}d")(torch.cat([h if self.dilated else _up(h, skip), skip], 1))
        return h + start


class U2Net(nn.Module):
    """U²-Net (``"full"``) or U²-Net† (``"small"``); ``forward`` returns the seven saliency maps
    (fused, then sides 1-6) as probabilities, each (B, 1, H, W)."""

    def __init__(self, variant: str = "full"):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
        self.variant = variant
        c_in = 3
        for stage, (depth, (mid, out)) in enumerate(zip((7, 6, 5, 4, 4, 4), VARIANTS[variant]), start=1):
            setattr(self, f"stage{stage}", RSU(depth, c_in, mid, out, dilated=stage >= 5))
            c_in = out
        outs = [out for _, out in VARIANTS[variant]]
        for stage, (depth, (mid, out)) in zip((5, 4, 3, 2, 1), zip((4, 4, 5, 6, 7), DECODER[variant])):
            setattr(self, f"stage{stage}d", RSU(depth, 2 * outs[stage - 1], mid, out, dilated=stage == 5))
        sides = [out for _, out in DECODER[variant]][::-1] + [outs[-1]]  # stages 1d .. 5d, then 6
        for k, width in enumerate(sides, start=1):
            setattr(self, f"side{k}", nn.Conv2d(width, 1, 3, padding=1))
        self.outconv = nn.Conv2d(6, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoded, h = [], x
        for stage in range(1, 7):
            h = getattr(self, f"stage{stage}")(h)
            encoded.append(h)
            if stage < 6:
                h = F.max_pool2d(h, 2, 2, ceil_mode=True)
        decoded = {6: encoded[5]}
        for stage in range(5, 0, -1):
            decoded[stage] = getattr(self, f"stage{stage}d")(torch.cat([_up(decoded[stage + 1], encoded[stage - 1]),
                                                                        encoded[stage - 1]], 1))
        sides = [_up(getattr(self, f"side{k}")(decoded[k]), x) for k in range(1, 7)]
        fused = self.outconv(torch.cat(sides, 1))
        return tuple(torch.sigmoid(s) for s in [fused, *sides])


def load_u2net(path: str | Path) -> U2Net:
    """U²-Net with the weights in ``path`` (the variant read from their shapes), in eval mode.

    Problems (missing, unreadable or pickle-code file, other weights) are one ``DataError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "U2-Net weights not found (u2net.pth / u2netp.pth of xuebinqin/U-2-Net, or a safetensors copy)")
    state = load_state_dict(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    probe = state.get("stage2.rebnconvin.conv_s1.weight")
    if probe is None:
        raise DataError(path, "does not hold U2-Net weights (no stage2.rebnconvin.conv_s1.weight)")
    model = U2Net("full" if probe.shape[0] == 128 else "small")
    load_into(model, state, path, "U2-Net")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def saliency(model: U2Net, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
    """Float (H, W) saliency in [0, 1] of each uint8 (H, W, 3) or (H, W) image (the authors' test recipe)."""
    device = next(model.parameters()).device
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    out = []
    for first in range(0, len(images), batch_size):
        chunk = [np.asarray(im) for im in images[first:first + batch_size]]
        x = torch.cat([torch.from_numpy(np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im[..., :3].copy())
                       .permute(2, 0, 1)[None].float() for im in chunk])
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
        x = x / x.flatten(1).amax(1).clamp(min=1e-8).view(-1, 1, 1, 1)
        fused = model(((x - mean) / std).to(device))[0][:, 0].float().cpu()
        low, high = fused.flatten(1).amin(1).view(-1, 1, 1), fused.flatten(1).amax(1).view(-1, 1, 1)
        fused = (fused - low) / (high - low).clamp(min=1e-8)
        for im, s in zip(chunk, fused):
            out.append(F.interpolate(s[None, None], size=im.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy())
    return out
