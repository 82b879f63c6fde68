"""CAGen's DRAEM-augmentation protocol: DRAEM's training samples, its loss, the generated pairs'
reconstruction targets, the test splits, and a tiny end-to-end run through the CLI."""

import json
import shutil

import numpy as np
from scipy import ndimage
import pytest
import torch

from anomalygen import pipeline
from anomalygen.errors import AnomalygenError
from anomalygen.evaluation import draem_augmentation as da
from anomalygen.evaluation.inputs import load_evaluation_data
from anomalygen.evaluation.unet import ReconstructiveNet

from tests.helpers.cli_harness import run_cli

SIZE = 32


def _pairs(count, with_target=True):
    rng = np.random.default_rng(1)
    pairs = []
    for _ in range(count):
        mask = np.zeros((SIZE, SIZE), bool)
        mask[8:20, 8:20] = True
        target = np.full((SIZE, SIZE, 3), 7, np.uint8)
        image = np.where(mask[..., None], rng.integers(20, 255, (SIZE, SIZE, 3), dtype=np.uint8), target)
        pairs.append(da.GeneratedPair(image, mask, target if with_target else None))
    return pairs


def _goods(count=10):
    rng = np.random.default_rng(0)
    return [np.full((SIZE, SIZE, 3), int(v), np.uint8) for v in rng.integers(60, 200, count)]


def _kinds(samples, pairs, items):
    """How many items are normal, generated pairs and simulated anomalies."""
    kinds = {"normal": 0, "generated": 0, "simulated": 0}
    for item in items:
        sample, _, mask, _ = samples[item]
        if not mask.any():
            kinds["normal"] += 1
        elif any(np.array_equal(sample, p.image) or np.array_equal(mask, p.mask) for p in pairs):
            kinds["generated"] += 1
        else:
            kinds["simulated"] += 1
    return kinds


def test_by_default_ratio_of_all_samples_are_generated_and_the_rest_are_draems():
    """CAGen's "30 % of the training set" (default): 30 % of the samples generated, the other 70 %
    half normal, half simulated (so 35 % simulated, where the "anomalies" reading gives 35 % + 15 %)."""
    assert da.DraemAugmentationConfig().share_of == "training_set"
    pairs = _pairs(3)
    samples = da.TrainingSamples(_goods(), pairs, 0.3, "skimage", seed=0)
    kinds = _kinds(samples, pairs, range(300))
    # 30 % of the pairs are rotated and then counted as simulated: generated 0.3 x 0.7 = 21 %
    assert 0.15 < kinds["generated"] / 300 < 0.27
    assert 0.29 < kinds["normal"] / 300 < 0.42  # 0.7 x 0.5 = 35 % (the other reading: 50 %)


def test_half_the_samples_are_anomalous_and_ratio_of_those_are_generated():
    pairs = _pairs(3)
    samples = da.TrainingSamples(_goods(), pairs, 0.3, "skimage", seed=0, share_of="anomalies")
    # rotation (30 %) would change the pair's pixels: count only unrotated items by their mask
    kinds = _kinds(samples, pairs, range(600))
    anomalous = kinds["generated"] + kinds["simulated"]
    assert 0.42 < anomalous / 600 < 0.58
    # rotated generated pairs are counted as simulated: 0.3 x 0.7 of the anomalous are unrotated pairs
    assert 0.13 < kinds["generated"] / anomalous < 0.30
    none = _kinds(da.TrainingSamples(_goods(), pairs, 0.0, "skimage", seed=0, share_of="anomalies"), pairs, range(300))
    assert none["generated"] == 0
    every = _kinds(da.TrainingSamples(_goods(), pairs, 1.0, "skimage", seed=0, share_of="anomalies"), pairs, range(300))
    assert every["simulated"] < 0.4 * (every["generated"] + every["simulated"])


def test_samples_are_reproducible_and_targets_follow_the_sample():
    pairs = _pairs(2, with_target=False)
    samples = da.TrainingSamples(_goods(), pairs, 1.0, "skimage", seed=3, share_of="anomalies")  # half normal
    again = da.TrainingSamples(_goods(), pairs, 1.0, "skimage", seed=3, share_of="anomalies")
    for item in range(40):
        a, b = samples[item], again[item]
        assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3]
        sample, target, mask, has_target = a
        if not mask.any():  # normal: the target is the sample itself
            assert has_target and np.array_equal(sample, target)
        elif not has_target:  # a pair without a source good image: nothing to reconstruct
            assert not target.any()
    assert any(not samples[i][3] for i in range(40))
    # every epoch visits each good image once
    firsts = {samples[item][1].mean().round() for item in range(10) if not samples[item][2].any()}
    assert len(firsts) >= 3


def test_anomalies_change_pixels_inside_their_mask_only():
    """Simulated and generated (rotated or not) anomalies: sample and target differ only under the
    mask (generated pairs turn with their mask: at most 1 px of interpolation at its border)."""
    pairs = _pairs(3)
    samples = da.TrainingSamples(_goods(), pairs, 0.5, "skimage", seed=0)
    seen = 0
    for item in range(200):
        sample, target, mask, has_target = samples[item]
        if mask.any() and has_target:
            seen += 1
            changed = (sample.astype(int) - target.astype(int)).any(axis=2)
            assert not (changed & ~ndimage.binary_dilation(mask, np.ones((3, 3)))).any()
            assert changed[mask].mean() > 0.5
    assert seen > 60


def test_loss_ignores_reconstructions_without_target():
    torch.manual_seed(0)
    reconstruction = torch.rand(2, 3, SIZE, SIZE, requires_grad=True)
    logits = torch.randn(2, 2, SIZE, SIZE)
    target = torch.rand(2, 3, SIZE, SIZE)
    mask = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    has_target = torch.tensor([True, False])
    da.draem_loss(reconstruction, logits, target, mask, has_target).backward()
    assert reconstruction.grad[0].abs().sum() > 0 and reconstruction.grad[1].abs().sum() == 0
    # a perfect reconstruction of the sample with a target leaves the focal loss alone
    perfect = torch.stack([target[0], torch.rand(3, SIZE, SIZE)])
    from anomalygen.evaluation.unet import focal_loss
    assert da.draem_loss(perfect, logits, target, mask, has_target).item() == pytest.approx(focal_loss(logits, mask).item(), abs=1e-5)
    # both terms (L2 and SSIM) count: a constant offset raises the loss by at least its squared size
    offset = da.draem_loss(target + 0.5, logits, target, mask, torch.tensor([True, True]))
    assert offset.item() - focal_loss(logits, mask).item() > 0.25


def test_reconstructive_net_is_draems_shape():
    net = ReconstructiveNet(3, 128)
    assert sum(p.numel() for p in net.parameters()) == 69_048_579
    assert ReconstructiveNet(3, 8)(torch.rand(2, 3, 64, 48)).shape == (2, 3, 64, 48)


def test_settings_default_to_draems_on_cuda_and_are_labelled_reduced_on_cpu():
    config = da.DraemAugmentationConfig()
    paper = config.resolved(torch.device("cuda"))
    assert (paper.epochs, paper.resolution, paper.rec_base, paper.disc_base) == (700, 256, 128, 64)
    assert paper.label() == "DRAEM's settings" and paper.workers >= 1
    cpu = config.resolved(torch.device("cpu"))
    assert cpu.label().startswith("reduced settings: epochs 20 (DRAEM: 700), resolution 64")
    assert config.resolved(torch.device("cpu")).workers == 0
    assert da.DraemAugmentationConfig(epochs=5).resolved(torch.device("cuda")).epochs == 5


@pytest.mark.parametrize("kwargs, fragment", [
    ({"ratio": 1.5}, "draem_augmentation.ratio got 1.5"), ({"test": "all"}, "draem_augmentation.test got 'all'"),
    ({"share_of": "x"}, "draem_augmentation.share_of"), ({"epochs": 0}, "draem_augmentation.epochs got 0"),
    ({"resolution": 50}, "draem_augmentation.resolution got 50"),
    ({"texture_source": "/nonexistent/dtd"}, "/nonexistent/dtd"),
])
def test_bad_settings_are_one_line_errors(kwargs, fragment):
    with pytest.raises(AnomalygenError, match=fragment.replace("(", r"\(")):
        da.DraemAugmentationConfig(**kwargs)


@pytest.fixture(scope="module")
def generated(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    pipeline.generate("croppaste", demo_root, out, 12, category="nut", seed=0)
    return out


def test_generated_pairs_reconstruct_their_source_good_image(generated, demo_root, tmp_path):
    data = load_evaluation_data(generated, demo_root, "nut")
    pairs = da.generated_pairs(data, 64)
    assert len(pairs) == 12 and all(p.target is not None for p in pairs)
    for pair in pairs:  # croppaste keeps the source outside the mask
        outside = ~pair.mask
        assert np.abs(pair.image.astype(int) - pair.target.astype(int))[outside].mean() < 3
    # a method that makes the whole image (its run.json's outside_mask policy: "none") has no reconstruction target
    whole = tmp_path / "whole"
    shutil.copytree(generated, whole)
    run = whole / "nut" / "run.json"
    assert json.loads(run.read_text())["outside_mask"] == "kept"
    run.write_text(json.dumps({**json.loads(run.read_text()), "outside_mask": "none"}))
    assert all(p.target is None for p in da.generated_pairs(load_evaluation_data(whole, demo_root, "nut"), 64))


def test_protocol_end_to_end_through_the_cli(generated, demo_root, tmp_path):
    out = tmp_path / "report"
    result = run_cli(*["evaluate", "--generated", str(generated), "--data", str(demo_root), "--category", "nut",
                      "--report-dir", str(out), "--metrics", "draem-augmentation", "--draem-epochs", "2",
                      "--draem-resolution", "32", "--draem-test", "full"])
    assert result.returncode == 0, result.stderr
    section = json.loads((out / "report.json").read_text())["draem_augmentation"]
    assert section["test"] == "full" and section["test_images"] == {"good": 6, "defect": 27}
    assert section["settings"].startswith("reduced settings: epochs 2 (DRAEM: 700), resolution 32")
    for run in ("augmented", "draem"):
        assert 0 <= section[run]["pixel_auroc"] <= 1 and 0 < section[run]["pixel_ap"] <= 1
    assert "DRAEM augmentation" in (out / "report.html").read_text()


def test_clean_split_leaves_out_the_generators_training_defects(generated, demo_root, monkeypatch):
    data = load_evaluation_data(generated, demo_root, "nut")
    monkeypatch.setattr(da, "train_draem", lambda *a, **k: None)
    seen = []
    monkeypatch.setattr(da, "measure", lambda model, images, masks, device, epoch, network: (seen.append(len(images)) or {}, None, None))
    config = da.DraemAugmentationConfig(epochs=1, resolution=32)
    section = da.run_draem_augmentation(data, config, torch.device("cpu"))
    assert section["test_images"] == {"good": 6, "defect": 18} and seen == [24, 24]
    # a baseline already measured (the benchmark's other methods) is not trained again
    seen.clear()
    section = da.run_draem_augmentation(data, config, torch.device("cpu"), baseline={"pixel_ap": 0.5})
    assert seen == [24] and section["draem"] == {"pixel_ap": 0.5}


@pytest.mark.slow
def test_generated_pairs_that_match_the_test_defects_raise_pixel_ap(demo_root, tmp_path):
    """Direction check: a pool made of the real test defects themselves must help DRAEM find them."""
    data = load_evaluation_data(_pool_of_test_defects(demo_root, tmp_path), demo_root, "nut")
    config = da.DraemAugmentationConfig(ratio=1.0, share_of="anomalies", epochs=20, resolution=32, rec_base=8, disc_base=8, lr=2e-3)
    section = da.run_draem_augmentation(data, config, torch.device("cpu"))
    assert section["augmented"]["pixel_ap"] > 2 * section["draem"]["pixel_ap"]


def _pool_of_test_defects(demo_root, tmp_path):
    """A generated-layout folder holding the real test defects (no manifest: no reconstruction target)."""
    pool = tmp_path / "pool" / "nut"
    for part in ("test", "ground_truth"):
        for folder in (demo_root / "nut" / part).iterdir():
            if folder.name != "good":
                shutil.copytree(folder, pool / part / folder.name)
    return tmp_path / "pool"
