"""How large do AnomalyDiffusion's learned tokens get during a fit? (issue 30: "spatial tokens explode")

Fits ``AnomalyDiffusion`` (tiny random-init backbone by default; any ``--set NAME=VALUE`` option) on
real masks when ``../shared/data/magnetic_tile`` exists (images random: the encoder sees only the
masks), else on synthetic rectangles, and records at every training step the largest L2 norm of
the spatial tokens E(m) and of the anomaly tokens e_a, each divided by the mean norm of the text
encoder's input-embedding table (the vocabulary). Prints a table at chosen steps and the maxima.

    PYTHONPATH=src python benchmarks/spatial_token_norms.py --steps 40     # the default (mask_source=augment)
    PYTHONPATH=src python benchmarks/spatial_token_norms.py --steps 40 --set spatial_token_bound=null  # official-like heads, unbounded
    PYTHONPATH=src python benchmarks/spatial_token_norms.py --steps 2000 --set spatial_encoder=resnet50 --set device=cuda  # a full default fit

Results: benchmarks/RESULTS.md ("Spatial token norms").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from anomalygen.methods.anomalydiffusion import AnomalyDiffusion
from anomalygen.types import DefectExample

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


def masks_from_shared(limit: int, size: int) -> list[np.ndarray] | None:
    from PIL import Image

    files = sorted((SHARED / "ground_truth").glob("*/*.png"))[:: 7][:limit] if SHARED.is_dir() else []
    if not files:
        return None
    return [np.asarray(Image.open(f).convert("L").resize((size, size), Image.NEAREST)) > 127 for f in files]


def data(size: int, n: int = 12):
    rng = np.random.default_rng(0)
    masks = masks_from_shared(n, size)
    if masks is None:
        masks = []
        for _ in range(n):
            m = np.zeros((size, size), bool)
            y, x = rng.integers(2, size // 2, 2)
            m[y:y + rng.integers(2, size // 3), x:x + rng.integers(2, size // 3)] = True
            masks.append(m)
    masks = [m if m.any() else np.pad(np.ones((2, 2), bool), ((0, size - 2), (0, size - 2))) for m in masks]
    defects = [DefectExample(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), m, ("crack", "hole")[i % 2])
               for i, m in enumerate(masks)]
    return defects, [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(2)], "shared" if SHARED.is_dir() else "synthetic"


def measure(steps: int, options: dict) -> dict:
    options = {"model": "tiny", "device": "cpu", "resolution": 32, "mask_source": "augment", **options, "max_steps": steps}
    generator = AnomalyDiffusion(**options)
    defects, good, source = data(options["resolution"])
    spatial, anomaly = [], []
    build = generator._build

    def recording_build(types, encoder=None):
        build(types, encoder)
        table = generator.backbone.text_encoder.get_input_embeddings().weight.detach().float()
        vocabulary = float(table.norm(dim=-1).mean())

        def hook(module, inputs, output):
            spatial.append(float(output.detach().norm(dim=-1).max()) / vocabulary)
            anomaly.append(float(generator.anomaly_tokens.tokens.detach().norm(dim=-1).max()) / vocabulary)
        generator.spatial_encoder.register_forward_hook(hook)
        recording_build.vocabulary = vocabulary

    generator._build = recording_build
    start = time.perf_counter()
    generator.fit(defects, good)
    seconds = time.perf_counter() - start
    return {"options": {k: v for k, v in options.items() if k != "device"}, "masks": source,
            "vocabulary_mean_norm": recording_build.vocabulary, "seconds": round(seconds, 1),
            "spatial_over_vocabulary": spatial, "anomaly_over_vocabulary": anomaly,
            "loss_first_last": [generator.loss_log[0], generator.loss_log[-1]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="an AnomalyDiffusion option (JSON value)")
    parser.add_argument("--out", type=Path, help="write every step's norms as JSON")
    args = parser.parse_args()
    options = {}
    for item in args.set:
        name, value = item.split("=", 1)
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    torch.set_num_threads(1)  # a shared 2-core machine: two threads mostly wait on each other
    result = measure(args.steps, options)
    spatial, anomaly = result["spatial_over_vocabulary"], result["anomaly_over_vocabulary"]
    print(f"options {result['options']}  masks: {result['masks']}  {result['seconds']} s")
    print(f"vocabulary mean token norm {result['vocabulary_mean_norm']:.4g}; token norms as multiples of it:")
    print(f"{'step':>6} {'spatial max':>12} {'e_a max':>10}")
    marks = sorted({0, 1, 5, 10, 40, 100, 500, 1000, len(spatial) - 1} & set(range(len(spatial))))
    for step in marks:
        print(f"{step + 1:>6} {spatial[step]:>12.3g} {anomaly[step]:>10.3g}")
    print(f"max over the fit: spatial {max(spatial):.3g}, e_a {max(anomaly):.3g}; loss first/last "
          f"{result['loss_first_last'][0]:.4f}/{result['loss_first_last'][1]:.4f}")
    if args.out:
        args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
