"""The ``tiny`` preset: configs of small SD-style components for tests and smoke runs (``build_backbone``).

Nothing is downloaded. The CLIP BPE tokenizer is built locally: a vocabulary made of the
byte-level alphabet (as in CLIP/GPT-2), the merges that spell a few hundred words used in
prompts, and CLIP's start/end tokens. Output made with this preset is untrained noise and is
labelled so (``Backbone.untrained``).
"""

from __future__ import annotations

import json
import re
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

TINY_WORDS = (
    "a an the of with and in on photo picture image close up view vfx sks defect defective anomaly "
    "anomalous damaged damage broken break crack cracked scratch scratched hole holes stain spot dirt "
    "dent bent cut fray frayed glue contamination metal thread color colour print poke squeeze "
    "blowhole uneven rough missing misplaced surface texture object tile magnetic hazelnut grid "
    "carpet leather wood bottle cable capsule pill screw toothbrush transistor zipper metal_nut "
    "good normal industrial product background foreground mask white black small large one two"
).split()
TINY_SIZES = {"text_dim": 32, "text_layers": 2, "text_heads": 4, "unet_channels": (32, 64), "vae_channels": (32, 64)}
SCALED_LINEAR_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's / GPT-2's reversible byte -> printable unicode map (Radford et al. 2019)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_tokenizer_files(directory: Path, words: tuple[str, ...] | list[str] = TINY_WORDS, *,
                          single_tokens: bool = False) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a small CLIP BPE tokenizer into ``directory``.

    Every word is spelled by left-to-right merges ending in the end-of-word marker ``</w>``;
    any other text still tokenizes, character by character, through the byte alphabet. A word's
    merges can be pre-empted by an earlier word's (BPE applies the lowest-ranked merge first), so
    it may come out as a few pieces; with ``single_tokens`` merges joining those pieces are added
    until each word is one token (words in lower case, as CLIP's pre-tokenizer cuts text: ``clip_words``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    byte_chars = _bytes_to_unicode()
    alphabet = list(byte_chars.values())
    vocab: list[str] = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    known, rules = set(vocab), set()

    def join(symbols: list[str]) -> None:
        while len(symbols) > 1:
            merged, rule = symbols[0] + symbols[1], f"{symbols[0]} {symbols[1]}"
            if merged not in known:
                known.add(merged)
                vocab.append(merged)
            if rule not in rules:
                rules.add(rule)
                merges.append(rule)
            symbols = [merged] + symbols[2:]

    def write() -> Path:
        specials = ["<|startoftext|>", "<|endoftext|>"]
        (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab + specials)}))
        (directory / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
        return directory

    words = list(dict.fromkeys(words))
    spelled = ["".join(byte_chars[b] for b in word.encode("utf-8")) for word in words]
    for word in spelled:
        join(list(word[:-1]) + [word[-1] + "</w>"])
    if not single_tokens:
        return write()
    while True:  # each pass makes every split word one token; merges added last never split another word
        write()
        tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
        pieces = [tokenizer.tokenize(word) for word in words]
        # a word CLIP's pre-tokenizer cuts ("metal_nut") cannot be one token: it is left as it is
        split = [p for p, word in zip(pieces, spelled) if len(p) > 1 and "".join(p) == word + "</w>"]
        if not split:
            return directory
        for parts in split:
            join(parts)


def clip_words(text: str) -> list[str]:
    """``text`` as CLIP's tokenizer cuts it into words before BPE: lower case, letter runs, single
    digits and punctuation runs (``"metal_nut"`` -> ``metal``, ``_``, ``nut``)."""
    return re.findall(r"[^\W\d_]+|\d|[^\s\w]+|_+", " ".join(text.lower().split()))


@lru_cache(maxsize=1)
def _tokenizer_files() -> dict[str, bytes]:
    """``vocab.json`` and ``merges.txt`` of the tiny tokenizer (built once per process)."""
    with tempfile.TemporaryDirectory(prefix="anomalygen-tiny-tokenizer-") as directory:
        write_tokenizer_files(Path(directory))
        return {name: (Path(directory) / name).read_bytes() for name in ("vocab.json", "merges.txt")}


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over the locally written tiny vocabulary (77 tokens, like SD's); its files
    live in a temporary folder only while it is read (it keeps them in memory)."""
    with tempfile.TemporaryDirectory(prefix="anomalygen-tiny-tokenizer-") as directory:
        for name, data in _tokenizer_files().items():
            (Path(directory) / name).write_bytes(data)
        return CLIPTokenizer(str(Path(directory) / "vocab.json"), str(Path(directory) / "merges.txt"), model_max_length=77)


def tiny_image_encoder_config() -> dict:
    """A small CLIP vision encoder (32 px, 8 px patches) projecting to the tiny text width (32)."""
    dim = TINY_SIZES["text_dim"]
    return {"hidden_size": dim, "intermediate_size": 2 * dim, "num_hidden_layers": TINY_SIZES["text_layers"],
            "num_attention_heads": TINY_SIZES["text_heads"], "image_size": 32, "patch_size": 8, "projection_dim": dim}


def tiny_configs(tokenizer: CLIPTokenizer) -> dict[str, dict]:
    """Configs of a small UNet, VAE (4 latent channels, downsampling 2, no attention) and CLIP text encoder."""
    dim = TINY_SIZES["text_dim"]
    unet_channels, vae_channels = TINY_SIZES["unet_channels"], TINY_SIZES["vae_channels"]
    return {
        "text_encoder": {
            "architectures": ["CLIPTextModel"], "vocab_size": len(tokenizer.get_vocab()), "hidden_size": dim,
            "intermediate_size": 2 * dim, "num_hidden_layers": TINY_SIZES["text_layers"],
            "num_attention_heads": TINY_SIZES["text_heads"], "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        },
        "unet": {
            "sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": unet_channels, "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": dim, "attention_head_dim": 8, "norm_num_groups": 8,
        },
        "vae": {
            "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * len(vae_channels), "up_block_types": ("UpDecoderBlock2D",) * len(vae_channels),
            "block_out_channels": vae_channels, "latent_channels": 4, "norm_num_groups": 8, "sample_size": 32,
            "mid_block_add_attention": False,  # convolutions only: the decoder is local, so blending is testable
        },
        "scheduler": dict(SCALED_LINEAR_SCHEDULE),
    }
