"""Joint image + mask augmentation for AnomalyDiffusion training (as the official training does):
random horizontal / vertical flips, a rotation of up to ±20°, and a random crop that always keeps
the mask's bounding box, resized to the training resolution."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF


def to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (H, W, 3) and bool (H, W) -> float image (3, H, W) in [-1, 1], mask (1, H, W)."""
    img = torch.tensor(np.asarray(image)).permute(2, 0, 1).float() / 127.5 - 1
    return img, torch.tensor(np.asarray(mask)).float()[None]


def crop_box(mask: torch.Tensor, rng: np.random.Generator,
             min_scale: float = 0.6) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop containing the mask's bounding box, each side
    at least ``min_scale`` of the image side."""
    height, width = mask.shape[-2:]
    ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
    if ys.numel() == 0:
        y0, y1, x0, x1 = 0, height, 0, width
    else:
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    scale = rng.uniform(min_scale, 1.0)
    crop_h = max(y1 - y0, int(round(scale * height)))
    crop_w = max(x1 - x0, int(round(scale * width)))
    top = int(rng.integers(max(0, y1 - crop_h), min(y0, height - crop_h) + 1))
    left = int(rng.integers(max(0, x1 - crop_w), min(x0, width - crop_w) + 1))
    return top, left, crop_h, crop_w


def augment_pair(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, size: int,
                 max_rotation: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented (image (3, size, size) in [-1, 1], mask (1, size, size) in {0, 1}) pair.

    The image is resampled bilinearly, the mask nearest-neighbour, with the same parameters.
    """
    img, msk = to_tensors(image, mask)
    if rng.random() < 0.5:
        img, msk = TF.horizontal_flip(img), TF.horizontal_flip(msk)
    if rng.random() < 0.5:
        img, msk = TF.vertical_flip(img), TF.vertical_flip(msk)
    angle = float(rng.uniform(-max_rotation, max_rotation))
    rotated = TF.rotate(msk, angle, interpolation=InterpolationMode.NEAREST)
    if rotated.sum() > 0:  # a rotation that turns the defect out of the frame is skipped
        img, msk = TF.rotate(img, angle, interpolation=InterpolationMode.BILINEAR), rotated
    top, left, h, w = crop_box(msk, rng)
    img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    msk = TF.resized_crop(msk, top, left, h, w, [size, size],
                          interpolation=InterpolationMode.NEAREST)
    return img.clamp(-1, 1), msk
