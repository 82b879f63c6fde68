"""DualAnoDiff's masks on real grayscale defects: how many real defect pixels each segmenter keeps.

For every real defect image of a dataset (MVTec layout) the ideal anomaly-part image is built as
DualAnoDiff trains its part branch: the image inside the real mask, plain gray (0.5) outside
(``part_background=gray``). Each segmenter then gets that image, as it would get the part branch's
output: our threshold fallback (``mask_from_part``, default options) and, given weights, the
official U²-Net at 0.5 (``saliency`` + ``mask_from_saliency``). Reported per dataset: the share of
real defect pixels kept (recall, pooled over images), the share of the kept pixels that are defect
(precision), the mean per-image recall and the share of images whose mask comes out empty (such a
draw is redrawn: the redraws favour high-contrast defects). Defects whose mask vanishes at the
working size are left out.

    PYTHONPATH=src python benchmarks/dualanodiff_masks.py ../shared/data/magnetic_tile ../shared/data/mvtec_ad_grid_subset \\
        [--u2net u2net.safetensors] [--u2net u2netp.safetensors] [--size 512] [--every 1]

``--size``: the part image's side (DualAnoDiff's working resolution; 512 on SD 1.5); ``--every N``:
every N-th image only (in path order), for a quicker run on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from anomalygen.methods.dualanodiff.segment import mask_from_part, mask_from_saliency
from anomalygen.methods.dualanodiff.u2net import load_u2net, saliency


def pairs(root: Path, size: int, every: int = 1):
    """(part image uint8 (size, size, 3), real mask bool) of every ``every``-th defect image under ``root``."""
    paths = [p for p in sorted((root / "test").glob("*/*.png")) if p.parent.name != "good"]
    for image_path in paths[::every]:
        mask_path = root / "ground_truth" / image_path.parent.name / f"{image_path.stem}_mask.png"
        image = cv2.resize(cv2.imread(str(image_path), cv2.IMREAD_COLOR)[..., ::-1], (size, size), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE), (size, size), interpolation=cv2.INTER_LINEAR) >= 128
        if not mask.any():  # a defect smaller than a pixel at this size: nothing to keep
            continue
        part = np.where(mask[..., None], image, 128).astype(np.uint8)  # gray 0.5 outside, as I·M of a [-1, 1] image
        yield part, mask


def score(found: list[np.ndarray], real: list[np.ndarray]) -> dict[str, float]:
    kept = sum(int((f & r).sum()) for f, r in zip(found, real))
    return {"recall": kept / sum(int(r.sum()) for r in real),
            "precision": kept / max(1, sum(int(f.sum()) for f in found)),
            "mean_image_recall": float(np.mean([(f & r).sum() / r.sum() for f, r in zip(found, real)])),
            "empty": float(np.mean([not f.any() for f in found]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--u2net", action="append", default=[], help="U²-Net weights (repeatable)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--every", type=int, default=1)
    args = parser.parse_args()
    models = {Path(p).name: load_u2net(p) for p in args.u2net}
    print("| dataset | images | segmenter | defect pixels kept | precision | mean per-image kept | empty masks |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for root in args.datasets:
        parts, real = zip(*pairs(root, args.size, args.every))
        results = {"threshold 0.15 (ours, default options)": [mask_from_part(p) for p in parts]}
        for name, model in models.items():
            results[f"U²-Net {name} at 0.5 (official)"] = [mask_from_saliency(s) for s in saliency(model, list(parts))]
        for label, found in results.items():
            s = score(found, list(real))
            print(f"| {root.name}{f' (every {args.every}th)' if args.every > 1 else ''} | {len(parts)} | {label} | {s['recall']:.1%} | {s['precision']:.1%} | "
                  f"{s['mean_image_recall']:.1%} | {s['empty']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
