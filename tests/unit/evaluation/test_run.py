"""Downstream U-Net / ResNet protocol and the evaluate report, on a tiny dataset written here."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from anomalygen.evaluation.classification import ClassificationConfig
from anomalygen.evaluation.localization import LocalizationConfig
from anomalygen.evaluation.run import evaluate
from anomalygen.evaluation.unet import DiscriminativeUNet, focal_loss

torch.set_num_threads(1)
TYPES = ("hole", "stain")


def _pair(rng, kind, size=64):
    image = (120 + rng.normal(0, 12, (size, size, 1))).clip(0, 255).repeat(3, 2).astype(np.uint8)
    mask = np.zeros((size, size), bool)
    if kind != "good":
        y, x = rng.integers(8, size - 16, 2)
        mask[y : y + 10, x : x + 10] = True
        image[mask] = (20, 20, 20) if kind == "hole" else (200, 160, 40)
    return image, mask


def _write(root, sub, index, image, mask=None):
    (root / "test" / sub).mkdir(parents=True, exist_ok=True) if sub != "train" else None
    folder = root / ("train/good" if sub == "train" else f"test/{sub}")
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{index:03d}.png")
    if mask is not None:
        (root / "ground_truth" / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ground_truth" / sub / f"{index:03d}_mask.png")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A real category (8 train/good, 4 test/good, 6 per type) and a generated folder (8 per type)."""
    base = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    real, made = base / "data" / "tiles", base / "out" / "tiles"
    for i in range(8):
        _write(real, "train", i, _pair(rng, "good")[0])
    for i in range(4):
        _write(real, "good", i, _pair(rng, "good")[0])
    for kind in TYPES:
        for i in range(6):
            _write(real, kind, i, *_pair(rng, kind))
        for i in range(8):
            _write(made, kind, i, *_pair(rng, kind))
    return base / "data", base / "out"


def test_unet_shapes_and_papers_width():
    assert DiscriminativeUNet(base=8)(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    assert sum(p.numel() for p in DiscriminativeUNet(base=64).parameters()) == pytest.approx(28.37e6, rel=1e-3)


def test_focal_loss_reduces_to_cross_entropy_and_down_weights_easy_pixels():
    logits = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    target = (torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.5).long()
    assert focal_loss(logits, target, gamma=0) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, target)))
    assert focal_loss(logits, target, gamma=2) < focal_loss(logits, target, gamma=0)


def test_evaluate_writes_report_with_both_protocols(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    data, out = tiny
    report = evaluate(
        out, data, category="tiles", out=tmp_path / "report", device="cpu",
        localization=LocalizationConfig(epochs=3, samples_per_epoch=8, resolution=64, base=8, batch_size=4),
        classification=ClassificationConfig(epochs=1, resolution=64, batch_size=8, passes=1, random_init=True),
    )
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    html = (tmp_path / "report" / "report.html").read_text()
    assert saved["generated_counts"] == {"hole": 8, "stain": 8}
    assert saved["real_split"]["test_defects"] == {"hole": 4, "stain": 4}  # paper split: 2 train, 4 test
    # Offline without weights: IS and IC-LPIPS are skipped with visible notes, not a crash.
    assert "skipped" in saved["inception_score"] and "skipped" in saved["ic_lpips"]
    assert any("Inception Score skipped" in note for note in saved["notes"]) and "Inception Score skipped" in html
    loc = saved["localization"]
    assert len(loc["history"]) == 3 and loc["clean"]["epoch"] == 3
    for key, value in loc["clean"].items():
        if key != "epoch":
            assert 0.0 <= value <= 1.0 and loc["paper_per_metric"][key] >= value
    # The paper protocol (the official script's rule): the one epoch with the best sum of image AUROC,
    # pixel AUROC, pixel AP and PRO, every metric read there.
    selected = loc["paper"]
    summed = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_au_pro")
    row = max(loc["history"], key=lambda r: sum(r[k] for k in summed))
    assert selected["selected_by"] == " + ".join(summed) and selected["epoch"] == row["epoch"]
    assert all(selected[k] == row[k] for k in row if k not in ("epoch", "loss"))
    label = f"paper (official script: epoch {row['epoch']}, best {' + '.join(summed)} on the test set)"
    assert label in html and loc["protocol_labels"]["paper"] == label
    assert loc["test_images"] == {"good": 4, "hole": 4, "stain": 4}
    cls = saved["classification"]
    assert cls["classes"] == ["hole", "stain"] and cls["weights"].startswith("random")
    assert np.sum(cls["confusion_matrix"]) == 8  # every test defect counted
    assert cls["accuracy"] == pytest.approx(np.trace(cls["confusion_matrix"]) / 8)
    assert cls["clean"]["epoch"] == cls["paper"]["epoch"] == 1  # one epoch: both protocols read it
    assert any(note.startswith(f"ResNet-34 accuracy: clean {cls['accuracy']:.4f} (epoch 1); paper") for note in saved["notes"])
    assert "paper, per metric (each metric at its own best test epoch" in html and "clean (last epoch)" in html
    assert any("random initialisation (--cls-random-init)" in note for note in saved["notes"])
    assert report["files"] == [str(tmp_path / "report" / "report.json"), str(tmp_path / "report" / "report.html")]


def test_evaluate_is_seeded_and_clean_only_trains_without_test_selection(tiny, tmp_path):
    data, out = tiny
    config = dict(epochs=2, samples_per_epoch=8, resolution=64, base=8, batch_size=4, protocol="clean")
    first = evaluate(out, data, category="tiles", metrics=["localization"], out=tmp_path / "a", device="cpu", localization=LocalizationConfig(**config))
    second = evaluate(out, data, category="tiles", metrics=["localization"], out=tmp_path / "b", device="cpu", localization=LocalizationConfig(**config))
    assert "paper" not in first["localization"] and len(first["localization"]["history"]) == 1
    assert first["localization"]["clean"] == second["localization"]["clean"]


def test_evaluate_command(tiny, tmp_path):
    from typer.testing import CliRunner

    from anomalygen.cli import app

    data, out = tiny
    common = ["evaluate", "--generated", str(out), "--data", str(data), "--category", "tiles", "--device", "cpu"]
    bad = CliRunner().invoke(app, [*common, "--metrics", "is,bogus"])
    assert bad.exit_code == 2 and "unknown metric(s) bogus" in bad.output
    ok = CliRunner().invoke(app, [*common, "--metrics", "localization", "--protocol", "clean", "--epochs", "1",
                                  "--samples-per-epoch", "4", "--resolution", "64", "--base", "8",
                                  "--report-dir", str(tmp_path / "r")])
    assert ok.exit_code == 0, ok.output
    report = (tmp_path / "r" / "report.json").read_text()
    assert '"protocol": "clean"' in report and '"epochs": 1' in report


SMALL = dict(epochs=1, samples_per_epoch=4, resolution=64, base=4, batch_size=4)


def test_without_test_good_image_metrics_are_undefined_with_the_reason(tiny, tmp_path):
    import shutil

    data, out = tiny
    real = tmp_path / "data"
    shutil.copytree(data, real)
    shutil.rmtree(real / "tiles" / "test" / "good")
    report = evaluate(out, real, category="tiles", metrics=["localization"], out=tmp_path / "r", device="cpu",
                      localization=LocalizationConfig(**SMALL, protocol="clean"))
    loc = json.loads((tmp_path / "r" / "report.json").read_text())["localization"]
    assert loc["clean"]["image_auroc"] is None and loc["clean"]["image_ap"] is None and loc["clean"]["image_f1_max"] is None
    assert 0.0 <= loc["clean"]["pixel_ap"] <= 1.0
    assert set(loc["undefined"]) == {"image_auroc", "image_ap", "image_f1_max"}
    reason = "the real test split has no test/good images"
    assert any(reason in note for note in report["notes"])
    html = (tmp_path / "r" / "report.html").read_text()
    assert "undefined" in html and reason in html


def test_a_diverged_unet_is_one_error_naming_the_epoch(tiny, tmp_path, monkeypatch):
    from anomalygen.errors import AnomalygenError
    from anomalygen.evaluation import localization

    real_predict = localization.predict
    calls = []

    def diverging(model, images, device, batch_size=16):
        calls.append(1)
        maps = real_predict(model, images, device, batch_size)
        if len(calls) == 2:
            maps[0, 0, 0] = float("nan")
            maps[1, 0, 0] = float("inf")
        return maps

    monkeypatch.setattr(localization, "predict", diverging)
    data, out = tiny
    with pytest.raises(AnomalygenError, match=r"^downstream U-Net diverged at epoch 2: 2 of \d+ anomaly-map values are NaN "
                                              r"or infinite; re-run with another `seed`$"):
        evaluate(out, data, category="tiles", metrics=["localization"], out=tmp_path / "r", device="cpu",
                 localization=LocalizationConfig(**{**SMALL, "epochs": 3}))
    assert not (tmp_path / "r").exists()


def test_paper_protocol_never_picks_a_nan_epoch():
    from anomalygen.evaluation.localization import best_row, paper_protocol

    nan = float("nan")
    history = [{"epoch": 1, "pixel_ap": nan, "image_ap": None}, {"epoch": 2, "pixel_ap": 0.4, "image_ap": None},
               {"epoch": 3, "pixel_ap": nan, "image_ap": None}, {"epoch": 4, "pixel_ap": 0.3, "image_ap": None}]
    assert best_row(history, "pixel_ap")["epoch"] == 2
    assert best_row(history, "image_ap") is None
    result = paper_protocol(history, ["pixel_ap", "image_ap"])
    assert result["paper_per_metric"] == {"pixel_ap": 0.4, "image_ap": None, "best_epoch": {"pixel_ap": 2, "image_ap": None}}
    assert result["paper"] == {"epoch": 2, "selected_by": "pixel_ap", "selection_sum": 0.4, "pixel_ap": 0.4, "image_ap": None}


def test_resnet_without_imagenet_weights_needs_cls_random_init(tiny, tmp_path, monkeypatch):
    from anomalygen.errors import ModelNotFoundError
    from anomalygen.evaluation.run import prepare

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    # Asked for by name: an error naming the file and the option, before anything is read or written.
    with pytest.raises(ModelNotFoundError, match=r"resnet34-b627a593\.pth not found offline; download https://download"
                                                 r".*or set `classification.random_init`"):
        evaluate(tmp_path / "missing", tmp_path / "missing", metrics=["classification"], out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
    # On by default only: skipped with the same note.
    networks = prepare(None, device="cpu")
    assert "`classification.random_init`" in networks.skipped["classification"]
    assert prepare(["classification"], classification=ClassificationConfig(random_init=True)).resnet_weights is None


@pytest.mark.parametrize("config, option", [
    (dict(epochs=0), "localization.epochs got 0"), (dict(resolution=33), "localization.resolution got 33"),
    (dict(resolution=16), "localization.resolution got 16"), (dict(batch_size=-2), "localization.batch_size got -2"),
    (dict(samples_per_epoch=0), "localization.samples_per_epoch got 0"), (dict(base=0), "localization.base got 0"),
    (dict(eval_every=0), "localization.eval_every got 0"), (dict(protocol="best"), "localization.protocol got 'best'"),
])
def test_localization_config_checks_its_options(config, option):
    from anomalygen.errors import AnomalygenError

    with pytest.raises(AnomalygenError, match=f"^{option}; allowed: "):
        LocalizationConfig(**config)


def test_classification_config_checks_its_options():
    from anomalygen.errors import AnomalygenError

    with pytest.raises(AnomalygenError, match="^classification.epochs got 0; allowed: an integer >= 1"):
        ClassificationConfig(epochs=0)
    with pytest.raises(AnomalygenError, match="^classification.resolution got 100; allowed: a multiple of 32"):
        ClassificationConfig(resolution=100)


def test_a_diverged_resnet_is_one_error(tiny, tmp_path, monkeypatch):
    from anomalygen.errors import AnomalygenError
    from anomalygen.evaluation import classification

    monkeypatch.setattr(classification.F, "cross_entropy", lambda logits, target: logits.sum() * float("nan"))
    data, out = tiny
    with pytest.raises(AnomalygenError, match=r"^downstream ResNet-34 diverged at epoch 1: its loss is nan; re-run with"):
        evaluate(out, data, category="tiles", metrics=["classification"], out=tmp_path / "r", device="cpu",
                 classification=ClassificationConfig(epochs=1, resolution=32, batch_size=8, passes=1, random_init=True))
    assert not (tmp_path / "r").exists()


def test_report_names_the_inception_implementation_and_warns_on_small_splits(tiny, tmp_path):
    class Extractor(torch.nn.Module):  # uint8 images -> 10 logits
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 10)

        def forward(self, x):
            return self.linear(x.float().mean(dim=(2, 3)) / 255)

    torch.manual_seed(0)
    data, out = tiny
    report = evaluate(out, data, category="tiles", metrics=["is"], out=tmp_path / "r", device="cpu",
                      inception_extractor=Extractor())
    assert report["inception_score"]["implementation"] == "an injected feature extractor (not Inception-v3)"
    assert [n for n in report["notes"] if n.startswith("Inception Score of")] == [
        f"Inception Score of {t}: 8 images in 8 splits (1 per split, fewer than 50): the score is biased low and noisy"
        for t in TYPES]
    html = (tmp_path / "r" / "report.html").read_text()
    assert "computed by an injected feature extractor" in html and "fewer than 50" in html
