"""Evaluation presets and an up-front estimate of a run's length on its device.

``paper`` is the seed papers' protocol (U-Net 200 epochs x 500 samples at 256 px, base 64;
ResNet-34 30 epochs; 500 samples per type): hours on a GPU, days on a CPU. ``quick`` is the
reduced setting measured on a 2-core CPU in benchmarks/RESULTS.md (10 x 200 at 128 px, base 16;
ResNet-34 5 epochs; 100 samples per type): it exercises the pipeline, its figures rank little.
An option given on the command line wins over its preset's value.

The estimate counts the floating-point operations of one training step of the U-Net and of the
ResNet-34 (``torch.utils.flop_counter`` on the meta device: nothing is computed), divides by the
speed the device reaches on a convolution (timed: a fraction of a second) and multiplies by the
steps the settings ask for; data loading and start-up are left out.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import torch

from anomalygen.options import Choice, check

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"epochs": 200, "samples_per_epoch": 500, "resolution": 256, "base": 64, "batch_size": 8, "cls_epochs": 30,
              "num_per_type": 500},
    "quick": {"epochs": 10, "samples_per_epoch": 200, "resolution": 128, "base": 16, "batch_size": 8, "cls_epochs": 5,
              "num_per_type": 100},
}
WARN_AFTER_S = 30 * 60  # an estimate past this is printed as a warning, with the quick preset's


def apply_preset(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """``given`` with every None filled from preset ``name`` (the options a user left out)."""
    check("preset", Choice(None, tuple(PRESETS)), name)
    return {key: PRESETS[name][key] if value is None and key in PRESETS[name] else value for key, value in given.items()}


def _flops(build, batch: int, resolution: int) -> float:
    """Floating-point operations of one forward + backward pass of ``build()`` on a batch, counted
    on the meta device (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build()
        x = torch.randn(batch, 3, resolution, resolution)
        with FlopCounterMode(display=False) as counter:
            model(x).float().mean().backward()
    return float(counter.get_total_flops())


@functools.lru_cache(maxsize=4)
def throughput(device: torch.device) -> float:
    """FLOP/s the device reaches on a 3x3 convolution (64 channels, 2 x 64 x 64), forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device)
    x = torch.randn(2, 64, 64, 64, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        conv(x).mean().backward()
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        conv(x).mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return counter.get_total_flops() / best


def estimate_seconds(settings: dict[str, Any], device: torch.device, *, test_images: int, generated: int,
                     metrics: list[str], protocol: str = "both", eval_every: int = 1) -> dict[str, float]:
    """Seconds per part of one evaluation: "localization" (U-Net training + testing) and
    "classification" (ResNet-34 on ``generated`` images), for the metrics in ``metrics``."""
    from anomalygen.evaluation.unet import DiscriminativeUNet

    parts: dict[str, float] = {}
    resolution, batch = settings["resolution"], settings["batch_size"]
    speed = throughput(device)
    if "localization" in metrics:
        step = _flops(lambda: DiscriminativeUNet(base=settings["base"]), batch, resolution) / speed
        steps = settings["epochs"] * math.ceil(settings["samples_per_epoch"] / batch)
        tests = (math.ceil(settings["epochs"] / eval_every) if protocol in ("paper", "both") else 0) + 1
        parts["localization"] = step * (steps + tests * math.ceil(test_images / batch) / 3)  # a test pass: ~1/3 of a step
    if "classification" in metrics:
        from torchvision.models import resnet34

        step = _flops(lambda: resnet34(weights=None), 8, resolution) / speed
        parts["classification"] = step * settings["cls_epochs"] * math.ceil(generated / 8)
    return parts


def duration(seconds: float) -> str:
    """``95`` -> "2 min", ``7300`` -> "2.0 h", ``200000`` -> "2.3 days"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def announce(settings: dict[str, Any], device: torch.device, *, test_images: int, generated: int, metrics: list[str],
             protocol: str, eval_every: int, runs: int, say, warn) -> float:
    """Estimate ``runs`` evaluations with ``settings`` and ``say`` it; past ``WARN_AFTER_S`` ``warn``
    instead, with the quick preset's estimate. Returns the estimate in seconds."""
    about = dict(test_images=test_images, generated=generated, metrics=metrics, protocol=protocol, eval_every=eval_every)
    parts = {k: v * runs for k, v in estimate_seconds(settings, device, **about).items()}
    total = sum(parts.values())
    if not parts:
        return 0.0
    line = (f"estimated time on {device.type}: {duration(total)} ("
            + ", ".join(f"{name} {duration(t)}" for name, t in parts.items())
            + f"{f' over {runs} evaluations' if runs > 1 else ''}; start-up and data loading not counted)")
    if total <= WARN_AFTER_S:
        say(line)
        return total
    quick = {**settings, **{k: v for k, v in PRESETS["quick"].items() if k in settings}}
    if quick == settings:
        warn(line)
        return total
    faster = sum(estimate_seconds(quick, device, **about).values()) * runs
    warn(f"{line}; `preset` quick takes about {duration(faster)} (reduced settings: figures that rank little)")
    return total
