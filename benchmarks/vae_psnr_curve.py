"""The PSNR of a ``pretrain`` run's autoencoder at each of its checkpoints, on the held-back images
(and recoloured), as ``pretrain.json`` reports it for the last one.

    PYTHONPATH=src python benchmarks/vae_psnr_curve.py PRIOR [--every N]

A constant learning rate makes the last checkpoint's figure noisy (±1 dB between checkpoints at
128 px on the CPU); the curve shows the trend.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTokenizer

from anomalygen.diffusion.train import checkpoints, load_trainable
from anomalygen.pretrain.run import SETTINGS, held_back_psnr, read_run
from anomalygen.pretrain.models import PRESETS, component_configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prior", type=Path, help="a folder `anomalygen pretrain` wrote (its training/ kept)")
    parser.add_argument("--every", type=int, default=1, help="every Nth checkpoint (the last one always)")
    args = parser.parse_args()
    done = checkpoints(args.prior / "training" / "vae")
    if not (args.prior / SETTINGS).is_file() or not done:
        parser.exit(2, f"error: {args.prior}: no autoencoder checkpoints of an anomalygen pretrain run under training/vae/\n")
    if args.every < 1:
        parser.exit(2, f"error: --every {args.every}: must be at least 1\n")
    settings, images = read_run(args.prior)
    words = args.prior / "training" / "tokenizer"
    tokenizer = CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), model_max_length=77)
    config = component_configs(PRESETS[settings["size"]], settings["resolution"], tokenizer, settings.get("vae_attention"))["vae"]
    vae = AutoencoderKL.from_config(config).eval()
    print(f"{len(images.held_back)} held-back images at {settings['resolution']} px")
    print("| step | PSNR | PSNR recoloured |\n|---:|---:|---:|")
    chosen = done[args.every - 1 :: args.every]
    for checkpoint in chosen + ([] if done[-1] in chosen else done[-1:]):
        load_trainable({"vae": vae}, checkpoint)
        psnr, recoloured = held_back_psnr(vae, images)
        print(f"| {int(checkpoint.name[5:])} | {psnr} dB | {recoloured} dB |", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
