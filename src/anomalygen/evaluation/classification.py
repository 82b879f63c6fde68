"""Downstream classification: a ResNet-34 (He et al., CVPR 2016) trained on generated defects only,
tested on the real test defects, as in AnomalyDiffusion (Hu et al., AAAI 2024, Sec. 4.3).

Training as the official script (``train-classification.py``): classes are the generated defect
types (sorted by name here); Adam (lr 1e-4), 30 epochs of five passes over the generated images
each (its dataset's length is 5 × the images), batch 8, cross-entropy, MultiStepLR ×0.2 at 80 %
and 90 % of the epochs. Ours: ImageNet mean/std normalisation of the inputs (the official feeds
[0, 1] pixels) and, only with ``flip``, random horizontal flips (the official has none).
The network starts from torchvision's ImageNet weights, read from the torch hub cache without
pickle code; without them it is an error unless ``random_init`` (the ``--cls-random-init``
option) asks for random initialisation, which the report then labels. Accuracy counts every test
image (the official script reports only its last batch of 100).

Protocols (as the localisation's): ``paper`` tests after every epoch and keeps the best test
epoch (the official ``if acc > max_acc``: its first epoch with the highest accuracy); ``clean``
takes the last epoch. ``both`` reports both, the top-level figures being ``clean``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models import ResNet34_Weights, resnet34

from anomalygen.evaluation.inputs import EvaluationData, resize_image
from anomalygen.evaluation.localization import BATCH, LR, POSITIVE, PROTOCOLS, RESOLUTION, diverged
from anomalygen.options import Choice, OptionSpec
from anomalygen.progress import Bar
from anomalygen.seeding import check_seed
from anomalygen.weights import find_weights, load_into, load_state_dict, missing

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


RESNET34_URL = ResNet34_Weights.IMAGENET1K_V1.url
RANDOM_INIT = "random init (--cls-random-init; the papers use ImageNet weights)"


@dataclass
class ClassificationConfig:
    """The protocol's knobs (official: 30 epochs of 5 passes, batch 8, 256 px, ImageNet weights);
    checked when built."""

    epochs: int = 30
    resolution: int = 256
    batch_size: int = 8
    passes: int = 5  # passes over the generated images per epoch
    lr: float = 1e-4
    protocol: str = "both"
    flip: bool = False  # ours: random horizontal flips
    seed: int = 0
    random_init: bool = False

    FIELDS = OptionSpec(epochs=POSITIVE, resolution=RESOLUTION, batch_size=BATCH, passes=POSITIVE, lr=LR,
                        protocol=Choice(None, PROTOCOLS))

    def __post_init__(self) -> None:
        self.FIELDS.check_fields(self, "classification")
        check_seed(self.seed)


def resnet34_weights(config: ClassificationConfig) -> Path | None:
    """The ImageNet weights file to start from; None for ``random_init``. Missing weights raise
    ``ModelNotFoundError`` saying what to download, where, and that ``--cls-random-init`` exists."""
    if config.random_init:
        return None
    path = find_weights(RESNET34_URL)
    if path is None:
        raise missing("Classification (ResNet-34)", RESNET34_URL,
                      hint="; or set `classification.random_init` to train from random initialisation (not the papers' "
                           "protocol)")
    return path


def build_resnet34(classes: int, weights: Path | None) -> tuple[torch.nn.Module, str]:
    """ResNet-34 from ``weights`` (read without pickle code; None: random init) with a
    ``classes``-way head, and a label saying which weights it starts from."""
    model = resnet34(weights=None)
    if weights is not None:
        load_into(model, load_state_dict(weights), weights, "torchvision ResNet-34")
    model.fc = torch.nn.Linear(model.fc.in_features, classes)
    return model, RANDOM_INIT if weights is None else f"imagenet (torchvision IMAGENET1K_V1, {weights})"


def _stack(images: list[np.ndarray], size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([resize_image(image, size) for image in images])).permute(0, 3, 1, 2).contiguous()


def _normalise(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return (images.to(device).float().div(255.0) - IMAGENET_MEAN.to(device)) / IMAGENET_STD.to(device)


@torch.no_grad()
def _predict(model, images: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(_normalise(images[start : start + batch_size], device)).float().argmax(1).cpu())
    return torch.cat(out)


def run_classification(
    data: EvaluationData, config: ClassificationConfig, device: torch.device, weights: Path | None = None
) -> dict[str, object]:
    """Train on ``data.generated`` from ``weights`` (see ``resnet34_weights``); accuracy, per-class
    accuracy and confusion matrix on every real test defect whose type was generated (other types
    are listed as skipped), at the epoch each protocol keeps (``paper`` / ``clean`` sections; the
    top-level figures are ``clean``'s, or ``paper``'s when it is the only protocol)."""
    classes = sorted(data.generated)
    size = config.resolution
    # the training data go to the device once; the random draws stay on the CPU (same run on any device)
    train_x = _stack([e.image for t in classes for e in data.generated[t]], size).to(device)
    train_y = torch.tensor([i for i, t in enumerate(classes) for _ in data.generated[t]]).to(device)
    test_types = [t for t in sorted(data.test_defects) if t in classes and data.test_defects[t]]
    test_x = _stack([e.image for t in test_types for e in data.test_defects[t]], size)
    test_y = torch.tensor([classes.index(t) for t in test_types for _ in data.test_defects[t]])

    torch.manual_seed(config.seed)
    model, label = build_resnet34(len(classes), weights)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    milestones = [int(config.epochs * 0.8), int(config.epochs * 0.9)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.2)
    test_every_epoch = config.protocol in ("paper", "both")
    history: list[dict[str, float]] = []
    best: tuple[float, int, torch.Tensor] | None = None  # (accuracy, epoch, predictions)
    with Bar(config.epochs, "ResNet-34 training", leave=False) as bar:
        for epoch in range(config.epochs):
            model.train()
            # one epoch = ``passes`` × the images, shuffled together (the official dataset's 5 × length)
            order = torch.randperm(len(train_x) * config.passes) % len(train_x)
            loss_sum = torch.zeros((), device=device)
            for start in range(0, len(order), config.batch_size):
                index = order[start : start + config.batch_size].to(device)
                images = train_x[index]
                if config.flip:
                    flip = (torch.rand(len(index)) < 0.5).to(device)
                    images[flip] = images[flip].flip(-1)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(_normalise(images, device))
                loss = F.cross_entropy(logits.float(), train_y[index])
                loss_sum += loss.detach()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if not torch.isfinite(loss_sum):  # checked once per epoch: no host sync per step
                raise diverged("ResNet-34", epoch + 1, f"its loss is {loss_sum.item()}", device)
            scheduler.step()
            if test_every_epoch or epoch == config.epochs - 1:
                predicted = _predict(model, test_x, device, config.batch_size)
                accuracy = float((predicted == test_y).float().mean())
                history.append({"epoch": epoch + 1, "accuracy": accuracy})
                if best is None or accuracy > best[0]:
                    best = (accuracy, epoch + 1, predicted)
            bar.update(1)

    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix

    n = len(classes)

    def figures(epoch: int, predicted: torch.Tensor) -> dict[str, object]:
        per_class = multiclass_accuracy(predicted, test_y, num_classes=n, average=None)
        return {"epoch": epoch, "accuracy": float((predicted == test_y).float().mean()),
                "per_class_accuracy": {t: float(per_class[classes.index(t)]) for t in test_types},
                "confusion_matrix": multiclass_confusion_matrix(predicted, test_y, num_classes=n).tolist()}

    sections: dict[str, dict[str, object]] = {}
    if config.protocol in ("clean", "both"):
        sections["clean"] = figures(config.epochs, predicted)
    if config.protocol in ("paper", "both"):
        sections["paper"] = figures(best[1], best[2])
    top = sections["clean" if "clean" in sections else "paper"]
    return {
        "config": vars(config).copy(),
        "weights": label,
        "classes": classes,
        "test_counts": {t: len(data.test_defects[t]) for t in test_types},
        "skipped_test_types": sorted(set(data.test_defects) - set(test_types)),
        **{k: v for k, v in top.items() if k != "epoch"},
        "history": history,
        **sections,
    }
