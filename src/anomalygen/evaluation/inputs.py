"""What evaluation reads: generated pairs, the real few-shot training defects and the real test split.

Everything comes through ``anomalygen.data`` so that any folder in MVTec layout (ours or another
tool's) is evaluated the same way. Arrays are resized here once, to the size each metric needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.progress import track

from anomalygen.data import load_category, load_defect, load_goods, paper_split
from anomalygen.errors import DataError
from anomalygen.generation.writer import RUN_FILE
from anomalygen.io import MANIFEST, read_manifest
from anomalygen.masks.resize import resize_mask as resize_to_shape
from anomalygen.types import DefectExample


@dataclass
class EvaluationData:
    """The generated defects (by type), the real train/test split and the real good images."""

    category: str
    generated: dict[str, list[DefectExample]]
    train_defects: dict[str, list[DefectExample]]
    test_defects: dict[str, list[DefectExample]]
    train_good: list[np.ndarray]
    test_good: list[np.ndarray]
    problems: list[str]
    # (run.json, manifest line) of each generated image, by resolved path (``manifest_lines``)
    manifest: dict[Path, tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=dict)


def _load(records, what: str) -> list[DefectExample]:
    return [load_defect(record) for record in track(records, description=f"Loading {what}", transient=True)]


def load_evaluation_data(
    generated: str | Path, data: str | Path, category: str | None = None, skip_bad: bool = False
) -> EvaluationData:
    """Read the generated folder (``require_good=False``) and the real category it was made from.

    The real defects are split by ``paper_split``: the first third of each type are the few-shot
    training defects (IC-LPIPS cluster centres), the remaining two thirds the test defects.
    ``skip_bad`` leaves out bad real files (e.g. all-zero masks) before the split and lists them
    in ``problems``.
    """
    real = load_category(data, category, skip_bad=skip_bad)
    # The writer puts a run in OUT/<category>/; a bare category folder is accepted too.
    in_root = (Path(generated) / real.name).is_dir()
    made = load_category(generated, real.name if in_root else None, require_good=False)
    if not made.defects:
        raise DataError(made.root, "no generated defect images (expected test/<type>/*.png with ground_truth masks)")
    train, test = paper_split(real.defects)
    generated = {t: _load(r, f"generated {t}") for t, r in made.defects.items()}
    return EvaluationData(
        category=real.name,
        generated=generated,
        train_defects={t: _load(r, f"train {t}") for t, r in train.items()},
        test_defects={t: _load(r, f"test {t}") for t, r in test.items()},
        train_good=load_goods(real.train_good),
        test_good=load_goods(real.test_good),
        problems=list(real.problems),
        manifest=manifest_lines(generated),
    )


def manifest_lines(generated: dict[str, list[DefectExample]]) -> dict[Path, tuple[dict[str, Any], dict[str, Any]]]:
    """(run, manifest line) of every generated image (``OUT/<category>/test/<type>/N.png``, links
    followed: a benchmark merges several runs): its run's ``run.json`` (the method, its
    ``outside_mask`` policy, ...) and its line of the manifest; ({}, {}) for files another tool wrote."""
    runs: dict[Path, tuple[dict[str, Any], dict[Path, dict[str, Any]]]] = {}
    found = {}
    for example in (e for examples in generated.values() for e in examples):
        if example.source is None:
            continue
        path = Path(example.source).resolve()
        folder = path.parents[2]
        if folder not in runs:
            run_file = folder / RUN_FILE
            run = json.loads(run_file.read_text()) if run_file.is_file() else {}
            lines = read_manifest(folder / MANIFEST) if (folder / MANIFEST).is_file() else []
            runs[folder] = (run, {(folder / line["image"]).resolve(): line for line in lines})
        run, lines = runs[folder]
        found[path] = (run, lines.get(path, {}))
    return found


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Area-resample an RGB uint8 image to ``size`` x ``size``."""
    interpolation = cv2.INTER_AREA if min(image.shape[:2]) >= size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A bool mask at ``size`` x ``size``, any-pixel pooled when smaller: a thin defect never vanishes
    from a label (a test image scored as good, a training pair without its defect)."""
    return resize_to_shape(mask, (size, size), any_pixel=True)
