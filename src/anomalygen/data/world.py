"""A procedural defect world: 4 categories x 4 defect families, rendered small, with exact masks.

Built on the demo renderer (``data.demo``) for the proof-of-learning benchmark (issue 31,
``benchmarks/world_learning.py``): every family occurs in every category and keeps its own look
there, so that a prior trained on some (category, family) pairs knows each family's look, and a
method fitted on a held-out pair's few images can be judged against the world's ground truth.

Categories (good images rendered at 4x the size and area-downsampled, so fine structure stays
smooth at 32-64 px): ``fabric`` and ``wood`` (textures: defects anywhere but the border),
``nut`` and ``pill`` (objects on a plain mat: defects on the object's face).

Families, drawn at the final size (so the mask is exactly the set of changed pixels):

- ``scratch``: a thin, smoothly bending, bright line (near white);
- ``crack``: a dark, jagged line that forks once;
- ``stain``: a wine-red blot, darker at its drying ring;
- ``hole``: a near-black rounded opening whose rim is lit on one side and shadowed on the other.

``make_world`` writes categories in MVTec AD layout; ``render_defect`` gives labelled examples
(image, mask, good image) for judges trained on the renderer itself.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from anomalygen.data.demo import _blob, _field, _grid, _lighting, _margin, _noise, _pick, _save, _to_uint8, render_fabric, render_nut

FAMILIES = ("scratch", "crack", "stain", "hole")
SUPERSAMPLE = 4


def render_wood(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Planed wood: light and dark growth bands bent by a smooth field, fine pores along the grain."""
    y, x = _grid(size)
    turn = np.deg2rad(rng.uniform(-12, 12))
    across = (y * np.cos(turn) - x * np.sin(turn)) / size
    bands = np.sin(2 * np.pi * (across * rng.uniform(5, 8) + 0.35 * _field(rng, size, 4)))
    late = np.clip(bands, 0, 1) ** 3  # thin dark latewood
    pores = _noise(rng, size, (6.0, 0.6)) if abs(turn) < 1 else _noise(rng, size, (0.6, 6.0))
    base = np.array([0.76, 0.58, 0.38], np.float32) + rng.uniform(-0.04, 0.04, 3).astype(np.float32)
    dark = np.array([0.52, 0.34, 0.19], np.float32)
    image = base * (1 - late[..., None]) + dark * late[..., None]
    image = image * (1 + 0.03 * pores[..., None]) * _lighting(rng, size)
    return _to_uint8(image, rng), np.ones((size, size), bool)


def render_pill(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An orange capsule seen from above on a dark blue-grey mat, lit from the upper left, with a shadow.

    Returns the image and the pill's face (its body less a rim).
    """
    y, x = _grid(size)
    cx, cy = (size / 2 + float(d) * size for d in rng.uniform(-0.05, 0.05, 2))
    half, radius = size * rng.uniform(0.22, 0.27), size * rng.uniform(0.16, 0.19)
    angle = rng.uniform(0, np.pi)
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    dist = np.hypot(np.clip(np.abs(u) - half, 0, None), v)  # distance to the capsule's axis segment
    body = np.clip(radius - dist + 0.5, 0, 1)  # anti-aliased edge
    height = np.sqrt(np.clip(1 - (dist / radius) ** 2, 0, 1))
    shade = 0.72 + 0.28 * height + 0.12 * (-(x - cx) - (y - cy)) / (np.hypot(x - cx, y - cy) + radius) * (1 - height)
    colour = np.array([0.9, 0.66, 0.42], np.float32) * rng.uniform(0.92, 1.03)
    mat = np.array([0.22, 0.27, 0.34], np.float32) + rng.uniform(-0.02, 0.02, 3).astype(np.float32)
    shadow = cv2.GaussianBlur(np.roll(body, (int(0.04 * size), int(0.04 * size)), (0, 1)), (0, 0), 0.03 * size)
    image = mat * (1 - 0.5 * shadow)[..., None] * (1 + 0.02 * _field(rng, size, 5))[..., None]
    image = image * (1 - body[..., None]) + body[..., None] * colour * shade[..., None]
    image = image * _lighting(rng, size)
    return _to_uint8(image, rng), dist < radius - 2 * SUPERSAMPLE


RENDERERS = {"fabric": render_fabric, "wood": render_wood, "nut": render_nut, "pill": render_pill}
CATEGORIES = tuple(RENDERERS)


def render_good(category: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A good image of ``category`` at ``size`` px (rendered at 4x, area-downsampled) and where defects may go."""
    image, region = RENDERERS[category](rng, size * SUPERSAMPLE)
    small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    inside = cv2.resize(region.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) > 0.999
    return small, _margin(inside, size) if region.all() else inside


def _path(rng: np.random.Generator, start: np.ndarray, length: float, steps: int, wobble: float) -> np.ndarray:
    """Points of a walk from ``start``: ``steps`` segments whose heading changes by N(0, wobble)."""
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, wobble, steps))
    deltas = np.stack([np.cos(heading), np.sin(heading)], axis=1) * (length / steps)
    return start + np.concatenate([[[0.0, 0.0]], np.cumsum(deltas, axis=0)])


def _lines(size: int, paths: list[np.ndarray], antialiased: bool) -> np.ndarray:
    canvas = np.zeros((size, size), np.uint8)
    for points in paths:
        cv2.polylines(canvas, [np.rint(points * 16).astype(np.int32)], False, 255, 1,
                      cv2.LINE_AA if antialiased else cv2.LINE_8, shift=4)
    return canvas.astype(np.float32) / 255


def scratch(good: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bright, smooth, thin line: blended towards near white."""
    size = good.shape[0]
    core = _lines(size, [_path(rng, _pick(rng, region), rng.uniform(0.35, 0.6) * size, 30, 0.05)], True)
    mask = (core > 0.3) & region
    alpha = (np.clip(core * 1.4, 0, 1) * mask)[..., None]
    image = good.astype(np.float32) / 255
    return image * (1 - alpha) + alpha * np.array([0.97, 0.97, 0.93], np.float32), mask


def crack(good: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark jagged line (few long segments, sharp turns) with one fork: darkened to near black."""
    size = good.shape[0]
    trunk = _path(rng, _pick(rng, region), rng.uniform(0.3, 0.5) * size, 7, 0.7)
    branch = _path(rng, trunk[int(rng.integers(2, 6))], rng.uniform(0.1, 0.2) * size, 3, 0.7)
    core = _lines(size, [trunk, branch], False)
    mask = (core > 0) & region
    image = good.astype(np.float32) / 255
    return np.where(mask[..., None], image * 0.18 + 0.02, image), mask


def stain(good: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A wine-red blot: the image multiplied by a red tint, stronger at the drying ring."""
    size = good.shape[0]
    mask = _blob(rng, size, _pick(rng, region), rng.uniform(0.09, 0.14) * size, 0.35) & region
    depth = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    strength = np.clip(0.65 + 0.3 * np.exp(-depth / 1.5) + 0.08 * _field(rng, size, 8), 0.5, 1)[..., None]
    tint = np.array([0.62, 0.08, 0.2], np.float32)
    image = good.astype(np.float32) / 255
    return image * (1 - strength + strength * tint), mask


def hole(good: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A rounded opening: near-black inside, its rim lit on the side facing a light and shadowed opposite."""
    size = good.shape[0]
    centre = _pick(rng, region)
    r = rng.uniform(0.06, 0.1) * size
    inside = _blob(rng, size, centre, r, 0.15)
    rim = cv2.dilate(inside.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~inside
    y, x = _grid(size)
    light = rng.uniform(0, 2 * np.pi)
    facing = ((x - centre[0]) * np.cos(light) + (y - centre[1]) * np.sin(light)) / (np.hypot(x - centre[0], y - centre[1]) + 1e-3)
    image = good.astype(np.float32) / 255
    image = np.where(rim[..., None], image * (0.55 + 0.6 * np.clip(facing, 0, 1))[..., None] + 0.25 * np.clip(facing, 0, 1)[..., None], image)
    image = np.where(inside[..., None], 0.04 + 0.03 * _field(rng, size, 6)[..., None], image)
    mask = (inside | rim) & region
    return image, mask


DEFECTS = {"scratch": scratch, "crack": crack, "stain": stain, "hole": hole}


def render_defect(category: str, family: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(good image, the same with a ``family`` defect, its mask): changed only, and visibly, inside the mask."""
    good, region = render_good(category, rng, size)
    for _ in range(100):
        changed, mask = DEFECTS[family](good, region, rng)
        if mask.sum() >= max(4, mask.size // 400):
            defect = np.rint(np.clip(changed, 0, 1) * 255).astype(np.uint8)
            mask &= (defect != good).any(axis=-1)  # exact: a mask pixel is a changed pixel
            return good, np.where(mask[..., None], defect, good), mask
    raise ValueError(f"could not place a {family} on {category} at {size} px")


def make_world(out_dir: str | Path, pairs: list[tuple[str, str]], *, size: int = 64, n_good: int = 30,
               n_test_good: int = 10, n_defect: int = 30, seed: int = 0, categories: tuple[str, ...] | None = None) -> Path:
    """Write ``out_dir/<category>/`` (MVTec layout) for each category of ``pairs`` (or ``categories``),
    with test folders for the families ``pairs`` give it only. Image ``i`` of a folder depends only on
    ``(seed, category, family, i)``; a folder already complete (``.complete``) is kept."""
    root = Path(out_dir)
    for category in categories or tuple(dict.fromkeys(c for c, _ in pairs)):
        folder = root / category
        if (folder / ".complete").is_file():
            continue
        c = CATEGORIES.index(category)
        for split, count, offset in (("train", n_good, 0), ("test", n_test_good, 100000)):
            for i in range(count):
                good, _ = render_good(category, np.random.default_rng([seed, c, 9, offset + i]), size)
                _save(good, folder / split / "good" / f"{i:03d}.png")
        for family in [f for cat, f in pairs if cat == category]:
            for i in range(n_defect):
                _, image, mask = render_defect(category, family, np.random.default_rng([seed, c, FAMILIES.index(family), i]), size)
                _save(image, folder / "test" / family / f"{i:03d}.png")
                _save(mask.astype(np.uint8) * 255, folder / "ground_truth" / family / f"{i:03d}_mask.png")
        (folder / ".complete").write_text(f"{sorted(f for cat, f in pairs if cat == category)}\n")
    return root
