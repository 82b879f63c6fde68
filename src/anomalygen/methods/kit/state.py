"""A fitted diffusion method's learned state on disk: named modules in one safetensors file (keys
``name.parameter``), the training masks as PNGs, a saved tensor copied in with its shape checked.
Readers raise inside ``malformed_as_corrupt``, so a damaged file is ``FILE: corrupt (...)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save

from anomalygen.errors import DataError
from anomalygen.io import atomic_write_bytes
from anomalygen.methods.base import malformed_as_corrupt, model_path

MASK_DIR = "training_masks"


def write_modules(path: Path, modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Every module's state as ``name.key`` (fp32), with ``tensors`` as they are named, in one file."""
    named = {f"{name}.{key}": value.detach().float().cpu().contiguous()
             for name, module in modules.items() for key, value in module.state_dict().items()}
    atomic_write_bytes(path, save({**{k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()}, **named}))


def read_modules(path: Path, modules: dict[str, torch.nn.Module], device: torch.device) -> dict[str, torch.Tensor]:
    """Load what ``write_modules`` wrote into ``modules`` (each must find exactly its keys); returns
    every tensor of the file, for those saved by name."""
    with malformed_as_corrupt(path):
        tensors = load_file(str(path), device=str(device))
        for name, module in modules.items():
            prefix = name + "."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return tensors


def copy_saved(target: torch.Tensor, saved: torch.Tensor, name: str) -> None:
    """``target.copy_(saved)`` for a tensor read from a saved model, which must have exactly the target's
    shape (``copy_`` would broadcast one of width 1, or fail only when generating): else a ``ValueError``
    naming the tensor (``malformed_as_corrupt`` makes it ``FILE: corrupt (...)``)."""
    if tuple(saved.shape) != tuple(target.shape):
        raise ValueError(f"{name} has shape {tuple(saved.shape)}, expected {tuple(target.shape)} for this model "
                         "(saved with another base model?)")
    with torch.no_grad():
        target.copy_(saved)


def write_masks(directory: Path, masks: dict[str, list[np.ndarray]], types: list[str]) -> dict[str, list[str]]:
    """Save each type's bool masks as PNGs under ``directory/training_masks/NNN/`` (NNN: the type's
    index in ``types``); returns the relative paths by type, for the model's JSON."""
    import cv2

    names: dict[str, list[str]] = {}
    for t, type_masks in masks.items():
        folder = directory / MASK_DIR / f"{types.index(t):03d}"
        folder.mkdir(parents=True, exist_ok=True)
        names[t] = []
        for j, mask in enumerate(type_masks):
            cv2.imwrite(str(folder / f"{j:03d}.png"), np.asarray(mask, np.uint8) * 255)
            names[t].append(f"{MASK_DIR}/{folder.name}/{j:03d}.png")
    return names


def mask_paths(directory: Path, recorded: Any, types: list[str], recorded_in: Path) -> dict[str, list[Path]]:
    """The paths ``write_masks`` returned, as the model's JSON ``recorded_in`` holds them: every type
    has at least one mask (``fit`` saves one per training defect), each checked with ``model_path``."""
    paths = {}
    for t in types:
        names = recorded[t]
        if not isinstance(names, list) or not names:
            raise ValueError(f"training_masks of type {t!r} must be a non-empty list of files, got {names!r}")
        paths[t] = [model_path(directory, name, recorded_in) for name in names]
    return paths


def read_masks(paths: dict[str, list[Path]]) -> dict[str, list[np.ndarray]]:
    """The masks ``write_masks`` saved (paths already checked with ``model_path``)."""
    import cv2

    masks: dict[str, list[np.ndarray]] = {}
    for t, type_masks in paths.items():
        masks[t] = []
        for path in type_masks:
            image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise DataError(path, "unreadable training mask of the fitted model")
            masks[t].append(image > 127)
    return masks
