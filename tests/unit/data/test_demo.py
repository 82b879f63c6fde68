"""The procedural demo dataset: layout, counts, determinism, and defects confined to masks."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from anomalygen.data import load_category, load_defects, load_goods, paper_split
from anomalygen.data.demo import CATEGORIES, make_demo_dataset, render_pair


def _digest(root) -> str:
    files = sorted(p for p in root.rglob("*.png"))
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    a = make_demo_dataset(tmp_path / "a", seed=3, n_good=2, n_test_good=1, n_defect=2, size=64)
    b = make_demo_dataset(tmp_path / "b", seed=3, n_good=2, n_test_good=1, n_defect=2, size=64)
    c = make_demo_dataset(tmp_path / "c", seed=4, n_good=2, n_test_good=1, n_defect=2, size=64)
    assert len(list(a.rglob("*.png"))) == 2 * (2 + 1 + 3 * 2 * 2)
    assert _digest(a) == _digest(b) != _digest(c)


def test_layout_and_counts(demo_root):
    for name, (_, defects) in CATEGORIES.items():
        data = load_category(demo_root, name)
        assert data.layout == "mvtec"
        assert (len(data.train_good), len(data.test_good)) == (30, 6)
        assert data.defect_types == sorted(defects) and len(defects) >= 3
        train, test = paper_split(data.defects)
        assert all(len(train[t]) == 3 and len(test[t]) == 6 for t in data.defect_types)


def test_goods_vary_and_masks_valid(demo_root):
    for name in CATEGORIES:
        data = load_category(demo_root, name)
        goods = np.stack(load_goods(data.train_good, limit=6)).astype(np.float32)
        assert goods.shape == (6, 256, 256, 3)
        assert np.abs(goods[1:] - goods[:1]).mean() > 5  # lighting, position, phase differ
        for examples in map(load_defects, data.defects.values()):
            fractions = [e.mask.mean() for e in examples]
            assert all(0.0003 < f < 0.08 for f in fractions), fractions


@pytest.mark.parametrize("category,defect_type", [(c, t) for c, (_, ds) in CATEGORIES.items() for t in ds])
def test_defect_changes_only_inside_mask(category, defect_type):
    for seed in range(3):
        good, image, mask = render_pair(category, defect_type, seed, size=128)
        changed = np.abs(image.astype(int) - good.astype(int)).max(axis=2)
        assert mask.any()
        assert (changed[~mask] == 0).all()
        assert changed[mask].mean() > 12
        assert (changed[mask] > 0).mean() > 0.8
