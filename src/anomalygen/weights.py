"""Where pretrained weights (evaluation networks, encoders) are looked for, how they are read, and the errors.

Nothing is downloaded: everything must run offline. Weights are taken from an explicit path, an
environment variable, or the torch hub cache (``$TORCH_HOME/hub/checkpoints``), where
torchvision, torch-fidelity and torchmetrics keep what they download.

Every weights file is read here, never by those libraries (they unpickle with
``weights_only=False``, which runs code stored in the file): ``.safetensors`` with safetensors,
anything else with ``torch.load(..., weights_only=True)``; the modules are built without weights
and handed the state dict.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from anomalygen.errors import DataError, ModelNotFoundError, first_problem


def hub_checkpoint(url: str) -> Path:
    """The file that ``torch.hub.load_state_dict_from_url(url)`` caches (may not exist)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def find_weights(url: str, path: str | Path | None = None, env: str | None = None) -> Path | None:
    """An explicit ``path``, else ``$env``, else the hub cache file of ``url``; None if none exists.

    An explicit path or variable that names a missing file is a ``DataError`` (the user named it:
    never a silent fallback nor a skipped metric).
    """
    explicit = path or (os.environ.get(env) if env else None)
    if explicit:
        explicit = Path(explicit)
        if not explicit.is_file():
            raise DataError(explicit, f"weights file not found (download {url})")
        return explicit
    cached = hub_checkpoint(url)
    return cached if cached.is_file() else None


def missing(what: str, url: str, env: str | None = None, hint: str = "") -> ModelNotFoundError:
    """The error for weights that are absent: which file, where to get it, where to put it."""
    where = f"{hub_checkpoint(url)}" + (f" or set {env}=/path/to/{Path(url).name}" if env else "")
    return ModelNotFoundError(f"{what}: weights {Path(url).name} not found offline; download {url} and put it at {where}{hint}")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, read without running pickle code.

    A file that needs pickle code (a crafted or full-model pickle) is refused with a ``DataError``
    naming it; so is an unreadable file or one that is not a flat name -> tensor mapping.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # Either way nothing ran: the weights-only unpickler stops at the first disallowed opcode.
        called = re.search(r"GLOBAL ([\w.]+)", str(error), re.IGNORECASE)  # torch's words vary by version
        if called:
            raise DataError(path, f"refused: loading it would run pickle code ({called.group(1)}), which is unsafe; not a "
                                  "plain weights file, use the published one") from None
        raise DataError(path, "not a readable weights file (not a plain torch or safetensors weights file)") from None
    except (OSError, RuntimeError, ValueError, EOFError) as error:
        raise DataError(path, f"not a readable weights file ({first_problem(error)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise DataError(path, "not a state dict (expected a mapping of parameter names to tensors)")
    return state


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def refused_pickle(error: BaseException, folder: str | Path) -> DataError | None:
    """When ``error``, raised by a library loading a model from ``folder``, comes from torch's
    weights-only unpickler refusing a file (pickle code), the ``DataError`` naming that file (found
    by reading the folder's pickle-format files with ``load_state_dict``); None otherwise."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, pickle.UnpicklingError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    for path in sorted(p for p in Path(folder).rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file()):
        try:
            load_state_dict(path)
        except DataError as refusal:
            return refusal
    return DataError(folder, "refused: a weights file in it would run pickle code, which is unsafe")


@contextmanager
def state_mismatch(path: str | Path, what: str) -> Iterator[None]:
    """Turn a ``load_state_dict`` key/shape mismatch into a ``DataError`` naming the file."""
    try:
        yield
    except RuntimeError as error:
        raise DataError(path, f"does not hold {what} weights ({first_problem(error)})") from None


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """``module.load_state_dict(state)`` (strict); a mismatch names the file and what it should hold."""
    with state_mismatch(path, what):
        module.load_state_dict(state)
