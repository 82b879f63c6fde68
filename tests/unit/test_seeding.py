"""Seeds: the range every command takes (``seeding.check_seed``), and its largest value runs end to end."""

from __future__ import annotations

import numpy as np
import pytest

from anomalygen import pipeline
from anomalygen.errors import AnomalygenError
from anomalygen.io import MANIFEST, read_manifest
from anomalygen.seeding import MAX_SEED, check_seed

from tests.integration.test_pipeline import make_tiny_dataset


@pytest.mark.parametrize("seed", [0, 1, MAX_SEED, np.int64(7)])
def test_seeds_in_range_pass(seed):
    check_seed(seed)


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**70, True, 1.0, "3", None])
def test_seeds_out_of_range_are_one_line_naming_the_option(seed):
    with pytest.raises(AnomalygenError, match=rf"^demo_seed {seed}: give a seed from 0 to {MAX_SEED}$"):
        check_seed(seed, "demo_seed")


@pytest.mark.parametrize("config", ["LocalizationConfig", "ClassificationConfig", "DraemAugmentationConfig"])
def test_evaluation_configs_check_their_seed_when_built(config):
    from anomalygen.evaluation import run

    klass = getattr(run, config)
    assert klass(seed=MAX_SEED).seed == MAX_SEED
    with pytest.raises(AnomalygenError, match=r"^seed -1: give a seed"):
        klass(seed=-1)


def test_the_largest_seed_fits_and_generates(tmp_path):
    """A diffusion method's torch generators and the per-sample numpy streams take ``MAX_SEED``
    (2**70, say, overflows torch's generators: MAX_SEED must stay below that)."""
    data = make_tiny_dataset(tmp_path / "data")
    options = dict(model="tiny", device="cpu", resolution=32, max_steps=1, batch_size=2, seed=MAX_SEED,
                   num_inference_steps=2)
    result = pipeline.generate("textual-inversion", data, tmp_path / "out", 2, category="nut", seed=MAX_SEED,
                               options=options, filter=False)
    assert len(read_manifest(result.out / MANIFEST)) == 2
