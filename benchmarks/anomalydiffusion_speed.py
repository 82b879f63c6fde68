"""AnomalyDiffusion speed with the full-size LDM text2im-256 and Stable Diffusion 1.5 architectures (random weights).

Measures, per architecture (``--arch``: the published configs in ``anomalygen.diffusion.architectures``)
and dtype: training steps/s of the spatial anomaly embedding + mask embedding (one ``training_loss``
+ backward + Adam step, batch ``--train-batch``, 256 px), sampling images/s with each AAR variant
(``off`` / ``latent`` / ``paper``; DDIM ``--steps`` steps, eta 1, no CFG, batch ``--batch``, given
masks), mask sampling images/s (DDIM ``--mask-steps``, CFG 5), and peak GPU memory of each phase. Weights are random (no download): the timings are those of the real architecture.

    PYTHONPATH=src python benchmarks/anomalydiffusion_speed.py --out results.json

Without a CUDA device it says so and exits 0; ``--device cpu`` with small settings is a smoke run.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from common import architectures, run_all, synthetic_data, timed

from anomalygen.diffusion.architectures import random_backbone
from anomalygen.diffusion.backbone import resolve_dtype
from anomalygen.methods.anomalydiffusion import AnomalyDiffusion
from anomalygen.methods.anomalydiffusion.mask_model import MaskStats

def bench(arch: str, dtype_name: str, args, device: torch.device) -> dict:
    dtype = resolve_dtype(dtype_name)
    defects, good = synthetic_data(12)
    generator = AnomalyDiffusion(resolution=256, batch_size=args.train_batch, max_steps=2, num_inference_steps=args.steps,
                                 generate_batch_size=args.batch, mixed_precision=dtype_name, spatial_encoder="resnet50")
    generator._backbone = random_backbone(arch, device, dtype)
    generator.fit(defects, good)  # builds E (ResNet-50 + FPN), e_a, e_m; two warm-up steps
    type_indices = [generator.defect_types.index(d.defect_type) for d in defects]
    generator.opt["max_steps"] = args.train_steps
    _, seconds, memory = timed(lambda: generator._train(defects, type_indices), device)
    result = {"arch": arch, "dtype": dtype_name, "resolution": 256, "steps": args.steps, "batch": args.batch,
              "train_batch": args.train_batch, "train_steps_per_s": args.train_steps / seconds, "train_peak_gib": memory}
    masks = [d.mask for d in defects[: args.batch]]
    generator.opt["num_inference_steps"] = 3
    list(generator.generate(good, args.batch, masks=masks))  # warm-up
    generator.opt["num_inference_steps"] = args.steps
    for variant in ("off", "latent", "paper"):
        generator.opt["aar"] = variant
        _, seconds, memory = timed(lambda: list(generator.generate(good, args.batch, masks=masks)), device)
        result[f"sample_{variant}_images_per_s"] = args.batch / seconds
        result[f"sample_{variant}_peak_gib"] = memory
    generator.opt["mask_inference_steps"] = args.mask_steps
    generator.mask_stats = {t: MaskStats(0.0, 1.0, 1.0, tolerance=1e9, border_floor=1.0) for t in generator.defect_types}
    seeds = [np.random.SeedSequence([0, i]) for i in range(args.batch)]
    _, seconds, memory = timed(lambda: generator._sample_masks([i % 2 for i in range(args.batch)], seeds), device)
    result.update({"mask_images_per_s": args.batch / seconds, "mask_peak_gib": memory})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=architectures, default="ldm,sd15",
                        help="comma-separated architectures: ldm (AnomalyDiffusion's base model), sd15")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8, help="sampling batch (official: 8)")
    parser.add_argument("--steps", type=int, default=200, help="DDIM steps (official: 200)")
    parser.add_argument("--mask-steps", type=int, default=100, help="mask DDIM steps (official: 100)")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (very slow at full size)")
    args = parser.parse_args()
    return run_all(bench, [(arch, dtype) for arch in args.arch for dtype in args.dtypes], args)

if __name__ == "__main__":
    sys.exit(main())
