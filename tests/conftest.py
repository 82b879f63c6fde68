"""Shared fixtures: the procedural demo dataset, the optional real data in ../shared/data, and
the skipping of ``shared`` / ``gpu`` tests where that data or a CUDA device is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

DIST_ENV = "ANOMALYGEN_TEST_DIST"  # the main process's --dist, for the workers' test order
SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def pytest_collection_modifyitems(config, items):
    if os.environ.get(DIST_ENV) == "worksteal":
        # Longest first: the full-shape builds (one at a time: they share a lock), then modules
        # holding a ``slow`` test, those tests first in their module. ``-n 2 --dist worksteal``
        # starts each worker on one half of this order and lets a worker that runs out take
        # tests the other has not started, so the long ones run at the start, not at the end.
        # (``--dist load`` hands out large chunks in this order: it would put them all on one worker.)
        slow_modules = {item.path for item in items if "slow" in item.keywords}
        module_order = {path: i for i, path in reversed(list(enumerate(item.path for item in items)))}
        items.sort(key=lambda item: ("xdist_group" not in item.keywords, item.path not in slow_modules,
                                     module_order[item.path], "slow" not in item.keywords))
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


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the main process: pytest-xdist's workers inherit its environment
        os.environ[DIST_ENV] = str(config.getoption("dist", "no"))


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
