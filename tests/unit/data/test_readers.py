"""Readers on small fixtures written in tmp_path: MVTec AD (both mask namings), MVTec LOCO,
VisA, generic folder; category selection; require_good; skip_bad; dataset_info."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalygen.data import dataset_info, list_categories, load_category, load_defects, load_folder, load_mask
from anomalygen.errors import DataError

SHAPE = (10, 14)


def _img(path: Path, value: int = 90, shape=SHAPE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*shape, 3), value, np.uint8)).save(path)
    return path


def _mask(path: Path, box=(slice(2, 5), slice(3, 8)), high: int = 255, shape=SHAPE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(shape, np.uint8)
    mask[box] = high
    Image.fromarray(mask).save(path)
    return path


def _mvtec(root: Path, name: str = "widget") -> Path:
    """train/good 3, test/good 2, crack 3 (NNN_mask.png), hole 2 (masks named like the image)."""
    category = root / name
    for i in range(3):
        _img(category / f"train/good/{i:03d}.png")
        _img(category / f"test/crack/{i:03d}.png")
        _mask(category / f"ground_truth/crack/{i:03d}_mask.png")
    for i in range(2):
        _img(category / f"test/good/{i:03d}.png")
        _img(category / f"test/hole/{i:02d}.png")
        _mask(category / f"ground_truth/hole/{i:02d}.png")
    return category


def test_mvtec_both_mask_namings(tmp_path):
    data = load_category(_mvtec(tmp_path))
    assert (data.name, data.layout, data.defect_types) == ("widget", "mvtec", ["crack", "hole"])
    assert (len(data.train_good), len(data.test_good)) == (3, 2)
    assert data.defects["crack"][2].mask_paths == (data.root / "ground_truth/crack/002_mask.png",)
    assert data.defects["hole"][1].mask_paths == (data.root / "ground_truth/hole/01.png",)
    assert all(r.defect_type == "hole" and r.image_id in ("00", "01") for r in data.defects["hole"])
    examples = load_defects(data.defects["hole"])
    assert [e.mask.sum() for e in examples] == [15, 15]
    assert data.problems == []


def test_dataset_root_and_categories(tmp_path):
    _mvtec(tmp_path, "widget")
    _mvtec(tmp_path, "gadget")
    (tmp_path / "notes").mkdir()
    assert list_categories(tmp_path) == ["gadget", "widget"]
    assert load_category(tmp_path, "gadget").root == tmp_path / "gadget"
    assert load_category(tmp_path / "widget", "widget").name == "widget"
    with pytest.raises(DataError, match=f"{tmp_path}: no category given; available: gadget, widget"):
        load_category(tmp_path)
    with pytest.raises(DataError, match="unknown category 'bolt'; available: gadget, widget"):
        load_category(tmp_path, "bolt")
    with pytest.raises(DataError, match="missing: folder not found"):
        load_category(tmp_path / "missing")
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"a\.png: not a folder \(a file\)"):
        load_category(tmp_path / "a.png")
    with pytest.raises(DataError, match="notes: not a dataset"):
        load_category(tmp_path / "notes")
    with pytest.raises(DataError, match="unknown layout"):
        load_category(tmp_path, "widget", layout="coco")


def test_require_good(tmp_path):
    out = tmp_path / "generated"
    _img(out / "test/crack/000.png")
    _mask(out / "ground_truth/crack/000_mask.png")
    with pytest.raises(DataError, match=r"generated/train/good: missing folder"):
        load_category(out)
    data = load_category(out, require_good=False)
    assert (data.train_good, data.test_good, list(data.defects)) == ([], [], ["crack"])
    (out / "train/good").mkdir(parents=True)
    (out / "train/good/notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"generated/train/good: no images"):
        load_category(out)


def test_missing_mask_raises_or_is_skipped(tmp_path):
    category = _mvtec(tmp_path)
    _img(category / "test/crack/003.png")
    with pytest.raises(DataError, match=r"test/crack/003.png: defect image without a mask"):
        load_category(category)
    data = load_category(category, skip_bad=True)
    assert len(data.defects["crack"]) == 3
    assert data.problems == [f"{category}/test/crack/003.png: defect image without a mask"]


def test_skip_bad_validates_every_file(tmp_path):
    category = _mvtec(tmp_path)
    _mask(category / "ground_truth/crack/001_mask.png", box=(slice(0, 0), slice(0, 0)))  # all zero
    _mask(category / "ground_truth/hole/00.png", shape=(9, 14))  # size mismatch
    truncated = category / "train/good/001.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    data = load_category(category)  # content problems surface when loading ...
    with pytest.raises(DataError, match="001_mask.png: mask is all zero"):
        load_mask(data.defects["crack"][1])
    data = load_category(category, skip_bad=True)  # ... or all at once with skip_bad
    assert [r.image_id for r in data.train_good] == ["000", "002"]
    assert [r.image_id for r in data.defects["crack"]] == ["000", "002"]
    assert [r.image_id for r in data.defects["hole"]] == ["01"]
    assert len(data.problems) == 3
    assert any("001.png: unreadable or truncated" in p for p in data.problems)
    assert any("hole/00.png: mask is 14x9 but its image 00.png is 14x10" in p for p in data.problems)
    info = dataset_info(category)["categories"]["widget"]
    assert (info["train_good"], info["test_good"], info["defects"]) == (2, 2, {"crack": 2, "hole": 1})
    assert info["image_sizes"] == {"14x10": 7} and len(info["problems"]) == 3


def test_loco_union(tmp_path):
    category = tmp_path / "juice_bottle"
    _img(category / "train/good/000.png")
    _img(category / "validation/good/000.png")
    _img(category / "test/good/000.png")
    for i in range(2):
        _img(category / f"test/logical_anomalies/{i:03d}.png")
        _mask(category / f"ground_truth/logical_anomalies/{i:03d}/000.png")
        _mask(category / f"ground_truth/logical_anomalies/{i:03d}/001.png", box=(slice(7, 9), slice(0, 2)))
    _img(category / "test/structural_anomalies/000.png")
    _mask(category / "ground_truth/structural_anomalies/000/000.png")
    data = load_category(category)
    assert data.layout == "loco"
    assert data.defect_types == ["logical_anomalies", "structural_anomalies"]
    record = data.defects["logical_anomalies"][1]
    assert [p.name for p in record.mask_paths] == ["000.png", "001.png"]
    assert load_mask(record).sum() == 15 + 4


def test_visa_csv(tmp_path):
    root = tmp_path / "VisA"
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        _img(root / f"candle/Data/Images/Normal/{i:04d}.JPG")
        rows.append(f"candle,{'train' if i < 2 else 'test'},normal,candle/Data/Images/Normal/{i:04d}.JPG,")
    for i in (10, 9):
        _img(root / f"candle/Data/Images/Anomaly/{i:03d}.JPG")
        _mask(root / f"candle/Data/Masks/Anomaly/{i:03d}.png", high=2)  # a label map, not 0/255
        rows.append(f"candle,test,anomaly,candle/Data/Images/Anomaly/{i:03d}.JPG,candle/Data/Masks/Anomaly/{i:03d}.png")
    _img(root / "pcb1/Data/Images/Normal/0000.JPG")
    rows.append("pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,")
    (root / "split_csv").mkdir()
    (root / "split_csv/1cls.csv").write_text("\n".join(rows) + "\n")
    assert list_categories(root) == ["candle", "pcb1"]
    for data in (load_category(root, "candle"), load_category(root / "candle")):
        assert (data.name, data.layout) == ("candle", "visa")
        assert (len(data.train_good), len(data.test_good)) == (2, 1)
        assert [r.image_id for r in data.defects["anomaly"]] == ["009", "010"]
        assert load_mask(data.defects["anomaly"][0]).sum() == 15
    with pytest.raises(DataError, match="no category given; available: candle, pcb1"):
        load_category(root)
    (root / "split_csv/1cls.csv").write_text("object,image\ncandle,x.png\n")
    with pytest.raises(DataError, match="1cls.csv: not a VisA split file: missing columns label, mask, split"):
        load_category(root, "candle")
    header = rows[0]
    for body, problem in [("", "no rows below the header"),
                          (f"{rows[1]}\n\ncandle,test\n", "line 4: fewer columns than the header"),  # a blank line 3
                          (f"{rows[1]}\ncandle,test,anomaly,,\n", "line 3: no image path")]:
        (root / "split_csv/1cls.csv").write_text(f"{header}\n{body}")
        for call in (lambda: list_categories(root), lambda: load_category(root, "candle")):
            with pytest.raises(DataError, match=f"1cls.csv: {problem}$"):
                call()


def test_generic_folder(tmp_path):
    for i in range(2):
        _img(tmp_path / f"ok/{i}.png")
        _img(tmp_path / f"bad/{i}.jpg")
    _mask(tmp_path / "masks/0.png")
    _mask(tmp_path / "masks/1_mask.png")
    data = load_folder(tmp_path / "ok", tmp_path / "bad", tmp_path / "masks", defect_type="dent")
    assert (data.layout, data.defect_types, len(data.train_good)) == ("folder", ["dent"], 2)
    assert [p.name for r in data.defects["dent"] for p in r.mask_paths] == ["0.png", "1_mask.png"]
    with pytest.raises(DataError, match="nomasks: missing folder"):
        load_folder(tmp_path / "ok", tmp_path / "bad", tmp_path / "nomasks")
    category = tmp_path / "part"
    _img(category / "good/a.png")
    _img(category / "defect/b.png")
    _mask(category / "mask/b.png")
    data = load_category(category)
    assert (data.name, data.layout, len(data.train_good), len(data.defects["defect"])) == ("part", "folder", 1, 1)


@pytest.mark.parametrize("stray", [".ipynb_checkpoints", "notes", "000"])
def test_a_stray_mask_subfolder_does_not_make_loco(tmp_path, stray):
    """A hidden folder, a folder naming no image, even one folder named like an image among flat
    masks: still MVTec AD, every mask found; `datasets info` says why."""
    category = _mvtec(tmp_path)
    (category / "ground_truth" / "crack" / stray).mkdir()
    (category / "test" / ".ipynb_checkpoints").mkdir()  # a hidden folder is no defect type either
    data = load_category(category)
    assert data.layout == "mvtec" and data.defect_types == ["crack", "hole"]
    assert len(data.defects["crack"]) == 3 and len(data.defects["hole"]) == 2
    info = dataset_info(category)["categories"]["widget"]
    assert info["layout"] == "mvtec" and not info["problems"]
    assert info["layout_reason"].startswith(f"{int(stray == '000')} defect images with a mask folder")
    assert "5 with a mask file" in info["layout_reason"]


def test_datasets_info_prints_why_a_layout_was_chosen(tmp_path):
    from typer.testing import CliRunner

    from anomalygen.cli import app

    category = _mvtec(tmp_path)
    result = CliRunner().invoke(app, ["datasets", "info", str(category)])
    assert result.exit_code == 0, result.output
    assert "layout (widget): mvtec, because 0 defect images with a mask folder" in result.output


def _btad(root: Path, name: str = "01") -> Path:
    """BTAD: train/ok 3 (.bmp), test/ok 2, test/ko 3 (.bmp) with masks named like the image, .png or .bmp."""
    category = root / name
    for i in range(3):
        _img(category / f"train/ok/{i:04d}.bmp")
        _img(category / f"test/ko/{i:04d}.bmp")
        _mask(category / f"ground_truth/ko/{i:04d}.{'png' if i < 2 else 'bmp'}")
    for i in range(2):
        _img(category / f"test/ok/{i:04d}.bmp")
    return category


def test_btad_is_detected_and_read(tmp_path):
    _btad(tmp_path / "btad")
    _btad(tmp_path / "btad", "02")
    assert list_categories(tmp_path / "btad") == ["01", "02"]
    data = load_category(tmp_path / "btad", "01")
    assert data.layout == "btad" and "train/ok" in data.layout_reason
    assert [len(data.train_good), len(data.test_good)] == [3, 2]
    assert list(data.defects) == ["ko"]  # test/ok is the good split, not a defect type
    assert [r.mask_paths[0].suffix for r in data.defects["ko"]] == [".png", ".png", ".bmp"]
    mask = load_mask(data.defects["ko"][2])
    assert mask.shape == SHAPE and mask[2:5, 3:8].all() and mask.sum() == 15
    with pytest.raises(DataError, match="train/good"):  # read as MVTec it has no normal training images
        load_category(tmp_path / "btad" / "01", layout="mvtec")
