"""Validity checks (``anomalygen.generation.validity``) where a method's declaration reaches them: ``judge``
hands each method's sample to the checks with its source good image and ``blended`` as the class's
``outside_mask`` declares; and the measurements' edges (the band, the rings, an empty surrounding)."""

from __future__ import annotations

import numpy as np
import pytest

from anomalygen.generation import validity
from anomalygen.methods.base import available_methods, get_method
from anomalygen.types import AnomalySample


@pytest.mark.parametrize("name", available_methods())
def test_judge_gives_the_checks_the_source_and_blending_the_class_declares(name, monkeypatch):
    seen = []
    monkeypatch.setattr(validity.Calibration, "check",
                        lambda self, image, mask, defect_type, source=None, *, blended=False: seen.append((source, blended)))
    calibration = validity.Calibration(mode="texture", visible={}, spill={}, on_object={}, area={})
    goods = [np.full((8, 8, 3), level, np.uint8) for level in (10, 20)]
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    policy = get_method(name).outside_mask
    for meta, image in [({"source_index": 1}, goods[0]), ({}, goods[0]), ({"source_index": 1}, np.zeros((6, 8, 3), np.uint8))]:
        validity.judge(calibration, AnomalySample(image, mask[: image.shape[0]], "crack", meta=meta), goods, policy)
    (with_source, blended), (no_index, _), (other_size, _) = seen
    assert blended == (policy == "kept")
    assert with_source is (None if policy == "none" else goods[1])
    assert no_index is None and other_size is None


def test_changed_outside_counts_from_beyond_the_band():
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    source = np.zeros((20, 20, 3), np.uint8)
    at_band, beyond = source.copy(), source.copy()
    at_band[12, 7] = 50  # 3 pixels below the mask: distance 3
    beyond[13, 7] = 50  # distance 4
    assert validity.changed_outside(at_band, mask, source, band=3, pixel_tolerance=8) == 0.0
    assert validity.changed_outside(beyond, mask, source, band=3, pixel_tolerance=8) > 0.0
    beyond[13, 7] = 8  # not more than the tolerance
    assert validity.changed_outside(beyond, mask, source, band=3, pixel_tolerance=8) == 0.0


def test_ring_radius_is_three_percent_of_the_short_side_and_at_least_three_pixels():
    assert validity.ring_radius(np.zeros((200, 300), bool)) == 6
    assert validity.ring_radius(np.zeros((40, 300), bool)) == 3


def test_visible_compares_the_mask_with_its_ring_only():
    """Inside and the ring of 3 pixels around it alike, far away unlike: not visible (without a source)."""
    image = np.zeros((40, 40, 3), np.uint8)
    image[10:30, 10:30] = 100  # the mask (15:25) and its ring (3 px) inside this
    mask = np.zeros((40, 40), bool)
    mask[15:25, 15:25] = True
    assert validity.visible_score(image, mask) == 0.0
    image[15:25, 15:25] = 160
    assert validity.visible_score(image, mask) == pytest.approx(60.0)  # W1 = 60, ring std 0


def test_a_mask_covering_everything_has_no_surroundings_to_score():
    image = np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    full = np.ones((12, 12), bool)
    assert validity.visible_score(image, full) == 0.0
    assert validity.spill_score(image, full) == 0.0
    assert validity.changed_outside(image, full, image // 2, band=2, pixel_tolerance=8) == 0.0


def test_on_object_is_the_masks_share_on_the_foreground():
    plain = np.full((64, 64, 3), 128, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 24:44] = True
    assert validity.on_object_score(mask, plain) == 1.0  # no object found: not checked
    half = plain.copy()
    half[:, 34:] = 0  # an "object" standing out of the border colour: the dark right part
    half[:, :30] = 128
    score = validity.on_object_score(mask, half)
    assert 0.3 < score < 0.7


def test_the_ring_reaches_its_full_radius():
    """The ring is the pixels at distance 1..r (r included): a change only at distance exactly r is seen."""
    mask = np.zeros((40, 40), bool)
    mask[15:25, 15:25] = True
    distance = validity.distance_to(mask)
    assert validity.ring_radius(mask) == 3
    image = np.where(distance >= 2.9, 200, 100).astype(np.uint8)[..., None].repeat(3, -1)
    assert not ((distance >= 2.9) & (distance < 3)).any()  # the outermost ring pixels are at exactly 3
    assert validity.visible_score(image, mask) > 0.3  # 0 when the ring stops one pixel short


def test_size_bounds_include_the_smallest_and_largest_real_area():
    calibration = validity.Calibration(mode="texture", visible={}, spill={}, on_object={},
                                       area={"crack": [16 / 256, 64 / 256]}, size_margin=1.0)
    for side, passed in ((3, False), (4, True), (8, True), (9, False)):  # areas 9, 16, 64, 81 of 256 pixels
        mask = np.zeros((16, 16), bool)
        mask[:side, :side] = True
        assert calibration._size(mask, "crack").passed is passed, side
