"""Inception Score and IC-LPIPS with small random-weight networks (no downloads)."""

import numpy as np
import pytest
import torch
from torch import nn
from torchmetrics.image.inception import InceptionScore

from anomalygen.errors import DataError, ModelNotFoundError
from anomalygen.evaluation.ic_lpips import (ic_lpips, ic_lpips_scores, load_lpips, lpips_matrix, mean_pairwise_lpips,
                                             to_lpips_tensor)
from anomalygen.evaluation.inception_score import inception_score, inception_scores, load_inception

torch.set_num_threads(1)


class TinyExtractor(nn.Module):
    """A random-weight stand-in for Inception: uint8 images -> 10 logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        return self.net(x.float() / 32.0)


def _images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_inception_score_equals_torchmetrics_on_the_same_logits():
    extractor = TinyExtractor()
    images = _images(40)
    ours = inception_score(images, extractor, splits=10, seed=3, batch_size=7)
    with torch.no_grad():
        logits = extractor(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    reference = InceptionScore(feature=nn.Identity(), splits=10)
    reference.update(logits)
    torch.manual_seed(3)
    assert ours == pytest.approx(float(reference.compute()[0]), rel=1e-5)


def test_inception_score_one_split_closed_form_and_mixed_sizes():
    extractor = TinyExtractor()
    images = _images(6, 32) + _images(5, 40, seed=1)
    with torch.no_grad():
        p = torch.cat([extractor(torch.from_numpy(np.stack(g)).permute(0, 3, 1, 2)) for g in (images[:6], images[6:])]).double().softmax(1)
    expected = float(torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()))
    assert inception_score(images, extractor, splits=1) == pytest.approx(expected, rel=1e-5)


def test_inception_scores_per_type_and_mean():
    result = inception_scores({"a": _images(12), "b": _images(12, seed=5), "c": _images(1)}, TinyExtractor(), splits=2)
    assert sorted(result["per_type"]) == ["a", "b"]  # a single image has no score
    assert result["mean"] == pytest.approx(np.mean(list(result["per_type"].values())))
    assert all(v >= 1.0 for v in result["per_type"].values())


def test_inception_scores_warn_below_50_images_per_split(monkeypatch):
    monkeypatch.setattr("anomalygen.evaluation.inception_score.inception_score", lambda images, *a, **k: 1.0)
    result = inception_scores({"few": [None] * 499, "enough": [None] * 500}, None, splits=10)
    assert len(result["warnings"]) == 1
    assert result["warnings"][0].startswith("Inception Score of few: 499 images in 10 splits (49 per split, fewer than 50)")
    assert inception_scores({"t": [None] * 49}, None, splits=1)["warnings"]
    assert not inception_scores({"t": [None] * 50}, None, splits=1)["warnings"]


def test_missing_weights_name_the_file_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("ANOMALYGEN_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(ModelNotFoundError, match="weights-inception-2015-12-05-6726825d.pth.*https://github.com/toshas"):
        load_inception()
    with pytest.raises(DataError, match="nowhere.pth: weights file not found"):  # named by the user: an error
        load_inception(str(tmp_path / "nowhere.pth"))
    with pytest.raises(ModelNotFoundError, match="vgg16-397923af.pth"):
        load_lpips("vgg")


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return load_lpips("alex", random_backbone=True)


class MeanAbs(nn.Module):
    """A transparent stand-in for LPIPS: the mean absolute difference of each pair; counts the pairs."""

    pairs = 0

    def forward(self, a, b):
        self.pairs += len(a)
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_inputs_span_minus_one_to_one():
    images = [np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8), np.full((8, 8, 3), 51, np.uint8)]
    t = to_lpips_tensor(images, size=8)
    assert t.shape == (3, 3, 8, 8) and t[0].eq(-1).all() and t[1].eq(1).all()
    torch.testing.assert_close(t[2], torch.full((3, 8, 8), 51 / 127.5 - 1))


@pytest.mark.parametrize("batch_size", [16, 5, 1])
def test_pairwise_means_and_matrices_cover_every_pair_once(batch_size):
    """7 images have 21 unordered pairs (more than one batch of 16); 5 × 4 images 20 cells."""
    images = torch.rand(7, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = np.mean([float((images[i] - images[j]).abs().mean()) for i in range(7) for j in range(i + 1, 7)])
    model = MeanAbs()
    assert mean_pairwise_lpips(model, images, batch_size) == pytest.approx(expected) and model.pairs == 21
    matrix = lpips_matrix(model, images[:5], images[3:], batch_size)
    brute = torch.tensor([[float((images[i] - images[3 + j]).abs().mean()) for j in range(4)] for i in range(5)])
    torch.testing.assert_close(matrix, brute)


def test_ic_lpips_scores_two_member_clusters_and_draws_50_by_default():
    """Two images near the dark centre (a cluster of exactly two) and 60 identical ones at the light
    centre: the score is the mean of the dark pair's distance and 0, and the light cluster's
    pairs are those of 50 members (1225), after 62 × 2 nearest-centre distances."""
    dark, light = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    near_dark = [np.full((8, 8, 3), 10, np.uint8), np.full((8, 8, 3), 30, np.uint8)]
    model = MeanAbs()
    score = ic_lpips(model, [dark, light], near_dark + [light] * 60, size=8)
    assert score == pytest.approx((20 / 127.5) / 2)
    assert model.pairs == 62 * 2 + 1 + 50 * 49 // 2


def test_ic_lpips_identical_images_score_zero(random_lpips):
    centre = _images(1, 48)[0]
    generated = [centre.copy() for _ in range(5)]
    assert ic_lpips(random_lpips, [centre], generated, size=64) == pytest.approx(0.0, abs=1e-6)


def test_ic_lpips_more_diverse_set_scores_higher(random_lpips):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    similar = [np.clip(base.astype(int) + rng.integers(-10, 11, base.shape), 0, 255).astype(np.uint8) for _ in range(6)]
    diverse = _images(6, 48, seed=2)
    low = ic_lpips(random_lpips, [base], similar, size=64)
    high = ic_lpips(random_lpips, [base], diverse, size=64)
    assert 0.0 < low < high


def test_ic_lpips_clusters_caps_and_skips(random_lpips):
    dark = np.zeros((32, 32, 3), np.uint8)
    light = np.full((32, 32, 3), 255, np.uint8)
    rng = np.random.default_rng(0)
    near_dark = [rng.integers(0, 40, (32, 32, 3), dtype=np.uint8) for _ in range(8)]
    # All members join the dark centre; the light cluster is empty and skipped.
    full = ic_lpips(random_lpips, [dark, light], near_dark, size=64)
    capped = ic_lpips(random_lpips, [dark, light], near_dark, size=64, max_members=3, seed=1)
    assert full > 0 and capped > 0 and capped != full
    assert ic_lpips(random_lpips, [dark], near_dark[:1], size=64) is None
    result = ic_lpips_scores(random_lpips, {"t": [dark], "u": [light]}, {"t": near_dark, "v": near_dark}, size=64)
    assert list(result["per_type"]) == ["t"] and result["mean"] == pytest.approx(full)
