"""AnomalyDiffusion's Adaptive Attention Re-weighting (Hu et al., AAAI 2024, Eqs. 7-8): the paper
weights on hand-made cases, the direction of every variant on a UNet, classifier-free guidance,
no one-step lag, the official dilation schedule, and the learned-mask fallback count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from anomalygen.cli import app
from anomalygen.diffusion.attention import AttentionRecorder, AttentionReweight, install_hooks, remove_hooks, select_layers
from anomalygen.diffusion.sampling import decode_latents, to_tensor
from anomalygen.methods.anomalydiffusion import AnomalyDiffusion
from anomalygen.methods.anomalydiffusion import aar
from anomalygen.methods.anomalydiffusion import generator as module
from anomalygen.methods.anomalydiffusion.aar import APPLY, HOOK_STAGE, latent_weights, paper_weights

torch.set_num_threads(1)

FAST = dict(model="tiny", device="cpu", resolution=32, batch_size=2, max_steps=1, num_inference_steps=3,
            mask_inference_steps=2, mask_tries=1, generate_batch_size=2, mask_source="augment")


def test_paper_weights_formula_on_a_2x2_mask():
    """Eq. 7 by hand: squared distances d = (1, 2, 4, 10) inside a 2×2 mask give
    W = 4 · softmax(1/d) unbounded, clamped to [1, 1.5] by default; W = 1 outside, whatever
    x̂0 does there."""
    good = torch.zeros(1, 1, 4, 4)
    x0 = torch.full((1, 1, 4, 4), 7.0)  # far from the good image outside the mask
    x0[0, 0, :2, :2] = torch.tensor([[1.0, math.sqrt(2)], [2.0, math.sqrt(10)]])
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1
    inverse = torch.tensor([1.0, 1 / 2, 1 / 4, 1 / 10])
    expected = 4 * torch.softmax(inverse, 0)
    free = paper_weights(x0, good, mask, bounds=None)
    torch.testing.assert_close(free[0, :2, :2].flatten(), expected)
    assert free[0, :2, :2].sum().item() == pytest.approx(4.0)
    bounded = paper_weights(x0, good, mask)
    torch.testing.assert_close(bounded[0, :2, :2].flatten(), expected.clamp(1.0, 1.5))
    assert bounded[0, 0, 0] == 1.5 and torch.all(bounded[0, :2, :2].flatten()[1:] == 1.0)
    inside = mask[0, 0] > 0
    assert torch.all(free[0][~inside] == 1) and torch.all(bounded[0][~inside] == 1)


def test_paper_weights_each_image_sums_to_its_own_mask_area():
    """Eq. 7 per image of a batch: unbounded W sums to ||m||₁ of its own mask (3 and 5 pixels)."""
    g = torch.Generator().manual_seed(0)
    good = torch.randn(2, 3, 4, 5, generator=g)
    x0 = good + torch.randn(2, 3, 4, 5, generator=g)
    mask = torch.zeros(2, 1, 4, 5)
    mask[0, 0, 0, :3] = 1
    mask[1, 0, 2:, 1:4] = 1
    mask[1, 0, 3, 1] = 0
    weights = paper_weights(x0, good, mask, bounds=None)
    assert weights[0][mask[0, 0] > 0].sum().item() == pytest.approx(3.0)
    assert weights[1][mask[1, 0] > 0].sum().item() == pytest.approx(5.0)
    assert torch.equal(paper_weights(x0, good, mask[:, 0], bounds=None), weights)  # a (B, H, W) mask alike


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3))
def test_paper_weights_bounded_and_ordered_by_distance(seed, channels):
    """Bounded W lies in [1, 1.5] inside the mask and never decreases as x̂0 gets closer to the
    good image (f = 1/x); outside the mask W = 1."""
    g = torch.Generator().manual_seed(seed)
    good = torch.rand(1, channels, 6, 6, generator=g) * 2 - 1
    x0 = good + torch.randn(1, channels, 6, 6, generator=g) * 0.3
    mask = (torch.rand(1, 1, 6, 6, generator=g) > 0.4).float()
    mask[..., 0, 0] = 1
    weights = paper_weights(x0, good, mask)
    inside = mask[0, 0] > 0
    assert weights.min() >= 1.0 and weights.max() <= 1.5
    assert torch.all(weights[0][~inside] == 1)
    distance = ((x0 - good) ** 2).sum(1)[0][inside]
    order = torch.argsort(distance)
    assert torch.all(weights[0][inside][order].diff() <= 1e-6)


@pytest.fixture(scope="module")
def tiny():
    from anomalygen.diffusion.backbone import load_backbone

    return load_backbone("tiny", device="cpu")


@pytest.mark.parametrize("apply", APPLY)
def test_direction_on_the_anomaly_tokens_inside_the_mask(tiny, apply):
    """With the weights of both AAR variants (W in [1, 1.5], > 1 inside the mask), the attention
    on each anomaly token goes up at every boosted pixel of every cross-attention layer for
    ``probabilities`` (by W exactly) and ``add_log_logits`` (by at most W); with
    ``multiply_logits`` (official) it drops at some pixels: the documented caveat."""
    unet = tiny.unet
    torch.manual_seed(0)
    latents, good = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:6, 1:7] = 1
    weights = latent_weights(latents, good, mask, 0, scale=8)[:, None]
    context, positions = torch.randn(2, 7, 32) * 3, [[1, 2], [1, 2]]
    maps = {"before": {}, "after": {}}
    for layer in select_layers(unet, kinds=("cross",)):  # one layer at a time: the same input to compare
        hook, recorder = AttentionReweight(HOOK_STAGE[apply]), AttentionRecorder()
        hook.positions = positions
        install_hooks(unet, lambda _: [hook, recorder], [layer])
        try:
            for name, w in (("before", None), ("after", weights)):
                hook.weights = w
                with torch.no_grad():
                    unet(latents, 500, encoder_hidden_states=context)
                maps[name][layer.name] = recorder.maps[layer.name][:, :, 1:3]
        finally:
            remove_hooks(unet)
    drops = 0
    for layer in maps["before"]:
        before, after = maps["before"][layer], maps["after"][layer]
        w = torch.nn.functional.adaptive_avg_pool2d(weights, int(math.isqrt(before.shape[1]))).flatten(1)[..., None]
        boosted = (w > 1 + 1e-6).expand_as(before)
        assert boosted.any()
        if apply == "probabilities":
            torch.testing.assert_close(after, w * before, atol=1e-6, rtol=1e-4)
        elif apply == "add_log_logits":  # per head p' = Wp / (1 + P(W-1)) <= Wp; heads are averaged here
            assert torch.all(after <= w * before * (1 + 1e-5))
        if apply != "multiply_logits":
            assert torch.all(after[boosted] > before[boosted])
        drops += int((after[boosted] < before[boosted]).sum())  # per pixel and anomaly token
    assert (drops > 0) == (apply == "multiply_logits")


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    from anomalygen.types import DefectExample

    defects = []
    for i in range(2):
        mask = np.zeros((32, 32), bool)
        mask[8 + i:20, 6:24] = True
        defects.append(DefectExample(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), mask, "crack"))
    generator = AnomalyDiffusion(**FAST)
    generator.fit(defects, [])
    good = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)]
    mask = np.zeros((32, 32), bool)
    mask[8:24, 10:22] = True
    return generator, good, [mask]


def _unet_calls(generator, good, masks, **options):
    """Generate one sample and record every UNet call: input latents, timestep, output ε, the
    AAR hook's weights and rows at that moment."""
    calls = []
    unet = generator.backbone.unet

    def record(_, args, kwargs, output):
        hooks = [h for p in unet.attn_processors.values() for h in getattr(p, "hooks", [])]
        hook = hooks[0] if hooks else None
        calls.append(dict(latents=args[0].clone(), t=int(args[1]), eps=output.sample.clone(), batch=args[0].shape[0],
                          weights=None if hook is None or hook.weights is None else hook.weights.clone(),
                          rows=getattr(hook, "rows", None), stage=getattr(hook, "stage", None)))

    saved = dict(generator.opt)
    generator.opt.update(options)
    handle = unet.register_forward_hook(record, with_kwargs=True)
    try:
        list(generator.generate(good, 1, seed=2, masks=masks))
    finally:
        handle.remove()
        generator.opt.clear()
        generator.opt.update(saved)
    return calls


def test_paper_weights_are_for_the_current_step(fitted):
    """No one-step lag: every step runs an unweighted UNet pass on z_t, and the reweighted pass
    of the *same* step (step 0 included) uses Eq. 7 on that pass's x̂0."""
    generator, good, masks = fitted
    calls = _unet_calls(generator, good, masks, aar="paper")
    steps = generator.opt["num_inference_steps"]
    assert len(calls) == 2 * steps
    backbone = generator.backbone
    alphas = backbone.noise_scheduler().alphas_cumprod
    good_t = to_tensor(good, (32, 32)) * 2 - 1
    square = torch.from_numpy(masks[0])[None, None].float()
    for plain, weighted in zip(calls[::2], calls[1::2]):
        assert plain["weights"] is None and weighted["weights"] is not None
        assert plain["t"] == weighted["t"] and torch.equal(plain["latents"], weighted["latents"])
        alpha = alphas[plain["t"]]
        x0 = (plain["latents"] - (1 - alpha).sqrt() * plain["eps"]) / alpha.sqrt()
        expected = paper_weights(decode_latents(backbone, x0) * 2 - 1, good_t, square)[:, None]
        torch.testing.assert_close(weighted["weights"], expected)


@pytest.mark.parametrize("variant, apply, stage", [
    ("latent", None, "logits"), ("paper", None, "probabilities"), ("latent", "add_log_logits", "log_logits"),
    ("paper", "multiply_logits", "logits"), ("off", None, None)])
def test_aar_options_pick_the_attention_stage(fitted, variant, apply, stage):
    """``aar_apply=None`` is each variant's own stage (official: logits, Eq. 8: probabilities);
    the option overrides it; ``off`` installs no hook. The manifest meta names both."""
    generator, good, masks = fitted
    calls = _unet_calls(generator, good, masks, aar=variant, aar_apply=apply)
    assert {c["stage"] for c in calls if c["weights"] is not None} == ({stage} if stage else set())
    saved = dict(generator.opt)
    generator.opt.update(aar=variant, aar_apply=apply, num_inference_steps=1)
    try:
        meta = list(generator.generate(good, 1, masks=masks))[0].meta
    finally:
        generator.opt.update(saved)
    assert meta["aar"] == ("off" if variant == "off" else f"{variant} ({apply or aar.DEFAULT_APPLY[variant]})")


def test_cfg_reweights_the_conditional_rows_only(fitted):
    generator, good, masks = fitted
    for variant in ("latent", "paper"):
        calls = _unet_calls(generator, good, masks, aar=variant, guidance_scale=3.0)
        weighted = [c for c in calls if c["weights"] is not None]
        assert weighted and all(c["batch"] == 2 and c["rows"] == slice(1, 2) for c in weighted)
        assert all(c["weights"].shape[0] == 1 for c in weighted)


@pytest.mark.parametrize("steps, radius", [(50, 17), (200, 8)])
def test_dilation_follows_the_number_of_steps(fitted, monkeypatch, steps, radius):
    """The official schedule: scale 16 at 50 DDIM steps, 8 otherwise; radius ⌊(t+100)·scale/T⌋
    at the first step (t = 981 for 50 steps, 996 for 200). The sampler is replaced by a loop that
    only calls the AAR callback at each DDIM timestep (the schedule, not the network, is tested)."""
    from types import SimpleNamespace

    from anomalygen.diffusion.sampling import make_scheduler

    generator, good, masks = fitted
    seen = []
    original = module.latent_weights
    monkeypatch.setattr(module, "latent_weights", lambda *a, **k: seen.append(aar.dilation_radius(
        a[3], k["scale"], k["num_train_timesteps"])) or original(*a, **k))

    def schedule_only(backbone, hidden, images, masks, generators, *, resolution, callback, **sampling):
        scheduler = make_scheduler(backbone.scheduler_config)
        scheduler.set_timesteps(sampling["num_inference_steps"])
        latents, mask = torch.randn(len(images), 4, 16, 16), torch.ones(len(images), 1, 16, 16)
        for i, t in enumerate(scheduler.timesteps):
            callback(SimpleNamespace(index=i, timestep=t, latents=latents, encoder_hidden_states=hidden,
                                     known_latents=torch.zeros_like(latents), mask=mask, cond_rows=slice(0, len(images))))
        return images

    monkeypatch.setattr(module, "blended_generate", schedule_only)
    saved = dict(generator.opt)
    generator.opt.update(aar="latent", num_inference_steps=steps)
    try:
        list(generator.generate(good, 1, seed=2, masks=masks))
    finally:
        generator.opt.update(saved)
    assert len(seen) == steps and seen[0] == radius
    assert aar.dilation_scale(steps) == (16 if steps == 50 else 8)


def test_options_validated():
    with pytest.raises(Exception, match="aar_apply"):
        AnomalyDiffusion(aar_apply="sometimes")
    with pytest.raises(Exception, match="aar_dilation_scale"):
        AnomalyDiffusion(aar_dilation_scale=-1)


@pytest.fixture()
def rejecting(fitted, monkeypatch):
    """The fitted generator in learned-mask mode with every learned mask rejected."""
    generator, good, _ = fitted
    monkeypatch.setattr(generator, "_sample_masks", lambda types, seeds: [None] * len(types))
    monkeypatch.setitem(generator.opt, "mask_source", "learned")
    return generator, good


def test_learned_mask_fallback_is_labelled(rejecting):
    generator, good = rejecting
    samples = list(generator.generate(good, 2, seed=0))
    assert [s.meta["mask_source"] for s in samples] == [module.FALLBACK] * 2
    assert [s.meta.get("mask_draws") for s in samples] == [generator.opt["mask_tries"]] * 2


def test_learned_mask_fallback_is_counted_in_the_run_summary(rejecting, tmp_path, monkeypatch):
    """GenerateResult.mask_sources and the CLI's last line count the fallbacks of the run."""
    from anomalygen import pipeline
    from anomalygen.data.demo import make_demo_dataset

    generator, _ = rejecting
    root = make_demo_dataset(tmp_path / "data", 0, n_good=2, n_test_good=1, n_defect=3, size=64, categories=("nut",))
    monkeypatch.setattr(pipeline, "build", lambda method, options: generator)
    monkeypatch.setattr(generator, "fit", lambda defects, goods: None)
    result = pipeline.generate("anomalydiffusion", root / "nut", tmp_path / "out", 3, seed=0, filter=False)
    assert getattr(result, "mask_sources", None) == {module.FALLBACK: 3}
    run = CliRunner().invoke(app, ["generate", "--method", "anomalydiffusion", "--data", str(root / "nut"),
                                   "--out", str(tmp_path / "cli"), "--num", "2", "--no-filter"])
    assert run.exit_code == 0, run.output
    assert f"(2 new, 2 {module.FALLBACK})" in " ".join(run.output.split())  # the summary line, wrapped (next steps follow)


@pytest.mark.parametrize("timestep, radius", [(0, 0), (24, 0), (25, 1), (150, 2), (900, 8)])
def test_latent_weights_dilate_the_mask_with_the_official_schedule_and_sum_to_its_area(timestep, radius):
    """``latent_weights`` with its defaults (scale 8, T = 1000): the weights differ from 1 exactly
    on the two-pixel mask dilated by r = ⌊(t + 100)·8 / 1000⌋ (a (2r+1)×(2r+2) box; t = 900 gives 8, where
    T = 1001 would give 7 and scale 9 would give 9), and unbounded they are |m̃|·(1/d)/Σ(1/d), so
    they sum to the dilated area. Distances are below 1 and all different."""
    size, centre = 24, 11
    g = torch.Generator().manual_seed(3)
    good = torch.randn(1, 4, size, size, generator=g)
    latents = good + 0.1 + 0.4 * torch.rand(1, 1, size, size, generator=g)  # the same gap in every channel
    mask = torch.zeros(1, 1, size, size)
    mask[..., centre, centre: centre + 2] = 1
    weights = latent_weights(latents, good, mask, timestep, bounds=(0.0, math.inf))[0]
    square = torch.zeros(size, size, dtype=torch.bool)
    square[centre - radius: centre + radius + 1, centre - radius: centre + radius + 2] = True
    assert torch.equal(weights != 1, square)
    assert float(weights[square].sum()) == pytest.approx((2 * radius + 1) * (2 * radius + 2), rel=1e-5)
    distance = (latents[0, 0] - good[0, 0]) ** 2
    inverse = 1 / distance[square]
    assert torch.allclose(weights[square], square.sum() * inverse / inverse.sum(), rtol=1e-5)
    assert aar.dilation_radius(timestep) == radius
    assert aar.dilation_radius(999, 16) == 17
