"""Downstream classification: a ResNet-34 (He et al., CVPR 2016) trained on generated defects only,
tested on the real test defects, as in AnomalyDiffusion (Hu et al., AAAI 2024, Sec. 4.3).

Classes are the generated defect types sorted by name; Adam (lr 1e-4), 30 epochs, cross-entropy,
horizontal-flip augmentation. ImageNet weights (torchvision) are used when present in the torch
hub cache, otherwise the network starts from random initialisation; the report says which.
Accuracy counts every test image (the official script reports only its last batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix
from torchvision.models import ResNet34_Weights, resnet34

from anomalygen.evaluation.inputs import EvaluationData, resize_image
from anomalygen.evaluation.weights import find_weights

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class ClassificationConfig:
    epochs: int = 30
    resolution: int = 256
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    pretrained: bool = True


def build_resnet34(classes: int, pretrained: bool = True) -> tuple[torch.nn.Module, str]:
    """ResNet-34 with a ``classes``-way head, and which weights it starts from."""
    weights = ResNet34_Weights.IMAGENET1K_V1
    use_imagenet = pretrained and find_weights(weights.url) is not None
    model = resnet34(weights=weights if use_imagenet else None)
    model.fc = torch.nn.Linear(model.fc.in_features, classes)
    return model, ("imagenet (torchvision IMAGENET1K_V1)" if use_imagenet else "random init (ImageNet weights not found offline)")


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


def run_classification(data: EvaluationData, config: ClassificationConfig, device: torch.device) -> dict[str, object]:
    """Train on ``data.generated``; accuracy, per-class accuracy and confusion matrix on every real
    test defect whose type was generated (other types are listed as skipped)."""
    classes = sorted(data.generated)
    size = config.resolution
    train_x = _stack([e.image for t in classes for e in data.generated[t]], size)
    train_y = torch.tensor([i for i, t in enumerate(classes) for _ in data.generated[t]])
    test_types = [t for t in sorted(data.test_defects) if t in classes and data.test_defects[t]]
    test_x = _stack([e.image for t in test_types for e in data.test_defects[t]], size)
    test_y = torch.tensor([classes.index(t) for t in test_types for _ in data.test_defects[t]])

    torch.manual_seed(config.seed)
    model, weights = build_resnet34(len(classes), config.pretrained)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    with Progress(transient=True) as progress:
        task = progress.add_task("ResNet-34 training", total=config.epochs)
        for _ in range(config.epochs):
            model.train()
            order = torch.randperm(len(train_x))
            for start in range(0, len(order), config.batch_size):
                index = order[start : start + config.batch_size]
                images = train_x[index]
                flip = torch.rand(len(index)) < 0.5
                images[flip] = images[flip].flip(-1)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(_normalise(images, device))
                loss = F.cross_entropy(logits.float(), train_y[index].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            progress.update(task, advance=1)

    predicted = _predict(model, test_x, device, config.batch_size)
    n = len(classes)
    per_class = multiclass_accuracy(predicted, test_y, num_classes=n, average=None)
    return {
        "config": vars(config).copy(),
        "weights": weights,
        "classes": classes,
        "test_counts": {t: len(data.test_defects[t]) for t in test_types},
        "skipped_test_types": sorted(set(data.test_defects) - set(test_types)),
        "accuracy": float((predicted == test_y).float().mean()),
        "per_class_accuracy": {t: float(per_class[classes.index(t)]) for t in test_types},
        "confusion_matrix": multiclass_confusion_matrix(predicted, test_y, num_classes=n).tolist(),
    }
