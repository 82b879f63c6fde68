"""The training split of one category: what a generator is fitted on and builds its samples on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from anomalygen.data.images import load_defects, load_goods
from anomalygen.data.readers import CategoryData, load_category
from anomalygen.data.split import paper_split
from anomalygen.errors import AnomalygenError

Warn = Callable[[str], None]
Training = tuple[CategoryData, list, list]  # what ``load_training`` returns


def load_training(
    data: str | Path, category: str | None = None, *, skip_bad: bool = False, warn: Warn | None = None
) -> Training:
    """The category, its paper-split training defects and its ``train/good`` images.

    With ``skip_bad`` every file is checked first; each bad one is passed to ``warn`` and left out.
    """
    category_data = load_category(data, category, skip_bad=skip_bad)
    for problem in category_data.problems:
        if warn is not None:
            warn(f"skipped {problem}")
    train, _ = paper_split(category_data.defects)
    defects = load_defects([record for records in train.values() for record in records], skip_bad=skip_bad)
    goods = load_goods(category_data.train_good)
    if not goods:
        raise AnomalygenError(f"{category_data.root}: no usable train/good images to build samples on")
    return category_data, defects, goods
