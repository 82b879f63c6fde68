"""Where pretrained evaluation weights are looked for, and the error when they are missing.

Nothing is downloaded: evaluation must run offline. Weights are taken from an explicit path, an
environment variable, or the torch hub cache (``$TORCH_HOME/hub/checkpoints``), where
torchvision, torch-fidelity and torchmetrics keep what they download.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from anomalygen.errors import ModelNotFoundError


def hub_checkpoint(url: str) -> Path:
    """The file that ``torch.hub.load_state_dict_from_url(url)`` caches (may not exist)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def find_weights(url: str, path: str | Path | None = None, env: str | None = None) -> Path | None:
    """An explicit ``path``, else ``$env``, else the hub cache file of ``url``; None if none exists.

    An explicit path or variable that names a missing file is an error, not a silent fallback.
    """
    explicit = path or (os.environ.get(env) if env else None)
    if explicit:
        explicit = Path(explicit)
        if not explicit.is_file():
            raise ModelNotFoundError(f"{explicit}: weights file not found (download {url})")
        return explicit
    cached = hub_checkpoint(url)
    return cached if cached.is_file() else None


def missing(what: str, url: str, env: str | None = None) -> ModelNotFoundError:
    """The error for weights that are absent: which file, where to get it, where to put it."""
    where = f"{hub_checkpoint(url)}" + (f" or set {env}=/path/to/{Path(url).name}" if env else "")
    return ModelNotFoundError(f"{what}: weights {Path(url).name} not found offline; download {url} and put it at {where}")
