"""The CLIP image encoder (``CLIPVisionModelWithProjection``), loaded like the other components.

``load_image_encoder(source, model=, device=, dtype=)``: ``source`` is a hub id, a local folder
(the encoder itself, or a diffusers folder holding ``image_encoder/``) or ``"tiny"`` (a small
random one, ``tiny.tiny_image_encoder_config``); ``None`` takes the base model's
``image_encoder/`` when its folder has one, ``tiny`` for the tiny model, else
``DEFAULT_IMAGE_ENCODER`` (CLIP ViT-L/14, whose 768-d projection matches SD 1.x's text width).
Frozen, eval mode. ``image_embeds(encoder, images)``: (B, 3, H, W) in [0, 1] -> the projected
(pooled) image embeddings (B, P), preprocessed as ``CLIPImageProcessor`` does (resize to the
encoder's size, CLIP mean / std), in torch.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from anomalygen.devices import resolve_device
from anomalygen.diffusion.backbone import TINY, resolve_dtype
from anomalygen.errors import ModelNotFoundError, first_problem
from anomalygen.weights import refused_pickle

DEFAULT_IMAGE_ENCODER = "openai/clip-vit-large-patch14"
SUBFOLDER = "image_encoder"


def _not_found(source: str, reason: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"image encoder {source!r} could not be loaded ({reason}). Download a CLIP vision model once where there is "
        f"network: `huggingface-cli download {DEFAULT_IMAGE_ENCODER} --local-dir DIR`, then pass it as "
        f"the option image_encoder=DIR (or put it in the model folder as {SUBFOLDER}/); `tiny` builds an untrained test one")


def default_source(model: str | None) -> str:
    """The image encoder used with base model ``model`` when none is given."""
    if model == TINY:
        return TINY
    if model and (Path(model).expanduser() / SUBFOLDER).is_dir():
        return str(Path(model).expanduser())
    return DEFAULT_IMAGE_ENCODER


def build_image_encoder(config: dict, seed: int = 0) -> CLIPVisionModelWithProjection:
    """A randomly initialised encoder from a config dict (as ``image_encoder/config.json`` holds it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(config))


def load_image_encoder(source: str | None, *, model: str | None = None, device: str | torch.device | None = None,
                       dtype: str | torch.dtype = "fp32", seed: int = 0) -> CLIPVisionModelWithProjection:
    """The frozen CLIP image encoder named by ``source`` (see the module docstring)."""
    source = source or default_source(model)
    if source == TINY:
        from anomalygen.diffusion.tiny import tiny_image_encoder_config

        encoder = build_image_encoder(tiny_image_encoder_config(), seed)
    else:
        local = Path(source).expanduser()
        looks_local = local.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
        if looks_local and not local.is_dir():
            raise ModelNotFoundError(f"{local}: not a CLIP image encoder folder (no such folder)")
        where = str(local) if looks_local else source
        subfolders = [SUBFOLDER] if looks_local and (local / SUBFOLDER).is_dir() else ([""] if looks_local else ["", SUBFOLDER])
        errors = []
        for subfolder in subfolders:
            try:
                encoder = CLIPVisionModelWithProjection.from_pretrained(where, subfolder=subfolder)
                break
            except (OSError, ValueError, pickle.UnpicklingError) as error:  # huggingface_hub's offline/missing errors are OSErrors
                refusal = refused_pickle(error, local) if looks_local else None
                if refusal is not None:  # a pickle weights file with code in it: refused, not missing
                    raise refusal from None
                errors.append(first_problem(error))
        else:
            raise _not_found(source, errors[0])
    return encoder.requires_grad_(False).eval().to(resolve_device(str(device) if device is not None else None),
                                                   resolve_dtype(dtype))


def image_embeds(encoder: CLIPVisionModelWithProjection, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, P) projected CLIP image embeddings (no gradient)."""
    size = encoder.config.image_size
    pixels = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    pixels = ((pixels.clamp(0, 1) - mean) / std).to(encoder.device, encoder.dtype)
    with torch.no_grad():
        return encoder(pixel_values=pixels).image_embeds.float()


def load_text_encoder(source: str, *, device: str | torch.device | None = None):
    """A frozen CLIP text model and its tokenizer for a caption's pooled embedding: ``"tiny"`` (the
    tiny base model's), a hub id or a folder holding them (or their ``text_encoder/`` and
    ``tokenizer/``, a Stable Diffusion folder). Returns (model, tokenizer)."""
    if source == TINY:
        from anomalygen.diffusion.backbone import load_backbone

        backbone = load_backbone(TINY, device="cpu")
        model, tokenizer = backbone.text_encoder, backbone.tokenizer
    else:
        local = Path(source).expanduser()
        nested = local.is_dir() and (local / "text_encoder").is_dir()
        try:
            model = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder" if nested else "")
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer" if nested else "")
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(f"semantic encoder {source!r} could not be loaded ({str(error).splitlines()[0]}); "
                                     "give a CLIP text model folder (e.g. openai/clip-vit-base-patch32, downloaded once)") from None
    return model.requires_grad_(False).eval().to(resolve_device(str(device) if device is not None else None)), tokenizer
