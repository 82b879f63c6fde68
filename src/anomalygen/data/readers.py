"""Readers for one category of MVTec AD, MVTec LOCO, VisA, or a generic folder of images.

Layouts (``layout="auto"`` tells them apart):

- ``mvtec``: ``train/good``, ``test/good``, ``test/<type>/NNN.png``, masks
  ``ground_truth/<type>/NNN_mask.png`` or named exactly like the image (``NNN.png``).
- ``loco``: as ``mvtec`` but ``ground_truth/<type>/NNN/000.png, 001.png, ...`` (the union is
  the mask); ``validation/good`` is not read. Chosen only when more defect images have such a
  folder than a flat mask file: a stray sub-folder does not turn a category into LOCO.

- ``btad``: BTAD (beanTech): ``train/ok``, ``test/ok``, ``test/ko``, masks ``ground_truth/ko/NNNN.png``
  or ``.bmp`` named like the image; one defect type, ``ko``. Chosen when ``train/ok`` exists.
- ``visa``: a dataset root holding ``split_csv/1cls.csv`` (columns object, split, label, image,
  mask; paths relative to the root); anomalies form one defect type, ``anomaly``.
- ``folder``: ``good/``, ``defect/`` and ``mask/`` under the category folder (masks named like
  their image, or ``<stem>_mask``); see also ``load_folder``.

Hidden entries (``.ipynb_checkpoints``, ``.DS_Store``, ...) are ignored everywhere.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anomalygen.data.images import check_record, is_image_file, load_image
from anomalygen.errors import DataError
from anomalygen.types import ImageRecord

LAYOUTS = ("auto", "mvtec", "loco", "btad", "visa", "folder")
GOOD = {"btad": "ok"}  # the folder of normal images where a layout does not call it "good"
VISA_CSV = Path("split_csv") / "1cls.csv"


@dataclass
class CategoryData:
    """One category: good images per split and the defect images per type.

    Defect types are sorted by name and records within a split by numeric ID ("10" after "9").
    ``problems`` lists what ``skip_bad`` skipped, as "path: problem" lines.
    """

    name: str
    root: Path
    layout: str
    train_good: list[ImageRecord]
    test_good: list[ImageRecord]
    defects: dict[str, list[ImageRecord]]
    problems: list[str] = field(default_factory=list)
    layout_reason: str = ""  # why ``layout="auto"`` chose this layout

    @property
    def defect_types(self) -> list[str]:
        return list(self.defects)


def id_key(name: str) -> tuple:
    """Natural sort key: digit runs compare as numbers, so "9" < "10" and "img2" < "img10"."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name))


def _visible(folder: Path) -> list[Path]:
    """The entries of ``folder`` that are not hidden (no leading dot)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


def _images(folder: Path) -> list[Path]:
    return sorted((p for p in _visible(folder) if is_image_file(p)), key=lambda p: id_key(p.stem))


def _defect_dirs(root: Path, good: str = "good") -> list[Path]:
    """``test/<type>`` folders (not the ``good`` one), by name."""
    test = root / "test"
    return sorted((d for d in _visible(test) if d.is_dir() and d.name != good), key=lambda d: d.name) if test.is_dir() else []


def _sorted_records(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    return sorted(records, key=lambda r: id_key(r.image_id))


def _goods(folder: Path) -> list[ImageRecord]:
    if not folder.is_dir():
        return []
    return [ImageRecord(path=p, image_id=p.stem) for p in _images(folder)]


def _require_dir(folder: Path, why: str) -> None:
    if not folder.is_dir():
        raise DataError(folder, f"missing folder ({why})")


def _flat_mask_finder(mask_dir: Path):
    """Find the mask of image ``stem`` in ``mask_dir``: ``<stem>_mask.*`` or ``<stem>.*``. Several
    such files (both conventions, or two extensions) are one mask only when their pixels agree;
    otherwise the image's mask is ambiguous, a ``DataError`` naming the files."""
    by_stem: dict[str, list[Path]] = {}
    for path in _images(mask_dir) if mask_dir.is_dir() else []:
        by_stem.setdefault(path.stem, []).append(path)

    def find(image: Path) -> tuple[Path, ...]:
        found = by_stem.get(f"{image.stem}_mask", []) + by_stem.get(image.stem, [])
        if len(found) > 1 and any(not _same_pixels(found[0], other) for other in found[1:]):
            raise DataError(image, f"ambiguous mask: {' and '.join(str(p) for p in found)} differ; remove all but one")
        return tuple(found[:1])

    return find


def _same_pixels(a: Path, b: Path) -> bool:
    """Whether two image files hold the same pixels (unreadable ones do not)."""
    if a.read_bytes() == b.read_bytes():
        return True
    try:
        return np.array_equal(load_image(a), load_image(b))
    except DataError:
        return False


def _loco_mask_finder(mask_dir: Path):
    def find(image: Path) -> tuple[Path, ...]:
        folder = mask_dir / image.stem
        return tuple(_images(folder)) if folder.is_dir() else ()

    return find


def _defect_records(image_dir: Path, defect_type: str, find_masks, problems: list[str] | None) -> list[ImageRecord]:
    """Records of ``image_dir`` with their masks; a missing mask raises unless collecting ``problems``."""
    records = []
    for image in _images(image_dir):
        try:
            masks = find_masks(image)
            if not masks:
                raise DataError(image, "defect image without a mask")
        except DataError as error:
            if problems is None:
                raise
            problems.append(str(error))
            continue
        records.append(ImageRecord(path=image, defect_type=defect_type, mask_paths=masks, image_id=image.stem))
    return records


def _read_mvtec(root: Path, loco: bool, require_good: bool, problems: list[str] | None, good: str = "good"):
    """MVTec AD / LOCO, and BTAD (``good="ok"``)."""
    if require_good:
        _require_dir(root / "train" / good, f"an MVTec-style category needs train/{good}")
    _require_dir(root / "test", "an MVTec-style category needs test/<defect type>")
    defects = {}
    for type_dir in _defect_dirs(root, good):
        mask_dir = root / "ground_truth" / type_dir.name
        finder = _loco_mask_finder(mask_dir) if loco else _flat_mask_finder(mask_dir)
        records = _defect_records(type_dir, type_dir.name, finder, problems)
        if records:
            defects[type_dir.name] = records
    train = _goods(root / "train" / good)
    if require_good and not train:
        raise DataError(root / "train" / good, "no images (PNG, JPG, BMP or TIFF) in this folder")
    return train, _goods(root / "test" / good), defects


def _visa_rows(dataset_root: Path) -> list[dict[str, str]]:
    csv_path = dataset_root / VISA_CSV
    columns = ("object", "split", "label", "image", "mask")
    try:
        with csv_path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(csv_path, f"unreadable split file ({error})") from error
    missing = set(columns) - set(reader.fieldnames or ())
    if missing:
        raise DataError(csv_path, f"not a VisA split file: missing columns {', '.join(sorted(missing))}")
    if not rows:
        raise DataError(csv_path, "no rows below the header")
    for line, row in rows:
        if any(row[column] is None for column in columns):
            raise DataError(csv_path, f"line {line}: fewer columns than the header")
        if not row["image"]:
            raise DataError(csv_path, f"line {line}: no image path")
    return [row for _, row in rows]


def _read_visa(dataset_root: Path, category: str, require_good: bool, problems: list[str] | None):
    csv_path = dataset_root / VISA_CSV
    train, test, anomalies = [], [], []
    for row in _visa_rows(dataset_root):
        if row["object"] != category:
            continue
        image = dataset_root / row["image"]
        if row["label"] == "normal":
            (train if row["split"] == "train" else test).append(ImageRecord(path=image, image_id=image.stem))
            continue
        if not row["mask"]:
            error = DataError(image, f"defect image without a mask (empty mask column in {csv_path})")
            if problems is None:
                raise error
            problems.append(str(error))
            continue
        anomalies.append(
            ImageRecord(path=image, defect_type="anomaly", mask_paths=(dataset_root / row["mask"],),
                        image_id=image.stem, mask_labels=True)
        )
    if require_good and not train:
        raise DataError(csv_path, f"no normal training images for object {category!r}")
    return _sorted_records(train), _sorted_records(test), ({"anomaly": _sorted_records(anomalies)} if anomalies else {})


def _mask_layout(folder: Path) -> tuple[str, str]:
    """``loco`` when more defect images have a mask folder ``ground_truth/<type>/<stem>/`` than a
    flat mask file, else ``mvtec``; with the counts that decided it."""
    nested = flat = 0
    for type_dir in _defect_dirs(folder):
        mask_dir = folder / "ground_truth" / type_dir.name
        if not mask_dir.is_dir():
            continue
        entries = _visible(mask_dir)
        folders = {p.name for p in entries if p.is_dir()}
        files = {p.stem for p in entries if is_image_file(p)}
        for image in _images(type_dir):
            nested += image.stem in folders
            flat += image.stem in files or f"{image.stem}_mask" in files
    counts = f"{nested} defect images with a mask folder ground_truth/<type>/<image>/, {flat} with a mask file"
    return ("loco", counts) if nested > flat else ("mvtec", counts)


def detect_layout(folder: Path) -> tuple[str | None, str]:
    """The layout of a category folder (None if ``folder`` is not one) and why it was chosen."""
    if (folder / "Data" / "Images").is_dir() and (folder.parent / VISA_CSV).is_file():
        return "visa", f"Data/Images/ next to {VISA_CSV}"
    if (folder / "train" / "ok").is_dir():
        return "btad", "train/ok/ (BTAD)"
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        return _mask_layout(folder)
    if (folder / "good").is_dir() and (folder / "defect").is_dir():
        return "folder", "good/ and defect/ folders"
    return None, "no train/, test/, good/ + defect/ or VisA folders"


def category_layout(folder: Path) -> str | None:
    """The layout of a category folder, or None if ``folder`` is not one."""
    return detect_layout(folder)[0]


def list_categories(root: str | Path) -> list[str]:
    """Category names under a dataset root (VisA: the csv's objects)."""
    root = Path(root)
    if (root / VISA_CSV).is_file():
        return sorted({row["object"] for row in _visa_rows(root)})
    if not root.is_dir():
        return []
    return sorted(d.name for d in _visible(root) if d.is_dir() and category_layout(d))


def _resolve(root: Path, category: str | None) -> tuple[Path, str | None]:
    """(category folder, VisA object name or None) for ``root`` and ``category``."""
    if not root.is_dir():
        raise DataError(root, "not a folder (a file)" if root.exists() else "folder not found")
    if (root / VISA_CSV).is_file():
        objects = list_categories(root)
        if category not in objects:
            what = "no category given" if category is None else f"unknown category {category!r}"
            raise DataError(root, f"{what}; available: {', '.join(objects)}")
        return root / category, category
    if category_layout(root) and category in (None, root.name):
        return root, (root.name if category_layout(root) == "visa" else None)
    if category is not None and (root / category).is_dir() and category_layout(root / category):
        folder = root / category
        return folder, (category if category_layout(folder) == "visa" else None)
    if category_layout(root):
        raise DataError(root, f"this is the category folder {root.name!r}, not {category!r}")
    available = list_categories(root)
    if not available:
        raise DataError(root, "not a dataset: no train/ or test/ folder here or in any sub-folder")
    what = "no category given" if category is None else f"unknown category {category!r}"
    raise DataError(root, f"{what}; available: {', '.join(available)}")


def load_category(
    root: str | Path,
    category: str | None = None,
    *,
    layout: str = "auto",
    require_good: bool = True,
    skip_bad: bool = False,
) -> CategoryData:
    """Read one category from a category folder or a dataset root (``category`` picks one).

    ``require_good=False`` accepts a folder with only ``test/<type>`` + ``ground_truth/<type>``
    (a generated output). ``skip_bad=True`` decodes every file, skips bad ones and lists them
    in ``problems``; otherwise a defect image without a mask raises here and other problems
    raise when the file is loaded.
    """
    if layout not in LAYOUTS:
        raise DataError(None, f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    folder, visa_object = _resolve(Path(root), category)
    reason = "given"
    if layout == "auto":
        detected, reason = detect_layout(folder)
        layout = detected or "mvtec"
    problems: list[str] | None = [] if skip_bad else None
    if layout == "visa":
        if visa_object is None:
            raise DataError(folder.parent / VISA_CSV, "VisA split file not found")
        train, test, defects = _read_visa(folder.parent, visa_object, require_good, problems)
    elif layout == "folder":
        data = load_folder(folder / "good", folder / "defect", folder / "mask", skip_bad=skip_bad)
        data.name, data.root, data.layout_reason = folder.name, folder, reason
        return data
    else:
        train, test, defects = _read_mvtec(folder, layout == "loco", require_good, problems, GOOD.get(layout, "good"))
    data = CategoryData(folder.name, folder, layout, train, test, defects, layout_reason=reason)
    if skip_bad:
        _drop_bad(data, problems)
    return data


def load_folder(
    good_dir: str | Path | None,
    defect_dir: str | Path,
    mask_dir: str | Path,
    defect_type: str = "defect",
    *,
    skip_bad: bool = False,
) -> CategoryData:
    """A generic folder: good images (all ``train_good``), defect images, masks named like the
    image or ``<stem>_mask``."""
    defect_dir, mask_dir = Path(defect_dir), Path(mask_dir)
    _require_dir(defect_dir, "defect images")
    _require_dir(mask_dir, "masks of the defect images")
    good = []
    if good_dir is not None:
        _require_dir(Path(good_dir), "good images")
        good = _goods(Path(good_dir))
    problems: list[str] | None = [] if skip_bad else None
    records = _defect_records(defect_dir, defect_type, _flat_mask_finder(mask_dir), problems)
    data = CategoryData(defect_dir.parent.name, defect_dir.parent, "folder", good, [], {defect_type: records} if records else {})
    if skip_bad:
        _drop_bad(data, problems)
    return data


def _drop_bad(data: CategoryData, problems: list[str]) -> None:
    """Decode every file of ``data``; drop records that fail, noting why in ``data.problems``."""

    def keep(records: list[ImageRecord]) -> list[ImageRecord]:
        kept = []
        for record in records:
            try:
                check_record(record)
            except DataError as error:
                problems.append(str(error))
            else:
                kept.append(record)
        return kept

    data.train_good = keep(data.train_good)
    data.test_good = keep(data.test_good)
    data.defects = {t: kept for t, records in data.defects.items() if (kept := keep(records))}
    data.problems = problems
