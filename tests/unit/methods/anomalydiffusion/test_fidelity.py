"""AnomalyDiffusion against its paper and the official code (issue 30): which behaviour is the
default and which is a named option, and that each option reaches what it acts on. Also the
sampling-time options of every method on a fitted model (``generate --checkpoint --set``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from anomalygen.cli import app
from anomalygen.methods.anomalydiffusion import AnomalyDiffusion
from anomalygen.methods.anomalydiffusion import generator as module
from anomalygen.methods.anomalydiffusion.loss import masked_diffusion_loss
from anomalygen.methods.anomalydiffusion.mask_model import MaskStats, binarize, official_rejection
from anomalygen.methods.anomalydiffusion.prompts import OFFICIAL_TEMPLATES, TEXTUAL_INVERSION_TEMPLATES
from anomalygen.methods.base import AnomalyGenerator, available_methods, get_method

torch.set_num_threads(1)
BASE = dict(model="tiny", device="cpu", resolution=32, num_spatial_tokens=2, num_anomaly_tokens=3, mask_tokens=2)


@pytest.fixture(scope="module")
def built():
    """A tiny AnomalyDiffusion with its tokens and E built, not trained (fast), one training mask."""
    generator = AnomalyDiffusion(**BASE)
    generator._build(["crack"])
    mask = np.zeros((32, 32), bool)
    mask[8:20, 6:24] = True
    generator.training_masks, generator.mask_stats = {"crack": [mask]}, {"crack": MaskStats.from_masks([mask])}
    return generator


def test_spatial_tokens_stay_bounded_under_adversarial_adam_steps_at_the_default_lr(built):
    """Whatever the gradient (here: always 'grow the tokens'), Adam steps at the default lr
    (5e-3 × batch 4) keep every spatial token within |init| + 1 × the vocabulary's mean token
    norm. Unbounded plain heads (the earlier default) pass 10× that in two steps."""
    vocabulary = float(built.backbone.text_encoder.get_input_embeddings().weight.norm(dim=-1).mean())
    init = built.prompts.word_embedding(built.opt["init_word"])
    masks = torch.zeros(1, 1, 32, 32)
    masks[0, :, 4:12, 4:20] = 1
    limit = float(init.norm()) + vocabulary * built.opt["spatial_token_bound"]
    state = {k: v.clone() for k, v in built.spatial_encoder.state_dict().items()}
    peaks = {}
    for name, equalized, bound in (("default", None, None), ("plain", False, "none")):
        encoder = built.spatial_encoder
        if name == "plain":
            encoder = module.SpatialEncoder.from_preset("tiny", 2, init, equalized=False, bound=None)
        optimizer = torch.optim.Adam(encoder.parameters(), lr=5e-3 * 4)
        peak = 0.0
        for _ in range(4 if name == "default" else 2):
            tokens = encoder(masks)
            peak = max(peak, float(tokens.detach().norm(dim=-1).max()))
            optimizer.zero_grad()
            (-tokens.norm(dim=-1).sum()).backward()
            optimizer.step()
        with torch.no_grad():
            peaks[name] = max(peak, float(encoder(masks).norm(dim=-1).max()))
    built.spatial_encoder.load_state_dict(state)
    assert peaks["default"] <= limit * (1 + 1e-5), peaks
    assert peaks["plain"] > 10 * limit, peaks


def test_spatial_heads_scale_their_weights_as_the_official_equal_linear():
    """out = b + (W / sqrt(fan_in)) f: with W = 1, b = 0 and no bound, each coordinate is the sum
    of the features over sqrt(fan_in) (fan_in = 8 channels x 4 x 4 for the tiny preset)."""
    encoder = module.SpatialEncoder.from_preset("tiny", 1, torch.zeros(6)).eval()
    features = []
    encoder.reduce.register_forward_hook(lambda m, i, out: features.append(out.flatten(1)))
    with torch.no_grad():
        encoder.heads[0].weight.fill_(1.0)
        tokens = encoder(torch.ones(1, 1, 16, 16))
    assert features[0].shape[1] == 128
    torch.testing.assert_close(tokens[0, 0], features[0].sum(1).expand(6) / 128 ** 0.5)


def test_mask_model_defaults_are_the_official_codes(built, monkeypatch):
    """Threshold 0.8 on the decoded [-1, 1] mean (a pixel at 0.7 is out; ours, 0.6, kept it),
    DDIM η = 1 reaches the mask sampler, and the official border rule rejects only masks over a
    third of a border side (and empty ones): a mask far smaller than the training masks passes
    it, while our rule rejects it."""
    assert {k: AnomalyDiffusion.OPTIONS.options[k].default for k in ("mask_threshold", "mask_eta", "mask_filter")} == \
        {"mask_threshold": 0.8, "mask_eta": 1.0, "mask_filter": "official"}
    decoded = torch.full((1, 3, 8, 8), -1.0)
    decoded[..., 1, 1], decoded[..., 2, 2] = 0.7, 0.9
    assert binarize(decoded).nonzero().tolist() == [[0, 2, 2]]
    assert binarize(decoded, 0.6).sum() == 2
    side = np.zeros((12, 12), bool)
    side[0, :4] = True  # 4/12 of the top row: a third, kept
    assert official_rejection(side) is None
    side[0, 4] = True
    assert "top border" in official_rejection(side)
    assert official_rejection(np.zeros((12, 12), bool)) == "empty"
    seen = {}
    small = torch.full((1, 3, 32, 32), -1.0)
    small[..., 14:16, 14:16] = 1.0  # 4 px: far below the training mask's 216 px

    def fake_sample(backbone, context, generators, **kwargs):
        seen.update(kwargs)
        return torch.zeros(len(generators), 4, 8, 8)

    monkeypatch.setattr(module, "sample_latents", fake_sample)
    monkeypatch.setattr(module, "decode_latents", lambda backbone, latents: (small.expand(len(latents), -1, -1, -1) + 1) / 2)
    assert built._sample_masks([0], [np.random.SeedSequence(1)])[0].sum() == 4
    assert seen["eta"] == 1.0 and seen["num_inference_steps"] == 100 and seen["guidance_scale"] == 5.0
    monkeypatch.setitem(built.opt, "mask_filter", "ours")
    monkeypatch.setitem(built.opt, "mask_eta", 0.25)
    assert built._sample_masks([0], [np.random.SeedSequence(1)]) == [None]
    assert seen["eta"] == 0.25


def test_masked_loss_variants_are_named_for_what_they_are():
    """Residual 2 on every channel of a mask covering 4 of 64 latent cells (C = 4): the plain sum
    (Eq. 5) 4·4·4 = 64, ÷ latent size (official, default) 64 / 256 = 0.25, ÷ mask area (ours) 4."""
    assert AnomalyDiffusion.OPTIONS.options["masked_loss_norm"].default == "latent_size"
    weight = torch.zeros(1, 1, 8, 8)
    weight[..., 2:4, 2:4] = 1
    eps = torch.zeros(1, 4, 8, 8)
    losses = {n: masked_diffusion_loss(eps + 2, eps, weight, n).item() for n in ("sum", "latent_size", "mask_area")}
    assert losses == pytest.approx({"sum": 64.0, "latent_size": 0.25, "mask_area": 4.0})


def test_official_prompt_templates_place_the_tokens_and_aar_reweights_the_official_columns(built, monkeypatch):
    """The 81 official templates (27 textual-inversion ones, then 'an illustration of' and 'a
    depiction of' variants); drawn per row, the tokens follow the template's words. AAR is off by
    default; asked for, it reweights column 0, the anomaly and the spatial tokens (official) or
    the anomaly tokens only (ours)."""
    assert len(OFFICIAL_TEMPLATES) == 81 and OFFICIAL_TEMPLATES[:27] == TEXTUAL_INVERSION_TEMPLATES
    assert OFFICIAL_TEMPLATES[27] == "an illustration of a {}" and OFFICIAL_TEMPLATES[54] == "a depiction of a {}"
    masks = torch.zeros(3, 1, 32, 32)
    rngs = [np.random.default_rng(s) for s in range(3)]
    with torch.no_grad():
        encoded = built.condition(torch.zeros(3, dtype=torch.long), masks, rngs=rngs)
    anomaly, spatial = encoded.positions[module.ANOMALY], encoded.positions[module.SPATIAL]
    assert all(a[0] > 1 and s == list(range(a[-1] + 1, a[-1] + 3)) for a, s in zip(anomaly, spatial))
    assert AnomalyDiffusion.OPTIONS.options["aar"].default == "off"
    assert built._aar_positions(encoded) == [[0, *a, *s] for a, s in zip(anomaly, spatial)]
    monkeypatch.setitem(built.opt, "aar_tokens", "anomaly")
    assert built._aar_positions(encoded) == anomaly
    monkeypatch.setitem(built.opt, "prompt", "tokens")
    with torch.no_grad():
        bare = built.condition(torch.zeros(1, dtype=torch.long), masks[:1])
    assert bare.positions[module.ANOMALY] == [[1, 2, 3]]


def test_generate_installs_aar_only_when_asked_on_the_official_columns(built, monkeypatch):
    installed = []
    original = module.install_hooks

    def spy(unet, hooks_for, layers):
        installed.append(hooks_for(None)[0].positions)
        return original(unet, hooks_for, layers)

    monkeypatch.setattr(module, "install_hooks", spy)
    good = [np.full((32, 32, 3), 128, np.uint8)]
    mask = built.training_masks["crack"][0]
    monkeypatch.setitem(built.opt, "num_inference_steps", 1)
    assert list(built.generate(good, 1, masks=[mask]))[0].meta["aar"] == "off" and installed == []
    monkeypatch.setitem(built.opt, "aar", "latent")
    list(built.generate(good, 1, masks=[mask]))
    assert len(installed) == 1 and installed[0][0][0] == 0 and len(installed[0][0]) == 1 + 3 + 2


def test_every_method_marks_its_sampling_options():
    """Generation-time options are marked on every method; what shapes the fit is not."""
    for name in available_methods():
        spec = get_method(name).OPTIONS
        sampling = set(spec.sampling())
        assert sampling, name
        assert not sampling & {"lr", "max_steps", "batch_size", "model", "resolution", "rank", "min_area"}, name
        if "num_inference_steps" in spec:
            assert {"num_inference_steps", "device", "generate_batch_size"} <= sampling, name
    assert {"aar", "aar_tokens", "aar_apply", "eta", "guidance_scale", "mask_threshold", "mask_tries", "mask_eta",
            "mask_filter", "mask_guidance_scale", "mask_inference_steps"} <= set(AnomalyDiffusion.OPTIONS.sampling())


def test_a_fitted_model_takes_sampling_options_and_refuses_fitted_ones(built, tmp_path):
    built.save(tmp_path / "model")
    loaded = AnomalyGenerator.load(tmp_path / "model", {"aar": "paper", "num_inference_steps": 3, "mask_threshold": 0.5})
    assert (loaded.opt["aar"], loaded.opt["num_inference_steps"], loaded.opt["mask_threshold"]) == ("paper", 3, 0.5)
    assert loaded.config()["aar"] == "paper"  # recorded in run.json
    torch.testing.assert_close(loaded.anomaly_tokens.tokens, built.anomaly_tokens.tokens)
    with pytest.raises(Exception, match=r"`options` lr, masked_loss_norm: shapes what was fitted.*aar"):
        AnomalyGenerator.load(tmp_path / "model", {"lr": 0.1, "masked_loss_norm": "sum"})
    with pytest.raises(Exception, match="option aar .*got 'sometimes'"):
        AnomalyGenerator.load(tmp_path / "model", {"aar": "sometimes"})
    assert loaded.opt["prompt"] == "official"
    meta = tmp_path / "model" / "anomalydiffusion.json"
    record = json.loads(meta.read_text())
    del record["prompt"], record["spatial_encoder"]["equalized"], record["spatial_encoder"]["bound"]
    meta.write_text(json.dumps(record))  # a model saved before these options: as it was fitted
    older = AnomalyGenerator.load(tmp_path / "model")
    assert (older.opt["prompt"], older.spatial_encoder.gain, older.spatial_encoder.bound) == ("tokens", 1.0, None)


def test_cli_generate_checkpoint_set(tmp_path):
    """CLI: a sampling option changes the loaded model's output and is recorded; a fitted option
    is one line, exit 2, nothing written."""
    from anomalygen.data.demo import make_demo_dataset

    demo_root = make_demo_dataset(tmp_path / "data", 0, n_good=2, n_test_good=1, n_defect=3, size=64, categories=("nut",))
    runner = CliRunner()
    model, out = tmp_path / "model", tmp_path / "out"
    fit = runner.invoke(app, ["fit", "--method", "croppaste", "--data", str(demo_root / "nut"), "--out", str(model)])
    assert fit.exit_code == 0, fit.output
    run = runner.invoke(app, ["generate", "--checkpoint", str(model), "--data", str(demo_root / "nut"), "--out", str(out),
                              "--num", "1", "--no-filter", "--set", "jitter=0.0", "--set", "rotate=10"])
    assert run.exit_code == 0, run.output
    config = json.loads(next(out.rglob("run.json")).read_text())["config"]
    assert (config["jitter"], config["rotate"]) == (0.0, 10)
    refused = runner.invoke(app, ["generate", "--checkpoint", str(model), "--data", str(demo_root / "nut"),
                                  "--out", str(tmp_path / "other"), "--num", "1", "--set", "min_area=4"])
    assert refused.exit_code == 2 and "min_area: shapes what was fitted" in refused.output
    assert not (tmp_path / "other").exists()
