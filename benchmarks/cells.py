"""The rows and cells of the learning benchmarks (``learning.py``, ``world_learning.py``): a row is a
model-free method, a diffusion method, or a diffusion method's untrained control (zero steps); a
cell is one (dataset or pair, seed, row) run in its own folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from anomalygen.errors import AnomalygenError

MODEL_FREE = ("cutpaste", "croppaste", "draem")
CONTROL = " (untrained)"
UNTRAINED = {"time_budget_s": 1e-9}  # spent before the first step: 0 steps (max_steps=0 is refused)
CELL_FILE = "cell.json"


def rows(methods: Sequence[str], diffusion: Sequence[str]) -> list[str]:
    return [m for m in MODEL_FREE if m in methods] + [r for m in diffusion if m in methods for r in (m, m + CONTROL)]


def diffusion_options(method: str, args: argparse.Namespace, model: str, seed: int, resolution: int,
                      **extra: Any) -> dict[str, Any]:
    """The CPU-size options of a diffusion method, then ``extra``; ``--set METHOD.key=value`` overrides them."""
    options: dict[str, Any] = {"model": model, "device": args.device, "seed": seed, "resolution": resolution,
                               "batch_size": args.batch_size, "max_steps": args.steps,
                               "num_inference_steps": args.sampling_steps, "checkpoint_every": 0}
    if method == "anomalydiffusion":  # augmented real masks: trained and control rows share the masks
        options.update(spatial_encoder="tiny", mask_source="augment", generate_batch_size=8)
    if method == "dualanodiff":
        options.update(rank=4, mask_tries=2, generate_batch_size=8)
    options.update(extra)
    prefix = f"{method}."
    options.update({k[len(prefix):]: v for k, v in args.settings.items() if k.startswith(prefix)})
    return options


def row_options(row: str, options_of: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """The options of ``row``: none for a model-free method, ``options_of(method)`` for a diffusion one,
    with zero steps for its control."""
    method = row.removesuffix(CONTROL)
    if method in MODEL_FREE:
        return {}
    options = options_of(method)
    return {**options, **UNTRAINED} if row.endswith(CONTROL) else options


def cell_dir(out: Path, name: str, seed: int, row: str) -> Path:
    return out / "cells" / name / f"seed-{seed}" / row.replace(CONTROL, "-untrained")


def run_command(main: Callable[[], int]) -> None:
    """``sys.exit(main())`` for a benchmark script: an error a user can cause (``AnomalygenError``) is one
    line on stderr and exit code 2, never a traceback."""
    try:
        sys.exit(main())
    except AnomalygenError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
