"""What the downstream networks receive (issue 29): every image has its own flat grey level, so each
row a network sees names the image it came from. The localisation U-Net (DRAEM's protocol) trains on
good images with empty masks about half the time and on generated pairs (image with its own mask)
otherwise, and is tested on the real test split; the classifier trains on generated defects only,
labelled by their type, and is tested on the real test defects of the generated types."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalygen.evaluation import classification, localization
from anomalygen.evaluation.classification import ClassificationConfig, run_classification
from anomalygen.evaluation.inputs import EvaluationData, resize_mask
from anomalygen.evaluation.localization import LocalizationConfig, run_localization
from anomalygen.types import DefectExample

torch.set_num_threads(1)
SIZE = 32


def flat(level: int) -> np.ndarray:
    return np.full((24, 24, 3), level, np.uint8)


def box(top: int, left: int, height: int = 6, width: int = 6) -> np.ndarray:
    mask = np.zeros((24, 24), bool)
    mask[top:top + height, left:left + width] = True
    return mask


def example(level: int, defect_type: str, top: int = 2, left: int = 2) -> DefectExample:
    return DefectExample(flat(level), box(top, left), defect_type)


@pytest.fixture
def data() -> EvaluationData:
    """Grey levels: train/good 10-30, generated 100-130 ("a") and 200-210 ("b"), real test good 50,
    real test defects 60-61 ("a"), 70 ("b"), 80 ("c": not generated), real train defects 90."""
    generated = {"a": [example(100 + 10 * i, "a", top=3 * i, left=i) for i in range(4)],
                 "b": [example(200 + 10 * i, "b", top=12, left=4 * i) for i in range(2)]}
    return EvaluationData(
        category="tiles", generated=generated, train_defects={"a": [example(90, "a")]},
        test_defects={"a": [example(60, "a", 8, 8), example(61, "a", 1, 14)], "b": [example(70, "b", 14, 2)],
                      "c": [example(80, "c")]},
        train_good=[flat(10), flat(20), flat(30)], test_good=[flat(50)], problems=[])


def levels(batch: torch.Tensor) -> list[int]:
    """The grey level of each row of a (N, 3, H, W) batch in [0, 1]; every row is one flat image."""
    values = (batch.detach().float() * 255).round()
    assert bool((values == values[:, :1, :1, :1]).all()), "a row mixes images"
    return [int(v) for v in values[:, 0, 0, 0]]


def test_the_unet_trains_on_good_images_half_the_time_and_on_generated_pairs_otherwise(data, monkeypatch):
    seen = {"train": [], "test": [], "targets": [], "metric_masks": [], "losses": [], "lr": [], "classes": [], "autocast": []}

    class Recording(localization.DiscriminativeUNet):
        def forward(self, x):
            seen["train" if self.training else "test"].append(levels(x))
            out = super().forward(x)
            seen["classes"].append(out.shape[1])
            seen["autocast"].append(torch.is_autocast_enabled("cpu"))
            return out

    real_loss, real_metrics = localization.focal_loss, localization.localization_metrics

    def loss(logits, target):
        seen["targets"].append(target.detach().clone())
        value = real_loss(logits, target)
        seen["losses"].append(float(value.detach()))
        return value

    class Schedule(torch.optim.lr_scheduler.MultiStepLR):
        def step(self, *args, **kwargs):
            seen["lr"].append(self.optimizer.param_groups[0]["lr"])
            super().step(*args, **kwargs)

    def metrics(masks, maps, scores):
        seen["metric_masks"].append(masks.copy())
        return real_metrics(masks, maps, scores)

    monkeypatch.setattr(localization, "DiscriminativeUNet", Recording)
    monkeypatch.setattr(localization, "focal_loss", loss)
    monkeypatch.setattr(localization, "localization_metrics", metrics)
    monkeypatch.setattr(torch.optim.lr_scheduler, "MultiStepLR", Schedule)
    config = LocalizationConfig(epochs=10, samples_per_epoch=40, resolution=SIZE, base=2, batch_size=15, protocol="clean")
    result = run_localization(data, config, torch.device("cpu"))

    rows = [level for batch in seen["train"] for level in batch]
    targets = torch.cat(seen["targets"])
    assert set(seen["classes"]) == {2} and not any(seen["autocast"])  # good / anomalous per pixel, fp32 on the CPU
    assert len(rows) == len(targets) == 400 and [len(batch) for batch in seen["train"][:3]] == [15, 15, 10]
    # DRAEM's schedule: Adam at 1e-4, x0.2 at 80 % and 90 % of the epochs; an epoch's loss is its batches' mean
    assert seen["lr"][1:] == pytest.approx([1e-4] * 8 + [2e-5, 4e-6])  # the lr of each epoch (0: the constructor's step)
    assert result["history"][-1]["loss"] == pytest.approx(np.mean(seen["losses"][-3:]))
    good = {10, 20, 30}
    pairs = {e.image[0, 0, 0]: resize_mask(e.mask, SIZE) for t in data.generated.values() for e in t}
    share = sum(level in good for level in rows) / len(rows)
    assert 0.42 < share < 0.58  # a fair coin per sample: 0.5 +- 3.2 sd over 400 draws
    assert set(rows) == good | set(pairs)  # every good image and every generated image is drawn
    for level, target in zip(rows, targets):
        expected = np.zeros((SIZE, SIZE), bool) if level in good else pairs[level]
        assert np.array_equal(target.numpy().astype(bool), expected), level  # each image with its own mask
    # tested once (the clean protocol's last epoch) on real test/good + every real test defect, in order
    assert seen["test"] == [[50, 60, 61, 70, 80]]
    real = [np.zeros((SIZE, SIZE), bool)] + [resize_mask(e.mask, SIZE) for t in ("a", "b", "c") for e in data.test_defects[t]]
    assert len(seen["metric_masks"]) == 4 and np.array_equal(seen["metric_masks"][0], np.stack(real))
    for t, masks in zip(("a", "b", "c"), seen["metric_masks"][1:]):  # then per defect type: test/good + its defects
        expected = [np.zeros((SIZE, SIZE), bool)] + [resize_mask(e.mask, SIZE) for e in data.test_defects[t]]
        assert np.array_equal(masks, np.stack(expected)), t


def test_the_paper_protocol_tests_every_eval_every_epochs_and_the_last(data):
    config = LocalizationConfig(epochs=7, samples_per_epoch=4, resolution=SIZE, base=2, batch_size=4, protocol="paper",
                                eval_every=3)
    result = run_localization(data, config, torch.device("cpu"))
    assert [row["epoch"] for row in result["history"]] == [3, 6, 7]
    assert "clean" not in result and result["paper"]["epoch"] in (3, 6, 7)


def quadrants(level: int) -> np.ndarray:
    """An image named by ``level`` whose horizontal mirror, vertical mirror and channel order all differ:
    channels level, +1, +2; +3 on the right half, +6 on the bottom half."""
    image = level + np.arange(3)[None, None, :] + 3 * (np.arange(SIZE)[None, :, None] >= SIZE // 2)
    return (image + 6 * (np.arange(SIZE)[:, None, None] >= SIZE // 2)).astype(np.uint8)


def test_the_classifier_trains_on_generated_defects_and_tests_on_the_real_ones(data, monkeypatch):
    """Training rows: every generated image five times per epoch (the official dataset's five passes),
    labelled by its type's index among the sorted generated types, never mirrored (the official code
    has no flip); no autocast on the CPU. Test rows: the real test defects of the generated types, and the reported accuracy is
    that of the network's predictions on them."""
    data.generated = {t: [DefectExample(quadrants(int(level)), e.mask, t) for level, e in
                          zip([100 + 10 * i for i in range(4)] if t == "a" else [200, 210], examples)]
                      for t, examples in data.generated.items()}
    seen = {"train": [], "test": [], "labels": [], "logits": [], "autocast": []}
    mean, std = classification.IMAGENET_MEAN, classification.IMAGENET_STD

    class Recording(torch.nn.Module):
        def __init__(self, classes: int):
            super().__init__()
            self.head = torch.nn.Linear(3, classes)

        def forward(self, x):
            pixels = ((x * std + mean) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            seen["train" if self.training else "test"].append(pixels)
            seen["autocast"].append(torch.is_autocast_enabled("cpu"))
            out = self.head(x.mean(dim=(2, 3)))
            if not self.training:
                seen["logits"].append(out.detach())
            return out

    def build(classes, weights):
        return Recording(classes), "recording"

    real_ce = torch.nn.functional.cross_entropy

    def cross_entropy(logits, target, *args, **kwargs):
        seen["labels"].append(target.tolist())
        return real_ce(logits, target, *args, **kwargs)

    monkeypatch.setattr(classification, "build_resnet34", build)
    monkeypatch.setattr(classification.F, "cross_entropy", cross_entropy)
    config = ClassificationConfig(epochs=3, resolution=SIZE, batch_size=4, random_init=True, protocol="clean")
    result = run_classification(data, config, torch.device("cpu"))

    types = {int(e.image.min()): t for t, examples in data.generated.items() for e in examples}
    images = {level: quadrants(level) for level in types}
    rows = [row for batch in seen["train"] for row in batch]
    labels = [label for batch in seen["labels"] for label in batch]
    assert len(rows) == len(labels) == 3 * 5 * len(types)
    levels_seen, mirrored = [], 0
    for row, label in zip(rows, labels):
        level = int(row.min())
        assert np.array_equal(row, images[level]) or np.array_equal(row, images[level][:, ::-1]), level
        mirrored += not np.array_equal(row, images[level])
        assert label == ["a", "b"].index(types[level])  # its own type
        levels_seen.append(level)
    assert sorted(levels_seen) == sorted(list(types) * 15)  # every generated image 5 times per epoch, nothing else
    assert mirrored == 0
    assert [int(row.mean().round()) for batch in seen["test"] for row in batch] == [60, 61, 70]  # real test defects
    assert not any(seen["autocast"])
    predicted = torch.cat(seen["logits"]).argmax(1)
    truth = torch.tensor([0, 0, 1])
    assert result["accuracy"] == pytest.approx(float((predicted == truth).float().mean()))
    assert result["confusion_matrix"] == [[int(((truth == i) & (predicted == j)).sum()) for j in range(2)] for i in range(2)]
    assert result["classes"] == ["a", "b"] and result["skipped_test_types"] == ["c"]
    assert result["test_counts"] == {"a": 2, "b": 1}
