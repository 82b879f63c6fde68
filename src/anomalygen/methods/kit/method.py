"""``DiffusionMethod``: the lifecycle every method on the shared diffusion core goes through,
written once. A method declares ``name`` and ``OPTIONS`` (its ``config.py``), builds and trains its
modules in ``fit`` (with ``draw_*``, ``train_config`` and ``train_modules``), makes one chunk of
samples in ``sample_batch``, and keeps its learned state with ``save_state`` / ``load_state``."""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from anomalygen.diffusion.backbone import DEFAULT_MODEL, Backbone, default_model, load_backbone
from anomalygen.diffusion.conditioning import PromptEncoder
from anomalygen.diffusion.fast import sampling_batch
from anomalygen.diffusion.train import TrainConfig, train, work_directory
from anomalygen.errors import AnomalygenError, DataError
from anomalygen.io import atomic_write_text, read_json
from anomalygen.methods.base import AnomalyGenerator
from anomalygen.methods.kit.batch import Batch
from anomalygen.types import AnomalySample


class DiffusionMethod(AnomalyGenerator):
    """``opt`` (the validated options), ``backbone`` (``--model``, else ``$ANOMALYGEN_MODEL``, else
    ``BASE_MODEL``; the working ``resolution`` settled against its native size), ``prompts`` (the
    text encoder with the method's placeholder tokens), and ``generate`` in chunks of
    ``generation_batch`` (``generate_batch_size``, 0 = the fast path's, ``CPU_BATCH`` on the CPU)."""

    BASE_MODEL: ClassVar[str] = DEFAULT_MODEL  # the paper's base model
    CPU_BATCH: ClassVar[int] = 8  # the sampling batch on the CPU when generate_batch_size is 0
    GOOD_USE: ClassVar[str] = ""  # what the good images are for, in the error when there are none

    def __init__(self, **options: Any):
        self.opt = self.OPTIONS.validate(self.name, options)
        super().__init__(**options)
        self._backbone: Backbone | None = None
        self._compile = False  # compile_unet
        self._prompt_encoder: PromptEncoder | None = None
        self._defect_types: list[str] = []

    # ----------------------------------------------------------------- components
    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = load_backbone(self.opt["model"] or default_model(self.BASE_MODEL), device=self.opt["device"],
                                           dtype=self.opt["mixed_precision"], seed=self.opt["seed"])
            self.opt["resolution"] = self._backbone.resolution(self.opt["resolution"])
            self._backbone.compile = self._compile
        return self._backbone

    def compile_unet(self) -> None:
        self._compile = True
        if self._backbone is not None:
            self._backbone.compile = True

    def placeholders(self) -> dict[str, int]:
        """The prompt encoder's placeholders (name -> token positions) for the method's learned tokens."""
        return {}

    @property
    def prompts(self) -> PromptEncoder:
        if self._prompt_encoder is None:
            self._prompt_encoder = PromptEncoder(self.backbone.text_encoder, self.backbone.tokenizer, self.placeholders())
        return self._prompt_encoder

    # ----------------------------------------------------------------- training
    def draw_picks(self, count: int, generator: torch.Generator, share: slice) -> torch.Tensor:
        """Training rows: ``batch_size`` indices below ``count``, drawn whole on every process, ``share`` kept (DDP)."""
        return torch.randint(0, count, (self.opt["batch_size"],), generator=generator)[share]

    def draw_timesteps(self, generator: torch.Generator, share: slice) -> torch.Tensor:
        """t ~ U{0, ..., T − 1} per training row (the ε-objective's timestep)."""
        return self.draw_picks(self.backbone.num_train_timesteps, generator, share)

    def draw_noise(self, shape: Sequence[int], generator: torch.Generator, share: slice) -> torch.Tensor:
        """ε ~ N(0, I) of ``shape`` per training row."""
        return torch.randn((self.opt["batch_size"], *shape), generator=generator)[share]

    def draw_noised(self, latents: torch.Tensor, generator: torch.Generator, share: slice):
        """The ε-objective's draw on the training ``latents``: rows, t, ε (in that order), and
        z_t = √ᾱ_t·z_0 + √(1 − ᾱ_t)·ε on the host; returns (picks, timesteps, noise, z_t)."""
        picks = self.draw_picks(len(latents), generator, share)
        timesteps = self.draw_timesteps(generator, share)
        noise = self.draw_noise(latents.shape[1:], generator, share)
        return picks, timesteps, noise, self.backbone.noise_scheduler().add_noise(latents[picks].cpu(), noise, timesteps)

    def train_config(self, **changed: Any) -> TrainConfig:
        """``TrainConfig`` from the options (``max_steps``, ``lr``, budget, precision, checkpoints,
        seed, device), ``changed`` fields given by the method."""
        opt = self.opt
        fields = dict(max_steps=opt["max_steps"], time_budget_s=opt["time_budget_s"], lr=opt["lr"],
                      mixed_precision=opt["mixed_precision"], checkpoint_every=opt["checkpoint_every"], seed=opt["seed"],
                      device=opt["device"])
        fields.update(changed)
        return TrainConfig(**{**fields, "max_steps": int(fields["max_steps"])})

    def train_modules(self, modules: dict[str, torch.nn.Module], loss_fn: Callable[..., torch.Tensor],
                      config: TrainConfig, folder: str = "") -> list[float]:
        """The core's loop (``diffusion.train``) on ``modules`` with checkpoints in ``work_dir/folder``
        (a temporary folder without ``work_dir``; a re-run resumes there); every step's loss."""
        with work_directory(self.opt["work_dir"]) as work_dir:
            return train(modules, loss_fn, config, Path(work_dir) / folder if folder else work_dir).losses

    # ----------------------------------------------------------------- generation
    @property
    def fitted(self) -> bool:
        """Whether ``fit`` or ``load`` gave this generator its learned state."""
        return bool(self._defect_types)

    def needs_good(self) -> bool:
        return True

    def check_inputs(self, good: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None,
                     defect_type: str | None) -> None:
        """One line for what the caller got wrong, before anything is made."""
        if not self.fitted:
            raise AnomalygenError(f"{self.name}: call fit() or load a fitted model before generate()")
        if defect_type is not None and defect_type not in self._defect_types:
            raise AnomalygenError(f"{self.name}: defect type {defect_type!r} not learned; have {', '.join(self._defect_types)}")
        if self.needs_good() and not len(good):
            raise DataError(None, f"{self.name}.generate needs at least one good image{self.GOOD_USE}")

    def sampling_rows(self) -> float:
        """UNet rows one sample costs per sampling step (2 under classifier-free guidance)."""
        return 2 if self.opt["guidance_scale"] > 1 else 1

    def cpu_batch(self) -> int:
        return self.CPU_BATCH

    def generation_batch(self) -> int:
        return sampling_batch(self.backbone, self.opt["generate_batch_size"], self.cpu_batch(), self.opt["resolution"],
                              self.sampling_rows())

    def generate(self, good: Sequence[np.ndarray], n: int, *, masks: Sequence[np.ndarray] | None = None,
                 seed: int = 0, start: int = 0, defect_type: str | None = None) -> Iterator[AnomalySample]:
        """Samples ``start .. start+n-1`` in chunks of ``generation_batch``; sample ``i`` is of
        ``defect_type`` or the learned types in turn (``i mod`` their number)."""
        self.check_inputs(good, masks, defect_type)
        chunk = self.generation_batch()
        for first in range(start, start + n, chunk):
            indices = list(range(first, min(first + chunk, start + n)))
            types = [defect_type or self._defect_types[i % len(self._defect_types)] for i in indices]
            yield from self.sample_batch(Batch.draw(indices, good, masks, seed, types))

    @abstractmethod
    def sample_batch(self, batch: Batch) -> list[AnomalySample]:
        """The samples of ``batch``, in its order."""

    # ----------------------------------------------------------------- persistence
    def meta_file(self, directory: Path) -> Path:
        """``{name}.json``: what a saved model holds besides its weights."""
        return directory / f"{self.name}.json"

    def write_meta(self, directory: Path, meta: dict[str, Any]) -> None:
        atomic_write_text(self.meta_file(directory), json.dumps(meta, indent=1))

    def read_meta(self, directory: Path) -> Any:
        return read_json(self.fitted_file(self.meta_file(directory)))

    def fitted_file(self, path: Path) -> Path:
        """``path``, which a fitted model folder holds: one line when it is missing."""
        if not path.is_file():
            raise DataError(path, f"missing: not a fitted {self.name} model folder")
        return path
