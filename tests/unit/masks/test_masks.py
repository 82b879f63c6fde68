"""Mask sources: Perlin (DRAEM), object foreground, random shapes, real-mask augmentation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from anomalygen.errors import AnomalygenError
from anomalygen.masks import (
    augment_mask,
    brush_mask,
    ellipse_mask,
    foreground_mask,
    is_object,
    object_mask,
    perlin_mask,
    perlin_noise,
    resolve_mode,
)

cv2.setNumThreads(1)


def disc_image(seed: int, shape=(120, 160), centre=(55, 85), radius=35):
    """A bright disc on a dark, slightly noisy, unevenly lit plain background, and the disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2
    light = (xx / shape[1] * 6)[..., None]
    image = np.array([40, 45, 50]) + light + rng.normal(0, 2, (*shape, 3))
    image[disc] = np.array([170, 140, 90]) + rng.normal(0, 6, (disc.sum(), 3))
    return np.clip(image, 0, 255).astype(np.uint8), disc


def texture_image(seed: int, shape=(120, 160)):
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.uniform(0, 255, (*shape, 3)).astype(np.float32), (0, 0), 2)
    return np.clip((noise - noise.mean()) * 4 + 128, 0, 255).astype(np.uint8)


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_perlin_noise_range_any_shape_and_determinism():
    a = perlin_noise((37, 53), (4, 8), np.random.default_rng(3))
    b = perlin_noise((37, 53), (4, 8), np.random.default_rng(3))
    assert a.shape == (37, 53)
    assert np.array_equal(a, b)
    assert -1.0 <= a.min() < -0.1 and 0.1 < a.max() <= 1.0


def test_perlin_mask_coverage_matches_draem():
    coverage = [perlin_mask((128, 128), np.random.default_rng(s)).mean() for s in range(40)]
    assert all(c > 0 for c in coverage)
    assert 0.02 < np.mean(coverage) < 0.12
    assert max(coverage) < 0.5


def test_perlin_mask_deterministic_and_bool():
    a = perlin_mask((64, 96), np.random.default_rng(1))
    b = perlin_mask((64, 96), np.random.default_rng(1))
    assert a.dtype == bool and a.shape == (64, 96)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, perlin_mask((64, 96), np.random.default_rng(2)))


def test_perlin_times_foreground_stays_inside():
    _, disc = disc_image(0)
    for s in range(10):
        m = perlin_mask(disc.shape, np.random.default_rng(s), foreground=disc)
        assert m.sum() >= 16
        assert not (m & ~disc).any()


def test_perlin_mask_shape_mismatch_and_impossible_threshold():
    with pytest.raises(AnomalygenError):
        perlin_mask((10, 10), np.random.default_rng(0), foreground=np.ones((5, 5), bool))
    with pytest.raises(AnomalygenError, match="no Perlin mask"):
        perlin_mask((16, 16), np.random.default_rng(0), threshold=1.5, tries=3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_object_mask_finds_the_disc(seed):
    image, disc = disc_image(seed, centre=(50 + 5 * seed, 70 + 10 * seed))
    assert iou(object_mask(image), disc) > 0.9
    assert iou(foreground_mask(image, "object"), disc) > 0.9
    assert iou(foreground_mask(image, "auto"), disc) > 0.9


def test_is_object_decides_objects_and_textures():
    objects = [disc_image(s)[0] for s in range(3)]
    textures = [texture_image(s) for s in range(3)]
    assert is_object(objects)
    assert not is_object(textures)
    assert resolve_mode("auto", objects) == "object"
    assert resolve_mode("auto", textures) == "texture"
    assert resolve_mode("texture", objects) == "texture"
    assert foreground_mask(textures[0]).all()
    assert foreground_mask(objects[0], "texture").all()


def test_foreground_bad_mode_and_empty_input():
    with pytest.raises(AnomalygenError, match="unknown"):
        foreground_mask(texture_image(0), "stuff")
    with pytest.raises(AnomalygenError):
        is_object([])


def test_plain_image_without_object_falls_back_to_whole_image():
    plain = np.full((40, 50, 3), 90, np.uint8)
    assert not object_mask(plain).any()
    assert foreground_mask(plain, "object").all()


def test_ellipses_on_foreground_with_expected_area():
    _, disc = disc_image(0)
    areas = []
    for s in range(20):
        m = ellipse_mask(
            disc.shape, np.random.default_rng(s), count=(1, 1), area=(0.01, 0.02), foreground=disc
        )
        assert m.dtype == bool and m.any()
        areas.append(m.mean())
    # one ellipse of 1-2 % of the image, a little less when cut by the border
    assert 0.008 < np.median(areas) < 0.021


def test_brush_strokes_nonempty_and_deterministic():
    a = brush_mask((100, 120), np.random.default_rng(5))
    b = brush_mask((100, 120), np.random.default_rng(5))
    assert a.any() and np.array_equal(a, b)
    assert a.mean() < 0.5


def test_augmented_masks_stay_inside_foreground():
    _, disc = disc_image(0)
    real = np.zeros((60, 80), bool)
    real[20:30, 10:40] = True  # from a smaller image: rescaled by 120/60
    results = [augment_mask(real, np.random.default_rng(s), foreground=disc) for s in range(15)]
    for m in results:
        assert m.shape == disc.shape and m.any()
        assert not (m & ~disc).any()
    assert len({m.tobytes() for m in results}) == 15
    assert 300 / 2 < np.median([m.sum() for m in results]) < 300 * 4 * 1.6


def test_augment_mask_without_foreground_keeps_shape_and_rejects_empty():
    real = np.zeros((50, 50), bool)
    real[10:20, 10:20] = True
    m = augment_mask(real, np.random.default_rng(0), scale=(1.0, 1.0), rotate=0.0)
    assert m.shape == (50, 50) and 50 <= m.sum() <= 100
    with pytest.raises(AnomalygenError, match="empty"):
        augment_mask(np.zeros((5, 5), bool), np.random.default_rng(0))


def test_augment_mask_flips_by_default_both_ways():
    """Unrotated and unscaled, an L-shaped mask comes back in all four mirror images over a few
    draws (those cut by the canvas's edge left aside)."""
    real = np.zeros((100, 100), bool)
    real[10:20, 10] = True
    real[19, 10:16] = True
    shapes = set()
    for seed in range(40):
        m = augment_mask(real, np.random.default_rng(seed), scale=(1.0, 1.0), rotate=0.0)
        ys, xs = np.nonzero(m)
        if min(ys.min(), xs.min()) > 0 and max(ys.max(), xs.max()) < 99:
            shapes.add(m[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].tobytes())
    crop = real[10:20, 10:16]
    assert shapes == {c.tobytes() for c in (crop, crop[::-1], crop[:, ::-1], crop[::-1, ::-1])}


def test_augment_mask_rotates_over_the_whole_circle_and_scales_by_default():
    """Defaults: angle U(-180, 180) and scale U(0.75, 1.25). A bar's orientation (of its second
    moments) takes values all over [0, 180) degrees, and its area varies between 0.75² and 1.25²."""
    real = np.zeros((200, 200), bool)
    real[95:105, 70:130] = True
    angles, areas = [], []
    for seed in range(30):
        m = augment_mask(real, np.random.default_rng(seed), flip=False)
        ys, xs = np.nonzero(m)
        if min(ys.min(), xs.min()) == 0 or max(ys.max(), xs.max()) == 199:
            continue  # cut by the canvas's edge
        cov = np.cov(np.stack([xs, ys]))
        angles.append(np.degrees(0.5 * np.arctan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1])) % 180)
        areas.append(m.sum() / real.sum())
    assert len(angles) >= 15
    assert np.histogram(angles, bins=4, range=(0, 180))[0].min() >= 1  # every quarter of the circle
    assert 0.75**2 * 0.9 < min(areas) < 0.85 and 1.25 < max(areas) < 1.25**2 * 1.1


def test_augmented_mask_is_centred_on_a_foreground_pixel():
    """A 3 × 3 mask (unrotated, unscaled) over a foreground of two 3 × 3 blocks: centred on any
    block pixel it keeps at least 4 of its 9 pixels (at a corner), and a draw centred on a block's
    middle, kept whole, is found in most runs."""
    real = np.zeros((40, 40), bool)
    real[5:8, 30:33] = True
    foreground = np.zeros((40, 40), bool)
    foreground[10:13, 6:9] = foreground[25:28, 20:23] = True
    sizes = [augment_mask(real, np.random.default_rng(s), foreground=foreground, scale=(1.0, 1.0), rotate=0.0).sum()
             for s in range(20)]
    assert min(sizes) >= 4 and np.median(sizes) == 9


def test_augment_mask_is_never_empty_even_when_no_draw_lands_on_the_foreground():
    """Two far-apart pixels centred on a one-pixel foreground never touch it: the result is that pixel."""
    real = np.zeros((30, 30), bool)
    real[15, 2] = real[15, 27] = True
    foreground = np.zeros((30, 30), bool)
    foreground[8, 21] = True
    for seed in range(3):
        m = augment_mask(real, np.random.default_rng(seed), foreground=foreground, scale=(1.0, 1.0))
        assert np.array_equal(m, foreground)


def test_resize_mask_is_nearest_and_keeps_a_fitting_mask():
    from anomalygen.masks import resize_mask

    mask = np.zeros((4, 6), bool)
    mask[1:3, 2:4] = True
    assert resize_mask(mask, (4, 6)) is not None and np.array_equal(resize_mask(mask, (4, 6)), mask)
    big = resize_mask(mask, (8, 12))
    assert big.dtype == bool and big.sum() == 4 * mask.sum() and big[2:6, 4:8].all()
