"""Readers on the real datasets in <repo>/../shared/data (skipped when absent)."""

from __future__ import annotations

import numpy as np
import pytest

from anomalygen.data import dataset_info, list_categories, load_category, load_defect, load_image, paper_split

pytestmark = pytest.mark.shared


def test_categories(shared_data):
    assert {"hazelnut_toy", "magnetic_tile", "mvtec_ad_grid_subset"} <= set(list_categories(shared_data))


def test_hazelnut_masks_named_like_images(shared_data):
    data = load_category(shared_data, "hazelnut_toy")
    assert (len(data.train_good), len(data.test_good), data.defect_types) == (28, 6, ["colour"])
    assert len(data.defects["colour"]) == 17
    assert data.defects["colour"][0].mask_paths[0].name == "00.png"
    example = load_defect(data.defects["colour"][-1])
    assert example.image.shape == (512, 512, 3) and example.mask.shape == (512, 512) and example.mask.any()


def test_magnetic_tile_grayscale_varied_sizes(shared_data):
    data = load_category(shared_data / "magnetic_tile")
    counts = {t: len(rs) for t, rs in data.defects.items()}
    assert counts == {"blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 103}
    train, test = paper_split(data.defects)
    assert {t: len(rs) for t, rs in train.items()} == {"blowhole": 39, "break": 29, "crack": 19, "fray": 11, "uneven": 35}
    assert all(len(train[t]) + len(test[t]) == counts[t] for t in counts)
    image = load_image(data.defects["crack"][0].path)
    assert image.ndim == 3 and image.shape[2] == 3 and np.array_equal(image[..., 0], image[..., 2])


def test_grid_subset_info(shared_data):
    info = dataset_info(shared_data, "mvtec_ad_grid_subset")["categories"]["mvtec_ad_grid_subset"]
    assert (info["train_good"], info["test_good"]) == (7, 3)
    assert info["defects"] == {"bent": 3, "broken": 2, "glue": 2, "metal_contamination": 2, "thread": 2}
    assert info["image_sizes"] == {"512x512": 21} and info["problems"] == []


def test_magnetic_tile_problems_found(shared_data):
    """Four 'uneven' masks in magnetic_tile are empty: skip_bad drops them and says which."""
    data = load_category(shared_data, "magnetic_tile", skip_bad=True)
    assert len(data.defects["uneven"]) == 99
    assert [p.split("/")[-1] for p in data.problems] == [
        f"{i}_mask.png: mask is all zero (no anomalous pixel)" for i in ("050", "053", "066", "067")
    ]
