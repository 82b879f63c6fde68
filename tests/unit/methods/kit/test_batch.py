"""``methods.kit.batch.Batch``: what each sample of a chunk draws depends on (seed, i) alone."""

import numpy as np
import torch

from anomalygen.methods.kit.batch import Batch
from anomalygen.seeding import sample_rng


def _good(n: int) -> list[np.ndarray]:
    return [np.full((4, 4, 3), k, np.uint8) for k in range(n)]


def test_each_sample_draws_its_good_image_first_from_its_own_rng_and_its_mask_by_index():
    good, masks = _good(5), [np.eye(4, dtype=bool), ~np.eye(4, dtype=bool)]
    batch = Batch.draw([7, 2, 9], good, masks, seed=3, types=["a", "b", "a"])
    assert (batch.seed, batch.indices, batch.types, len(batch)) == (3, [7, 2, 9], ["a", "b", "a"], 3)
    expected = [int(sample_rng(3, i).integers(5)) for i in (7, 2, 9)]
    assert batch.sources == expected and [int(im[0, 0, 0]) for im in batch.images] == expected
    assert [m is masks[i % 2] for m, i in zip(batch.given, (7, 2, 9))] == [True] * 3
    for rng, i in zip(batch.rngs, (7, 2, 9)):  # each rng is past its one draw of the good image
        fresh = sample_rng(3, i)
        fresh.integers(5)
        assert rng.random() == fresh.random()
    assert torch.equal(torch.randn(3, generator=batch.generators[1]),
                       torch.randn(3, generator=Batch.draw([2], good, None, 3, ["b"]).generators[0]))


def test_without_good_images_no_sample_has_a_source_and_no_draw_is_spent():
    """Methods that paint the whole image (DualAnoDiff) generate without good images."""
    batch = Batch.draw([0, 4], [], None, seed=1, types=["a", "a"])
    assert batch.sources == [None, None] and batch.images == [None, None] and batch.given is None
    assert [rng.random() for rng in batch.rngs] == [sample_rng(1, i).random() for i in (0, 4)]
    part = batch.subset([1])
    assert part.indices == [4] and part.sources == [None] and part.rngs == [batch.rngs[1]]


def test_split_groups_positions_by_key_in_order_of_first_appearance():
    batch = Batch.draw([0, 1, 2, 3, 4], _good(2), None, seed=0, types=["a"] * 5)
    assert batch.split([(8, 8), (4, 4), (8, 8), (2, 2), (4, 4)]) == [[0, 2], [1, 4], [3]]
