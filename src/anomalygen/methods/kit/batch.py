"""One chunk of ``generate``: what every sample draws from ``(seed, i)`` alone, whatever the batch."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anomalygen.diffusion.sampling import sample_generators
from anomalygen.seeding import sample_rng


@dataclass
class Batch:
    """Sample ``indices[j]`` is of defect type ``types[j]``, built on good image ``sources[j]``
    (``images[j]``; None without good images), inside ``given[j]`` when masks were given; it draws
    on from ``rngs[j]`` (``sample_rng(seed, i)``, past its good image) and denoises with
    ``generators[j]`` (``sample_generators``)."""

    seed: int
    indices: list[int]
    types: list[str]
    sources: list[int | None]
    images: list[np.ndarray | None]
    given: list[np.ndarray] | None
    rngs: list[np.random.Generator]
    generators: list[torch.Generator]

    @classmethod
    def draw(cls, indices: list[int], good: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None, seed: int,
             types: list[str]) -> Batch:
        """Sample ``i``'s good image is ``good[rng.integers(len(good))]``, its given mask ``masks[i % len(masks)]``."""
        rngs = [sample_rng(seed, i) for i in indices]
        sources = [int(rng.integers(len(good))) for rng in rngs] if len(good) else [None] * len(indices)
        return cls(seed, list(indices), types, sources, [None if s is None else np.asarray(good[s]) for s in sources],
                   [masks[i % len(masks)] for i in indices] if masks is not None and len(masks) else None, rngs, sample_generators(seed, indices))

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, positions: Sequence[int]) -> Batch:
        """The samples at ``positions`` of this batch."""
        def pick(values):
            return None if values is None else [values[j] for j in positions]

        return Batch(self.seed, pick(self.indices), pick(self.types), pick(self.sources), pick(self.images),
                     pick(self.given), pick(self.rngs), pick(self.generators))

    def split(self, keys: Sequence[Hashable]) -> list[list[int]]:
        """The positions of the samples sharing a key (e.g. their image's shape), in the order keys first appear."""
        groups: dict[Hashable, list[int]] = {}
        for j, key in enumerate(keys):
            groups.setdefault(key, []).append(j)
        return list(groups.values())
