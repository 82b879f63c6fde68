"""Image and mask I/O: formats to RGB uint8, mask validation, each bad input a DataError naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalygen.data import load_defect, load_defects, load_goods, load_image, load_mask
from anomalygen.errors import DataError
from anomalygen.types import ImageRecord

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)


def _save(array: np.ndarray, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _mask(levels=(0, 255), shape=(12, 16)) -> np.ndarray:
    mask = np.full(shape, levels[0], np.uint8)
    mask[2:6, 3:9] = levels[1]
    return mask


def _defect(tmp_path: Path, *masks: np.ndarray, labels: bool = False) -> ImageRecord:
    image = _save(RGB, tmp_path / "img" / "007.png")
    paths = tuple(_save(m, tmp_path / "gt" / f"{i:03d}.png") for i, m in enumerate(masks))
    return ImageRecord(image, "crack", paths, "007", mask_labels=labels)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff"])
def test_lossless_formats_roundtrip(tmp_path, suffix):
    image = load_image(_save(RGB, tmp_path / f"x{suffix}"))
    assert image.dtype == np.uint8 and image.shape == (12, 16, 3)
    assert np.array_equal(image, RGB)


def test_jpeg_grayscale_rgba_palette_16bit(tmp_path):
    smooth = np.dstack([np.tile(np.arange(16, dtype=np.uint8) * 15, (12, 1))] * 3)
    jpg = load_image(_save(smooth, tmp_path / "x.jpg", quality=95))
    assert jpg.shape == (12, 16, 3) and np.abs(jpg.astype(int) - smooth).mean() < 3
    gray = RGB[..., 0]
    assert np.array_equal(load_image(_save(gray, tmp_path / "g.png")), np.repeat(gray[..., None], 3, 2))
    rgba = np.dstack([RGB, np.full((12, 16), 7, np.uint8)])
    assert np.array_equal(load_image(_save(rgba, tmp_path / "a.png")), RGB)
    palette = Image.fromarray(RGB).quantize(8)
    palette.save(tmp_path / "p.png")
    assert np.array_equal(load_image(tmp_path / "p.png"), np.asarray(palette.convert("RGB")))
    deep = (gray.astype(np.uint16) * 257)
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert np.array_equal(load_image(tmp_path / "d.png")[..., 1], gray)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image(tmp_path, suffix):
    path = _save(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8), tmp_path / f"t{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"t\.(png|jpg): unreadable or truncated"):
        load_image(path)


def test_unreadable_and_missing(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="junk.png: unreadable"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(DataError, match="nope.png: file not found"):
        load_image(tmp_path / "nope.png")


def test_mask_levels_accepted(tmp_path):
    for levels in ((0, 255), (0, 1)):
        mask = load_mask(_defect(tmp_path, _mask(levels)))
        assert mask.dtype == bool and mask.sum() == 24 and mask[2:6, 3:9].all()
    colour = np.dstack([_mask(), np.zeros((12, 16), np.uint8), np.zeros((12, 16), np.uint8)])
    assert load_mask(_defect(tmp_path, colour)).sum() == 24


def test_mask_union(tmp_path):
    second = np.zeros((12, 16), np.uint8)
    second[8:10, 0:4] = 255
    record = _defect(tmp_path, _mask(), second, np.zeros((12, 16), np.uint8))
    assert load_mask(record).sum() == 24 + 8


def test_label_masks(tmp_path):
    labels = _mask((0, 1))
    labels[8:10, 0:4] = 2
    with pytest.raises(DataError, match="000.png: non-binary mask"):
        load_mask(_defect(tmp_path, labels))
    assert load_mask(_defect(tmp_path, labels, labels=True)).sum() == 32


@pytest.mark.parametrize(
    "mask,problem",
    [
        (_mask(shape=(12, 15)), "mask is 15x12 but its image 007.png is 16x12"),
        (np.zeros((12, 16), np.uint8), "mask is all zero"),
        (np.arange(192, dtype=np.uint8).reshape(12, 16), "non-binary mask"),
        (_mask((0, 128)), "non-binary mask"),
    ],
)
def test_bad_masks(tmp_path, mask, problem):
    record = _defect(tmp_path, mask)
    with pytest.raises(DataError, match=f"gt/000.png: {problem}"):
        load_mask(record)


def test_no_mask_and_missing_mask_file(tmp_path):
    image = _save(RGB, tmp_path / "009.png")
    with pytest.raises(DataError, match="009.png: defect image without a mask"):
        load_mask(ImageRecord(image, "crack", (), "009"))
    with pytest.raises(DataError, match="gone_mask.png: file not found"):
        load_mask(ImageRecord(image, "crack", (tmp_path / "gone_mask.png",), "009"))


def test_load_defect_and_skip_bad(tmp_path):
    good = _defect(tmp_path / "a", _mask())
    bad = _defect(tmp_path / "b", np.zeros((12, 16), np.uint8))
    example = load_defect(good)
    assert example.defect_type == "crack" and example.source == good.path
    assert np.array_equal(example.image, RGB) and example.mask.sum() == 24
    with pytest.raises(DataError):
        load_defects([good, bad])
    with pytest.warns(UserWarning, match="all zero"):
        assert len(load_defects([good, bad], skip_bad=True)) == 1


def test_load_goods_limit(tmp_path):
    records = [ImageRecord(_save(RGB + i, tmp_path / f"{i}.png"), image_id=str(i)) for i in range(4)]
    goods = load_goods(records, limit=2)
    assert len(goods) == 2 and np.array_equal(goods[1], RGB + 1)
    assert len(load_goods(records)) == 4


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_rgb(tmp_path, suffix):
    import cv2

    deep = np.random.default_rng(1).integers(0, 65536, (6, 7, 3)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / f"d{suffix}"), deep[..., ::-1])
    image = load_image(tmp_path / f"d{suffix}")
    assert image.dtype == np.uint8 and image.shape == (6, 7, 3)
    assert np.abs(image.astype(int) - deep / 257).max() <= 1
