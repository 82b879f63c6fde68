"""PNG encoding of generated pairs at zlib levels 1, 3 and 6 (PIL's default): ms per image and bytes.

    PYTHONPATH=src python benchmarks/png_speed.py [FOLDER ...] [--size 256]

FOLDER: category folders (MVTec AD layout) whose test images stand in for generated ones (natural
images compress unlike random ones); without one, the built-in demo data. Each image is resized to
``--size`` px and encoded 3 times per level; masks are taken from ground_truth/. anomalygen writes
with ``anomalygen.io.PNG_LEVEL``.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from anomalygen.data.demo import make_demo_dataset
from anomalygen.io import PNG_LEVEL


def images(folders: list[Path], size: int, limit: int = 48) -> dict[str, list[np.ndarray]]:
    found = {kind: sorted(p for f in folders for p in (f / part).glob("*/*.png"))
             for kind, part in (("image", "test"), ("mask", "ground_truth"))}
    found = {kind: paths[:: max(1, len(paths) // limit)][:limit] for kind, paths in found.items()}
    return {"image": [read(p, "RGB", size, Image.BICUBIC) for p in found["image"]],
            "mask": [read(p, "L", size, Image.NEAREST) for p in found["mask"]]}


def read(path: Path, mode: str, size: int, resample: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode).resize((size, size), resample))
    except OSError as error:  # PIL's unreadable or truncated file
        print(f"error: {path}: unreadable image ({error})", file=sys.stderr)
        sys.exit(2)


def encode(arrays: list[np.ndarray], level: int, repeats: int = 3) -> tuple[float, int]:
    """(ms per image, mean bytes) at zlib ``level``."""
    start, size = time.perf_counter(), 0
    for _ in range(repeats):
        for array in arrays:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG", compress_level=level)
            size += len(buffer.getvalue())
    return (time.perf_counter() - start) / (repeats * len(arrays)) * 1000, size // (repeats * len(arrays))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    for folder in args.folders:
        if not any((folder / "test").glob("*/*.png")) or not any((folder / "ground_truth").glob("*/*.png")):
            parser.exit(2, f"error: {folder}: no test/*/*.png images with ground_truth/*/*.png masks (MVTec AD layout)\n")
    if args.size < 1:
        parser.exit(2, f"error: --size {args.size}: must be at least 1 px\n")
    with tempfile.TemporaryDirectory() as tmp:
        folders = args.folders or [make_demo_dataset(Path(tmp)) / name for name in ("fabric", "nut")]
        arrays = images(folders, args.size)
    print(f"{len(arrays['image'])} images, {len(arrays['mask'])} masks at {args.size} px; anomalygen writes level {PNG_LEVEL}")
    print("| zlib level | image ms | image bytes | mask ms | mask bytes |\n|---|---|---|---|---|")
    for level in (1, 3, 6):
        (image_ms, image_bytes), (mask_ms, mask_bytes) = encode(arrays["image"], level), encode(arrays["mask"], level)
        print(f"| {level}{' (PIL default)' if level == 6 else ''} | {image_ms:.2f} | {image_bytes} | {mask_ms:.2f} | {mask_bytes} |")


if __name__ == "__main__":
    main()
