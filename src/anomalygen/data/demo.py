"""A small procedural dataset in MVTec AD layout: the built-in data of the demo and the tests.

Two categories, rendered from a seed (the same seed writes the same bytes):

- ``fabric`` (texture): a plain weave whose thread phase, angle, colour and lighting vary;
  defects ``cut`` (thin dark line of broken threads), ``hole`` (frayed opening onto the dark
  backing) and ``stain`` (coloured blot with a darker drying ring).
- ``nut`` (object on a plain background): a hex nut with a chamfered, machined face, threaded
  bore and cast shadow, whose position, rotation and lighting vary; defects ``scratch`` (thin
  bright curve), ``dent`` (shaded depression) and ``stain`` (rust blot).

Every defect changes the good image only inside its mask, and visibly everywhere inside it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from rich.progress import track

Render = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
Defect = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _noise(rng: np.random.Generator, size: int, sigma: tuple[float, float]) -> np.ndarray:
    """Gaussian noise smoothed with (sigma_x, sigma_y), rescaled to unit standard deviation."""
    field = cv2.GaussianBlur(rng.standard_normal((size, size), dtype=np.float32), (0, 0), *sigma)
    return field / (field.std() + 1e-6)


def _field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field (unit standard deviation): a ``cells`` x ``cells`` Gaussian grid, upscaled."""
    grid = rng.standard_normal((cells, cells), dtype=np.float32)
    field = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return field / (field.std() + 1e-6)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (y, x) as float32 (H, W) arrays, shared read-only."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    y.flags.writeable = x.flags.writeable = False
    return y, x


def _lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    """A global gain times a linear gradient in a random direction, as (H, W, 1)."""
    y, x = (c / size - 0.5 for c in _grid(size))
    gx, gy = (float(g) for g in rng.uniform(-0.2, 0.2, 2))
    return (rng.uniform(0.85, 1.12) * (1 + gx * x + gy * y))[..., None]


def _to_uint8(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = image + 0.028 * (rng.random(image.shape, dtype=np.float32) - 0.5)  # sensor noise, std 0.008
    return np.rint(np.clip(noisy, 0, 1) * 255).astype(np.uint8)


def _blob(rng: np.random.Generator, size: int, center: np.ndarray, radius: float, rough: float) -> np.ndarray:
    """An irregular filled outline: radius(theta) perturbed by random low harmonics, as bool."""
    theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 9):
        r += rough / k**1.5 * rng.normal() * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    angle = rng.uniform(0, np.pi)
    stretch = rng.uniform(0.6, 1.0)
    px, py = radius * r * np.cos(theta), radius * r * stretch * np.sin(theta)
    points = np.stack([center[0] + px * np.cos(angle) - py * np.sin(angle),
                       center[1] + px * np.sin(angle) + py * np.cos(angle)], axis=1)
    canvas = np.zeros((size, size), np.uint8)
    cv2.fillPoly(canvas, [np.rint(points * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _curve(rng: np.random.Generator, size: int, start: np.ndarray, length: float, width: int) -> np.ndarray:
    """A thin smoothly bending line (a random walk of the heading), anti-aliased, as float alpha."""
    steps = 40
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.08, steps))
    deltas = np.stack([np.cos(heading), np.sin(heading)], axis=1) * (length / steps)
    points = start + np.concatenate([[[0.0, 0.0]], np.cumsum(deltas, axis=0)])
    canvas = np.zeros((size, size), np.uint8)
    cv2.polylines(canvas, [np.rint(points * 16).astype(np.int32)], False, 255, width, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255


def _pick(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """A random (x, y) point of a bool region."""
    ys, xs = np.nonzero(region)
    i = rng.integers(len(xs))
    return np.array([xs[i], ys[i]], dtype=np.float64)


def _finish(good: np.ndarray, changed: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantise the changed float image; outside ``mask`` keep the good pixels exactly."""
    defect = np.rint(np.clip(changed, 0, 1) * 255).astype(np.uint8)
    return np.where(mask[..., None], defect, good), mask


# ----------------------------------------------------------------------------- fabric


def render_fabric(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A plain weave: warp and weft threads alternate over/under in a checkerboard of cells.

    Rendered axis-aligned from separable 1-D thread profiles on a padded canvas, then turned
    by a small angle and cropped.
    """
    pad = size // 8
    full = size + 2 * pad
    period = size / rng.uniform(26, 30)
    u = np.arange(full, dtype=np.float32) / period + rng.uniform(0, 2)  # across the warp (x)
    v = np.arange(full, dtype=np.float32) / period + rng.uniform(0, 2)  # across the weft (y)
    warp_on_top = (np.floor(u).astype(int)[None, :] + np.floor(v).astype(int)[:, None]) % 2 == 0
    across_u, across_v = np.sin(np.pi * (u % 1)) ** 0.7, np.sin(np.pi * (v % 1)) ** 0.7
    along_u, along_v = 0.55 + 0.45 * np.sin(np.pi * (u % 1)), 0.55 + 0.45 * np.sin(np.pi * (v % 1))
    height = np.where(warp_on_top, across_u[None, :] * along_v[:, None], across_v[:, None] * along_u[None, :])
    fibres = np.where(warp_on_top, _noise(rng, full, (0.6, 3.0)), _noise(rng, full, (3.0, 0.6)))
    hue = rng.uniform(-0.015, 0.015, 3).astype(np.float32)
    warp = np.array([0.60, 0.53, 0.40], np.float32) + hue
    weft = np.array([0.69, 0.63, 0.49], np.float32) + hue
    shade = 0.5 + 0.5 * height + 0.035 * fibres
    weave = np.where(warp_on_top[..., None], warp, weft) * shade[..., None]
    turn = cv2.getRotationMatrix2D((full / 2, full / 2), rng.uniform(-4, 4), 1.0)
    weave = cv2.warpAffine(weave, turn, (full, full), flags=cv2.INTER_LINEAR)[pad:-pad, pad:-pad]
    mottling = (1 + 0.04 * _field(rng, size, 12))[..., None]
    image = weave * mottling * _lighting(rng, size)
    return _to_uint8(image, rng), np.ones((size, size), bool)


def fabric_cut(good: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Broken threads along a thin line: dark gap with slightly lighter frayed edges."""
    size = good.shape[0]
    core = _curve(rng, size, _pick(rng, _margin(region, size)), rng.uniform(0.2, 0.45) * size, int(rng.integers(1, 3)))
    halo = cv2.dilate(core, np.ones((3, 3), np.uint8)) - core
    fringe = (halo > 0.5) & (rng.random(halo.shape) > 0.3)
    mask = ((core > 0.25) | fringe) & region
    image = good.astype(np.float32) / 255
    gap = 0.12 + 0.05 * rng.random()
    image = image * (1 - core[..., None]) + gap * core[..., None] + 0.12 * fringe[..., None]
    return _finish(good, image, mask)


def fabric_hole(good: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A frayed opening: dark backing inside a rough outline, a ragged rim of loose fibres."""
    size = good.shape[0]
    inside = _blob(rng, size, _pick(rng, _margin(region, size)), rng.uniform(0.035, 0.08) * size, 0.5)
    rim = cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~inside
    fringe = rim & (rng.random(rim.shape) > 0.35)
    image = good.astype(np.float32) / 255
    backing = 0.07 + 0.03 * _noise(rng, size, (1.5, 1.5))[..., None]
    loose = sum(_curve(rng, size, _pick(rng, inside), rng.uniform(0.03, 0.08) * size, 1) for _ in range(2))
    thread = image[rim].mean(axis=0) * np.clip(loose, 0, 1)[..., None]
    image = np.where(inside[..., None], np.maximum(backing, thread), image)  # dark, crossed by loose threads
    image = np.where(fringe[..., None], image * 0.55 + 0.35, image)
    return _finish(good, image, (inside | fringe) & region)


def _stain(good: np.ndarray, region: np.ndarray, rng: np.random.Generator, tints: np.ndarray,
           radius: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """A coloured blot: multiply by a tint, stronger at the drying ring near the outline."""
    size = good.shape[0]
    mask = _blob(rng, size, _pick(rng, _margin(region, size)), rng.uniform(*radius) * size, 0.35) & region
    depth = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    ring = np.exp(-depth / 2.5)
    mottle = 0.6 + 0.15 * _field(rng, size, 32)
    strength = (rng.uniform(0.55, 0.8) * np.clip(mottle + 0.4 * ring, 0.4, 1))[..., None]
    tint = tints[rng.integers(len(tints))]
    image = good.astype(np.float32) / 255
    image = image * (1 - strength + strength * tint)
    return _finish(good, image, mask)


def fabric_stain(good, region, rng):
    """Wine, coffee or oil on cloth."""
    tints = np.array([[0.55, 0.12, 0.22], [0.45, 0.28, 0.12], [0.3, 0.3, 0.28]], np.float32)
    return _stain(good, region, rng, tints, (0.05, 0.11))


# ----------------------------------------------------------------------------- nut


def render_nut(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A hex nut seen from above on a plain mat: machined face, chamfer, threaded bore, shadow.

    Returns the image and the nut's face (where defects may go).
    """
    y, x = _grid(size)
    cx, cy = (size / 2 + float(d) * size for d in rng.uniform(-0.07, 0.07, 2))
    radius = size * rng.uniform(0.3, 0.33)
    turn = rng.uniform(0, np.pi / 3)
    light = float(np.deg2rad(rng.uniform(200, 250)))  # from the upper left
    corners = np.array([[cx + radius * np.cos(turn + k * np.pi / 3), cy + radius * np.sin(turn + k * np.pi / 3)]
                        for k in range(6)])

    def polygon(points: np.ndarray) -> np.ndarray:
        canvas = np.zeros((size, size), np.uint8)
        cv2.fillPoly(canvas, [np.rint(points * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
        return canvas.astype(np.float32) / 255

    background = np.array([0.33, 0.37, 0.36], np.float32) + rng.uniform(-0.015, 0.015, 3).astype(np.float32)
    offset = 0.035 * size * np.array([-np.cos(light), -np.sin(light)])
    shadow = cv2.GaussianBlur(polygon(corners + offset), (0, 0), 0.025 * size)
    image = background * (1 - 0.45 * shadow)[..., None] * (1 + 0.02 * _field(rng, size, 6))[..., None]

    dx, dy = x - cx, y - cy
    r = np.hypot(dx, dy)
    towards_light = (dx * np.cos(light) + dy * np.sin(light)) / np.maximum(r, 1e-3)  # cos(angle to light)
    machining = 0.025 * np.sin(2 * np.pi * r / 2.5 + 0.8 * _noise(rng, size, (2.0, 2.0)))
    metal = 0.6 + 0.08 * ((dx * np.cos(light) + dy * np.sin(light)) / radius) + machining
    chamfer_start = radius * 0.84
    chamfer = np.clip((r - chamfer_start) / 2, 0, 1)
    metal = metal * (1 - chamfer) + chamfer * (0.5 + 0.22 * towards_light)
    bore, thread_start = radius * 0.45, radius * 0.33
    threads = 0.22 + 0.07 * np.sin(2 * np.pi * r / (0.035 * radius)) - 0.1 * towards_light
    in_bore = np.clip(bore - r + 0.5, 0, 1)
    through = np.clip(thread_start - r + 0.5, 0, 1)
    metal = metal * (1 - in_bore) + in_bore * (threads * (1 - through) + 0.6 * background.mean() * through)
    tone = np.array([1.0, 0.98, 0.95], np.float32) * rng.uniform(0.92, 1.05)
    body = polygon(corners)[..., None]
    image = image * (1 - body) + body * metal[..., None] * tone
    image = image * _lighting(rng, size)
    face = (polygon(corners) > 0.99) & (r > bore + 3) & (r < chamfer_start - 2)
    return _to_uint8(image, rng), face


def nut_scratch(good: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin bright scratch across the face, cut off where it leaves the face."""
    size = good.shape[0]
    core = _curve(rng, size, _pick(rng, region), rng.uniform(0.12, 0.3) * size, int(rng.integers(1, 3)))
    mask = (core > 0.25) & region
    image = good.astype(np.float32) / 255
    image = image + (0.32 * core * mask)[..., None]
    return _finish(good, image, mask)


def nut_dent(good: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A depression: a bowl-shaped height field lit from one side (Lambert shading of its slope)."""
    size = good.shape[0]
    mask = _blob(rng, size, _pick(rng, region), rng.uniform(0.03, 0.06) * size, 0.3) & region
    depth = cv2.GaussianBlur(cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3), (0, 0), 1.5)
    gy, gx = np.gradient(depth)
    light = float(rng.uniform(0, 2 * np.pi))
    shading = 0.22 * (gx * np.cos(light) + gy * np.sin(light)) - 0.12
    image = good.astype(np.float32) / 255 + (shading * mask)[..., None]
    return _finish(good, image, mask)


def nut_stain(good, region, rng):
    """Rust or oil on metal."""
    tints = np.array([[0.75, 0.38, 0.15], [0.6, 0.3, 0.12], [0.35, 0.32, 0.25]], np.float32)
    return _stain(good, region, rng, tints, (0.03, 0.06))


def _margin(region: np.ndarray, size: int) -> np.ndarray:
    """``region`` minus a border of 10% of the image, so that defects stay inside the frame."""
    inner = np.zeros_like(region)
    m = size // 10
    inner[m:-m, m:-m] = region[m:-m, m:-m]
    return inner


CATEGORIES: dict[str, tuple[Render, dict[str, Defect]]] = {
    "fabric": (render_fabric, {"cut": fabric_cut, "hole": fabric_hole, "stain": fabric_stain}),
    "nut": (render_nut, {"dent": nut_dent, "scratch": nut_scratch, "stain": nut_stain}),
}


def _apply(defect: Defect, good: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw the defect again (same ``rng`` stream) until it covers at least 1/2000 of the image."""
    for _ in range(100):
        image, mask = defect(good, region, rng)
        if mask.sum() >= mask.size / 2000:
            return image, mask
    raise ValueError(f"could not place a {defect.__name__} defect of at least {mask.size // 2000} pixels")


def render_pair(category: str, defect_type: str, seed: int, size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(good image, the same image with the defect, mask) rendered from ``seed``."""
    render, defects = CATEGORIES[category]
    rng = np.random.default_rng(seed)
    good, region = render(rng, size)
    image, mask = _apply(defects[defect_type], good, region, rng)
    return good, image, mask


def _save(array: np.ndarray, path: Path) -> None:
    """Write a PNG fast (zlib level 1, run-length strategy: noisy images barely compress anyway)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = array[..., ::-1] if array.ndim == 3 else array
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    path.write_bytes(cv2.imencode(".png", pixels, params)[1].tobytes())


def make_demo_dataset(
    out_dir: str | Path,
    seed: int = 0,
    n_good: int = 30,
    n_test_good: int = 6,
    n_defect: int = 9,
    size: int = 256,
    categories: tuple[str, ...] = ("fabric", "nut"),
) -> Path:
    """Write the demo dataset root (``out_dir/<category>/train|test|ground_truth``) and return it.

    Per category: ``n_good`` train/good, ``n_test_good`` test/good, ``n_defect`` images per
    defect type with ``NNN_mask.png`` masks (0/255). Image ``i`` of a split depends only on
    ``(seed, category, split, i)``.
    """
    if size < 64:
        raise ValueError(f"demo images need size >= 64, got {size}")
    root = Path(out_dir)
    jobs = []
    for c, category in enumerate(categories):
        if category not in CATEGORIES:
            raise ValueError(f"unknown demo category {category!r}; choose from {', '.join(CATEGORIES)}")
        jobs += [(c, category, "good", i, f"train/good/{i:03d}.png") for i in range(n_good)]
        jobs += [(c, category, "good", n_good + i, f"test/good/{i:03d}.png") for i in range(n_test_good)]
        for t, defect_type in enumerate(CATEGORIES[category][1]):
            jobs += [(c, category, defect_type, 1000 * (t + 1) + i, f"test/{defect_type}/{i:03d}.png") for i in range(n_defect)]
    for c, category, kind, index, name in track(jobs, description="demo dataset", transient=True):
        render, defects = CATEGORIES[category]
        rng = np.random.default_rng([seed, c, index])
        good, region = render(rng, size)
        if kind == "good":
            _save(good, root / category / name)
            continue
        image, mask = _apply(defects[kind], good, region, rng)
        _save(image, root / category / name)
        _save(mask.astype(np.uint8) * 255, root / category / name.replace("test/", "ground_truth/").replace(".png", "_mask.png"))
    return root
