"""Copy real categories into the git-ignored ``.carry/data`` for a lent GPU (``../shared`` does not travel;
the working tree that travels is limited to 64 MiB): every ``train/good`` image, and the first
``--per-type`` test images of each defect type with their masks (the readers need the MVTec layout;
``pretrain`` trains on ``train/good`` only). With ``--resize N``: every image of each category (the
learning benchmark evaluates on the whole test two-thirds), copied square at N px with
``learning.resized_copy``, small enough to travel.

    PYTHONPATH=src python benchmarks/gpu_data.py ../shared/data/magnetic_tile ../shared/data/hazelnut_toy
    PYTHONPATH=src python benchmarks/gpu_data.py --resize 256 --out .carry/data256 ../shared/data/magnetic_tile ../shared/data/hazelnut_toy
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from learning import resized_copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("categories", nargs="+", type=Path)
    parser.add_argument("--per-type", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(".carry/data"))
    parser.add_argument("--resize", type=int, help="copy every image, square at this size (for benchmarks/learning.py)")
    args = parser.parse_args()
    for category in args.categories:
        target = args.out / category.name
        shutil.rmtree(target, ignore_errors=True)
        if args.resize:
            resized_copy(category, args.resize, target)
            continue
        shutil.copytree(category / "train" / "good", target / "train" / "good")
        for folder in sorted(p for p in (category / "test").iterdir() if p.is_dir()):
            images = sorted(p for p in folder.iterdir() if p.is_file())[: args.per_type]
            (target / "test" / folder.name).mkdir(parents=True)
            for image in images:
                shutil.copy2(image, target / "test" / folder.name / image.name)
                for mask in (category / "ground_truth" / folder.name).glob(f"{image.stem}*"):
                    (target / "ground_truth" / folder.name).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(mask, target / "ground_truth" / folder.name / mask.name)
    print(f"{args.out}: {sum(f.stat().st_size for f in args.out.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
