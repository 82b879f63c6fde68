"""Inception Score (Salimans et al., NeurIPS 2016, Sec. 4) per defect type, as the seed papers use it.

IS = exp(E_x KL(p(y|x) || p(y))), computed by torchmetrics' ``InceptionScore`` (10 splits) on the
logits of torch-fidelity's Inception-v3 with the 2015-12-05 TensorFlow weights, on whole
generated images. The network is the library's; weight lookup, a pickle-free weight load (see
``weights``) and grouping by type are here. Each split should hold at least ``MIN_PER_SPLIT``
images: with fewer the marginal p(y) is a noisy estimate and IS is biased low; the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from rich.progress import track
from torch import nn

from anomalygen.weights import find_weights, load_state_dict, missing, state_mismatch

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "ANOMALYGEN_INCEPTION_WEIGHTS"
MIN_PER_SPLIT = 50


def load_inception(weights: str | None = None) -> tuple[nn.Module, str]:
    """torch-fidelity's Inception-v3 returning unbiased logits, and a sentence naming it and its file.

    The file is read by ``load_state_dict`` (no pickle code); torch-fidelity's own loader, which
    unpickles, is bypassed by handing its constructor the state dict instead of a path. Raises
    ``ModelNotFoundError`` naming the file, its URL and where to put it.
    """
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = find_weights(INCEPTION_URL, weights, INCEPTION_ENV)
    if path is None:
        raise missing("Inception Score", INCEPTION_URL, INCEPTION_ENV)
    state = load_state_dict(path)
    # Without a path the constructor asks this function for its state dict: hand it ours.
    with mock.patch.object(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: state), \
            state_mismatch(path, "torch-fidelity Inception-v3"):
        model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"])
    return model, f"torchmetrics InceptionScore on torch-fidelity's Inception-v3 (inception-v3-compat, unbiased logits), weights {path}"


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
    from torchmetrics.image.inception import InceptionScore  # torchmetrics takes seconds to import

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
    """IS of each defect type's generated images, their mean (the category's figure), and a warning
    for each type whose splits hold fewer than ``MIN_PER_SPLIT`` images."""
    per_type, warnings = {}, []
    for defect_type, images in track(by_type.items(), description="Inception Score", transient=True):
        if len(images) < 2:
            continue
        used = min(splits, len(images))
        if len(images) // used < MIN_PER_SPLIT:
            warnings.append(f"Inception Score of {defect_type}: {len(images)} images in {used} splits "
                            f"({len(images) // used} per split, fewer than {MIN_PER_SPLIT}): the score is biased low and noisy")
        with torch.no_grad():
            per_type[defect_type] = inception_score(images, extractor, splits, seed, device=device)
    return {"per_type": per_type, "mean": float(np.mean(list(per_type.values()))) if per_type else None,
            "splits": splits, "warnings": warnings}
