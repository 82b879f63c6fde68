"""Every downstream network's training loop is a row of the one progress display (``progress.Bar``): in
a log (stderr not a terminal) it writes its epochs with their time left, and it joins a display that
is already open (``anomalygen benchmark``) instead of opening a second live display."""

from __future__ import annotations

import io

import numpy as np
import torch
from rich.console import Console

from anomalygen import progress
from anomalygen.evaluation import draem_augmentation as da
from anomalygen.evaluation.classification import ClassificationConfig, run_classification
from anomalygen.evaluation.inputs import EvaluationData
from anomalygen.evaluation.localization import LocalizationConfig, run_localization
from anomalygen.types import DefectExample

torch.set_num_threads(1)
SIZE = 32


def logged(monkeypatch, work) -> list[str]:
    """The plain lines ``work()`` writes to a non-terminal display that is already open, every update logged."""
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    log = io.StringIO()
    with progress.display(Console(file=log, force_terminal=False, width=200)):
        work()
    return [line for line in log.getvalue().splitlines() if " elapsed, " in line]


def data() -> EvaluationData:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[4:12, 4:12] = True
    example = {t: [DefectExample(np.full((SIZE, SIZE, 3), level, np.uint8), mask, t) for level in (100, 120)]
               for t in ("a", "b")}
    return EvaluationData(category="tiles", generated=example, train_defects={}, test_defects=example,
                          train_good=[np.full((SIZE, SIZE, 3), 20, np.uint8)] * 2,
                          test_good=[np.full((SIZE, SIZE, 3), 30, np.uint8)], problems=[])


def test_the_localization_unet_logs_its_epochs_and_loss(monkeypatch):
    config = LocalizationConfig(epochs=2, samples_per_epoch=2, resolution=SIZE, base=2, batch_size=2, protocol="clean")
    lines = logged(monkeypatch, lambda: run_localization(data(), config, torch.device("cpu")))
    assert [line.split(",")[0] for line in lines] == ["U-Net training: 1/2", "U-Net training: 2/2"]
    assert all(" left loss=" in line for line in lines)


def test_the_classifier_logs_its_epochs(monkeypatch):
    config = ClassificationConfig(epochs=2, resolution=SIZE, batch_size=4, random_init=True, protocol="clean")
    lines = logged(monkeypatch, lambda: run_classification(data(), config, torch.device("cpu")))
    assert [line.split(",")[0] for line in lines] == ["ResNet-34 training: 1/2", "ResNet-34 training: 2/2"]


def test_draem_logs_every_epoch_the_last_one_too(monkeypatch):
    good = [np.full((SIZE, SIZE, 3), v, np.uint8) for v in (60, 90, 120, 150)]
    mask = np.zeros((SIZE, SIZE), bool)
    mask[8:20, 8:20] = True
    pairs = [da.GeneratedPair(np.where(mask[..., None], 250, good[0]).astype(np.uint8), mask, good[0])]
    config = da.DraemAugmentationConfig(epochs=3, resolution=SIZE, rec_base=2, disc_base=2, batch_size=2, workers=0)
    lines = logged(monkeypatch, lambda: da.train_draem(good, pairs, config, torch.device("cpu"), "DRAEM (generated)"))
    assert [line.split(",")[0] for line in lines] == [f"DRAEM (generated): {k}/3" for k in (1, 2, 3)]
