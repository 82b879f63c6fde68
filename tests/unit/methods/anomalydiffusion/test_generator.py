"""AnomalyDiffusion end to end on the tiny (random-init) preset: fit, generate, ablation switches,
save/load determinism, CLI round trip (Hu et al., AAAI 2024)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalygen.methods.anomalydiffusion import AnomalyDiffusion
from anomalygen.methods.anomalydiffusion.mask_model import MaskStats
from anomalygen.methods.base import AnomalyGenerator, create
from anomalygen.types import DefectExample

torch.set_num_threads(1)

FAST = dict(model="tiny", device="cpu", resolution=32, batch_size=2, max_steps=2, num_inference_steps=4,
            mask_inference_steps=3, mask_tries=1, generate_batch_size=2)


def toy_data(seed=0):
    rng = np.random.default_rng(seed)
    defects = []
    for i in range(4):
        image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        mask = np.zeros((40, 48), bool)
        mask[10 + i:20 + i, 12:30] = True
        defects.append(DefectExample(image, mask, ["crack", "hole"][i % 2]))
    good = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in [(40, 48, 3), (36, 52, 3), (40, 48, 3)]]
    return defects, good


@pytest.fixture(scope="module")
def fitted():
    defects, good = toy_data()
    generator = AnomalyDiffusion(**FAST)
    generator.fit(defects, good)
    return generator, good


def test_registered_and_options_checked():
    assert isinstance(create("anomalydiffusion", **FAST), AnomalyDiffusion)
    with pytest.raises(Exception, match="unknown option"):
        AnomalyDiffusion(colour="red")
    with pytest.raises(Exception, match="aar"):
        AnomalyDiffusion(aar="sometimes")


def test_fit_learns_and_generates_pairs_that_keep_the_good_image(fitted):
    generator, good = fitted
    assert generator.defect_types == ["crack", "hole"]
    assert len(generator.loss_log) == 2 and all(np.isfinite(generator.loss_log))
    init = generator.prompts.word_embedding("defect")
    width, opt = init.shape[-1], generator.opt  # one row of k tokens per defect type, for e_a and e_m
    assert generator.anomaly_tokens.tokens.shape == (2, opt["num_anomaly_tokens"], width)
    assert generator.mask_tokens.tokens.shape == (2, opt["mask_tokens"], width)
    assert not torch.allclose(generator.anomaly_tokens.tokens[0, 0], init)  # e_a trained
    assert not torch.allclose(generator.mask_tokens.tokens[0, 0], init)  # e_m trained
    fresh = AnomalyDiffusion(**FAST)
    fresh._build(["crack", "hole"])
    assert not torch.equal(fresh.spatial_encoder.heads[0].weight, generator.spatial_encoder.heads[0].weight)
    samples = list(generator.generate(good, 3, seed=1))
    assert [s.defect_type for s in samples] == ["crack", "hole", "crack"]
    for sample in samples:
        source = good[sample.meta["source_index"]]
        assert sample.image.shape == source.shape and sample.image.dtype == np.uint8
        assert sample.mask.shape == source.shape[:2] and sample.mask.any()
        assert np.array_equal(sample.image[~sample.mask], source[~sample.mask])
        assert not np.array_equal(sample.image[sample.mask], source[sample.mask])


def test_fit_runs_on_the_core_trainer_and_resumes_exactly(tmp_path):
    """Training goes through ``diffusion.train``: checkpoints + loss.csv in ``work_dir``; a fit
    stopped after 2 steps and re-run to 3 equals an uninterrupted 3-step fit."""
    defects, good = toy_data()
    options = {**FAST, "mask_source": "augment", "checkpoint_every": 1}
    stopped = AnomalyDiffusion(**options, work_dir=str(tmp_path / "w"))
    stopped.fit(defects, good)
    assert (tmp_path / "w" / "loss.csv").is_file() and (tmp_path / "w" / "checkpoints" / "step-0000002").is_dir()
    resumed = AnomalyDiffusion(**{**options, "max_steps": 3}, work_dir=str(tmp_path / "w"))
    resumed.fit(defects, good)
    straight = AnomalyDiffusion(**{**options, "max_steps": 3})
    straight.fit(defects, good)
    assert resumed.loss_log[:2] == stopped.loss_log and len(resumed.loss_log) == 3
    assert resumed.loss_log == pytest.approx(straight.loss_log, rel=1e-5)
    torch.testing.assert_close(resumed.anomaly_tokens.tokens, straight.anomaly_tokens.tokens)
    for a, b in zip(resumed.spatial_encoder.parameters(), straight.spatial_encoder.parameters()):
        torch.testing.assert_close(a, b)


def test_save_load_generate_is_deterministic(fitted, tmp_path):
    generator, good = fitted
    generator.save(tmp_path / "model")
    loaded = AnomalyGenerator.load(tmp_path / "model")
    assert isinstance(loaded, AnomalyDiffusion) and loaded.defect_types == generator.defect_types
    first = list(generator.generate(good, 3, seed=5))
    again = list(loaded.generate(good, 3, seed=5))
    resumed = list(loaded.generate(good, 2, seed=5, start=1))  # other batch split, same samples
    for a, b in zip(first, again):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    for a, b in zip(first[1:], resumed):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    other = list(loaded.generate(good, 1, seed=6))[0]
    assert not np.array_equal(other.image, first[0].image)


def test_spatial_embedding_switch(fitted):
    generator, _ = fitted
    types = torch.tensor([0])
    a, b = torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)
    a[..., 2:10, 2:10] = 1
    b[..., 20:30, 5:25] = 1
    with torch.no_grad():
        assert not torch.allclose(generator.condition(types, a).hidden_states, generator.condition(types, b).hidden_states)
        generator.opt["spatial_embedding"] = False
        try:
            assert torch.equal(generator.condition(types, a).hidden_states, generator.condition(types, b).hidden_states)
        finally:
            generator.opt["spatial_embedding"] = True


def test_masked_loss_switch(monkeypatch):
    from anomalygen.methods.anomalydiffusion import generator as module

    defects, _ = toy_data()
    weights = []
    original = module.masked_diffusion_loss
    monkeypatch.setattr(module, "masked_diffusion_loss", lambda e, n, w, *rest: weights.append(w) or original(e, n, w, *rest))
    losses = []
    for masked in (True, False):
        generator = AnomalyDiffusion(**FAST, masked_loss=masked, mask_source="augment")
        generator._build(["crack", "hole"])
        with torch.no_grad():
            losses.append(generator.training_loss(defects, [0, 1, 0, 1], np.random.default_rng(0),
                                                  torch.Generator().manual_seed(0)).item())
    inside = weights[0] > 0
    assert 0 < inside.float().mean() < 0.5  # only the latent cells of the (augmented) masks count
    assert torch.all(weights[1] == 1)  # ablation: the plain LDM loss over the whole image
    assert losses[0] != pytest.approx(losses[1], rel=1e-4)


def test_mask_source_switch(fitted):
    generator, good = fitted
    stats = generator.mask_stats
    try:
        generator.mask_stats = {t: MaskStats(0.0, 1.0, 1.0, tolerance=1e9, border_floor=1.0) for t in stats}
        generator.opt["mask_threshold"] = 0.5
        learned = list(generator.generate(good, 2, seed=0))
        generator.opt["mask_source"] = "augment"
        augmented = list(generator.generate(good, 2, seed=0))
    finally:
        generator.mask_stats, generator.opt["mask_source"] = stats, "learned"
        generator.opt["mask_threshold"] = 0.8
    assert all(s.meta["mask_source"].startswith("learned") for s in learned)
    assert all(s.meta["mask_source"] == "augment" for s in augmented)
    assert not np.array_equal(learned[0].mask, augmented[0].mask)


def test_cli_round_trip_on_demo_data(demo_root, tmp_path):
    from typer.testing import CliRunner

    from anomalygen.cli import app

    runner = CliRunner()
    settings = ["--set", "resolution=32", "--set", "batch_size=2", "--set", "num_inference_steps=3",
                "--set", "mask_inference_steps=2", "--set", "mask_tries=1", "--set", "spatial_encoder=\"tiny\""]
    fitted = runner.invoke(app, ["fit", "--method", "anomalydiffusion", "--data", str(demo_root), "--category", "fabric",
                                 "--out", str(tmp_path / "model"), "--model", "tiny", "--max-steps", "2",
                                 "--device", "cpu", *settings])
    assert fitted.exit_code == 0, fitted.output
    assert (tmp_path / "model" / "anomalydiffusion.safetensors").is_file()
    command = ["generate", "--method", "anomalydiffusion", "--checkpoint", str(tmp_path / "model"),
               "--data", str(demo_root), "--category", "fabric", "--num", "3", "--seed", "1"]
    first = runner.invoke(app, [*command, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, [*command, "--out", str(tmp_path / "b")])
    assert second.exit_code == 0, second.output
    images = sorted((tmp_path / "a" / "fabric" / "test").rglob("*.png"))
    assert len(images) == 3
    for path in images:
        twin = tmp_path / "b" / path.relative_to(tmp_path / "a")
        assert path.read_bytes() == twin.read_bytes()
    assert len(list((tmp_path / "a" / "fabric" / "ground_truth").rglob("*_mask.png"))) == 3


@pytest.mark.shared
def test_cli_round_trip_on_magnetic_tile(shared_data, tmp_path):
    """Real grayscale data of varied sizes, learned masks: pairs keep the good image outside the mask."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from anomalygen.cli import app

    runner = CliRunner()
    data = ["--data", str(shared_data / "magnetic_tile"), "--skip-bad"]
    settings = ["--set", "resolution=32", "--set", "batch_size=2", "--set", "num_inference_steps=3",
                "--set", "mask_inference_steps=2", "--set", "mask_tries=1"]
    fitted = runner.invoke(app, ["fit", "--method", "anomalydiffusion", *data, "--out", str(tmp_path / "model"),
                                 "--model", "tiny", "--max-steps", "2", "--device", "cpu", *settings])
    assert fitted.exit_code == 0, fitted.output
    saved = json.loads((tmp_path / "model" / "generator.json").read_text())
    assert saved["defect_types"] == ["blowhole", "break", "crack", "fray", "uneven"]
    made = runner.invoke(app, ["generate", "--checkpoint", str(tmp_path / "model"), *data, "--out", str(tmp_path / "out"),
                               "--num", "5"])
    assert made.exit_code == 0, made.output
    root = tmp_path / "out" / "magnetic_tile"
    entries = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    assert sorted(e["defect_type"] for e in entries) == saved["defect_types"]
    for entry in entries:
        image = np.asarray(Image.open(root / entry["image"]).convert("RGB"))
        mask = np.asarray(Image.open(root / entry["mask"])) > 127
        good = np.asarray(Image.open(entry["source"]).convert("RGB"))
        assert image.shape == good.shape and mask.shape == good.shape[:2] and mask.any()
        np.testing.assert_array_equal(image[~mask], good[~mask])
