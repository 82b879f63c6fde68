"""The fast sampling path on CUDA, in one place: every ``sample_latents`` call goes through it.

- ``prepare_for_sampling`` (once per backbone): TF32 matmuls, cuDNN autotuning, and, when
  ``backbone.compile`` (``pipeline.generate``'s ``compile``), a channels_last UNet and VAE and ``torch.compile`` of the UNet:
  its compile time is printed once, with the first step. bf16 weights come from the methods'
  ``mixed_precision=auto``; attention is PyTorch's SDPA (``diffusion.attention``). On the CPU it
  changes nothing.
- ``sampling_batch``: the batch a method samples in. A number given by the user is kept; ``0``
  (auto) is the method's CPU default on the CPU and, on CUDA, as many samples as 70 % of the
  device's memory left after the weights holds, from the measured peak of one UNet call (total
  memory, not free memory, so that a re-run on the same machine picks the same batch).
"""

from __future__ import annotations

import sys
import time

import torch

from anomalygen.diffusion.backbone import Backbone

MAX_BATCH = 64
MEMORY_SHARE = 0.7


def prepare_for_sampling(backbone: Backbone) -> None:
    """Make ``backbone`` fast to sample with on CUDA (idempotent); see the module docstring."""
    if backbone.device.type != "cuda" or backbone.prepared:
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    if backbone.compile:  # channels_last pays under compile only (eager: 8 % slower on an H100, RESULTS.md)
        backbone.unet.to(memory_format=torch.channels_last)
        backbone.vae.to(memory_format=torch.channels_last)
        backbone.unet.compile()  # in place: hooks and attention processors stay reachable
        backbone.compile_started = time.perf_counter()
    backbone.prepared = True


def report_compile(backbone: Backbone) -> None:
    """After the first UNet call of a compiled backbone: say once how long compiling took."""
    if backbone.compile_started is not None:
        seconds = time.perf_counter() - backbone.compile_started
        backbone.compile_started = None
        print(f"torch.compile: the UNet's first step (compilation included) took {seconds:.0f} s", file=sys.stderr)


def batch_from_memory(total: int, weights: int, per_sample: int, cap: int = MAX_BATCH) -> int:
    """How many samples of ``per_sample`` bytes fit in ``MEMORY_SHARE`` of ``total`` after ``weights``."""
    return max(1, min(cap, int((MEMORY_SHARE * total - weights) // max(per_sample, 1))))


@torch.no_grad()
def sampling_batch(backbone: Backbone, requested: int, cpu_default: int, resolution: int,
                   rows_per_sample: float = 1.0, context_length: int = 77) -> int:
    """``requested`` if > 0; else ``cpu_default`` off CUDA, or the batch that fits (module docstring):
    ``rows_per_sample`` UNet rows per sample (2 with CFG, more for methods that run extra rows)."""
    if requested > 0:
        return requested
    if backbone.device.type != "cuda":
        return cpu_default
    prepare_for_sampling(backbone)
    device, dtype = backbone.device, backbone.unet.dtype
    probe = 2
    side = resolution // backbone.vae_scale_factor
    latents = torch.zeros(probe, backbone.latent_channels, side, side, device=device, dtype=dtype)
    context = torch.zeros(probe, context_length, backbone.unet.config.cross_attention_dim, device=device, dtype=dtype)
    torch.cuda.synchronize(device)
    weights = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    # .forward: the eager module, so that a compiled UNet is not compiled for the probe's shape too
    backbone.unet.forward(latents, torch.tensor([999] * probe, device=device), encoder_hidden_states=context)
    per_row = (torch.cuda.max_memory_allocated(device) - weights) / probe
    total = torch.cuda.get_device_properties(device).total_memory
    return batch_from_memory(total, weights, int(per_row * rows_per_sample))
