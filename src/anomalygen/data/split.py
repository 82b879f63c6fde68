"""The few-shot paper split of the defect images, as in AnomalyDiffusion (Hu et al., AAAI 2024,
experimental setup: one third of each defect type trains the generator, two thirds test)."""

from __future__ import annotations

import math

from anomalygen.types import ImageRecord


def paper_split(
    defects: dict[str, list[ImageRecord]], train_fraction: float = 1 / 3
) -> tuple[dict[str, list[ImageRecord]], dict[str, list[ImageRecord]]]:
    """Split each defect type into generator-training and test images, exactly and disjointly.

    Per type, with the ``n`` records ordered by numeric ID (as ``load_category`` returns them),
    the first ``ceil(n * train_fraction)`` records train the generator and the remaining
    ``n - ceil(n * train_fraction)`` are the test set (for 1/3: ceil(n/3) and floor(2n/3)).
    No record is in both; the official code's off-by-one overlap is not reproduced. The
    product is rounded to 9 decimals first, so that e.g. 9 * (1/3) counts as exactly 3.
    """
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    train, test = {}, {}
    for defect_type, records in defects.items():
        cut = math.ceil(round(len(records) * train_fraction, 9))
        train[defect_type] = list(records[:cut])
        test[defect_type] = list(records[cut:])
    return train, test
