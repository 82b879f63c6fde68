"""Wiring of every diffusion method, in training and in generation: what each UNet (ControlNet,
text encoder) call receives per batch row, recorded by ``tests/helpers/recording.py`` on the tiny preset.

Inputs are told apart by value: each training image and each good image is a different constant
(or a two-level) image, defect types have different prompts and learned vectors set to different
random values, so a row that gets another row's latent, prompt, tokens, mask or target fails.
Training: the trainer (``train``) is replaced by one that calls the method's own ``loss_fn`` once
under the recorder (no optimisation: the wiring, not the learning), with the UNet answering each
row with the noise that made it (``oracle``): the loss is 0 only if every row is compared with its
own noise. Generation: 2-3 sampling steps; every step is checked, not the last one only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalygen.diffusion.sampling import encode_images, latent_mask, to_tensor, to_uint8
from anomalygen.diffusion.train import TrainResult
from anomalygen.methods.kit import method as kit
from anomalygen.types import DefectExample

from tests.helpers.recording import record, source

torch.set_num_threads(1)

SIZE = 32
BASE = dict(model="tiny", device="cpu", resolution=SIZE, seed=0, checkpoint_every=0)


def box(top, left, height, width, shape=(SIZE, SIZE)):
    mask = np.zeros(shape, bool)
    mask[top:top + height, left:left + width] = True
    return mask


def plain(value, shape=(SIZE, SIZE)):
    return np.full((*shape, 3), value, np.uint8)


def defects():
    """Four training pairs, two per type, each image a different two-level picture (inside / outside its mask)."""
    masks = [box(4, 6, 10, 12), box(16, 4, 8, 20), box(6, 14, 14, 10), box(18, 18, 10, 8)]
    levels = [(40, 230), (90, 10), (150, 250), (210, 60)]
    return [DefectExample(np.where(m[..., None], plain(a), plain(b)), m, t)
            for m, (b, a), t in zip(masks, levels, ["crack", "hole", "crack", "hole"])]


GOOD = [plain(70), plain(130), plain(190)]


def latents_of(backbone, images):
    return encode_images(backbone, to_tensor([np.asarray(i) for i in images], (SIZE, SIZE)))


class FakeTrain:
    """Stands in for ``diffusion.train.train``: ``prepare(modules)`` gives the learned state
    distinct values, then the method's ``loss_fn`` runs once under the recorder (oracle UNet)."""

    def __init__(self, backbone, prepare=None, controlnet=None):
        self.backbone, self.prepare, self.controlnet = backbone, prepare, controlnet
        self.calls = []

    def __call__(self, modules, loss_fn, config, out_dir, **kwargs):
        if self.prepare is not None:
            with torch.no_grad():
                self.prepare(modules)
        with record(self.backbone(), controlnet=modules.get("controlnet"), oracle=True) as rec:
            loss = loss_fn(modules, 0, torch.Generator().manual_seed(config.seed))
        self.calls.append((rec, float(loss), dict(modules)))
        self.loss_fn, self.seed = loss_fn, config.seed  # to run it again with the UNet's own answers
        return TrainResult(1, float(loss), "max_steps", [float(loss)])


def distinct(parameter, seed):
    parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(seed)))


def drawn_prompts(patch):
    """The prompts AnomalyDiffusion's ``prompt`` (the template draw) returns, in order, while ``patch`` holds."""
    import anomalygen.methods.anomalydiffusion.generator as module

    drawn = []

    def draw(kind, tokens, rng, _original=module.prompt):
        drawn.append(_original(kind, tokens, rng))
        return drawn[-1]

    patch.setattr(module, "prompt", draw)
    return drawn


def assert_in_template(encoder, row, drawn, tokens, vectors):
    """The context ``row`` is the prompt ``drawn`` for it, an official template (AnomalyDiffusion's
    ``prompts.OFFICIAL_TEMPLATES``) whose "*" is ``tokens``, encoded with ``vectors`` ((k, D) each)
    at those tokens' positions; returns the positions."""
    from anomalygen.methods.anomalydiffusion.prompts import OFFICIAL_TEMPLATES

    assert drawn in {t.format(tokens) for t in OFFICIAL_TEMPLATES}
    encoded = encoder([drawn], vectors)
    assert torch.allclose(row, encoded.hidden_states[0], atol=1e-5)
    return {name: positions[0] for name, positions in encoded.positions.items()}


def assert_blended_every_step(rec, calls, known, mask, rows=slice(None)):
    """Blended latent diffusion at every step: the UNet input of step i ≥ 1 is, outside the latent
    mask, the known image's latent noised to that step's timestep (and inside it is not); the
    decoded latent is, outside the mask, the clean known latent."""
    blends = [n for n in rec.noised if n.original.shape == known.shape and torch.allclose(n.original, known, atol=1e-5)]
    assert len(blends) == len(calls) - 1  # one blend after every step but the last, which takes the clean latent
    for call, blend in zip(calls[1:], blends):
        x = call.latents[rows]
        assert int(blend.timesteps.reshape(-1)[0]) == int(call.timesteps[0])
        assert torch.allclose((1 - mask) * x, (1 - mask) * blend.noisy, atol=1e-5)
        assert not torch.allclose(mask * x, mask * blend.noisy, atol=1e-3)
    final = rec.decoded[-1][0]
    assert torch.allclose((1 - mask) * final, (1 - mask) * known, atol=1e-4)


# ----------------------------------------------------------------- textual inversion
def fit_with_fake_train(generator, goods, prepare=None):
    """Fit ``generator`` on ``defects()`` with the kit's ``train`` replaced by a ``FakeTrain``; returns
    (generator, the fake, the defects)."""
    fake = FakeTrain(lambda: generator.backbone, prepare)
    data = defects()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kit, "train", fake)
        generator.fit(data, goods)
    return generator, fake, data


@pytest.fixture(scope="module")
def textual_inversion():
    import anomalygen.methods.textual_inversion as module

    generator = module.TextualInversionGenerator(**{**BASE, "seed": 1}, batch_size=4, num_inference_steps=3, guidance_scale=2.0,
                                                 prompt="a photo of {} here", generate_batch_size=2)
    fake = FakeTrain(lambda: generator.backbone, lambda m: distinct(m["embeddings"].tokens, 1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kit, "train", fake)
        generator.fit(defects(), GOOD)
    return generator, fake


def test_textual_inversion_training_rows_get_their_image_its_type_token_and_their_own_noise(textual_inversion):
    generator, fake = textual_inversion
    (rec, loss, _), = fake.calls
    backbone, encoder = generator.backbone, generator.prompts
    data = defects()
    clean = latents_of(backbone, [d.image for d in data])
    call, = rec.unet
    assert loss < 1e-10  # every row's ε target is the noise that made its input
    picked = [data[source(rec.made(x)[0], clean)] for x in call.latents]
    types = [d.defect_type for d in picked]
    assert types != types[::-1] and len(set(types)) == 2  # (seed 1) rows of one batch in an order a swap changes
    for row, (x, d) in enumerate(zip(call.latents, picked)):
        z0, _, t = rec.made(x)
        vector = generator.embeddings.tokens[generator._defect_types.index(d.defect_type)]
        expected = encoder(["a photo of <defect> here"], {"<defect>": vector}).hidden_states[0]
        assert torch.allclose(call.context[row], expected, atol=1e-5)
        assert int(call.timesteps[row]) == int(t)


def test_textual_inversion_generation_conditions_every_step_and_blends_at_every_step(textual_inversion):
    generator, _ = textual_inversion
    backbone, encoder = generator.backbone, generator.prompts
    with record(backbone) as rec:
        samples = list(generator.generate(GOOD, 2, seed=3, start=1))
    assert len(rec.unet) == 3
    uncond = encoder([""]).hidden_states[0]
    for j, sample in enumerate(samples):
        vector = generator.embeddings.tokens[generator._defect_types.index(sample.defect_type)]
        expected = encoder(["a photo of <defect> here"], {"<defect>": vector}).hidden_states[0]
        for call in rec.unet:  # [uncond; cond] under classifier-free guidance
            assert torch.allclose(call.context[2 + j], expected, atol=1e-5)
            assert torch.allclose(call.context[j], uncond, atol=1e-5)
            assert torch.equal(call.latents[j], call.latents[2 + j])
    assert [s.defect_type for s in samples] == ["hole", "crack"]
    known = latents_of(backbone, [GOOD[s.meta["source_index"]] for s in samples])
    mask = latent_mask(torch.stack([torch.from_numpy(s.mask) for s in samples])[:, None], known.shape[-2:])
    assert_blended_every_step(rec, rec.unet, known, mask, rows=slice(2, 4))
    for s in samples:  # the good image outside the mask, the decoded sample inside it
        assert np.array_equal(s.image[~s.mask], GOOD[s.meta["source_index"]][~s.mask])
    decoded = to_uint8(rec.decoded[-1][1])
    for s, image in zip(samples, decoded):
        assert np.array_equal(s.image[s.mask], image[s.mask])


# ----------------------------------------------------------------- AnomalyDiffusion
AD = dict(BASE, batch_size=4, num_anomaly_tokens=2, num_spatial_tokens=2, mask_tokens=2, mask_source="learned",
          masked_loss=True, spatial_embedding=True)


@pytest.fixture(scope="module")
def anomalydiffusion():
    import anomalygen.methods.anomalydiffusion.generator as module

    generator = module.AnomalyDiffusion(**AD)
    data = defects()
    pairs, losses = [], []

    def augment(image, mask, rng, size, _original=module.augment_pair):
        out = _original(image, mask, rng, size)
        pairs.append((next(i for i, d in enumerate(data) if d.image is image), *out))
        return out

    def loss(eps, noise, weight, normalise, _original=module.masked_diffusion_loss):
        losses.append((weight.detach().clone(), normalise))
        return _original(eps, noise, weight, normalise)

    def prepare(modules):
        distinct(modules["anomaly_tokens"].tokens, 1)
        distinct(modules["mask_tokens"].tokens, 2)
        for k, parameter in enumerate(modules["spatial_encoder"].parameters()):  # its zero-initialised heads made mask-dependent
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(10 + k)))

    fake = FakeTrain(lambda: generator.backbone, prepare)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kit, "train", fake)
        patch.setattr(module, "augment_pair", augment)
        patch.setattr(module, "masked_diffusion_loss", loss)
        prompts = drawn_prompts(patch)
        generator.fit(data, GOOD)
    return generator, fake, data, pairs, losses, prompts


def test_anomalydiffusion_training_rows_get_their_image_type_tokens_spatial_mask_and_masked_target(anomalydiffusion):
    """Eqs. 4-6: row r's input is the r-th augmented image, its context an official template (drawn
    per row, as the official ``personalized.py``) whose "*" holds {e_a of its type, E(its augmented
    mask)}, its loss weight its mask at latent size; Eq. 9: the mask model's rows are the same
    augmented masks with e_m of their type at their template's "*"; every target is its own noise."""
    from anomalygen.methods.anomalydiffusion.generator import ANOMALY, MASK, SPATIAL

    generator, fake, data, pairs, losses, prompts = anomalydiffusion
    (rec, loss, modules), = fake.calls
    backbone = generator.backbone
    assert loss < 1e-10 and len(pairs) == 4 and len(rec.unet) == 2
    images = torch.stack([p[1] for p in pairs])
    masks = torch.stack([p[2] for p in pairs])
    types = [generator._defect_types.index(data[p[0]].defect_type) for p in pairs]
    assert len(set(types)) == 2
    spatial = modules["spatial_encoder"](masks)
    assert not torch.allclose(spatial[0], spatial[1], atol=1e-3)  # E(m) tells the masks apart
    image_call, mask_call = rec.unet
    clean = encode_images(backbone, (images + 1) / 2)
    mask_clean = encode_images(backbone, masks.expand(-1, 3, -1, -1))
    assert len(prompts) == 8 and len(set(prompts[:4])) > 1  # a template drawn per row: 4 image rows, then 4 mask rows
    for row in range(4):
        assert source(rec.made(image_call.latents[row])[0], clean) == row
        vectors = {ANOMALY: modules["anomaly_tokens"].tokens[types[row]], SPATIAL: spatial[row]}
        assert_in_template(generator.prompts, image_call.context[row], prompts[row], f"{ANOMALY} {SPATIAL}", vectors)
        assert source(rec.made(mask_call.latents[row])[0], mask_clean) == row
        assert_in_template(generator.prompts, mask_call.context[row], prompts[4 + row], MASK,
                           {MASK: modules["mask_tokens"].tokens[types[row]]})
    (weight, normalise), = losses
    assert torch.equal(weight, F.interpolate(masks, size=clean.shape[-2:], mode="area")) and normalise == "latent_size"


def test_anomalydiffusion_generation_conditions_reweights_anomaly_tokens_and_blends_at_every_step(anomalydiffusion, monkeypatch):
    """Every step: in the conditional rows, the sample's official template with {e_a, E(m)} of its
    type and mask at the "*"; AAR (when asked) on every cross-attention layer (no self-attention
    layer) of the conditional rows only, aimed at the start column, the anomaly and the spatial
    tokens (the official columns), weights from this step's z_t against the good image's z_0 in
    the sample's mask; blending with the noised good image after every step; the mask returned is
    the one generated in."""
    from anomalygen.methods.anomalydiffusion import aar
    from anomalygen.methods.anomalydiffusion.generator import ANOMALY, SPATIAL

    generator, *_ = anomalydiffusion
    backbone = generator.backbone
    generator.opt.update(aar="latent", aar_apply="multiply_logits", aar_dilation_scale=None, mask_source="augment",
                         guidance_scale=2.0, eta=1.0, num_inference_steps=3, sampler="ddim", generate_batch_size=2)
    prompts = drawn_prompts(monkeypatch)
    with record(backbone) as rec:
        samples = generator.generate(GOOD, 2, seed=5, start=2)
        samples = list(samples)
    assert len(rec.unet) == 3 and len({s.defect_type for s in samples}) == 2 and len(prompts) == 2
    square = torch.stack([torch.from_numpy(s.mask) for s in samples])[:, None].float()
    types = torch.tensor([generator._defect_types.index(s.defect_type) for s in samples])
    anomaly, spatial = generator.anomaly_tokens(types), generator.spatial_encoder(square)
    uncond = generator.prompts([""]).hidden_states[0]
    known = latents_of(backbone, [GOOD[s.meta["source_index"]] for s in samples])
    mask = latent_mask(square, known.shape[-2:])
    for call in rec.unet:
        columns = [assert_in_template(generator.prompts, call.context[2 + j], prompts[j], f"{ANOMALY} {SPATIAL}",
                                      {ANOMALY: anomaly[j], SPATIAL: spatial[j]}) for j in range(2)]
        assert torch.allclose(call.context[:2], uncond.expand(2, -1, -1), atol=1e-5)
        assert call.hook_kinds("self") == [[]] * len(call.hooks["self"])
        assert call.hook_kinds("cross") == [["AttentionReweight"]] * len(call.hooks["cross"])
        state = call.hooks["cross"][0][0].state
        assert state["rows"] == slice(2, 4)
        assert state["positions"] == [[0, *c[ANOMALY], *c[SPATIAL]] for c in columns]
        expected = aar.latent_weights(call.latents[2:], known, mask, int(call.timesteps[0]), scale=aar.dilation_scale(3),
                                      num_train_timesteps=backbone.num_train_timesteps)[:, None]
        assert torch.allclose(state["weights"], expected, atol=1e-5)
        assert all(torch.equal(layer[0].state["weights"], state["weights"]) for layer in call.hooks["cross"])
    assert_blended_every_step(rec, rec.unet, known, mask, rows=slice(2, 4))
    for s in samples:
        assert np.array_equal(s.image[~s.mask], GOOD[s.meta["source_index"]][~s.mask])


# ----------------------------------------------------------------- DualAnoDiff
def with_object(level, obj):
    image = plain(level)
    image[8:24, 6 + level // 40:22 + level // 40] = obj
    return image


GOOD_OBJECTS = [with_object(30, 200), with_object(60, 140), with_object(90, 250)]
DUAL = dict(BASE, batch_size=2, rank=2, flip=False, vae_latents="mean", part_background="gray", foreground="object",
            defect_word="{type}", object_word="vfx", saim=True, bcm=True, text_encoder_lora=True)


@pytest.fixture(scope="module")
def dualanodiff():
    import anomalygen.methods.dualanodiff.generator as module

    return fit_with_fake_train(module.DualAnoDiff(**DUAL), GOOD_OBJECTS)


def test_dualanodiff_training_rows_whole_part_background_with_their_prompts_adapters_and_targets(dualanodiff):
    """Eq. 4 per type: rows [whole; part; background] of the same pairs at one timestep per pair;
    whole rows: z(I), "a vfx with <type>", the whole LoRA; part rows: z(I·M + gray outside),
    "<type>", the part LoRA; background rows: z(I_b) unscaled (the official code skips the VAE's
    scaling factor for it), the whole prompt and LoRA; SAIM pairs
    whole and part rows on every layer, BCM injects the background rows into the whole rows'
    self-attention; each branch's target is its own noise; every text call through the type's text LoRA."""
    generator, fake, data = dualanodiff
    backbone, n = generator.backbone, 2
    scaling = backbone.vae.config.scaling_factor
    assert len(fake.calls) == 2
    for k, (rec, loss, _) in enumerate(fake.calls):
        name = generator._defect_types[k]
        examples = [d for d in data if d.defect_type == name]
        whole = to_tensor([d.image for d in examples])
        masks = torch.stack([torch.from_numpy(d.mask) for d in examples])[:, None].float()
        pixels = {"whole": whole, "part": whole * masks + 0.5 * (1 - masks),
                  "background": to_tensor([generator._background(d.image) for d in examples])}
        clean = {b: encode_images(backbone, x) for b, x in pixels.items()}
        clean["background"] = clean["background"] / scaling  # I_b's latent unscaled, as the official code
        call, = rec.unet
        assert loss < 1e-10
        assert call.adapters == [f"whole_{k}"] * n + [f"part_{k}"] * n + [f"whole_{k}"] * n
        assert rec.text and all(rows == [f"text_{k}"] * len(rows) for rows in rec.text)
        prompts = {b: generator.prompts([p]).hidden_states[0]
                   for b, p in (("whole", f"a vfx with {name}"), ("part", name), ("background", f"a vfx with {name}"))}
        for r in range(n):
            made = {b: rec.made(call.latents[i * n + r]) for i, b in enumerate(("whole", "part", "background"))}
            pairs = {b: source(made[b][0], clean[b]) for b in made}
            assert len(set(pairs.values())) == 1  # one pair in all three branches
            assert len({int(m[2]) for m in made.values()}) == 1  # at one timestep
            assert not torch.equal(made["whole"][1], made["part"][1])  # with independent noise
            for i, b in enumerate(("whole", "part", "background")):
                assert torch.allclose(call.context[i * n + r], prompts[b], atol=1e-5)
        self_hooks, cross_hooks = call.hooks["self"], call.hooks["cross"]
        assert all(sorted(h.kind for h in layer) == ["ReferenceKV", "SAIM"] for layer in self_hooks)
        assert all([h.kind for h in layer] == ["SAIM"] for layer in cross_hooks)
        for layer in self_hooks + cross_hooks:
            for h in layer:
                if h.kind == "SAIM":
                    assert h.state["whole"].tolist() == [0, 1] and h.state["part"].tolist() == [2, 3]
                else:
                    assert h.state["mode"] == "inject"
                    assert h.state["targets"].tolist() == [0, 1] and h.state["reference_rows"].tolist() == [4, 5]


def test_dualanodiff_generation_sample_is_the_whole_branch_and_the_mask_is_segmented_from_the_part_branch(dualanodiff, monkeypatch):
    """Every step: [uncond; cond] x [whole; part] rows with their prompts and LoRAs, then the
    background rows: a mid-gray image (uncond) or the good image's background (cond), encoded and
    unscaled as the official code, noised to this step's timestep, with the whole prompt and LoRA,
    injected by BCM into the whole rows; the sample is the decoded whole-branch image, its mask
    segmented from the decoded part image."""
    import anomalygen.methods.dualanodiff.generator as module

    generator, _, _ = dualanodiff
    backbone, n = generator.backbone, 2
    generator.opt.update(sampler="ddim", guidance_scale=2.0, num_inference_steps=2, mask_source="threshold",
                         mask_reference="nominal", mask_tries=1, generate_batch_size=2)
    segmented = []

    def segment(part, background, threshold, min_area, _original=module.mask_from_part):
        segmented.append((part.copy(), _original(part, background, threshold, min_area)))
        return segmented[-1][1]

    monkeypatch.setattr(module, "mask_from_part", segment)
    with record(backbone) as rec:
        samples = list(generator.generate(GOOD_OBJECTS, n, seed=1, defect_type="hole"))
    w, p = "whole_1", "part_1"
    assert len(rec.unet) == 2
    uncond = generator.prompts([""]).hidden_states[0]
    whole, part = generator.prompts(["a vfx with hole"]).hidden_states[0], generator.prompts(["hole"]).hidden_states[0]
    scaling = backbone.vae.config.scaling_factor
    gray = encode_images(backbone, torch.full((1, 3, SIZE, SIZE), 0.5))[0] / scaling
    references = latents_of(backbone, [generator._background(GOOD_OBJECTS[s.meta["source_index"]]) for s in samples]) / scaling
    assert not torch.allclose(references[0], gray, atol=1e-3)
    for call in rec.unet:
        assert call.adapters == [w, w, p, p, w, w, p, p, w, w, w, w]
        for rows, expected in ((slice(0, 4), uncond), (slice(4, 6), whole), (slice(6, 8), part), (slice(8, 10), uncond),
                               (slice(10, 12), whole)):
            assert torch.allclose(call.context[rows], expected.expand(rows.stop - rows.start, -1, -1), atol=1e-5)
        for j in range(n):
            for row, reference in ((8 + j, gray), (10 + j, references[j])):
                z0, _, t = rec.made(call.latents[row])
                assert torch.allclose(z0, reference, atol=1e-4) and int(t) == int(call.timesteps[0])
        for layer in call.hooks["self"] + call.hooks["cross"]:
            for h in layer:
                if h.kind == "SAIM":
                    assert h.state["whole"].tolist() == [0, 1, 4, 5] and h.state["part"].tolist() == [2, 3, 6, 7]
                else:
                    assert h.state["mode"] == "inject" and h.state["targets"].tolist() == [0, 1, 4, 5]
                    assert h.state["reference_rows"].tolist() == [8, 9, 10, 11]
        assert sum(h.kind == "ReferenceKV" for layer in call.hooks["self"] for h in layer) == len(call.hooks["self"])
    assert rec.text and all(rows == ["text_1"] * len(rows) for rows in rec.text)
    decoded = to_uint8(rec.decoded[-1][1])
    assert len(decoded) == 2 * n and len(segmented) == n
    for j, s in enumerate(samples):
        assert np.array_equal(s.image, decoded[j])  # the whole branch
        assert np.array_equal(segmented[j][0], decoded[n + j]) and np.array_equal(s.mask, segmented[j][1])
        assert not np.array_equal(decoded[j], decoded[n + j])


# ----------------------------------------------------------------- CAGen
CAGEN = dict(BASE, batch_size=4, max_per_type=2, prompt="{defect} {category}", category="tile", foreground="texture")


@pytest.fixture(scope="module")
def cagen():
    import anomalygen.methods.cagen.generator as module

    generator = module.CAGen(**CAGEN)

    def prepare(modules):  # the zero convolutions made non-zero: the residuals then depend on the control image
        for k, (name, parameter) in enumerate(modules["controlnet"].named_parameters()):
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(k)))

    return fit_with_fake_train(generator, GOOD, prepare)


def assert_controlled(rec, call, control_call, control):
    """Eq. 1: the ControlNet sees the UNet's latents, timestep and context and the control image;
    the UNet gets exactly the ControlNet's residuals."""
    assert torch.equal(control_call.latents, call.latents) and torch.equal(control_call.timesteps, call.timesteps)
    assert torch.equal(control_call.context, call.context)
    assert torch.equal(control_call.control, control)
    assert len(call.down) == len(control_call.down) and all(torch.equal(a, b) for a, b in zip(call.down, control_call.down))
    assert torch.equal(call.mid, control_call.mid) and call.mid.abs().amax() > 0


def test_cagen_training_rows_get_their_image_prompt_and_mask_through_the_controlnet(cagen):
    from anomalygen.methods.cagen.control import control_image

    generator, fake, data = cagen
    (rec, loss, _), = fake.calls
    backbone = generator.backbone
    clean = latents_of(backbone, [d.image for d in data])
    call, = rec.unet
    control_call, = rec.control
    assert loss < 1e-10
    picks = [source(rec.made(x)[0], clean) for x in call.latents]
    assert len({data[i].defect_type for i in picks}) == 2 and picks != picks[::-1]
    assert_controlled(rec, call, control_call, control_image([data[i].mask for i in picks], SIZE))
    # t reaches both as integers: cast to the UNet's dtype, a bf16 t would round (999 -> 1000)
    assert not call.timesteps.is_floating_point() and not control_call.timesteps.is_floating_point()
    for row, i in enumerate(picks):
        expected = generator.prompts([f"{data[i].defect_type} tile"]).hidden_states[0]
        assert torch.allclose(call.context[row], expected, atol=1e-5)


def test_cagen_generation_controls_every_step_and_fuses_with_the_good_latent_once_at_the_end(cagen):
    """Every step: the ControlNet reads the sample's mask ([uncond; cond] both), its residuals
    reach the UNet; no blending during sampling (Eqs. 2-5: z_f = z_g·c_m + z_i·(1 − c_m) once, at
    the end), z_g the sampler's last latent, z_i the good image's; the sample is z_f decoded."""
    from anomalygen.methods.cagen.control import control_image

    generator, _, _ = cagen
    backbone = generator.backbone
    generator.opt.update(fusion="end", final_paste=False, guidance_scale=2.0, num_inference_steps=2, sampler="ddim",
                         mask_source="perlin", generate_batch_size=2)
    masks = [box(2, 2, 12, 14), box(14, 10, 16, 18)]
    with record(backbone, controlnet=generator.controlnet) as rec:
        samples = list(generator.generate(GOOD, 2, masks=masks, seed=4))
    assert len(rec.unet) == len(rec.control) == 2 and not rec.noised
    control = control_image([s.mask for s in samples], SIZE)
    assert all(np.array_equal(s.mask, m) for s, m in zip(samples, masks))
    uncond = generator.prompts([""]).hidden_states[0]
    prompts = generator.prompts([f"{s.defect_type} tile" for s in samples]).hidden_states
    for call, control_call in zip(rec.unet, rec.control):
        assert_controlled(rec, call, control_call, torch.cat([control, control]))
        assert torch.allclose(call.context[2:], prompts, atol=1e-5) and torch.allclose(call.context[:2], uncond[None], atol=1e-5)
    known = latents_of(backbone, [GOOD[s.meta["source_index"]] for s in samples])
    mask = latent_mask(torch.from_numpy(np.stack(masks))[:, None], known.shape[-2:])
    z_g = rec.steps[-1][1]
    final, images = rec.decoded[-1]
    assert torch.allclose(final, mask * z_g + (1 - mask) * known, atol=1e-4)
    assert all(np.array_equal(s.image, image) for s, image in zip(samples, to_uint8(images)))


# ----------------------------------------------------------------- AnomalyXFusion
AXF = dict(BASE, batch_size=4, tokens=2, mask_embedding=16, mif=True, ddf=True, category="tile", image_encoder="tiny")


@pytest.fixture(scope="module")
def anomalyxfusion():
    import anomalygen.methods.anomalyxfusion.generator as module

    return fit_with_fake_train(module.AnomalyXFusion(**AXF), GOOD)


def x_context(modules, generator, caption, mask, defect_type, t):
    """The authors' placement for one sample, computed here: e_t = DDF(MIF(e_sem, M, type), t)
    (Eqs. 1-5, 14), e_sem from the caption, its tokens at the "*" of "a photo of a *" through the
    text encoder; the caption reaches the context only through e_sem."""
    from anomalygen.diffusion.conditioning import PromptEncoder

    backbone = generator.backbone
    _, semantic = generator.encode_text([caption])
    mask = torch.from_numpy(np.asarray(mask, np.float32))[None, None]
    tokens = modules["ddf"](modules["mif"](semantic, mask, torch.tensor([generator._defect_types.index(defect_type)])),
                            torch.tensor([int(t)]))
    encoder = PromptEncoder(backbone.text_encoder, backbone.tokenizer, {"<x>": tokens.shape[1]})
    return encoder(["a photo of a <x>"], {"<x>": tokens}).hidden_states[0]


def test_anomalyxfusion_training_rows_get_their_image_caption_mask_and_type_at_their_timestep(anomalyxfusion):
    """Each row: its image's latent, e_t of its caption, mask and type at its timestep at the "*"
    of the authors' template; the loss (Eq. 17, the authors' default) is the ε-MSE inside the
    row's own mask (resized to the latent, binarised at 0.5), averaged over the whole latent."""
    generator, fake, data = anomalyxfusion
    (rec, loss, modules), = fake.calls
    clean = latents_of(generator.backbone, [d.image for d in data])
    call, = rec.unet
    assert loss < 1e-10
    picks = [source(rec.made(x)[0], clean) for x in call.latents]
    assert len({data[i].defect_type for i in picks}) == 2 and picks != picks[::-1]
    for row, i in enumerate(picks):
        d = data[i]
        expected = x_context(modules, generator, f"tile with {d.defect_type}", d.mask, d.defect_type, call.timesteps[row])
        assert call.context.shape[1] == 77 and torch.allclose(call.context[row], expected, atol=1e-5)
    with record(generator.backbone) as rec:  # the same draws, the UNet's own ε this time
        loss = fake.loss_fn(modules, 0, torch.Generator().manual_seed(fake.seed))
    call, = rec.unet
    error = call.output - torch.stack([rec.made(x)[1] for x in call.latents])
    masks = torch.stack([torch.from_numpy(data[i].mask) for i in picks])[:, None].float()
    inside = F.interpolate(masks, size=error.shape[-2:], mode="bilinear") >= 0.5
    assert 0 < inside.float().mean() < 1 and torch.isclose(loss, (error * inside).pow(2).mean(), rtol=1e-5)


def test_anomalyxfusion_generation_recomputes_the_x_embedding_at_every_step_and_blends_at_every_step(anomalyxfusion):
    generator, _, _ = anomalyxfusion
    backbone = generator.backbone
    generator.opt.update(guidance_scale=2.0, num_inference_steps=3, sampler="ddim", final_paste=True, mask_augment=True,
                         generate_batch_size=2)
    with record(backbone) as rec:
        samples = list(generator.generate(GOOD, 2, seed=2, start=1))
    assert len(rec.unet) == 3 and len({s.defect_type for s in samples}) == 2
    modules = generator.modules()
    empty = generator.prompts([""]).hidden_states[0]
    for call in rec.unet:
        assert call.context.shape[1] == 77
        for j, s in enumerate(samples):
            expected = x_context(modules, generator, s.prompt, s.mask, s.defect_type, call.timesteps[0])
            assert torch.allclose(call.context[2 + j], expected, atol=1e-5)
            assert torch.allclose(call.context[j], empty, atol=1e-5)
    known = latents_of(backbone, [GOOD[s.meta["source_index"]] for s in samples])
    mask = latent_mask(torch.stack([torch.from_numpy(s.mask) for s in samples])[:, None], known.shape[-2:])
    assert_blended_every_step(rec, rec.unet, known, mask, rows=slice(2, 4))
    for s in samples:
        assert np.array_equal(s.image[~s.mask], GOOD[s.meta["source_index"]][~s.mask])


def test_anomalydiffusion_learned_mask_is_the_mask_models_decoded_sample_and_the_image_is_generated_in_it(anomalydiffusion,
                                                                                                      monkeypatch):
    """Eq. 9: the mask model's steps see e_m of the sample's type at the "*" of its official template
    ([""; template] under its CFG); the mask returned is its decoded sample, thresholded; the
    anomaly image is blended in that mask."""
    import anomalygen.methods.anomalydiffusion.generator as module
    from anomalygen.methods.anomalydiffusion.generator import MASK
    from anomalygen.methods.anomalydiffusion.mask_model import binarize

    generator, *_ = anomalydiffusion
    backbone = generator.backbone
    generator.opt.update(aar="off", mask_source="learned", mask_inference_steps=2, mask_guidance_scale=5.0, mask_threshold=0.5,
                         mask_tries=1, guidance_scale=1.0, num_inference_steps=2, sampler="ddim", mask_sampler="ddim",
                         generate_batch_size=2)
    monkeypatch.setattr(module, "official_rejection", lambda mask: None)  # every learned mask accepted
    prompts = drawn_prompts(monkeypatch)
    with record(backbone) as rec:
        samples = list(generator.generate(GOOD, 2, seed=6))
    assert [s.meta["mask_source"] for s in samples] == ["learned"] * 2 and len(rec.unet) == 4
    types = torch.tensor([generator._defect_types.index(s.defect_type) for s in samples])
    tokens = generator.mask_tokens(types)
    assert len(prompts) == 4  # the mask model's two rows, then the image's
    uncond = generator.prompts([""]).hidden_states
    for call in rec.unet[:2]:
        for j in range(2):
            assert_in_template(generator.prompts, call.context[2 + j], prompts[j], MASK, {MASK: tokens[j]})
        assert torch.allclose(call.context[:2], uncond.expand(2, -1, -1), atol=1e-5)
    assert torch.allclose(rec.decoded[0][0], rec.steps[1][1], atol=1e-5)  # the mask model's last latents, in sample order
    masks = binarize(rec.decoded[0][1] * 2 - 1, 0.5).numpy()
    assert all(0 < m.mean() < 1 for m in masks)
    for s, m in zip(samples, masks):
        assert np.array_equal(s.mask, m)
    known = latents_of(backbone, [GOOD[s.meta["source_index"]] for s in samples])
    mask = latent_mask(torch.from_numpy(masks)[:, None], known.shape[-2:])
    assert_blended_every_step(rec, rec.unet[2:], known, mask)


def test_anomalydiffusion_paper_aar_weights_come_from_this_steps_x0_against_the_good_image(anomalydiffusion):
    """Eq. 7 (``aar="paper"``): before every step an extra pass, the re-weighting off, on the same
    latents, timestep and context; x̂0 = (z_t − √(1−ᾱ_t)·ε)/√ᾱ_t decoded; the step's weights are
    W(x̂0, good image, mask) in the sample's mask."""
    from anomalygen.methods.anomalydiffusion import aar

    generator, *_ = anomalydiffusion
    backbone = generator.backbone
    generator.opt.update(aar="paper", aar_apply="probabilities", mask_source="augment", guidance_scale=1.0, eta=0.0,
                         num_inference_steps=2, sampler="ddim", generate_batch_size=2)
    with record(backbone) as rec:
        samples = list(generator.generate(GOOD, 2, seed=9))
    assert len(rec.unet) == 4 and len(rec.decoded) == 3  # 2 steps x (x̂0 pass + step); 2 x̂0 decodes + the sample's
    assert len({s.meta["source_index"] for s in samples}) == 2
    alphas = backbone.noise_scheduler().alphas_cumprod
    good = to_tensor([GOOD[s.meta["source_index"]] for s in samples])
    square = torch.stack([torch.from_numpy(s.mask) for s in samples])[:, None].float()
    for step in range(2):
        probe, call = rec.unet[2 * step], rec.unet[2 * step + 1]
        assert all(layer[0].state["weights"] is None for layer in probe.hooks["cross"])
        assert torch.equal(probe.latents, call.latents) and torch.equal(probe.timesteps, call.timesteps)
        assert torch.equal(probe.context, call.context)
        alpha = alphas[int(call.timesteps[0])]
        x0 = (call.latents - (1 - alpha).sqrt() * probe.output) / alpha.sqrt()
        assert torch.allclose(rec.decoded[step][0], x0, atol=1e-4)
        expected = aar.paper_weights(rec.decoded[step][1] * 2 - 1, good * 2 - 1, square)[:, None]
        assert torch.allclose(call.hooks["cross"][0][0].state["weights"], expected, atol=1e-5)
