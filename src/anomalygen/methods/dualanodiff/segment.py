"""The mask from the anomaly branch (DualAnoDiff, Jin et al. CVPR 2025, §3.4).

The anomaly-part image shows the defect alone on a plain background (gray, as the official code's
I·M in [-1, 1], or black), so its mask is segmented from it, aligned with the whole image by
construction. Three ways:

- ``u2net`` (the official code's): U²-Net saliency (``u2net.py``, weights the user supplies) of the
  anomaly-part image, binarised at 0.5 (``mask_from_saliency``), no clean-up;
- ``threshold`` (ours, the fallback without U²-Net weights): the pixels whose value differs from the
  background by more than ``threshold`` in any channel ([0, 1] scale), cleaned by morphology
  (opening removes specks, closing and hole filling close the region) and with components below
  ``min_area`` of the image dropped. On grayscale categories it misses defect pixels close to the
  gray background (benchmarks/dualanodiff_masks.py measures how many). The
  background is the nominal value (gray 0.5), or, with ``decoded``, that plain image as the model's
  autoencoder returns it (``decoded_background``): an autoencoder that shifts the colour (a small
  prior's) would otherwise make the whole image "defect".
- ``attention``: the mean cross-attention map of the defect token in the anomaly branch, scaled to
  [0, 1] by its maximum, above ``threshold``, with the same clean-up.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from anomalygen.diffusion.backbone import Backbone
from anomalygen.diffusion.sampling import decode_latents, encode_images

MASK_SOURCES = ("u2net", "threshold", "attention")
SALIENCY_THRESHOLD = 0.5  # the official binarisation of U²-Net's output
MASK_REFERENCES = ("nominal", "decoded")


def clean(mask: np.ndarray, min_area: float = 5e-4) -> np.ndarray:
    """Opening, closing and hole filling with a disk scaled to the image (radius 1 per 256 px),
    then connected components smaller than ``min_area`` × the image area removed."""
    radius = max(1, round(max(mask.shape) / 256))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    out = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, disk)
    out = cv2.morphologyEx(out, cv2.MORPH_CLOSE, disk)
    out = ndimage.binary_fill_holes(out)
    labels, count = ndimage.label(out)
    if count:
        sizes = ndimage.sum(out, labels, range(1, count + 1))
        keep = np.flatnonzero(sizes >= min_area * mask.size) + 1
        out = np.isin(labels, keep)
    return out.astype(bool)


def mask_from_part(part: np.ndarray, background: float | Sequence[float] = 0.5, threshold: float = 0.15,
                   min_area: float = 5e-4) -> np.ndarray:
    """Bool (H, W) mask of a uint8 (H, W, 3) anomaly-part image on a plain ``background`` (its
    value in [0, 1], one or per channel: 0.5 gray, 0 black): the pixels farther than ``threshold``
    from it in any channel."""
    values = np.asarray(part, np.float32).reshape(*part.shape[:2], -1) / 255
    return clean(np.abs(values - np.asarray(background, np.float32)).max(axis=-1) > threshold, min_area)


def mask_from_saliency(salient: np.ndarray, threshold: float = SALIENCY_THRESHOLD) -> np.ndarray:
    """Bool mask of a saliency map in [0, 1]: above ``threshold`` (0.5, the official code's)."""
    return np.asarray(salient) > threshold


def decoded_background(backbone: Backbone, value: float, size: int) -> tuple[float, ...]:
    """The per-channel mean, in [0, 1], of a plain ``value`` image of ``size`` px after the
    backbone's autoencoder (encoded to its posterior mean, decoded)."""
    plain = torch.full((1, 3, size, size), float(value))
    decoded = decode_latents(backbone, encode_images(backbone, plain.to(backbone.device)))
    return tuple(float(c) for c in decoded[0].mean((1, 2)))


def token_attention(maps: dict[str, torch.Tensor], rows: slice, tokens: slice, size: tuple[int, int]) -> torch.Tensor:
    """The attention of batch ``rows`` to the prompt positions ``tokens``, averaged over those
    tokens, bilinearly resized to ``size`` and summed over the layers of ``maps`` ({layer: (B, N, S)
    probabilities, N a square number of pixels}): (len(rows), *size)."""
    total = None
    for probs in maps.values():
        side = round(probs.shape[1] ** 0.5)
        chosen = probs[rows, :, tokens].mean(-1).float()
        resized = F.interpolate(chosen.view(-1, 1, side, side), size=size, mode="bilinear").squeeze(1).cpu()
        total = resized if total is None else total + resized
    return total


def mask_from_attention(attention: np.ndarray, shape: tuple[int, int], threshold: float = 0.5,
                        min_area: float = 5e-4) -> np.ndarray:
    """Bool mask of size ``shape`` (H, W) from a (h, w) attention map (bilinear upsampling)."""
    peak = float(attention.max())
    scaled = attention / peak if peak > 0 else attention
    resized = cv2.resize(scaled.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return clean(resized > threshold, min_area)
