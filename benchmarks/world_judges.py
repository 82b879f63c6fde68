"""Judges of the procedural defect world (issue 31), trained on its own renderer: no outside weights.

- ``family``: which family (or ``none``) a defect region shows: a small CNN on the square crop
  around the mask's bounding box (the image only: a mask's shape alone earns nothing);
- ``segmenter``: which pixels of an image are defect pixels: a small fully convolutional net;
- ``category``: which category an image shows, whole image;
- ``prior_family`` (optional, ``train_prior_family``): the family classifier trained on the same renders
  passed through a prior's autoencoder (defect and good crops alike): which family a region shows as
  that prior can draw it, where the plain one judges against the renderer's own look.

Each trains on freshly rendered, labelled examples (``data.world.render_defect``) with blur and
noise augmentation (generated images are blurrier than renders), and reports its accuracy on a
second, disjoint bank of renders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalygen.data.world import CATEGORIES, FAMILIES, render_defect

CLASSES = (*FAMILIES, "none")
CROP = 24


def crop_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): a square around the mask's bounding box, 1.5x its longer side (at least 12 px)."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        h, w = mask.shape
        return h // 4, 3 * h // 4, w // 4, 3 * w // 4
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    half = max(6.0, 0.75 * (max(ys.max() - ys.min(), xs.max() - xs.min()) + 1))
    return int(round(cy - half)), int(round(cy + half)), int(round(cx - half)), int(round(cx + half))


def crop(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The ``crop_box`` of ``image`` (edge-padded where it leaves the image), resized to CROP x CROP."""
    y0, y1, x0, x1 = crop_box(mask)
    h, w = image.shape[:2]
    pad = max(0, -y0, -x0, y1 - h, x1 - w)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    return cv2.resize(padded[y0 + pad:y1 + pad, x0 + pad:x1 + pad], (CROP, CROP), interpolation=cv2.INTER_AREA)


def _block(c_in: int, c_out: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation), nn.BatchNorm2d(c_out), nn.ReLU())


class Classifier(nn.Module):
    def __init__(self, classes: int, width: int = 24):
        super().__init__()
        self.features = nn.Sequential(_block(3, width), nn.MaxPool2d(2), _block(width, 2 * width), nn.MaxPool2d(2),
                                      _block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class Segmenter(nn.Module):
    def __init__(self, width: int = 24):
        super().__init__()
        self.net = nn.Sequential(_block(3, width), _block(width, width, 2), _block(width, width, 4), _block(width, width, 2),
                                 nn.Conv2d(width, 1, 1))

    def forward(self, x):
        return self.net(x)[:, 0]


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


@dataclass
class Bank:
    """Rendered examples: defect images, masks, their good images, category and family indices."""
    images: np.ndarray
    masks: np.ndarray
    goods: np.ndarray
    categories: np.ndarray
    families: np.ndarray


def render_bank(count: int, size: int, seed: int) -> Bank:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        c, f = i % len(CATEGORIES), (i // len(CATEGORIES)) % len(FAMILIES)
        good, image, mask = render_defect(CATEGORIES[c], FAMILIES[f], np.random.default_rng([seed, i]), size)
        items.append((image, mask, good, c, f))
    rng.shuffle(items)
    return Bank(*(np.stack(column) for column in zip(*items)))


def _flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    for axis in (-1, -2):
        if torch.rand(1, generator=generator) < 0.5:
            x = x.flip(axis)
    return x


def _degrade(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random blur (sigma 0-1.2 px) and noise: generated images are softer than renders."""
    sigma = float(torch.rand(1, generator=generator)) * 1.2
    if sigma > 0.3:
        r = torch.arange(-2, 3, dtype=torch.float32)
        k = torch.exp(-r**2 / (2 * sigma**2))
        k = k / k.sum()
        x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), (k[:, None] * k[None]).expand(3, 1, 5, 5).contiguous(), groups=3)
    return x + 0.03 * torch.randn(x.shape, generator=generator)


def _family_examples(bank: Bank) -> tuple[torch.Tensor, torch.Tensor]:
    """Each defect's crop labelled with its family, and the same box of its good image labelled none."""
    crops = [crop(im, m) for im, m in zip(bank.images, bank.masks)] + [crop(g, m) for g, m in zip(bank.goods, bank.masks)]
    labels = np.concatenate([bank.families, np.full(len(bank.goods), len(FAMILIES))])
    return _tensor(np.stack(crops)), torch.from_numpy(labels).long()


def _category_examples(bank: Bank) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.concatenate([bank.images, bank.goods])
    return _tensor(images), torch.from_numpy(np.concatenate([bank.categories, bank.categories])).long()


def _segment_examples(bank: Bank) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.concatenate([bank.images, bank.goods])
    masks = np.concatenate([bank.masks, np.zeros_like(bank.masks)])
    return _tensor(images), torch.from_numpy(masks).float()


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, segment: bool) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        index = torch.randint(len(x), (32,), generator=generator)
        if segment:  # the same flips for image and mask; blur and noise for the image only
            both = _flip(torch.cat([x[index], y[index][:, None]], 1), generator)
            inputs, target = _degrade(both[:, :3], generator), both[:, 3]
            loss = F.binary_cross_entropy_with_logits(model(inputs), target, pos_weight=torch.tensor(4.0))
        else:
            loss = F.cross_entropy(model(_degrade(_flip(x[index], generator), generator)), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@dataclass
class Judges:
    family: Classifier
    segmenter: Segmenter
    category: Classifier
    prior_family: Classifier | None = None

    @torch.no_grad()
    def families(self, images: list[np.ndarray], masks: list[np.ndarray], prior: bool = False) -> list[str]:
        """The family (or ``none``) each image shows inside its mask's crop (``prior``: as the prior draws it)."""
        if not images:
            return []
        logits = (self.prior_family if prior else self.family)(_tensor(np.stack([crop(im, m) for im, m in zip(images, masks)])))
        return [CLASSES[i] for i in logits.argmax(1).tolist()]

    @torch.no_grad()
    def segment(self, images: list[np.ndarray]) -> np.ndarray:
        """(N, H, W) bool: the pixels the segmenter marks as defect."""
        return (self.segmenter(_tensor(np.stack(images))) > 0).numpy()

    @torch.no_grad()
    def categories(self, images: list[np.ndarray]) -> list[str]:
        return [CATEGORIES[i] for i in self.category(_tensor(np.stack(images))).argmax(1).tolist()]

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name in ("family", "segmenter", "category") for k, v in getattr(self, name).state_dict().items()}

    def load(self, state: dict[str, torch.Tensor]) -> "Judges":
        for name in ("family", "segmenter", "category"):
            getattr(self, name).load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
            getattr(self, name).eval()
        return self


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def build_judges() -> Judges:
    return Judges(Classifier(len(CLASSES)), Segmenter(), Classifier(len(CATEGORIES)))


def train_judges(size: int, count: int, steps: int, seed: int = 0) -> tuple[Judges, dict[str, float]]:
    """Judges trained on ``count`` renders (``steps`` steps each), and their accuracies on ``count // 2`` others."""
    train, check = render_bank(count, size, seed + 1000), render_bank(max(16, count // 2), size, seed + 2000)
    judges = build_judges()
    _fit(judges.family, *_family_examples(train), steps, seed, False)
    _fit(judges.category, *_category_examples(train), steps, seed, False)
    _fit(judges.segmenter, *_segment_examples(train), steps, seed, True)
    n = len(check.images)
    images, masks = list(check.images), list(check.masks)
    families = judges.families(images + list(check.goods), masks + masks)
    truth = [FAMILIES[f] for f in check.families] + ["none"] * n
    marked = judges.segment(images)
    categories = judges.categories(images)
    report = {"family_accuracy": float(np.mean([a == b for a, b in zip(families, truth)])),
              "segment_iou": float(np.mean([iou(p, m) for p, m in zip(marked, check.masks)])),
              "good_marked_share": float(judges.segment(list(check.goods)).mean()),
              "category_accuracy": float(np.mean([c == CATEGORIES[i] for c, i in zip(categories, check.categories)])),
              "train_renders": count, "check_renders": n, "steps": steps}
    return judges, report


def train_prior_family(through: Callable[[Bank], Bank], size: int, count: int, steps: int,
                       seed: int = 0) -> tuple[Classifier, dict[str, float]]:
    """A family classifier trained like ``train_judges``' on the same renders after ``through`` (a prior's
    autoencoder round trip of the defect and good images, masks unchanged), and its accuracy on the
    check renders after ``through``."""
    train, check = (through(render_bank(n, size, seed + offset)) for n, offset in ((count, 1000), (max(16, count // 2), 2000)))
    judges = build_judges()
    judges.prior_family = _fit(Classifier(len(CLASSES)), *_family_examples(train), steps, seed, False)
    masks = list(check.masks)
    found = judges.families(list(check.images) + list(check.goods), masks + masks, prior=True)
    truth = [FAMILIES[f] for f in check.families] + ["none"] * len(masks)
    return judges.prior_family, {"family_accuracy": float(np.mean([a == b for a, b in zip(found, truth)])),
                                 "train_renders": count, "check_renders": len(masks), "steps": steps}
