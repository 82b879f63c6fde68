"""Configs of the components a prior is trained with: Stable Diffusion's shapes, scaled down.

The autoencoder is an ``AutoencoderKL`` with 4 latent channels that downsamples 4x at <= 128 px
and 8x above (Rombach et al. 2022 found f4-f8 the best trade-off); the UNet is a
``UNet2DConditionModel`` with cross-attention on a ``CLIPTextModel`` over a locally built BPE
vocabulary (``tiny.write_tokenizer_files``, one token per word). Presets: ``tiny`` (tests),
``small`` (CPU, minutes to an hour), ``base`` (GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer

from anomalygen.diffusion.tiny import SCALED_LINEAR_SCHEDULE, write_tokenizer_files


@dataclass(frozen=True)
class Preset:
    vae_channels: tuple[int, ...]  # 4 levels; an f4 autoencoder uses the first 3
    vae_layers: int
    vae_attention: bool
    unet_channels: tuple[int, ...]
    unet_layers: int
    unet_heads: int
    text_dim: int
    text_layers: int
    text_heads: int
    groups: int


PRESETS = {
    "tiny": Preset((8, 16, 16, 16), 1, False, (16, 32), 1, 2, 32, 2, 4, 8),
    "small": Preset((32, 64, 128, 128), 1, True, (64, 128, 256), 1, 4, 256, 4, 4, 32),
    "base": Preset((128, 256, 512, 512), 2, True, (192, 384, 768), 2, 8, 512, 6, 8, 32),
}


def vae_factor(resolution: int) -> int:
    """Pixels per latent pixel: 4 at <= 128 px, 8 above."""
    return 4 if resolution <= 128 else 8


def component_configs(preset: Preset, resolution: int, tokenizer: CLIPTokenizer,
                      vae_attention: bool | None = None) -> dict[str, dict[str, Any]]:
    """``vae``, ``unet``, ``text_encoder`` and ``scheduler`` configs (as the diffusers folder's files hold them);
    ``vae_attention`` overrides the preset's mid-block attention in the autoencoder."""
    levels = {4: 3, 8: 4}[vae_factor(resolution)]
    vae_channels = list(preset.vae_channels[:levels])
    levels = len(preset.unet_channels)
    down = ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1)
    return {
        "vae": {
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": vae_channels,
            "down_block_types": ["DownEncoderBlock2D"] * len(vae_channels), "up_block_types": ["UpDecoderBlock2D"] * len(vae_channels),
            "layers_per_block": preset.vae_layers, "norm_num_groups": preset.groups, "sample_size": resolution,
            "mid_block_add_attention": preset.vae_attention if vae_attention is None else vae_attention,
        },
        "unet": {
            "sample_size": resolution // vae_factor(resolution), "in_channels": 4, "out_channels": 4,
            "block_out_channels": list(preset.unet_channels), "layers_per_block": preset.unet_layers,
            "down_block_types": down, "up_block_types": up, "cross_attention_dim": preset.text_dim,
            "attention_head_dim": preset.unet_heads, "norm_num_groups": preset.groups,
        },
        "text_encoder": {
            "vocab_size": len(tokenizer.get_vocab()), "hidden_size": preset.text_dim, "intermediate_size": 4 * preset.text_dim,
            "num_hidden_layers": preset.text_layers, "num_attention_heads": preset.text_heads, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "scheduler": dict(SCALED_LINEAR_SCHEDULE),
    }


def build_tokenizer(folder: Path, words: list[str]) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary holds each of ``words`` as one token (77 positions, like SD's)."""
    write_tokenizer_files(folder, words, single_tokens=True)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
