"""DualAnoDiff (Jin et al., CVPR 2025) on the tiny (random-init) preset: SAIM (Eq. 3), BCM (Eq. 5),
the dual loss (Eq. 4), row layout and routing, masks from the anomaly branch, save / load, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anomalygen.diffusion import lora
from anomalygen.errors import AnomalygenError
from anomalygen.methods.base import AnomalyGenerator, create
from anomalygen.methods.dualanodiff import DualAnoDiff
from anomalygen.methods.dualanodiff.bcm import BackgroundMix
from anomalygen.methods.dualanodiff.saim import SAIM
from anomalygen.methods.dualanodiff.segment import decoded_background, mask_from_attention, mask_from_part, token_attention
from anomalygen.types import DefectExample

torch.set_num_threads(1)

FAST = dict(model="tiny", device="cpu", resolution=32, batch_size=2, max_steps=2, num_inference_steps=3, rank=4,
            mask_tries=1, generate_batch_size=2)


def toy_data(seed=0):
    rng = np.random.default_rng(seed)
    defects = []
    for i, shape in enumerate([(40, 48), (40, 48), (40, 48), (36, 52)]):  # images of different sizes
        image = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
        mask = np.zeros(shape, bool)
        mask[10 + i:20 + i, 12:30] = True
        defects.append(DefectExample(image, mask, ["crack", "hole"][i % 2]))
    good = [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    return defects, good


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def fitted(work_dir):
    defects, good = toy_data()
    generator = DualAnoDiff(**FAST, work_dir=str(work_dir))
    generator.fit(defects, good)
    return generator, good


# ----------------------------------------------------------------- SAIM (Eq. 3)
def test_saim_on_identical_branches_is_symmetric_with_the_exact_residual():
    torch.manual_seed(0)
    saim = SAIM(16)
    o = torch.randn(3, 10, 16)
    whole, part = saim.interact(o, o.clone())
    assert torch.equal(whole, part)
    # two identical keys: the branch attention is uniform, its output is v(x) itself
    with torch.no_grad():
        expected = o + saim.proj_out(saim.v(saim.proj_in(saim.norm(o))))
    assert torch.allclose(whole, expected, atol=1e-6)
    assert (whole - o).abs().max() > 1e-2  # the residual is not zero at the default init


def test_saim_swaps_with_its_branches_and_pairs_only_the_same_sample():
    torch.manual_seed(1)
    saim = SAIM(8)
    w, p = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    a_w, a_p = saim.interact(w, p)
    b_w, b_p = saim.interact(p, w)
    assert torch.allclose(a_w, b_p, atol=1e-6) and torch.allclose(a_p, b_w, atol=1e-6)
    p2 = p.clone()
    p2[1] = torch.randn(5, 8)  # sample 1's part changes: sample 0 does not, sample 1's whole does
    c_w, _ = saim.interact(w, p2)
    assert torch.equal(c_w[0], a_w[0]) and (c_w[1] - a_w[1]).abs().max() > 1e-3
    position = torch.randn(2, 5, 8)
    position[:, 3] = w[:, 3]  # positions attend only across the branch axis, never to other positions
    d_w, _ = saim.interact(position, p)
    assert torch.allclose(d_w[:, 3], a_w[:, 3], atol=1e-6)


def test_saim_hook_changes_only_the_paired_rows_and_zero_init_is_identity():
    torch.manual_seed(2)
    saim = SAIM(8)
    out = torch.randn(5, 4, 8)
    saim.whole, saim.part = torch.tensor([0, 1]), torch.tensor([2, 3])
    changed = saim.output("layer", out)
    assert torch.equal(changed[4], out[4])  # e.g. a background row
    w, p = saim.interact(out[:2], out[2:4])
    assert torch.equal(changed[:2], w) and torch.equal(changed[2:4], p)
    zero = SAIM(8, zero_init=True)
    zero.whole, zero.part = saim.whole, saim.part
    assert torch.equal(zero.output("layer", out), out)


# ----------------------------------------------------------------- BCM (Eq. 5)
def test_bcm_paper_mix_adds_gamma_mlp_of_the_background():
    torch.manual_seed(3)
    mix = BackgroundMix(8, 6, "paper")
    assert mix.gamma.item() == pytest.approx(0.1) and mix.gamma.requires_grad
    own, background = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    with torch.no_grad():
        assert torch.allclose(mix(own, background), own + 0.1 * mix.mlp(background), atol=1e-6)
        mix.gamma.fill_(0.3)
        assert torch.allclose(mix(own, background), own + 0.3 * mix.mlp(background), atol=1e-6)


def test_bcm_official_mix_interpolates_and_starts_as_the_identity():
    torch.manual_seed(4)
    mix = BackgroundMix(8, 6, "official")
    own, background = torch.randn(2, 7, 8), torch.randn(2, 7, 8)
    with torch.no_grad():
        assert torch.equal(mix(own, background), own)
        mix.gamma.fill_(0.25)
        assert torch.allclose(mix(own, background), 0.75 * own + 0.25 * mix.mlp(background), atol=1e-6)


# ----------------------------------------------------------------- layout, routing, loss (Eq. 4)
def test_row_layout_under_cfg_with_background_rows(fitted):
    generator, _ = fitted
    names = generator._set_rows(1, n=2, halves=2, background=True)
    w, p = "whole_1", "part_1"
    assert names == [w, w, p, p, w, w, p, p, w, w, w, w]
    modules = generator.interaction["hole"].values()
    saim = next(m for m in modules if isinstance(m, SAIM))
    bcm = next(m for m in modules if not isinstance(m, SAIM))
    assert saim.whole.tolist() == [0, 1, 4, 5] and saim.part.tolist() == [2, 3, 6, 7]
    assert bcm.targets.tolist() == [0, 1, 4, 5] and bcm.reference_rows.tolist() == [8, 9, 10, 11]
    assert bcm.mode == "inject"


class ZeroUNet(torch.nn.Module):
    """Predicts ε = 0 and records the timesteps it is called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, noisy, timesteps, encoder_hidden_states):
        self.calls.append((noisy.shape[0], timesteps.clone()))
        return type("Out", (), {"sample": torch.zeros_like(noisy, dtype=torch.float32)})()


def test_loss_is_the_sum_of_both_branch_losses_at_one_shared_timestep(fitted):
    generator, _ = fitted
    latents = {b: (torch.randn(12, 4, 16, 16), torch.rand(12, 4, 16, 16)) for b in ("whole", "part", "background")}
    generator.opt["batch_size"] = 64
    try:
        fake = ZeroUNet()
        loss = generator.training_loss(0, latents, torch.Generator().manual_seed(0), {"unet": fake})
    finally:
        generator.opt["batch_size"] = FAST["batch_size"]
    assert loss.item() == pytest.approx(2.0, abs=0.05)  # E‖ε_w‖² + E‖ε_a‖² with a zero prediction
    rows, timesteps = fake.calls[0]
    assert rows == 3 * 64  # whole, part and background rows in one forward
    assert torch.equal(timesteps[:64], timesteps[64:128]) and torch.equal(timesteps[:64], timesteps[128:])
    assert len(set(timesteps[:64].tolist())) > 10


def test_training_pixels_are_the_official_pairs_under_every_flip(fitted, monkeypatch):
    import anomalygen.methods.dualanodiff.generator as module

    generator, _ = fitted
    encoded = {}
    monkeypatch.setattr(module, "encode_posterior", lambda backbone, x: (encoded.setdefault(len(encoded), x), x)[1:] * 2)
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = 200  # left half bright
    mask = np.zeros((32, 32), bool)
    mask[4:12, 2:10] = True  # top left
    generator._latents([DefectExample(image, mask, "crack")])
    whole, part = encoded[0], encoded[1]
    assert whole.shape[0] == part.shape[0] == 4  # one pair under no flip, h, v, both
    inside = torch.from_numpy(mask)
    assert torch.allclose(part[0, :, inside], whole[0, :, inside])
    assert torch.all(part[0, :, ~inside] == 0.5)  # I·M of [-1, 1] images: gray outside the mask
    assert torch.equal(part[1], part[0].flip(-1)) and torch.equal(whole[2], whole[0].flip(-2))
    assert torch.equal(whole[3], whole[0].flip(-2).flip(-1))
    generator.opt.update(flip=False, part_background="black")
    try:
        encoded.clear()
        generator._latents([DefectExample(image, mask, "crack")])
        assert encoded[1].shape[0] == 1 and torch.all(encoded[1][0, :, ~inside] == 0)
    finally:
        generator.opt.update(flip=True, part_background="gray")


def test_training_draws_each_flip_of_each_pair(fitted):
    generator, _ = fitted
    latents = {b: (torch.arange(8.0).view(8, 1, 1, 1).expand(8, 4, 16, 16).clone(), torch.zeros(8, 4, 16, 16))
               for b in ("whole", "part", "background")}  # 2 pairs × 4 flips, row r holds the value r
    fake = ZeroUNet()
    fake.inputs = []
    original = fake.forward
    fake.forward = lambda noisy, t, encoder_hidden_states: (fake.inputs.append(noisy), original(noisy, t, encoder_hidden_states))[1]
    generator.opt["batch_size"] = 256
    try:
        generator.training_loss(0, latents, torch.Generator().manual_seed(0), {"unet": fake})
    finally:
        generator.opt["batch_size"] = FAST["batch_size"]
    alphas = generator.backbone.noise_scheduler().alphas_cumprod
    rows = fake.inputs[0][:256]
    # recover each row's clean value from the mean over its pixels (noise averages out), all 8 drawn
    t = fake.calls[0][1][:256]
    values = (rows.mean(dim=(1, 2, 3)) / alphas[t].sqrt()).round()
    usable = alphas[t] > 0.5
    assert set(values[usable].int().tolist()) == set(range(8))


def test_vae_latents_sample_adds_the_posterior_std_times_fresh_noise(fitted):
    generator, _ = fitted
    mean = torch.randn(12, 4, 16, 16)

    def noisy_inputs(std, mode):
        fake = ZeroUNet()
        fake.inputs = []
        original = fake.forward
        fake.forward = lambda noisy, t, encoder_hidden_states: (fake.inputs.append(noisy), original(noisy, t, encoder_hidden_states))[1]
        generator.opt["vae_latents"] = mode
        try:
            latents = {b: (mean, torch.full_like(mean, std)) for b in ("whole", "part", "background")}
            generator.training_loss(0, latents, torch.Generator().manual_seed(0), {"unet": fake})
        finally:
            generator.opt["vae_latents"] = "sample"
        return fake.inputs[0], fake.calls[0][1]

    plain, _ = noisy_inputs(1.0, "mean")
    assert torch.equal(noisy_inputs(0.0, "sample")[0], plain)  # std 0: a sample is the mean
    sampled, timesteps = noisy_inputs(1.0, "sample")
    alphas = generator.backbone.noise_scheduler().alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
    drawn = (sampled - plain) / alphas  # = std · ε', ε' ~ N(0, 1)
    assert drawn.std().item() == pytest.approx(1.0, abs=0.1) and drawn.mean().abs().item() < 0.1


def test_one_step_gives_gradients_to_both_branches_saim_and_bcm_only_of_this_type(fitted):
    generator, _ = fitted
    unet = generator.backbone.unet
    generator._freeze_adapters({"whole_0", "part_0", "text_0"})
    for module in generator.interaction["crack"].values():
        module.requires_grad_(True)
    handle = generator._install(0)
    try:
        latents = {b: (torch.randn(8, 4, 16, 16), torch.rand(8, 4, 16, 16)) for b in ("whole", "part", "background")}
        generator.training_loss(0, latents, torch.Generator().manual_seed(0)).backward()
    finally:
        from anomalygen.diffusion.attention import remove_hooks

        remove_hooks(unet, handle)
    text_encoder = generator.backbone.text_encoder
    for model, name in ((unet, "whole_0"), (unet, "part_0"), (text_encoder, "text_0")):
        grads = [p.grad for p in lora.trainable_parameters(model, name) if p.grad is not None]
        assert grads and max(g.abs().max().item() for g in grads) > 0, name  # peft starts B at 0: B's gradient
    assert all(p.grad is None for name in ("whole_1", "part_1") for p in lora.trainable_parameters(unet, name))
    assert all(p.grad is None for p in lora.trainable_parameters(text_encoder, "text_1"))
    modules = generator.interaction["crack"]
    gamma = next(m.mix.gamma for n, m in modules.items() if n.endswith(".bcm"))
    saim = next(m for n, m in modules.items() if n.endswith(".saim"))
    assert gamma.grad is not None and gamma.grad.abs().item() > 0
    assert saim.proj_out.weight.grad.abs().max() > 0
    unet.zero_grad(set_to_none=True)
    text_encoder.zero_grad(set_to_none=True)
    for module in modules.values():
        module.zero_grad(set_to_none=True)
        module.requires_grad_(False)
    generator._freeze_adapters()


def test_each_type_encodes_its_prompts_through_its_own_text_lora_only(fitted):
    generator, _ = fitted
    text_encoder = generator.backbone.text_encoder
    prompts = list(generator.words("crack"))
    before = [generator.encode(k, prompts) for k in (0, 1)]
    params = lora.trainable_parameters(text_encoder, "text_1")
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p) * 0.3)
        assert torch.equal(generator.encode(0, prompts), before[0])
        assert (generator.encode(1, prompts) - before[1]).abs().max() > 1e-2
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)


def test_training_uses_the_official_optimiser_settings(monkeypatch):
    import anomalygen.methods.kit.method as kit

    configs = []

    def capture(modules, loss_fn, config, out_dir):
        configs.append(config)
        raise KeyboardInterrupt

    monkeypatch.setattr(kit, "train", capture)
    defects, good = toy_data()
    with pytest.raises(KeyboardInterrupt):
        DualAnoDiff(**{k: v for k, v in FAST.items() if k != "max_steps"}).fit(defects[:1], good)
    config = configs[0]
    assert (config.lr, config.weight_decay, config.max_grad_norm, config.lr_scheduler, config.max_steps) == (
        2e-5, 1e-2, 1.0, "constant", 5000)


def test_the_time_budget_is_shared_by_the_defect_types(monkeypatch):
    import types

    import anomalygen.methods.dualanodiff.generator as module
    import anomalygen.methods.kit.method as kit
    from anomalygen.diffusion.train import TrainResult

    clock, budgets = [100.0], []
    monkeypatch.setattr(module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    def fake_train(modules, loss_fn, config, out_dir):
        budgets.append(config.time_budget_s)
        clock[0] += 0.3  # this type used 0.3 s
        return TrainResult(0, float("nan"), "time_budget")

    monkeypatch.setattr(kit, "train", fake_train)
    defects, good = toy_data()
    three = defects[:3] + [DefectExample(defects[0].image, defects[0].mask, "stain")]
    DualAnoDiff(**{**FAST, "time_budget_s": 1.5}).fit(three, good)
    # 1.5 s over 3 types; then what is left is shared by the types still to train
    assert budgets == pytest.approx([0.5, (1.5 - 0.3) / 2, 1.5 - 0.6])
    budgets.clear()
    DualAnoDiff(**FAST).fit(three, good)
    assert budgets == [None, None, None]


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    defects, good = toy_data()
    runs = [DualAnoDiff(**{**FAST, "gradient_checkpointing": flag, "work_dir": str(tmp_path / str(flag))}) for flag in (False, True)]
    seen = []
    for generator in runs:
        generator.fit(defects[:1], good)
        seen.append(generator.backbone.unet.is_gradient_checkpointing)
    assert seen == [False, False]  # switched off again after the fit
    assert runs[0].loss_log == runs[1].loss_log
    for name in ("whole_0", "part_0"):
        for p, q in zip(*(lora.trainable_parameters(g.backbone.unet, name) for g in runs)):
            assert torch.allclose(p, q, atol=1e-7)


def test_gamma_starts_at_point_one_and_trains(fitted):
    generator, _ = fitted
    fresh = DualAnoDiff(**FAST)
    fresh._defect_types = ["crack"]
    fresh._add_branches(0)
    gammas = [m.mix.gamma.item() for n, m in fresh.interaction["crack"].items() if n.endswith(".bcm")]
    assert gammas and all(g == pytest.approx(0.1) for g in gammas)
    trained = [m.mix.gamma.item() for n, m in generator.interaction["crack"].items() if n.endswith(".bcm")]
    assert all(abs(g - 0.1) > 1e-7 for g in trained)
    assert len(generator.loss_log["crack"]) == FAST["max_steps"]


def test_each_type_trains_only_its_own_weights(fitted, work_dir):
    from safetensors.torch import load_file

    for k in (0, 1):
        keys = list(load_file(str(work_dir / f"type-00{k}" / "checkpoints" / "step-0000002" / "trainable.safetensors")))
        lora_keys = [key for key in keys if "lora_" in key]
        assert lora_keys and all(f".whole_{k}." in key or f".part_{k}." in key or f".text_{k}." in key for key in lora_keys)
        assert any(key.startswith("text_encoder.") and f".text_{k}." in key for key in lora_keys)
        assert any(".proj_out." in key for key in keys) and any(".mix.gamma" in key for key in keys)  # SAIM, BCM
        assert len(keys) - len(lora_keys) == len(generator_interaction_keys(fitted[0], k))
    assert not any(p.requires_grad for p in fitted[0].backbone.unet.parameters())
    assert not any(p.requires_grad for p in fitted[0].backbone.text_encoder.parameters())


def generator_interaction_keys(generator, k):
    modules = generator.interaction[generator.defect_types[k]]
    return [f"{n}.{key}" for n, m in modules.items() for key, _ in m.named_parameters()]


# ----------------------------------------------------------------- masks from the anomaly branch
def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@settings(max_examples=40, deadline=None)
@given(cx=st.integers(20, 108), cy=st.integers(20, 108), rx=st.integers(6, 18), ry=st.integers(6, 18),
       contrast=st.floats(0.25, 0.5), darker=st.booleans(), background=st.sampled_from([0.5, 0.0]),
       seed=st.integers(0, 1000))
def test_threshold_mask_matches_the_drawn_region(cx, cy, rx, ry, contrast, darker, background, seed):
    import cv2

    rng = np.random.default_rng(seed)
    region = np.zeros((128, 128), np.uint8)
    cv2.ellipse(region, (cx, cy), (rx, ry), 0, 0, 360, 1, -1)
    region = region.astype(bool)
    sign = -1 if darker and background > 0 else 1  # a defect darker or brighter than a gray background
    texture = background + sign * rng.uniform(contrast * 0.8, contrast, (128, 128, 3))
    noise = background + rng.uniform(-0.05, 0.05, (128, 128, 3)).clip(-background, None)  # the VAE's speckle
    part = (np.where(region[..., None], texture, noise) * 255).round().astype(np.uint8)
    assert iou(mask_from_part(part, background), region) > 0.9


def test_a_shifted_background_is_all_defect_against_gray_and_none_against_itself():
    """A small prior's autoencoder returns gray as another colour: against the nominal gray the whole
    part image is "defect", against that colour (``mask_reference="decoded"``) only the defect is."""
    shifted = (0.70, 0.49, 0.38)
    part = np.empty((64, 64, 3), np.uint8)
    part[:] = np.round(np.array(shifted) * 255)
    part[20:40, 10:30] = (40, 200, 60)
    region = np.zeros((64, 64), bool)
    region[20:40, 10:30] = True
    assert mask_from_part(part, 0.5).all()
    assert iou(mask_from_part(part, shifted), region) > 0.98  # (the opening may round the corners)


def test_decoded_reference_is_a_plain_image_through_the_autoencoder_and_reaches_the_mask(fitted, monkeypatch):
    import anomalygen.methods.dualanodiff.generator as module

    generator, good = fitted
    vae = generator.backbone.vae
    with torch.no_grad():  # diffusers' AutoencoderKL round trip of a plain gray image, by hand
        decoded = vae.decode(vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean).sample
    expected = ((decoded + 1) / 2).clamp(0, 1)[0].mean((1, 2)).numpy()
    np.testing.assert_allclose(decoded_background(generator.backbone, 0.5, 32), expected, atol=1e-5)
    backgrounds = []
    monkeypatch.setattr(module, "decoded_background", lambda backbone, value, size: (value, 0.25, 0.75))
    monkeypatch.setattr(module, "mask_from_part", lambda part, background, *a: (backgrounds.append(background), np.ones(part.shape[:2], bool))[1])
    for reference in ("nominal", "decoded"):
        generator.opt["mask_reference"] = reference
        try:
            list(generator.generate(good, 1, seed=3))
        finally:
            generator.opt["mask_reference"] = "nominal"
    assert backgrounds == [0.5, (0.5, 0.25, 0.75)]


def test_token_attention_reads_the_chosen_rows_and_tokens_and_sums_the_layers():
    torch.manual_seed(5)
    maps = {"a": torch.rand(4, 16, 6) * 9, "b": torch.rand(4, 64, 6) * 9}  # 4×4 and 8×8 layers
    maps["a"][2:4, :, 1:3] = 0.25
    maps["b"][2:4, :, 1:3] = 0.5
    maps["b"][2:4, :, 1] += torch.linspace(0, 1, 64)  # token 1 varies over pixels, token 2 opposite
    maps["b"][2:4, :, 2] -= torch.linspace(0, 1, 64)
    out = token_attention(maps, slice(2, 4), slice(1, 3), (8, 8))
    assert out.shape == (2, 8, 8) and torch.allclose(out, torch.full((2, 8, 8), 0.75), atol=1e-6)


def test_attention_mask_matches_the_region_the_map_attends_to():
    import cv2

    region = np.zeros((64, 64), np.uint8)
    cv2.circle(region, (40, 22), 12, 1, -1)
    attention = cv2.resize(region.astype(np.float32), (16, 16), interpolation=cv2.INTER_AREA) * 0.3  # a 16×16 layer
    mask = mask_from_attention(attention, (64, 64))
    assert iou(mask, region.astype(bool)) > 0.9
    assert not mask_from_attention(np.zeros((16, 16)), (64, 64)).any()


def test_specks_are_dropped_and_holes_filled():
    part = np.zeros((100, 100, 3), np.uint8)
    part[30:60, 30:60] = 200
    part[40:45, 40:45] = 0  # a dark spot inside the defect
    part[5, 5] = 255  # a speck
    mask = mask_from_part(part, background=0.0)
    assert mask[31:59, 31:59].all() and not mask[5, 5]
    assert 896 <= mask.sum() <= 900  # the opening may round the four corner pixels


def test_every_large_component_is_kept_small_ones_dropped_and_thin_cracks_survive():
    """Two 20 × 20 defects and a 3-px-wide crack are kept whole (the clean-up's disk is 3 px up
    to 384 px images); a 4 × 4 one, below ``min_area`` (0.2 % of the image), is dropped."""
    part = np.full((128, 128, 3), 128, np.uint8)
    part[10:30, 10:30] = part[80:100, 90:110] = (30, 200, 40)
    part[60:63, 20:70] = (30, 200, 40)  # a crack
    part[110:114, 20:24] = (30, 200, 40)
    mask = mask_from_part(part, 0.5, 0.15, min_area=0.002)
    expected = np.zeros((128, 128), bool)
    expected[10:30, 10:30] = expected[80:100, 90:110] = expected[60:63, 20:70] = True
    assert iou(mask, expected) > 0.97 and mask[61, 20:70].all() and not mask[105:, :30].any()


def test_the_opening_removes_one_pixel_streaks_the_area_filter_would_keep():
    """1-px-wide, 40-px-long streaks (above ``min_area``), across and down, are ringing, not
    defects: the opening's 3-px disk removes them; the defect beside them stays."""
    part = np.full((128, 128, 3), 128, np.uint8)
    part[40:60, 40:60] = (30, 200, 40)
    part[100, 20:60] = part[20:60, 100] = (30, 200, 40)
    mask = mask_from_part(part, 0.5)
    assert mask[42:58, 42:58].all() and mask.sum() <= 400


def test_attention_mask_of_a_non_square_image():
    attention = np.zeros((12, 16), np.float32)
    attention[2:6, 10:14] = 1.0
    mask = mask_from_attention(attention, (48, 64))
    expected = np.zeros((48, 64), bool)
    expected[8:24, 40:56] = True
    assert mask.shape == (48, 64) and iou(mask, expected) > 0.8


# ----------------------------------------------------------------- generation, persistence
def test_generate_pairs_and_sample_i_depends_on_seed_and_i_only(fitted):
    generator, good = fitted
    samples = list(generator.generate(good, 3, seed=1))
    assert [s.defect_type for s in samples] == ["crack", "hole", "crack"]
    assert all(s.image.shape == (40, 48, 3) and s.mask.shape == (40, 48) for s in samples)
    assert all(s.meta["good_image"].startswith("background") and "source_index" in s.meta for s in samples)
    late = list(generator.generate(good, 1, seed=1, start=2))[0]
    assert np.abs(late.image.astype(int) - samples[2].image).max() <= 1
    other = list(generator.generate(good, 1, seed=2))[0]
    assert np.abs(other.image.astype(int) - samples[0].image).mean() > 1
    only = list(generator.generate(good, 2, seed=1, defect_type="hole"))
    assert [s.defect_type for s in only] == ["hole", "hole"]


def test_attention_masks_come_from_the_part_rows_defect_token_and_hooks_are_removed(fitted, monkeypatch):
    import anomalygen.methods.dualanodiff.generator as module

    generator, good = fitted
    unet = generator.backbone.unet
    before = dict(unet.attn_processors)
    maps = []
    monkeypatch.setattr(module, "mask_from_attention", lambda attention, shape, *a: (maps.append(attention), np.ones(shape, bool))[1])
    generator.opt["mask_source"] = "attention"
    try:
        samples = list(generator.generate(good, 2, seed=3))
    finally:
        generator.opt["mask_source"] = "threshold"
    assert [s.meta["mask_source"] for s in samples] == ["attention", "attention"]
    assert len(maps) == 2 and all(m.shape == (16, 16) and m.min() > 0 for m in maps)  # 32 px, latent factor 2
    # summed over steps (PNDM: steps + 1 UNet calls) and the cross-attention layers, each map a probability
    layers = sum(1 for name in before if "attn2" in name)
    assert all(m.max() <= (FAST["num_inference_steps"] + 1) * layers + 1e-4 for m in maps)
    assert not np.allclose(maps[0], maps[1])
    assert dict(unet.attn_processors) == before  # SAIM, BCM and the recorder removed, earlier processors back


def test_bcm_negative_background_is_an_encoded_gray_image_and_background_latents_are_unscaled(fitted, monkeypatch):
    """The official BCM: CFG's negative background is a mid-gray image (zeros in [-1, 1]) encoded,
    and I_b's latent skips the VAE scaling factor, at sampling and in training; black / scaled are ours."""
    import anomalygen.methods.dualanodiff.generator as module
    from anomalygen.diffusion.sampling import encode_images, encode_posterior

    generator, good = fitted
    backbone, scale = generator.backbone, generator.backbone.vae.config.scaling_factor
    plain, references = [], []
    monkeypatch.setattr(module, "encode_images", lambda b, x: (plain.append(x), encode_images(b, x))[1])
    scheduler = backbone.noise_scheduler()
    add_noise = scheduler.add_noise
    monkeypatch.setattr(scheduler, "add_noise", lambda x, noise, t: (references.append(x.clone()), add_noise(x, noise, t))[1])
    monkeypatch.setattr(backbone, "noise_scheduler", lambda: scheduler)
    pixels = generator._square([generator._background(good[0])])
    expected = {}
    for uncond, level, latent, divide in (("gray", 0.5, "unscaled", scale), ("black", 0.0, "scaled", 1.0)):
        generator.opt.update(bcm_uncond=uncond, bcm_latent=latent, num_inference_steps=1)
        plain.clear(), references.clear()
        try:
            generator._sample(0, [torch.Generator().manual_seed(0)], [good[0]])
        finally:
            generator.opt.update(bcm_uncond="gray", bcm_latent="unscaled", num_inference_steps=FAST["num_inference_steps"])
        assert torch.equal(plain[1], torch.full((1, 3, 32, 32), level))  # the negative half's plain image
        expected[uncond] = torch.cat([encode_images(backbone, plain[1]), encode_images(backbone, pixels)]) / divide
        assert all(torch.allclose(r, expected[uncond], atol=1e-6) for r in references)  # [negative; I_b], every step
    assert not torch.allclose(expected["gray"], expected["black"] / scale, atol=1e-3)
    defects, _ = toy_data()
    mean, std = generator._latents(defects[:1])["background"]
    reference = encode_posterior(backbone, generator._square([generator._background(defects[0].image)]))
    torch.testing.assert_close(mean[:1], reference[0] / scale)
    torch.testing.assert_close(std[:1], reference[1] / scale)


def test_u2net_masks_are_the_part_images_saliency_above_one_half(fitted, monkeypatch):
    import anomalygen.methods.dualanodiff.generator as module
    from anomalygen.diffusion.sampling import to_uint8

    generator, good = fitted
    decoded, segmented = [], []
    monkeypatch.setattr(module, "to_uint8", lambda x: decoded.extend(to_uint8(x)) or to_uint8(x))
    salient = np.zeros((32, 32), np.float32)
    salient[4:9, 10:20], salient[20, 5] = 0.6, 0.5  # 0.5 itself is not salient
    monkeypatch.setattr(module, "saliency", lambda model, images: [segmented.extend(images), [salient] * len(images)][1])
    generator.u2net = torch.nn.Identity()  # saliency is replaced: any module
    generator.opt.update(mask_source="u2net", num_inference_steps=1)
    try:
        pairs = generator._sample(0, [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)], [good[0], good[1]])
    finally:
        generator.opt.update(mask_source="threshold", num_inference_steps=FAST["num_inference_steps"])
        generator.u2net = None
    assert len(segmented) == 2 and all(np.array_equal(a, b) for a, b in zip(segmented, decoded[2:]))  # the part rows
    assert all(np.array_equal(mask, salient > 0.5) and mask.sum() == 50 for _, mask in pairs)


def test_generate_refuses_masks_and_unknown_types(fitted):
    generator, good = fitted
    with pytest.raises(AnomalygenError, match="masks come from the anomaly branch"):
        list(generator.generate(good, 1, masks=[np.ones((4, 4), bool)]))
    with pytest.raises(AnomalygenError, match="'scratch' not learned"):
        list(generator.generate(good, 1, defect_type="scratch"))


def test_without_bcm_no_good_image_is_used_and_without_text_lora_none_is_saved(tmp_path):
    from safetensors.torch import load_file

    defects, good = toy_data()
    generator = DualAnoDiff(**{**FAST, "bcm": False, "text_encoder_lora": False, "max_steps": 1})
    generator.fit(defects[:1], good)
    assert not any(n.endswith(".bcm") for n in generator.interaction["crack"])
    assert not lora.adapter_names(generator.backbone.text_encoder)
    sample = next(iter(generator.generate([], 1)))
    assert "source_index" not in sample.meta and sample.meta["good_image"].startswith("none")
    generator.save(tmp_path / "model")
    keys = load_file(str(tmp_path / "model" / "types" / "000" / "whole" / lora.WEIGHT_NAME))
    assert keys and all(key.startswith("unet.") for key in keys)
    again = AnomalyGenerator.load(tmp_path / "model")
    assert np.array_equal(next(iter(again.generate([], 1))).image, sample.image)


def test_save_load_generates_the_same_and_loras_load_in_plain_diffusers(fitted, tmp_path):
    generator, good = fitted
    generator.save(tmp_path / "model")
    loaded = AnomalyGenerator.load(tmp_path / "model")
    a, b = list(generator.generate(good, 2, seed=4)), list(loaded.generate(good, 2, seed=4))
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
    meta = json.loads((tmp_path / "model" / "dualanodiff.json").read_text())
    assert meta["types"] == {"crack": "types/000", "hole": "types/001"}
    from diffusers import StableDiffusionPipeline

    from anomalygen.diffusion.backbone import load_backbone

    backbone = load_backbone("tiny", device="cpu")
    pipe = StableDiffusionPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                                   unet=backbone.unet, scheduler=backbone.noise_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path / "model" / "types" / "000" / "whole"), adapter_name="whole")
    for model, theirs_model, name in ((generator.backbone.unet, pipe.unet, "whole_0"),
                                      (generator.backbone.text_encoder, pipe.text_encoder, "text_0")):
        ours = dict(model.named_parameters())
        theirs = {n.replace(".whole.", f".{name}."): p for n, p in theirs_model.named_parameters() if ".whole." in n}
        assert theirs and all(torch.allclose(p.float(), ours[n].float()) for n, p in theirs.items()), name


def test_resumed_fit_equals_an_uninterrupted_one(tmp_path):
    defects, good = toy_data()
    one = DualAnoDiff(**{**FAST, "max_steps": 1, "work_dir": str(tmp_path / "w1")})
    one.fit(defects[:1], good)  # stopped after 1 step
    resumed = DualAnoDiff(**{**FAST, "max_steps": 2, "work_dir": str(tmp_path / "w1")})
    resumed.fit(defects[:1], good)
    straight = DualAnoDiff(**{**FAST, "max_steps": 2, "work_dir": str(tmp_path / "w2")})
    straight.fit(defects[:1], good)
    assert resumed.loss_log == straight.loss_log
    for name, part in (("whole_0", "unet"), ("part_0", "unet"), ("text_0", "text_encoder")):
        for p, q in zip(lora.trainable_parameters(getattr(resumed.backbone, part), name),
                        lora.trainable_parameters(getattr(straight.backbone, part), name)):
            assert torch.equal(p, q)
    for (n, m), (_, m2) in zip(resumed.interaction["crack"].items(), straight.interaction["crack"].items()):
        for (k, v), (_, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
            assert torch.equal(v, v2), f"{n}.{k}"


def test_options_are_checked_when_built():
    assert isinstance(create("dualanodiff", **FAST), DualAnoDiff)
    for bad, fragment in [({"rank": 0}, "rank"), ({"sampler": "euler"}, "sampler"), ({"bcm_mix": "both"}, "bcm_mix"),
                          ({"part_background": "white"}, "part_background"), ({"weight_decay": -1}, "weight_decay"),
                          ({"mask_source": "u2net"}, "mask_source"), ({"init_word": "x"}, "unknown option")]:
        with pytest.raises(AnomalygenError, match=fragment):
            DualAnoDiff(**bad)
    defaults = DualAnoDiff().opt
    assert (defaults["lr"], defaults["max_steps"], defaults["rank"]) == (2e-5, 5000, 32)
    assert (defaults["weight_decay"], defaults["flip"], defaults["part_background"]) == (1e-2, True, "gray")
    # the official scripts: with BCM batch 2, 50 steps at CFG 2.0; without, batch 4, 100 steps at 2.5
    assert (defaults["sampler"], defaults["batch_size"], defaults["num_inference_steps"], defaults["guidance_scale"]) == \
        ("pndm", 2, 50, 2.0)
    assert (defaults["bcm_uncond"], defaults["bcm_latent"], defaults["mask_source"]) == ("gray", "unscaled", "threshold")
    plain = DualAnoDiff(bcm=False).opt
    assert (plain["batch_size"], plain["num_inference_steps"], plain["guidance_scale"]) == (4, 100, 2.5)
    mine = DualAnoDiff(batch_size=3, num_inference_steps=7, guidance_scale=1.2).opt  # 1.2: the official screw
    assert (mine["batch_size"], mine["num_inference_steps"], mine["guidance_scale"]) == (3, 7, 1.2)
    assert DualAnoDiff().words("crack") == ("a vfx with sks", "sks")
    assert DualAnoDiff(defect_word="{type}", object_word="bottle").words("broken_large") == ("a bottle with broken large", "broken large")


@pytest.mark.slow
def test_cli_fit_generate_round_trip(demo_root, tmp_path):
    from typer.testing import CliRunner

    from anomalygen.cli import app

    runner = CliRunner()
    settings = ["--set", "resolution=32", "--set", "batch_size=2", "--set", "num_inference_steps=2", "--set", "rank=4",
                "--set", "mask_tries=1"]
    fitted = runner.invoke(app, ["fit", "--method", "dualanodiff", "--data", str(demo_root), "--category", "fabric",
                                 "--out", str(tmp_path / "model"), "--model", "tiny", "--max-steps", "1",
                                 "--device", "cpu", *settings])
    assert fitted.exit_code == 0, fitted.output
    assert (tmp_path / "model" / "types" / "000" / "part" / "pytorch_lora_weights.safetensors").is_file()
    # one draw per sample: a random tiny model's samples fail the validity checks, 4 redraws each would
    # only repeat the same generation (redrawing: test_validity)
    command = ["generate", "--checkpoint", str(tmp_path / "model"), "--data", str(demo_root), "--category", "fabric",
               "--num", "3", "--seed", "1", "--max-attempts", "1", "--keep-failing"]
    first = runner.invoke(app, [*command, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert "(3 new, 3 threshold)" in first.output
    manifest = [json.loads(line) for line in (tmp_path / "a" / "fabric" / "manifest.jsonl").read_text().splitlines()]
    assert [m["defect_type"] for m in manifest] == ["cut", "hole", "stain"]
    assert all(m["source"] and m["meta"]["good_image"].startswith("background") for m in manifest)
    assert len(list((tmp_path / "a" / "fabric" / "ground_truth").rglob("*_mask.png"))) == 3
