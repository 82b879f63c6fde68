"""The one device rule of the package: which torch devices a user may name, and what ``auto`` means.

Methods' ``device`` option, evaluation's and pretraining's ``device`` and ``load_backbone`` all
use it, so a device that does not exist on this machine is the same one-line error everywhere,
raised before anything is written.
"""

from __future__ import annotations

import torch

from anomalygen.errors import OptionError


def here() -> str:
    """The devices of this machine, as a user would write them."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = "cpu" + (f", cuda, cuda:0..{count - 1}" if count else "")
    return names + (", mps" if torch.backends.mps.is_available() else "")


def device_problem(value: object) -> str | None:
    """``None`` when ``value`` (``None``, ``"auto"`` or a device string) names a device of this
    machine, else what is allowed."""
    allowed = f"auto or a torch device available here ({here()})"
    if value is None or value == "auto":
        return None
    if not isinstance(value, (str, torch.device)) or not str(value):
        return allowed
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        return allowed
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    exists = (device.type == "cpu" or (device.type == "cuda" and (device.index or 0) < count)
              or (device.type == "mps" and torch.backends.mps.is_available()))
    return None if exists else allowed


def resolve_device(value: str | torch.device | None = None, option: str = "device") -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU; a device this machine lacks is an
    ``OptionError`` naming ``option``."""
    problem = device_problem(value)
    if problem is not None:
        raise OptionError(option, f"{value}: not a device of this machine; use {problem}")
    if value is None or value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(value)
