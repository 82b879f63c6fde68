"""Inception Score (Salimans et al., NeurIPS 2016, Sec. 4) per defect type, as the seed papers use it.

IS = exp(E_x KL(p(y|x) || p(y))), computed by torchmetrics' ``InceptionScore`` (10 splits) on the
logits of torch-fidelity's Inception-v3 with the 2015-12-05 TensorFlow weights, on whole
generated images. The network is the library's; only weight lookup and grouping by type are here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from rich.progress import track
from torch import nn
from torchmetrics.image.inception import InceptionScore

from anomalygen.evaluation.weights import find_weights, missing

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "ANOMALYGEN_INCEPTION_WEIGHTS"


def load_inception(weights: str | None = None) -> nn.Module:
    """torch-fidelity's Inception-v3 returning unbiased logits, with weights found offline.

    Raises ``ModelNotFoundError`` naming the file, its URL and where to put it.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = find_weights(INCEPTION_URL, weights, INCEPTION_ENV)
    if path is None:
        raise missing("Inception Score", INCEPTION_URL, INCEPTION_ENV)
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"], feature_extractor_weights_path=str(path))


def _to_uint8_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def inception_score(
    images: Sequence[np.ndarray], extractor: nn.Module, splits: int = 10, seed: int = 0, batch_size: int = 32,
    device: str = "cpu",
) -> float:
    """Mean Inception Score over ``splits`` splits of ``images`` (uint8 RGB arrays, any sizes).

    Images are fed to ``extractor`` as uint8 tensors (it resizes to its input size), batched
    among consecutive images of equal size. ``seed`` fixes torchmetrics' random split order.
    """
    metric = InceptionScore(feature=extractor, splits=min(splits, len(images))).to(device)
    batch: list[np.ndarray] = []
    for image in images:
        if batch and (image.shape != batch[0].shape or len(batch) == batch_size):
            metric.update(_to_uint8_batch(batch).to(device))
            batch = []
        batch.append(image)
    metric.update(_to_uint8_batch(batch).to(device))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, _ = metric.compute()
    return float(mean)


def inception_scores(
    by_type: dict[str, Sequence[np.ndarray]], extractor: nn.Module, splits: int = 10, seed: int = 0, device: str = "cpu"
) -> dict[str, object]:
    """IS of each defect type's generated images, and their mean (the category's figure)."""
    per_type = {}
    for defect_type, images in track(by_type.items(), description="Inception Score", transient=True):
        if len(images) < 2:
            continue
        with torch.no_grad():
            per_type[defect_type] = inception_score(images, extractor, splits, seed, device=device)
    return {"per_type": per_type, "mean": float(np.mean(list(per_type.values()))) if per_type else None}
