"""Latent sampling: DDIM / DPM-Solver++ / PNDM (diffusers schedulers), CFG, blended latent diffusion.

Blended latent diffusion (Avrahami, Fried & Lischinski, "Blended Latent Diffusion", SIGGRAPH
2023, Alg. 1): after every denoising step the latent keeps the model's values inside the mask and
takes the known image's latent noised to the new timestep outside it,
``z ← m ⊙ z + (1 − m) ⊙ q(z_known, t)``; at the last step the known latent is used clean.
Classifier-free guidance (Ho & Salimans 2022, Eq. 6): ``ε = ε_u + s·(ε_c − ε_u)``.

Every random draw of sample ``i`` comes from its own ``torch.Generator`` (``sample_generators``), so
sample ``i`` is the same whatever the batch it is drawn in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, VQModel
from diffusers.utils.torch_utils import randn_tensor

from anomalygen.diffusion.backbone import Backbone
from anomalygen.diffusion.fast import prepare_for_sampling, report_compile
from anomalygen.seeding import sample_rng

SAMPLERS = ("ddim", "dpm++", "pndm")

# The noise predictor the sampler calls: (model input, timestep, context) -> ε, one row per input row.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Per-step conditioning: timestep -> the conditional rows' encoder_hidden_states for that step.
Conditioning = Callable[[torch.Tensor], torch.Tensor]


def make_scheduler(scheduler_config: dict, sampler: str = "ddim"):
    """A fresh diffusers scheduler: ``"ddim"`` (Song et al. 2021), ``"dpm++"`` (Lu et al. 2022,
    2nd order) or ``"pndm"`` (Liu et al. 2022, PLMS steps only, as Stable Diffusion's pipelines)."""
    if sampler == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++", solver_order=2)
    if sampler == "pndm":
        return PNDMScheduler.from_config(scheduler_config, skip_prk_steps=True)
    raise ValueError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")


def sample_generators(seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One torch generator per global sample index, seeded from ``sample_rng(seed, i)``."""
    return [
        torch.Generator(device=device).manual_seed(int(sample_rng(seed, int(i)).integers(0, 2**63 - 1))) for i in indices
    ]


@dataclass
class StepState:
    """What a per-step callback sees and may change (the sampler reads the fields back)."""

    index: int
    timestep: torch.Tensor  # on the host: int(state.timestep) costs no device sync
    latents: torch.Tensor
    encoder_hidden_states: torch.Tensor
    known_latents: torch.Tensor | None
    mask: torch.Tensor | None  # (B, 1, h, w) at latent resolution, 1 = generate
    cond_rows: slice  # the rows of the UNet batch that hold the conditional samples: slice(B, 2B) under CFG


def _scale(images: torch.Tensor) -> torch.Tensor:
    return images * 2 - 1


def _posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(vae, VQModel):  # the encoder's output before quantisation (LDM's encode_first_stage)
        latents = vae.encode(images).latents
        return latents, torch.zeros_like(latents)
    posterior = vae.encode(images).latent_dist
    return posterior.mean, posterior.std


@torch.no_grad()
def encode_posterior(backbone: Backbone, images: torch.Tensor, chunk_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) in [0, 1] -> the scaled latent posterior's mean and std (KL autoencoder; a VQ
    encoder's output before quantisation with std 0): a latent sample is ``mean + std·ε``."""
    vae = backbone.vae
    parts = [_posterior(vae, _scale(chunk).to(backbone.device, vae.dtype)) for chunk in images.split(chunk_size)]
    scale = vae.config.scaling_factor
    return torch.cat([m for m, _ in parts]).float() * scale, torch.cat([s for _, s in parts]).float() * scale


def encode_images(backbone: Backbone, images: torch.Tensor, chunk_size: int = 16) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> scaled latents (KL: the posterior mean; VQ: before quantisation)."""
    return encode_posterior(backbone, images, chunk_size)[0]


@torch.no_grad()
def decode_latents(backbone: Backbone, latents: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
    """Scaled latents -> (B, 3, H, W) images in [0, 1], decoded ``chunk_size`` at a time.

    Latents are divided by the scaling factor; a VQModel quantises them to its codebook in
    ``decode``, as diffusers' LDM pipeline does."""
    vae = backbone.vae
    parts = [
        vae.decode(chunk.to(backbone.device, vae.dtype) / vae.config.scaling_factor).sample.float()
        for chunk in latents.split(chunk_size)
    ]
    return ((torch.cat(parts) + 1) / 2).clamp(0, 1)


def latent_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) pixel masks -> (B, 1, h, w) latent masks: a latent pixel is editable if any of its pixels is."""
    return (F.adaptive_max_pool2d(masks.float(), size) > 0.5).float()


def _noise(shape, generators: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    """Gaussian noise drawn per sample on the CPU (the same numbers at any batch size and on any
    device), sent to ``device`` from pinned memory without waiting for the device's queued work."""
    noise = randn_tensor(shape, generator=list(generators), device=torch.device("cpu"))
    if device.type != "cuda":
        return noise.to(device)
    return noise.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def sample_latents(
    backbone: Backbone,
    encoder_hidden_states: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    latent_size: tuple[int, int],
    sampler: str = "ddim",
    num_inference_steps: int = 50,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    uncond_hidden_states: torch.Tensor | None = None,
    known_latents: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    callback: Callable[[StepState], None] | None = None,
    denoiser: Denoiser | None = None,
    conditioning: Conditioning | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Denoise from per-sample Gaussian noise; blended with ``known_latents`` outside ``mask`` if given.

    ``mask`` is (B, 1, h, w) at latent resolution (1 = generate). With ``guidance_scale > 1`` the
    UNet sees ``[uncond; cond]`` (``StepState.cond_rows`` says which rows are conditional, e.g. for
    an attention hook that must change those only). ``callback(state)`` runs before each UNet call
    and may change the latents, the conditioning or attention hooks' state. ``conditioning(t)``
    is the documented way to condition on the timestep: it returns the conditional rows'
    ``encoder_hidden_states`` for step ``t`` (same batch; any number of tokens, the same at every
    step; ``uncond_hidden_states`` must have that many too), called before ``callback``;
    ``encoder_hidden_states`` then only gives the batch. ``denoiser(model_in,
    t, context) -> ε`` replaces the plain UNet call (default ``backbone.unet``), e.g. to run extra
    rows or inputs alongside the sampled ones; it gets the CFG-stacked batch and returns ε for it.
    """
    prepare_for_sampling(backbone)
    device, dtype = backbone.device, backbone.unet.dtype
    denoiser = denoiser or (lambda x, t, context: backbone.unet(x, t, encoder_hidden_states=context).sample)
    batch = encoder_hidden_states.shape[0]
    if len(generators) != batch:
        raise ValueError(f"{len(generators)} generators for a batch of {batch}")
    scheduler = make_scheduler(backbone.scheduler_config, sampler)
    # the scheduler steps on host timesteps (diffusers keeps its tables there) and the UNet gets a copy
    # made once on the device: no host-device sync per step (indexing a host table with a device
    # timestep, or copying a host one to the device, waits for the queued UNet work)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    timesteps = scheduler.timesteps
    device_timesteps = timesteps.to(device)
    shape = (batch, backbone.latent_channels, *latent_size)
    latents = _noise(shape, generators, device) * scheduler.init_noise_sigma
    blending = known_latents is not None and mask is not None
    if blending:
        known_latents, mask = known_latents.to(device), mask.to(device)
    guided = guidance_scale > 1.0
    iterator = range(len(timesteps))
    if progress:
        from anomalygen.progress import bar_iter

        iterator = bar_iter(iterator, len(timesteps), f"{sampler} sampling")
    for i in iterator:
        t, unet_t = timesteps[i], device_timesteps[i]
        if conditioning is not None:
            encoder_hidden_states = conditioning(unet_t)
        state = StepState(i, t, latents, encoder_hidden_states, known_latents, mask,
                          slice(batch, 2 * batch) if guided else slice(0, batch))
        if callback is not None:
            callback(state)
        latents, encoder_hidden_states = state.latents, state.encoder_hidden_states
        model_in = scheduler.scale_model_input(latents, t)
        context = encoder_hidden_states
        if guided:
            model_in = torch.cat([model_in, model_in])
            context = torch.cat([uncond_hidden_states.expand_as(encoder_hidden_states), encoder_hidden_states])
        noise_pred = denoiser(model_in.to(dtype), unet_t, context.to(device, dtype)).float()
        report_compile(backbone)
        if guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (cond - uncond)
        if sampler == "ddim" and eta > 0:
            # diffusers draws the DDIM variance noise on the latents' device; draw it on CPU per sample
            noise = _noise(latents.shape, generators, device)
            latents = scheduler.step(noise_pred, t, latents, eta=eta, variance_noise=noise).prev_sample
        else:
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        if blending:
            if i + 1 < len(timesteps):
                noise = _noise(latents.shape, generators, device)
                background = scheduler.add_noise(known_latents, noise, device_timesteps[i + 1 : i + 2])
            else:
                background = known_latents
            latents = mask * latents + (1 - mask) * background
    return latents


def to_tensor(images: Sequence[np.ndarray], size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 (H, W, 3) images, of any sizes when ``size`` is given -> (B, 3, H, W) float in [0, 1],
    each bilinearly resized (antialiased) to ``size``."""
    tensors = [torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255 for im in images]
    if size is not None:
        tensors = [t if tuple(t.shape[-2:]) == tuple(size) else
                   F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False) for t in tensors]
    return torch.cat(tensors)


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [0, 1] -> list of uint8 (H, W, 3)."""
    return list((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def paste(generated: np.ndarray, good: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Final paste: generated pixels inside ``mask``, the good image's pixels everywhere else."""
    return np.where(mask[..., None], generated, good)


BLENDS = ("step", "end", "none")


def blended_latents(
    backbone: Backbone,
    encoder_hidden_states: torch.Tensor,
    good: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    generators: Sequence[torch.Generator],
    *,
    resolution: int,
    blend: str = "step",
    **sampling,
) -> torch.Tensor:
    """Latents of generation inside each mask on its good image, at ``resolution``, before decoding.

    ``blend``: ``"step"`` blends with the good image's noised latent after every step (blended
    latent diffusion); ``"end"`` samples freely and fuses once at the end, ``z = m·z_g + (1 − m)·z_good``
    (outside the latent mask exactly the good image's latent); ``"none"`` samples freely.
    ``sampling`` goes to ``sample_latents``."""
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    size = (resolution, resolution)
    factor = backbone.vae_scale_factor
    latent_size = (resolution // factor, resolution // factor)
    known = encode_images(backbone, to_tensor(good, size))
    mask_t = torch.cat([F.interpolate(torch.from_numpy(np.asarray(m, dtype=bool))[None, None].float(), size=size, mode="nearest")
                        for m in masks])
    mask_t = latent_mask(mask_t, latent_size).to(known.device)
    stepwise = dict(known_latents=known, mask=mask_t) if blend == "step" else {}
    latents = sample_latents(backbone, encoder_hidden_states, generators, latent_size=latent_size, **stepwise, **sampling)
    if blend == "end":
        latents = mask_t * latents + (1 - mask_t) * known
    return latents


def blended_generate(
    backbone: Backbone,
    encoder_hidden_states: torch.Tensor,
    good: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    generators: Sequence[torch.Generator],
    *,
    resolution: int,
    final_paste: bool = True,
    decode_chunk: int = 8,
    **sampling,
) -> list[np.ndarray]:
    """Generate inside each mask on its good image (``blended_latents``, ``blend="step"`` by
    default), at ``resolution``, decoded.

    Returns uint8 images at each good image's own size; with ``final_paste`` the pixels outside
    the mask are exactly the good image's. ``sampling`` goes to ``blended_latents``.
    """
    latents = blended_latents(backbone, encoder_hidden_states, good, masks, generators, resolution=resolution, **sampling)
    images = decode_latents(backbone, latents, decode_chunk)
    out = []
    for image, original, mask in zip(images, good, masks):
        h, w = original.shape[:2]
        resized = to_uint8(F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False))[0]
        out.append(paste(resized, original, np.asarray(mask, dtype=bool)) if final_paste else resized)
    return out
