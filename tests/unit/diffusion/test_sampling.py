"""Blended sampling keeps the good image outside the mask; samples do not depend on the batch."""

import numpy as np
import pytest
import torch

from anomalygen.diffusion.backbone import load_backbone
from anomalygen.diffusion.conditioning import PromptEncoder
from anomalygen.diffusion.sampling import (
    blended_generate,
    decode_latents,
    encode_images,
    latent_mask,
    sample_generators,
    sample_latents,
    to_tensor,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    backbone = load_backbone("tiny", device="cpu")
    encoder = PromptEncoder(backbone.text_encoder, backbone.tokenizer, {})
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(3)]
    masks = [np.zeros((40, 40), bool) for _ in range(3)]
    for i, m in enumerate(masks):
        m[4 + i : 14 + i, 6:20] = True
    return backbone, encoder, good, masks


@pytest.mark.parametrize("sampler,eta,guidance", [("ddim", 1.0, 1.0), ("dpm++", 0.0, 2.5), ("pndm", 0.0, 2.5)])
def test_same_samples_whatever_the_batch(setup, sampler, eta, guidance):
    backbone, encoder, good, masks = setup
    context = encoder(["a photo of crack"] * 3).hidden_states
    options = dict(resolution=32, num_inference_steps=6, sampler=sampler, eta=eta, guidance_scale=guidance,
                   uncond_hidden_states=encoder([""]).hidden_states, final_paste=False)
    together = blended_generate(backbone, context, good, masks, sample_generators(7, [0, 1, 2]), **options)
    alone = [blended_generate(backbone, context[i : i + 1], good[i : i + 1], masks[i : i + 1], sample_generators(7, [i]), **options)[0]
             for i in (2, 0)]
    assert np.abs(together[2].astype(int) - alone[0]).max() <= 1
    assert np.abs(together[0].astype(int) - alone[1]).max() <= 1
    other_seed = blended_generate(backbone, context[:1], good[:1], masks[:1], sample_generators(8, [0]), **options)[0]
    assert np.abs(other_seed.astype(int) - together[0])[masks[0]].mean() > 1


def test_blending_keeps_known_latent_outside_mask_and_paste_is_exact(setup):
    backbone, encoder, good, masks = setup
    context = encoder(["a photo of crack"] * 3).hidden_states
    known = encode_images(backbone, to_tensor(good, (32, 32)))
    pixel_masks = torch.nn.functional.interpolate(torch.from_numpy(np.stack(masks))[:, None].float(), size=(32, 32))
    m = latent_mask(pixel_masks, (16, 16))
    latents = sample_latents(backbone, context, sample_generators(0, [0, 1, 2]), latent_size=(16, 16),
                             num_inference_steps=5, known_latents=known, mask=m)
    assert torch.equal(latents * (1 - m), known * (1 - m))
    assert (latents - known).abs().mul(m).sum() > 0
    # pixels: close to the VAE round trip of the good image away from the mask ...
    round_trip = decode_latents(backbone, known)
    images = decode_latents(backbone, latents)
    far = torch.nn.functional.max_pool2d(pixel_masks, 17, stride=1, padding=8) == 0
    diff = (images - round_trip).abs()
    round_trip_error = (round_trip - to_tensor(good, (32, 32))).abs().mean()
    outside, inside = diff[far.expand_as(images)].mean(), diff[(pixel_masks > 0).expand_as(images)].mean()
    assert outside < round_trip_error and outside < 0.5 * inside  # GroupNorm makes the decoder non-local
    # ... and exactly the good image everywhere outside the mask with the final paste
    pasted = blended_generate(backbone, context, good, masks, sample_generators(0, [0, 1, 2]), resolution=32, num_inference_steps=5)
    for out, image, mask in zip(pasted, good, masks):
        assert out.shape == image.shape and np.array_equal(out[~mask], image[~mask])


def test_pndm_is_sd_plms_and_runs_the_requested_steps(setup):
    backbone = setup[0]
    from anomalygen.diffusion.sampling import make_scheduler

    scheduler = make_scheduler(backbone.scheduler_config, "pndm")
    assert scheduler.config.skip_prk_steps
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) == 11  # PLMS repeats one step to warm up, as in SD's pipelines


def test_denoiser_replaces_the_unet_call_and_sees_the_cfg_stacked_batch(setup):
    backbone, encoder, _, _ = setup
    context = encoder(["a photo of crack"] * 2).hidden_states
    uncond = encoder([""]).hidden_states
    options = dict(latent_size=(8, 8), num_inference_steps=3, guidance_scale=2.0, uncond_hidden_states=uncond)
    plain = sample_latents(backbone, context, sample_generators(1, [0, 1]), **options)
    seen = []

    def with_extra_rows(model_in, t, ctx):  # runs two extra rows alongside, returns ε of the sampled ones
        seen.append(model_in.shape[0])
        extra = torch.zeros(2, *model_in.shape[1:])
        eps = backbone.unet(torch.cat([model_in, extra]), t, encoder_hidden_states=torch.cat([ctx, ctx[:2]])).sample
        return eps[: model_in.shape[0]]

    same = sample_latents(backbone, context, sample_generators(1, [0, 1]), denoiser=with_extra_rows, **options)
    assert seen == [4, 4, 4]
    assert torch.allclose(same, plain, atol=1e-5)
    doubled = sample_latents(backbone, context, sample_generators(1, [0, 1]),
                             denoiser=lambda x, t, c: 2 * backbone.unet(x, t, encoder_hidden_states=c).sample, **options)
    assert (doubled - plain).abs().max() > 1e-2


def test_blend_modes_step_end_none(setup):
    from anomalygen.diffusion.sampling import blended_latents

    backbone, encoder, good, masks = setup
    context = encoder(["a photo of crack"] * 3).hidden_states
    options = dict(resolution=32, num_inference_steps=3)
    known = encode_images(backbone, to_tensor(good, (32, 32)))
    m = latent_mask(torch.nn.functional.interpolate(torch.from_numpy(np.stack(masks))[:, None].float(), size=(32, 32)), (16, 16))
    free = blended_latents(backbone, context, good, masks, sample_generators(2, [0, 1, 2]), blend="none", **options)
    end = blended_latents(backbone, context, good, masks, sample_generators(2, [0, 1, 2]), blend="end", **options)
    step = blended_latents(backbone, context, good, masks, sample_generators(2, [0, 1, 2]), blend="step", **options)
    assert torch.equal(end * (1 - m), known * (1 - m))  # fused once: the good latent outside the mask
    assert torch.equal(end * m, free * m)  # inside: the freely sampled latent, untouched
    assert (free - known).mul(1 - m).abs().max() > 0.1  # free sampling ignores the good image
    assert torch.equal(step * (1 - m), known * (1 - m)) and (step - end).mul(m).abs().max() > 1e-3  # blended every step
    with pytest.raises(ValueError, match="blend"):
        blended_latents(backbone, context, good, masks, sample_generators(2, [0, 1, 2]), blend="sometimes", **options)


def test_to_tensor_takes_images_of_mixed_sizes():
    a = np.full((20, 30, 3), 255, np.uint8)
    b = np.zeros((36, 24, 3), np.uint8)
    batch = to_tensor([a, b], (16, 16))
    assert batch.shape == (2, 3, 16, 16) and torch.allclose(batch[0], torch.ones(3, 16, 16)) and batch[1].abs().max() == 0
    assert torch.equal(to_tensor([a]), torch.ones(1, 3, 20, 30))


def test_the_loop_is_ddim_with_cfg_eta_noise_and_blending_at_the_next_timestep(setup):
    """The sampling loop against a written-out reference, with a stub ε that tells the unconditional
    rows (context 0) from the conditional ones (context 1): ε = ε_u + g·(ε_c − ε_u); DDIM's variance
    noise (η = 1) and the blending noise are drawn from the sample's generator, in that order, and
    outside the mask the latent is the good latent noised to the *next* timestep (the good latent
    itself after the last step)."""
    from anomalygen.diffusion.sampling import make_scheduler

    backbone = setup[0]
    shape, steps, g = (1, 4, 8, 8), 4, 3.0
    eps_u, eps_c, known = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5)).unbind(0)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1

    def mixing(x):  # as a UNet, the latents outside the mask reach the prediction inside it
        return 0.5 * x.mean(dim=(2, 3), keepdim=True)

    def denoiser(x, t, context):  # ε_c where the context is 1, ε_u where it is 0
        cond = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return cond * eps_c + (1 - cond) * eps_u + mixing(x)

    latents = sample_latents(backbone, torch.ones(1, 77, 32), sample_generators(3, [0]), latent_size=(8, 8),
                             num_inference_steps=steps, eta=1.0, guidance_scale=g, uncond_hidden_states=torch.zeros(1, 77, 32),
                             known_latents=known, mask=mask, denoiser=denoiser)
    scheduler = make_scheduler(backbone.scheduler_config, "ddim")
    scheduler.set_timesteps(steps)
    generator = sample_generators(3, [0])[0]
    x = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(eps_u + g * (eps_c - eps_u) + mixing(x), t, x, eta=1.0,
                           variance_noise=torch.randn(shape, generator=generator)).prev_sample
        background = known if i + 1 == steps else scheduler.add_noise(
            known, torch.randn(shape, generator=generator), scheduler.timesteps[i + 1 : i + 2])
        x = mask * x + (1 - mask) * background
    assert torch.allclose(latents, x, atol=1e-5)


def test_a_latent_pixel_is_editable_if_any_of_its_pixels_is_and_decoding_undoes_the_latent_scale(setup):
    masks = torch.zeros(1, 1, 32, 32)
    masks[0, 0, 9, 20] = 1  # one pixel
    latent = latent_mask(masks, (16, 16))
    assert latent.sum() == 1 and latent[0, 0, 4, 10] == 1
    backbone = setup[0]
    images = to_tensor(setup[2], (32, 32))
    with torch.no_grad():
        latents = encode_images(backbone, images)
        direct = backbone.vae.decode(backbone.vae.encode(images * 2 - 1).latent_dist.mean).sample
    assert backbone.vae.config.scaling_factor != 1
    assert torch.allclose(decode_latents(backbone, latents), ((direct + 1) / 2).clamp(0, 1), atol=1e-5)
