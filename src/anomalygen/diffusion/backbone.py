"""Stable-Diffusion-style components: load from a hub id, a local diffusers folder, or ``tiny``.

``load_backbone`` returns the UNet, VAE, CLIP text encoder + tokenizer and the noise-schedule
config, frozen, on one device, in one dtype, with PyTorch's SDPA attention (diffusers' default).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from anomalygen.errors import ModelNotFoundError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
MODEL_ENV = "ANOMALYGEN_MODEL"
TINY = "tiny"
DTYPES = {"fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_model() -> str:
    """The model used when none is given: ``$ANOMALYGEN_MODEL``, else Stable Diffusion 1.5."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (or ``"no"``, accelerate's word for fp32) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Backbone:
    """The frozen components every diffusion method shares."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    @property
    def untrained(self) -> bool:
        """True for the ``tiny`` preset: random weights, outputs are noise."""
        return self.name == TINY

    @property
    def label(self) -> str:
        """The model name as shown in outputs (``tiny`` says it is untrained)."""
        return "tiny (random init, UNTRAINED)" if self.untrained else self.name

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (8 for Stable Diffusion, 2 for ``tiny``)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    def noise_scheduler(self) -> DDIMScheduler:
        """A scheduler over the training noise schedule (``add_noise`` for losses and blending)."""
        return DDIMScheduler.from_config(self.scheduler_config)


def _not_found(model: str, reason: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {model!r} could not be loaded ({reason}). Download it once where there is network: "
        f"`huggingface-cli download {model} --local-dir DIR` (or `hf download {model} --local-dir DIR`), "
        f"then point anomalygen at the copy with `--model DIR` or `export {MODEL_ENV}=DIR`; "
        f"`--model {TINY}` runs an untrained test model without any download"
    )


def load_backbone(
    model: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "fp32",
    seed: int = 0,
) -> Backbone:
    """Load a diffusers-format Stable Diffusion model (hub id or local folder) or the ``tiny`` preset.

    Raises ``ModelNotFoundError`` naming what to download and how to point anomalygen at it when
    the weights are neither cached nor reachable.
    """
    model = model or default_model()
    device = resolve_device(str(device) if device is not None else None)
    torch_dtype = resolve_dtype(dtype)
    if model == TINY:
        from anomalygen.diffusion.tiny import tiny_components

        parts = tiny_components(seed)
    else:
        local = Path(model).expanduser()
        looks_local = local.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
        if looks_local and not (local / "model_index.json").is_file() and not (local / "unet").is_dir():
            raise ModelNotFoundError(f"{local}: not a diffusers model folder (no model_index.json / unet/)")
        source = str(local) if looks_local else model
        try:
            parts = {
                "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=torch_dtype),
                "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype),
                "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=torch_dtype),
                "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
                "scheduler_config": dict(DDIMScheduler.load_config(source, subfolder="scheduler")),
            }
        except (OSError, ValueError) as error:  # huggingface_hub's offline/missing errors are OSErrors
            raise _not_found(model, str(error).splitlines()[0] if str(error) else type(error).__name__) from error
    for name in ("unet", "vae", "text_encoder"):
        module = parts[name].requires_grad_(False).eval().to(device)
        if module.dtype != torch_dtype:
            module.to(torch_dtype)
    return Backbone(**parts, name=model, device=device, dtype=torch_dtype)
