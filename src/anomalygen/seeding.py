"""Per-sample random generators: the sample with global index ``i`` of a run seeded with ``seed``
draws from ``sample_rng(seed, i)`` only, whatever the batch it is made in.

It sits below ``methods/`` and ``diffusion/`` so that both can use it.
"""

from __future__ import annotations

import numpy as np

from anomalygen.errors import OptionError

# Seeds a user may give: numpy's SeedSequence takes no negative number and torch no more than 64
# bits; 32 bits (numpy's legacy and scikit-learn's range) leaves room for seeds derived from them.
MAX_SEED = 2**32 - 1


def check_seed(seed: int, option: str = "seed") -> None:
    """Refuse a seed outside [0, ``MAX_SEED``] in one line naming ``option``, before anything runs."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise OptionError(option, f"{seed}: give a seed from 0 to {MAX_SEED}")


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of sample ``index`` in a run seeded with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))
