"""Stage 1 of CAGen (Jiang et al., ICASSP 2024, §2.1, Eq. 1): ε_θ(z_t, t, c_p, c_m), the frozen UNet
steered by a ControlNet (Zhang et al. 2023) that reads the binary mask c_m at pixel resolution; the
prompt c_p enters both through cross-attention."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel


def build_controlnet(unet: torch.nn.Module, vae_scale_factor: int) -> ControlNetModel:
    """A ControlNet initialised from ``unet`` (``from_unet``: encoder weights copied, zero
    convolutions), its mask encoder downsampling by the autoencoder's factor (SD: 8, as diffusers'
    default (16, 32, 96, 256))."""
    widths = (16, 32, 96, 256)[: int(math.log2(vae_scale_factor)) + 1]
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths).float()


def control_image(masks: list[np.ndarray], size: int) -> torch.Tensor:
    """Binary masks of any sizes -> (B, 3, size, size) control images in {0, 1} (each resized nearest, 3 channels)."""
    batch = torch.cat([F.interpolate(torch.from_numpy(np.asarray(m, np.float32))[None, None], size=(size, size), mode="nearest")
                       for m in masks])
    return batch.expand(-1, 3, -1, -1).contiguous()


def controlled_eps(unet, controlnet, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                   control: torch.Tensor) -> torch.Tensor:
    """Eq. 1: the UNet's ε with the ControlNet's down / mid residuals added. ``control`` is tiled
    over a batch that stacks copies (classifier-free guidance's [uncond; cond])."""
    control = control.repeat(latents.shape[0] // control.shape[0], 1, 1, 1).to(latents.device, latents.dtype)
    down, mid = controlnet(latents, timesteps, encoder_hidden_states=context, controlnet_cond=control, return_dict=False)
    return unet(latents, timesteps, encoder_hidden_states=context, down_block_additional_residuals=[d.to(latents.dtype) for d in down],
                mid_block_additional_residual=mid.to(latents.dtype)).sample
