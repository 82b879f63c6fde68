"""Helpers the speed benchmarks share: synthetic defect data, timers (in-process with peak GPU memory, CUDA
events, a CLI subprocess), FLOP counts and the measured bf16 peak, --arch parsing."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from anomalygen.diffusion.architectures import ARCHITECTURES
from anomalygen.types import DefectExample


def synthetic_data(n: int, size: int = 256, seed: int = 0, types: tuple[str, ...] = ("crack", "hole")):
    """``n`` random defect images with rectangular masks (types in turn) and 8 good images."""
    rng = np.random.default_rng(seed)
    defects = []
    for i in range(n):
        mask = np.zeros((size, size), bool)
        y, x = rng.integers(size // 12, size - size // 3, 2)
        mask[y:y + rng.integers(size // 25 + 1, size // 4), x:x + rng.integers(size // 25 + 1, size // 4)] = True
        defects.append(DefectExample(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), mask, types[i % len(types)]))
    good = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(8)]
    return defects, good


def timed(function, device):
    """(result, seconds, peak GPU memory in GiB; 0 on CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = function()
    if cuda:
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0


def training_speed(fit: Callable[[int], object], steps: int, device) -> tuple[float, float]:
    """(steps/s, peak GiB) of ``fit(n)`` (a fresh fit of ``n`` steps): a fit of 2 + ``steps`` steps
    minus one of 2 steps, so the set-up and the first steps do not count."""
    _, warm, _ = timed(lambda: fit(2), device)
    _, total, memory = timed(lambda: fit(2 + steps), device)
    return steps / max(total - warm, 1e-9), memory


def sampling_speed(generator, good, batch: int, steps: int, device, **options) -> tuple[float, float]:
    """(images/s, peak GiB) of ``generator.generate(good, batch)`` at ``steps`` sampling steps with
    ``options`` set, after a 2-step warm-up."""
    generator.opt.update(options, num_inference_steps=2)
    list(generator.generate(good, batch))
    generator.opt["num_inference_steps"] = steps
    _, seconds, memory = timed(lambda: list(generator.generate(good, batch)), device)
    return batch / seconds, memory


def speed_parser(doc: str, steps: int, steps_help: str) -> argparse.ArgumentParser:
    """The options every method speed script takes: dtypes, generation batch and steps, training
    batch and steps, ``--out`` and ``--device``; a script adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16"])
    parser.add_argument("--batch", type=int, default=8, help="generation batch")
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--train-batch", type=int, default=4, help="training batch (the papers': 4)")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (very slow at full size)")
    return parser


def architectures(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ARCHITECTURES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown architecture {', '.join(unknown) or text!r}; use {','.join(ARCHITECTURES)}")
    return names


def device_or_exit(name: str) -> torch.device | None:
    """The torch device, TF32 on; ``None`` (after saying so) when CUDA is asked for and absent."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (this benchmark needs a GPU)")
        return None
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def run_all(bench: Callable[..., dict], configs: Sequence[tuple], args: argparse.Namespace) -> int:
    """``bench(*config, args, device)`` for every config, each result printed and, after each (so
    an out-of-memory later keeps what was measured), all written to ``args.out`` as JSON."""
    device = device_or_exit(args.device)
    if device is None:
        return 0
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "runs": []}
    for config in configs:
        results["runs"].append(bench(*config, args, device))
        print(json.dumps(results["runs"][-1]), flush=True)
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(results, handle, indent=2)
    return 0


def cuda_time(fn, repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def matmul_peak() -> float:
    """Measured dense bf16 matmul TFLOP/s (8192³, random data)."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seconds = cuda_time(lambda: a @ b, repeats=10)
    return 2 * 8192**3 / seconds / 1e12


def unet_flops(unet, dtype, latent: int, tokens: int = 77) -> float:
    """FLOPs of one forward of a text-conditioned ``unet`` for one ``latent``² latent (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(unet.parameters()).device
    x = torch.randn(1, unet.config.in_channels, latent, latent, device=device, dtype=dtype)
    ctx = torch.randn(1, tokens, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, 500, encoder_hidden_states=ctx)
    return counter.get_total_flops()


def cli_seconds(args: list[str], timeout: float | None = None) -> float:
    """Wall seconds of ``anomalygen ARGS`` in its own process, from start to exit; a failure (or a run
    past ``timeout``) stops the benchmark with its output."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "anomalygen.cli", *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"anomalygen {' '.join(args)} ran past {timeout:.0f} s")
    if done.returncode:
        sys.exit(f"anomalygen {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - started
