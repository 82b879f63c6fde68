"""The downstream protocols against the official AnomalyDiffusion scripts (issue 30):
``train-localization.py`` keeps the one epoch with the best image AUROC + pixel AUROC + pixel AP +
PRO; ``train-classification.py`` trains the ResNet-34 at batch 8 on five passes per epoch with
MultiStepLR and keeps the best test epoch; both networks' U-Net starts from DRAEM's weights_init."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalygen.evaluation import classification
from anomalygen.evaluation.classification import ClassificationConfig, run_classification
from anomalygen.evaluation.inputs import EvaluationData
from anomalygen.evaluation.localization import paper_protocol
from anomalygen.evaluation.unet import DiscriminativeUNet, ReconstructiveNet
from anomalygen.types import DefectExample

torch.set_num_threads(1)
KEYS = ["pixel_auroc", "pixel_ap", "pixel_au_pro", "image_auroc", "image_ap"]


def test_paper_keeps_the_epoch_with_the_best_official_sum_per_metric_is_its_own_variant():
    """Epoch 1 has the best pixel AP (and image AP), epoch 2 the best sum of the four official
    metrics: ``paper`` reads every metric at epoch 2; ``paper_per_metric`` mixes epochs."""
    history = [
        {"epoch": 1, "loss": 0.1, "pixel_auroc": 0.80, "pixel_ap": 0.60, "pixel_au_pro": 0.50, "image_auroc": 0.70, "image_ap": 0.9},
        {"epoch": 2, "loss": 0.1, "pixel_auroc": 0.95, "pixel_ap": 0.55, "pixel_au_pro": 0.70, "image_auroc": 0.90, "image_ap": 0.8},
        {"epoch": 3, "loss": 0.1, "pixel_auroc": 0.95, "pixel_ap": 0.55, "pixel_au_pro": 0.70, "image_auroc": 0.90, "image_ap": 0.8},
    ]
    result = paper_protocol(history, KEYS)
    paper = result["paper"]
    assert paper["epoch"] == 2  # the first of the tied epochs, as the official `sum_metric > last_sum`
    assert paper["selection_sum"] == pytest.approx(0.95 + 0.55 + 0.70 + 0.90)
    assert {k: paper[k] for k in KEYS} == {k: history[1][k] for k in KEYS}
    assert result["paper_per_metric"]["pixel_ap"] == 0.60 and result["paper_per_metric"]["best_epoch"]["pixel_ap"] == 1
    # without real test/good images image AUROC is undefined: the sum runs over the defined three
    for row in history:
        row["image_auroc"] = None
    assert paper_protocol(history, KEYS)["paper"]["selected_by"] == "pixel_auroc + pixel_ap + pixel_au_pro"


@pytest.mark.parametrize("network", [lambda: DiscriminativeUNet(3, 2, base=8), lambda: ReconstructiveNet(3, base=8)])
def test_networks_start_from_draems_weights_init(network):
    torch.manual_seed(0)
    model = network()
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    weights = torch.cat([w.flatten() for w in convs])
    assert weights.mean().abs() < 2e-3 and weights.std().item() == pytest.approx(0.02, rel=0.05)
    scales = torch.cat([m.weight.detach() for m in norms])
    assert scales.mean().item() == pytest.approx(1.0, abs=3e-3) and scales.std().item() == pytest.approx(0.02, rel=0.15)
    assert all(torch.count_nonzero(m.bias) == 0 for m in norms)


def _data(per_type: int = 4) -> EvaluationData:
    rng = np.random.default_rng(0)
    make = lambda t: DefectExample(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), np.ones((32, 32), bool), t)  # noqa: E731
    generated = {t: [make(t) for _ in range(per_type)] for t in ("crack", "hole")}
    tests = {t: [make(t) for _ in range(2)] for t in ("crack", "hole")}
    return EvaluationData("tiles", generated, {}, tests, [], [], [])


def test_classifier_trains_as_the_official_script_and_paper_keeps_the_best_test_epoch(monkeypatch):
    """Defaults batch 8, 5 passes, MultiStepLR (×0.2 at 80 % and 90 % of the epochs); each epoch
    sees every generated image 5 times in batches of 8; ``paper`` is the best test epoch,
    ``clean`` the last. The ResNet-34 is replaced by a tiny network and the test predictions are
    scripted (the protocol is under test, not the network)."""
    config = ClassificationConfig(random_init=True)
    assert (config.batch_size, config.passes, config.epochs, config.protocol, config.flip) == (8, 5, 30, "both", False)
    seen, lrs = [], []

    class Tiny(torch.nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.fc = torch.nn.Linear(3, classes)

        def forward(self, x):
            if self.training:
                seen.append(len(x))
            return self.fc(x.mean((2, 3)))

    class Recorded(torch.optim.Adam):
        def step(self, *args, **kwargs):
            lrs.append(self.param_groups[0]["lr"])
            return super().step(*args, **kwargs)

    scripted_accuracies = [0.5, 1.0, 0.25, 0.75, 0.5, 0.5, 0.75, 0.25, 0.5, 0.5]
    accuracies = iter(scripted_accuracies)
    truth = torch.tensor([0, 0, 1, 1])

    def scripted(model, images, device, batch_size):
        right = round(next(accuracies) * 4)
        return torch.where(torch.arange(4) < right, truth, 1 - truth)

    monkeypatch.setattr(classification, "build_resnet34", lambda classes, weights: (Tiny(classes), "tiny"))
    monkeypatch.setattr(classification.torch.optim, "Adam", Recorded)
    monkeypatch.setattr(classification, "_predict", scripted)
    result = run_classification(_data(), ClassificationConfig(epochs=10, random_init=True), torch.device("cpu"))
    assert seen == [8] * 50  # 8 images × 5 passes = 40 per epoch, 5 batches of 8, 10 epochs
    assert lrs == pytest.approx([1e-4] * 40 + [2e-5] * 5 + [4e-6] * 5)  # ×0.2 after epochs 8 and 9
    assert [row["accuracy"] for row in result["history"]] == scripted_accuracies
    assert (result["paper"]["epoch"], result["paper"]["accuracy"]) == (2, 1.0)
    assert (result["clean"]["epoch"], result["clean"]["accuracy"]) == (10, 0.5) and result["accuracy"] == 0.5
