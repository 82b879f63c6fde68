"""Photometric image augmentations used by the model-free generators.

``color_jitter`` is CutPaste's colour jitter (Li et al. 2021, CVPR, Sec. 3.1: torchvision
``ColorJitter`` with brightness, contrast, saturation and hue 0.1). ``rand_augment`` applies 3
ops drawn without replacement from DRAEM's anomaly-source augmentation list (Zavrtanik et al.
2021, ICCV, Sec. 3.3; RandAugment, Cubuk et al. 2020).
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def _hue_saturation(image: np.ndarray, hue: float, saturation: float) -> np.ndarray:
    """Shift hue by ``hue`` turns and scale saturation by ``saturation`` (HSV, 8-bit full range);
    the identity (no lossy HSV round trip) for ``hue == 0`` and ``saturation == 1``."""
    if hue == 0 and saturation == 1:
        return image
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + hue * 256) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0, 255)
    return cv2.cvtColor(np.rint(hsv).astype(np.uint8), cv2.COLOR_HSV2RGB_FULL)


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.1,
    contrast: float = 0.1,
    saturation: float = 0.1,
    hue: float = 0.1,
) -> np.ndarray:
    """Brightness, contrast, saturation factors ``U(1 - x, 1 + x)`` and a hue shift ``U(-hue, hue)``
    (turns), as torchvision's ColorJitter draws them (CutPaste, Li et al. 2021, Sec. 3.1)."""
    pil = Image.fromarray(image)
    pil = ImageEnhance.Brightness(pil).enhance(rng.uniform(1 - brightness, 1 + brightness))
    pil = ImageEnhance.Contrast(pil).enhance(rng.uniform(1 - contrast, 1 + contrast))
    return _hue_saturation(
        np.asarray(pil), rng.uniform(-hue, hue), rng.uniform(1 - saturation, 1 + saturation)
    )


def _gamma(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(0.5, 2.0, size=3)
    return np.rint(255 * (image / 255.0) ** gamma).astype(np.uint8)


def _brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.rint(image * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)), 0, 255).astype(np.uint8)


def _sharpness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(image)).enhance(rng.uniform(0.1, 1.9)))


def _hue(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _hue_saturation(image, rng.uniform(-50, 50) / 256, 1 + rng.uniform(-50, 50) / 128)


def _solarize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.solarize(Image.fromarray(image), int(rng.integers(32, 129))))


def _posterize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.posterize(Image.fromarray(image), int(rng.integers(1, 9))))


def _invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255 - image


def _autocontrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.autocontrast(Image.fromarray(image)))


def _equalize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.equalize(Image.fromarray(image)))


def _rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-45, 45), 1.0)
    return cv2.warpAffine(image, matrix, (w, h), borderMode=cv2.BORDER_REFLECT)


RAND_AUGMENT_OPS = (
    _gamma,
    _brightness,
    _sharpness,
    _hue,
    _solarize,
    _posterize,
    _invert,
    _autocontrast,
    _equalize,
    _rotate,
)


def rand_augment(image: np.ndarray, rng: np.random.Generator, k: int = 3) -> tuple[np.ndarray, list[str]]:
    """Apply ``k`` of DRAEM's 10 anomaly-source ops (gamma, brightness, sharpness, hue/saturation,
    solarize, posterize, invert, autocontrast, equalize, rotate), drawn without replacement, in
    the drawn order (Zavrtanik et al. 2021, Sec. 3.3). Returns the image and the op names."""
    picks = rng.choice(len(RAND_AUGMENT_OPS), size=k, replace=False)
    names = []
    for p in picks:
        image = np.ascontiguousarray(RAND_AUGMENT_OPS[p](image, rng))
        names.append(RAND_AUGMENT_OPS[p].__name__.lstrip("_"))
    return image, names
