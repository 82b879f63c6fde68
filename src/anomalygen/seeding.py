"""Per-sample random generators: the sample with global index ``i`` of a run seeded with ``seed``
draws from ``sample_rng(seed, i)`` only, whatever the batch it is made in.

It sits below ``methods/`` and ``diffusion/`` so that both can use it.
"""

from __future__ import annotations

import numpy as np


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of sample ``index`` in a run seeded with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))
