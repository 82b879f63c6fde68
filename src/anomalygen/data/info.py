"""A summary of a dataset for ``anomalygen datasets info``: counts, image sizes, problems."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from anomalygen.data.images import image_size
from anomalygen.data.readers import category_layout, list_categories, load_category


def _category_info(root: Path, category: str | None) -> tuple[str, dict[str, Any]]:
    data = load_category(root, category, require_good=False, skip_bad=True)
    records = data.train_good + data.test_good + [r for rs in data.defects.values() for r in rs]
    sizes = Counter("{1}x{0}".format(*image_size(r.path)) for r in records)
    return data.name, {
        "root": str(data.root),
        "layout": data.layout,
        "layout_reason": data.layout_reason,
        "train_good": len(data.train_good),
        "test_good": len(data.test_good),
        "defects": {t: len(rs) for t, rs in data.defects.items()},
        "image_sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
        "problems": data.problems,
    }


def dataset_info(root: str | Path, category: str | None = None) -> dict[str, Any]:
    """Validate every file of one category (or of every category under a dataset root) and
    summarise: ``{"root", "categories": {name: {layout, layout_reason, train_good, test_good, defects:
    {type: n}, image_sizes: {"WxH": n}, problems: ["path: problem", ...]}}}``.
    """
    root = Path(root)
    if category is None and not category_layout(root) and list_categories(root):
        names: list[str | None] = list(list_categories(root))
    else:
        names = [category]
    return {"root": str(root), "categories": dict(_category_info(root, name) for name in names)}
