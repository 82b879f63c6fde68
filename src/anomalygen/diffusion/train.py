"""One training loop for "these parameters, this loss", on accelerate.

Serves learned embeddings, small encoders, LoRA (peft) and ControlNet alike: the caller passes the
trainable modules and a ``loss_fn(modules, step, generator) -> scalar``. bf16/fp16 autocast,
gradient accumulation, ``max_steps`` and a wall-time budget, checkpoints of the trainable state
only (``trainable.safetensors`` + ``state.json``, with optimizer / lr scheduler / RNG state for an
exact resume), an optional EMA of the trainable weights (``ema_decay``: diffusers' ``EMAModel``,
checkpointed as ``ema.safetensors`` with the same keys as ``trainable.safetensors``, so
``load_trainable(modules, latest_checkpoint(out_dir) / "ema.safetensors")`` puts the averaged
weights in), validation grids, a CSV loss log (TensorBoard too when installed). Under
``accelerate launch`` / ``torchrun`` the modules are wrapped for DDP; for the gradients to be
all-reduced ``loss_fn`` must call the modules it is handed (not its own references to them), and
for N processes to equal one on the whole batch each draws the same global batch (same seeds) and
computes the loss on its rows only (``batch_share``), as a mean of per-sample losses.

Kill-safety: ``loss.csv`` is flushed every step and each checkpoint also holds the log rows up to
its step; a resumed run rewrites ``loss.csv`` from them (dropping rows after the checkpoint and a
torn last line), so a run killed at any moment and re-run ends with the same weights and the same
log as an uninterrupted one, except ``elapsed_s`` (wall time, summed over the runs). ``out_dir``
is locked (``io.folder_lock``) while a run uses it: a second run on it is refused, naming the holder.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn

from anomalygen.diffusion.backbone import resolve_precision
from anomalygen.errors import AnomalygenError, first_problem
from anomalygen.io import atomic_write_text, folder_lock
from anomalygen.progress import Bar

CHECKPOINTS = "checkpoints"
LOG_FILE = "loss.csv"
LOG_HEADER = ["step", "loss", "lr", "elapsed_s"]


@dataclass
class TrainConfig:
    max_steps: int = 1000
    time_budget_s: float | None = None
    lr: float = 1e-4
    module_lr: dict[str, float] = field(default_factory=dict)  # a module's own lr (else ``lr``)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_accumulation: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"  # "auto" (bf16 on CUDA, else fp32) | "no" (or "fp32") | "bf16" | "fp16"
    checkpoint_every: int = 500
    validate_every: int = 0
    seed: int = 0
    device: str | None = None
    ema_decay: float = 0.0  # > 0: an EMA of the trainable weights (EMAModel: decay min(ema_decay, (1+n)/(10+n)))


@dataclass
class TrainResult:
    step: int
    last_loss: float  # of the last step trained, in this run or the one it resumed (NaN before any)
    stopped_by: str  # "max_steps" | "time_budget"
    losses: list[float] = field(default_factory=list)  # every step's loss, resumed runs included


_SCRATCH: set[Path] = set()  # the temporary folders of work_directory(None) now in use


@contextmanager
def work_directory(path: str | Path | None) -> Iterator[Path]:
    """``path`` when given (kept: its checkpoints let a re-run resume), else a temporary folder
    that is removed when the block ends: ``train`` saves no checkpoints there (nothing could
    resume from them; a full-size ControlNet's would be gigabytes written for nothing)."""
    if path is not None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="anomalygen-train-") as tmp:
        _SCRATCH.add(Path(tmp))
        try:
            yield Path(tmp)
        finally:
            _SCRATCH.discard(Path(tmp))


def batch_share(batch_size: int) -> slice:
    """This process's rows of a global batch of ``batch_size`` (all of them without DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return slice(0, batch_size)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if batch_size % world:
        raise AnomalygenError(f"batch_size {batch_size} does not split over {world} processes; use a multiple of {world}")
    share = batch_size // world
    return slice(rank * share, (rank + 1) * share)


def trainable_parameters(modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """``{"module.param": parameter}`` of every parameter with ``requires_grad``, in module order."""
    return {f"{name}.{pname}": p for name, module in modules.items() for pname, p in module.named_parameters() if p.requires_grad}


def trainable_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{"module.param": tensor}`` of every parameter with ``requires_grad``."""
    return {key: p.detach().float().cpu().contiguous() for key, p in trainable_parameters(modules).items()}


def load_trainable(modules: dict[str, nn.Module], path: str | Path) -> None:
    """Copy a ``trainable.safetensors`` (or a checkpoint folder holding one) into ``modules``."""
    path = Path(path)
    tensors = load_file(str(path / "trainable.safetensors" if path.is_dir() else path))
    for name, module in modules.items():
        params = dict(module.named_parameters())
        for key, value in tensors.items():
            if key.startswith(name + "."):
                target = params[key[len(name) + 1 :]]
                with torch.no_grad():
                    target.copy_(value.to(target.device, target.dtype))


def checkpoints(out_dir: Path) -> list[Path]:
    """The complete checkpoints, oldest first (``state.json`` is written last; ``.tmp`` folders are not)."""
    return sorted(p.parent for p in (out_dir / CHECKPOINTS).glob("step-*/state.json")
                  if re.fullmatch(r"step-\d+", p.parent.name))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint."""
    done = checkpoints(out_dir)
    return done[-1] if done else None


def _log_rows(log_path: Path, checkpoint: Path | None, state: dict) -> list[list[str]]:
    """The log rows up to the checkpoint's step: from the checkpoint, else (a checkpoint of an
    older version) the rows of ``loss.csv`` that parse, header-less or torn files included."""
    if checkpoint is None:
        return []
    if "log" in state:
        return state["log"]
    by_step = {}  # the last row of each step: older versions appended resumed steps again
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    for row in csv.reader(io.StringIO(text)):
        try:
            if len(row) == len(LOG_HEADER) and 0 < int(row[0]) <= state["step"] and [float(v) for v in row[1:]]:
                by_step[int(row[0])] = row
        except ValueError:
            continue
    return [by_step[s] for s in sorted(by_step)]


def save_grid(images: list[np.ndarray], path: Path) -> None:
    """Same-size uint8 images as one PNG, in rows of up to 4."""
    from PIL import Image

    columns = min(len(images), 4)
    rows = -(-len(images) // columns)
    h, w = images[0].shape[:2]
    grid = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, image in enumerate(images):
        grid[(i // columns) * h : (i // columns + 1) * h, (i % columns) * w : (i % columns + 1) * w] = image
    Image.fromarray(grid).save(path)


def train(
    modules: dict[str, nn.Module],
    loss_fn: Callable[[dict[str, nn.Module], int, torch.Generator], torch.Tensor],
    config: TrainConfig,
    out_dir: str | Path,
    *,
    validate: Callable[[int], list[np.ndarray]] | None = None,
    resume: bool = True,
) -> TrainResult:
    """Minimise ``loss_fn`` over the trainable parameters of ``modules``; resume from ``out_dir``.

    ``loss_fn(modules, step, generator)`` must draw all its randomness from ``generator`` (its
    state is checkpointed), so a run killed and resumed equals an uninterrupted one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cpu = config.device == "cpu" or (config.device is None and not torch.cuda.is_available())
    precision = resolve_precision(config.mixed_precision, torch.device("cpu" if cpu else "cuda"))
    precision = "no" if precision == "fp32" else precision
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=config.grad_accumulation, cpu=cpu)
    with folder_lock(out_dir, "training") if accelerator.is_main_process else nullcontext():
        return _train(accelerator, modules, loss_fn, config, out_dir, validate, resume)


def _train(accelerator, modules, loss_fn, config, out_dir, validate, resume) -> TrainResult:
    names = list(modules)
    groups = [{"params": [p for p in m.parameters() if p.requires_grad], "lr": config.module_lr.get(n, config.lr)}
              for n, m in modules.items()]
    groups = [g for g in groups if g["params"]]
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=True)  # one kernel: 8x the per-tensor loop on CPU
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=config.max_steps)
    prepared = accelerator.prepare(*modules.values(), optimizer, scheduler)
    modules = dict(zip(names, prepared[: len(names)]))
    optimizer, scheduler = prepared[len(names) :]
    generator = torch.Generator().manual_seed(config.seed)
    named = trainable_parameters({n: accelerator.unwrap_model(m) for n, m in modules.items()})
    ema = EMAModel(list(named.values()), decay=config.ema_decay, foreach=True) if config.ema_decay else None
    step, state = 0, {}
    checkpoint = latest_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        try:
            load_trainable({n: accelerator.unwrap_model(m) for n, m in modules.items()}, checkpoint)
            optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
            scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
            rng = load_file(str(checkpoint / "rng.safetensors"))
            generator.set_state(rng["generator"])
            torch.set_rng_state(rng["torch"])
            state = json.loads((checkpoint / "state.json").read_text())
            step = int(state["step"])
            if ema is not None:
                shadow = load_file(str(checkpoint / "ema.safetensors"))
                ema.load_state_dict({"optimization_step": int(state["ema_step"]),
                                     "shadow_params": [shadow[k].to(p.device, p.dtype) for k, p in named.items()]})
        except Exception as error:  # damaged or tampered: torch, safetensors and json raise many kinds
            raise AnomalygenError(
                f"{checkpoint}: corrupt checkpoint ({type(error).__name__}: {first_problem(error)}); "
                "delete this folder to resume from the previous checkpoint"
            ) from error
    log_path = out_dir / LOG_FILE
    rows = _log_rows(log_path, checkpoint, state)
    log_file = None
    if accelerator.is_main_process:
        text = io.StringIO()
        csv.writer(text).writerows([LOG_HEADER, *rows])
        atomic_write_text(log_path, text.getvalue())
        log_file = log_path.open("a", newline="")
        log = csv.writer(log_file)
    elapsed_before = float(rows[-1][3]) if rows else 0.0
    try:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(out_dir / "tensorboard")) if accelerator.is_main_process else None
    except ImportError:
        board = None

    scratch = any(folder == out_dir or folder in out_dir.parents for folder in _SCRATCH)

    def save_checkpoint() -> None:
        if not accelerator.is_main_process or scratch:
            return
        final = out_dir / CHECKPOINTS / f"step-{step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state({n: accelerator.unwrap_model(m) for n, m in modules.items()}), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        save_file({"generator": generator.get_state(), "torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        extra = {}
        if ema is not None:
            save_file({k: s.detach().float().cpu().contiguous() for k, s in zip(named, ema.shadow_params)}, str(tmp / "ema.safetensors"))
            extra["ema_step"] = ema.optimization_step
        (tmp / "state.json").write_text(json.dumps({"step": step, "config": asdict(config), "log": rows, **extra}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)

    start = time.monotonic()
    loss_value = float(rows[-1][1]) if rows else float("nan")  # a resumed run with no step left: the last logged
    stopped_by = "max_steps"
    with Bar(config.max_steps, "training", initial=step, disable=not accelerator.is_main_process,
             time_budget_s=config.time_budget_s) as progress:
        while step < config.max_steps:
            if config.time_budget_s is not None and time.monotonic() - start > config.time_budget_s:
                stopped_by = "time_budget"
                break
            for _ in range(config.grad_accumulation):
                with accelerator.accumulate(*modules.values()), accelerator.autocast():
                    loss = loss_fn(modules, step, generator)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.max_grad_norm:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
            step += 1
            if ema is not None:
                ema.step(list(named.values()))
            loss_value = float(loss.detach())
            rows.append([str(step), f"{loss_value:.6g}", f"{scheduler.get_last_lr()[0]:.6g}",
                         f"{elapsed_before + time.monotonic() - start:.2f}"])
            if log_file is not None:
                log.writerow(rows[-1])
                log_file.flush()  # a kill loses at most the row of the step being trained
            if board is not None:
                board.add_scalar("loss", loss_value, step)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}")
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save_checkpoint()
            if validate is not None and config.validate_every and step % config.validate_every == 0 and accelerator.is_main_process:
                (out_dir / "validation").mkdir(exist_ok=True)
                save_grid(validate(step), out_dir / "validation" / f"step-{step:07d}.png")
    if latest_checkpoint(out_dir) is None or json.loads((latest_checkpoint(out_dir) / "state.json").read_text())["step"] != step:
        save_checkpoint()
    if log_file is not None:
        log_file.close()
    if board is not None:
        board.close()
    return TrainResult(step, loss_value, stopped_by, [float(row[1]) for row in rows])
