"""Shared fixtures: the procedural demo dataset, the optional real data in ../shared/data, and
the skipping of ``shared`` / ``gpu`` tests where that data or a CUDA device is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def pytest_collection_modifyitems(config, items):
    if config.getoption("dist", "no") == "loadgroup":
        # Longest first (modules holding a ``slow`` test, and those tests first in their module):
        # with ``-n 2 --dist loadgroup`` a worker takes the next test when it is free, so long tests
        # started last would leave one core idle at the end. (``--dist load`` hands out chunks in
        # this order: there the slow tests would all land on one worker.)
        slow_modules = {item.path for item in items if "slow" in item.keywords}
        module_order = {path: i for i, path in reversed(list(enumerate(item.path for item in items)))}
        items.sort(key=lambda item: (item.path not in slow_modules, module_order[item.path], "slow" not in item.keywords))
    if not SHARED_DATA.is_dir():
        skip = pytest.mark.skip(reason=f"{SHARED_DATA} is absent")
        for item in items:
            if "shared" in item.keywords:
                item.add_marker(skip)
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items:
        import torch

        if not torch.cuda.is_available():
            for item in gpu_items:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``<repo>/../shared/data`` (tests using it carry the ``shared`` marker)."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The demo dataset (seed 0, default sizes): ``fabric`` and ``nut``, MVTec AD layout, each
    30 train/good, 6 test/good and 9 images per defect type (cut/hole/stain, dent/scratch/stain)."""
    from anomalygen.data.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), seed=0)
