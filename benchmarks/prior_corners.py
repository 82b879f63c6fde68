"""Where a ``pretrain`` prior's autoencoder fails (its corners) and whether its samples take their
category's colour.

    PYTHONPATH=src python benchmarks/prior_corners.py PRIOR [--samples N]

1. The autoencoder (``training/vae_final``) on the held-back images and on a flat gray image: the mean
   absolute reconstruction error (in [-1, 1]) over the whole image and in each corner (an eighth of
   the side), and where its latent norm peaks (a corner blot: RESULTS.md).
2. If the prior has a model: N samples per prompt (plain diffusers ``StableDiffusionPipeline``, DDIM
   25 steps, guidance 3, seed 0), the distance of each sample's mean colour to the mean colour of
   the category's training images (L1 over RGB in [0, 1], averaged), and the share within 0.1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

from anomalygen.pretrain.run import SETTINGS, read_run

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def corner_errors(vae: AutoencoderKL, pixels: torch.Tensor) -> dict[str, float]:
    """Mean absolute reconstruction error of ``pixels`` (N, 3, R, R) in [-1, 1], whole and per corner."""
    error = (vae(pixels, sample_posterior=False).sample.clamp(-1, 1) - pixels).abs().mean((0, 1))
    c = pixels.shape[-1] // 8
    rows, cols = (slice(0, c), slice(-c, None)), (slice(0, c), slice(-c, None))
    corners = [error[rows[i // 2], cols[i % 2]].mean() for i in range(4)]
    return {"whole": float(error.mean()), **{name: float(v) for name, v in zip(CORNERS, corners)}}


def peak_latent(vae: AutoencoderKL, pixels: torch.Tensor) -> str:
    norm = vae.encode(pixels).latent_dist.mean.norm(dim=1).mean(0)
    row, col = divmod(int(norm.argmax()), norm.shape[1])
    return f"{float(norm.max()):.2f} at ({row}, {col}) of {tuple(norm.shape)}, median {float(norm.median()):.2f}"


def _rgb(colour: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(v):.3f}" for v in colour) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prior", type=Path, help="a folder `anomalygen pretrain` wrote (its training/ kept)")
    parser.add_argument("--samples", type=int, default=32, help="samples per prompt (0: the autoencoder only)")
    args = parser.parse_args()
    if not (args.prior / SETTINGS).is_file() or not (args.prior / "training" / "vae_final").is_dir():
        parser.exit(2, f"error: {args.prior}: no trained autoencoder of an anomalygen pretrain run (training/vae_final/)\n")
    if args.samples < 0:
        parser.exit(2, f"error: --samples {args.samples}: must be at least 0\n")
    settings, images = read_run(args.prior)
    vae = AutoencoderKL.from_pretrained(args.prior / "training" / "vae_final").eval()
    r = settings["resolution"]
    print(f"autoencoder: mid-block attention {vae.config.mid_block_add_attention}, {r} px\n")
    print("| images | whole | " + " | ".join(CORNERS) + " | latent norm peak |\n|---|" + "---:|" * 5 + "---|")
    inputs = {f"{len(images.held_back)} held back": images.held_back_batch() if images.held_back else None,
              "flat gray": torch.zeros(1, 3, r, r)}
    for name, pixels in inputs.items():
        if pixels is not None:
            errors = corner_errors(vae, pixels)
            print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in errors.values()) + f" | {peak_latent(vae, pixels)} |")
    if args.samples == 0 or not (args.prior / "model_index.json").is_file():
        return
    pipe = StableDiffusionPipeline.from_pretrained(args.prior, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ids = np.array(images.prompt_ids)
    print("\n| prompt | real mean colour | samples' mean colour | mean distance | share within 0.1 |\n|---|---|---|---:|---:|")
    for k, prompt in enumerate(images.prompts):
        real = np.mean([images.images[i].mean((0, 1)) / 255 for i in np.flatnonzero(ids == k)], axis=0)
        samples = pipe([prompt] * args.samples, num_inference_steps=25, guidance_scale=3.0, height=r, width=r,
                       output_type="np", generator=torch.Generator().manual_seed(0)).images
        colours = samples.mean((1, 2))
        distance = np.abs(colours - real).mean(1)
        print(f"| {prompt} | {_rgb(real)} | {_rgb(colours.mean(0))} | {distance.mean():.3f} | "
              f"{(distance < 0.1).mean():.0%} |", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
