"""The paper split: counts, order, disjointness, numeric ID order ("10" after "9")."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalygen.data import load_category, paper_split
from anomalygen.types import ImageRecord


def _records(n: int) -> list[ImageRecord]:
    return [ImageRecord(Path(f"{i}.png"), "crack", (Path(f"{i}_mask.png"),), str(i)) for i in range(n)]


@pytest.mark.parametrize("n", range(1, 11))
def test_counts_order_disjoint(n):
    train, test = paper_split({"crack": _records(n), "hole": _records(n + 2)})
    assert len(train["crack"]) == math.ceil(n / 3)
    assert len(test["crack"]) == (2 * n) // 3
    assert train["crack"] + test["crack"] == _records(n)
    assert not set(train["crack"]) & set(test["crack"])
    assert len(train["hole"]) == math.ceil((n + 2) / 3)


def test_exact_thirds_and_fraction():
    train, test = paper_split({"a": _records(9), "b": _records(30)})
    assert (len(train["a"]), len(test["a"]), len(train["b"]), len(test["b"])) == (3, 6, 10, 20)
    train, test = paper_split({"a": _records(7)}, train_fraction=0.5)
    assert (len(train["a"]), len(test["a"])) == (4, 3)
    train, test = paper_split({"a": _records(7)}, train_fraction=1.0)
    assert (len(train["a"]), len(test["a"])) == (7, 0)
    with pytest.raises(ValueError):
        paper_split({"a": _records(3)}, train_fraction=0)


def test_numeric_order_from_disk(tmp_path):
    """Unpadded names 1..10: "10" sorts after "9", so the train third is 1, 2, 3, 4."""
    category = tmp_path / "widget"
    pixel = np.zeros((4, 4), np.uint8)
    mask = pixel.copy()
    mask[1, 1] = 255
    for folder in ("train/good", "test/crack", "ground_truth/crack"):
        (category / folder).mkdir(parents=True)
    Image.fromarray(pixel).save(category / "train/good/0.png")
    for i in range(1, 11):
        Image.fromarray(pixel).save(category / f"test/crack/{i}.png")
        Image.fromarray(mask).save(category / f"ground_truth/crack/{i}_mask.png")
    data = load_category(category)
    assert [r.image_id for r in data.defects["crack"]] == [str(i) for i in range(1, 11)]
    train, test = paper_split(data.defects)
    assert [r.image_id for r in train["crack"]] == ["1", "2", "3", "4"]
    assert [r.image_id for r in test["crack"]] == ["5", "6", "7", "8", "9", "10"]
