"""Textual inversion per defect type + blended latent sampling: the first method on the core.

Learns one token embedding per defect type (Gal et al., "An Image is Worth One Word", ICLR 2023,
Eq. 2: ``v* = argmin_v E‖ε − ε_θ(z_t, t, c_θ("a photo of S*"))‖²``) on the few-shot defect
images, with the UNet, VAE and text encoder frozen. Generation writes the type's token into the
prompt and denoises inside a mask on a good image by blended latent diffusion, pasting the good
pixels back outside the mask. It is the "no components" row of AnomalyDiffusion's ablation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from anomalygen.diffusion.backbone import load_backbone
from anomalygen.diffusion.conditioning import PromptEncoder
from anomalygen.diffusion.fast import sampling_batch
from anomalygen.diffusion.sampling import blended_generate, encode_images, sample_generators, to_tensor
from anomalygen.diffusion.train import TrainConfig, batch_share, train, work_directory
from anomalygen.errors import AnomalygenError
from anomalygen.io import atomic_write_bytes
from anomalygen.masks import augment_mask
from anomalygen.methods.base import AnomalyGenerator, malformed_as_corrupt
from anomalygen.methods.diffusion_base import copy_saved
from anomalygen.options import (MAX_BATCH, MAX_INFERENCE_STEPS, MAX_RESOLUTION, Float, Int, OptionSpec, Text,
                                        diffusion_options)
from anomalygen.seeding import sample_rng
from anomalygen.types import AnomalySample, DefectExample

TOKEN = "<defect>"


class TypeEmbeddings(nn.Module):
    """One learnable input embedding per defect type."""

    def __init__(self, count: int, dim: int):
        super().__init__()
        self.vectors = nn.Parameter(torch.zeros(count, dim))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) type indices -> (B, D) vectors (called through the module, so DDP sees it)."""
        return self.vectors[labels]


class TextualInversionGenerator(AnomalyGenerator):
    name = "textual-inversion"

    OPTIONS = OptionSpec(
        **diffusion_options(),
        max_steps=Int(1000, 1),
        resolution=Int(None, 8, MAX_RESOLUTION, optional=True),  # None = the base model's native size
        lr=Float(5e-3, 0, low_open=True),
        num_inference_steps=Int(50, 1, MAX_INFERENCE_STEPS, sampling=True),
        eta=Float(0.0, 0, 1, sampling=True),
        prompt=Text("a photo of {}", contains="{}"),
        generate_batch_size=Int(0, 0, MAX_BATCH, sampling=True),  # 0: auto (fast.sampling_batch; batch_size on the CPU)
    )

    def __init__(self, **options: Any):
        super().__init__(**self.OPTIONS.validate(self.name, options))
        self._backbone = None
        self._encoder: PromptEncoder | None = None
        self.embeddings: TypeEmbeddings | None = None
        self.train_masks: dict[str, np.ndarray] = {}

    @property
    def backbone(self):
        """The base model, loaded on first use (as ``DiffusionGenerator.backbone``)."""
        return self._setup()[0]

    def _setup(self):
        if self._backbone is None:
            o = self.options
            self._backbone = load_backbone(o["model"], device=o["device"], dtype=o["mixed_precision"])
            self.resolution = self._backbone.resolution(o["resolution"])  # None: the model's native size
            self._encoder = PromptEncoder(self._backbone.text_encoder, self._backbone.tokenizer, {TOKEN: 1})
        return self._backbone, self._encoder

    def _prompt(self) -> str:
        return self.options["prompt"].format(TOKEN)

    def fit(self, defects: Sequence[DefectExample], good: Sequence[np.ndarray]) -> None:
        if not defects:
            raise AnomalygenError("textual-inversion: no defect images to learn from")
        o = self.options
        backbone, encoder = self._setup()
        self._defect_types = sorted({d.defect_type for d in defects})
        size = (self.resolution, self.resolution)
        latents = encode_images(backbone, to_tensor([d.image for d in defects], size))
        labels = torch.tensor([self._defect_types.index(d.defect_type) for d in defects])
        self.train_masks = {}
        for t in self._defect_types:
            kept = [d.mask for d in defects if d.defect_type == t and d.mask.any()]
            if kept:  # max-pooled so that small defects survive the resize
                resized = [F.adaptive_max_pool2d(torch.from_numpy(np.asarray(m, bool))[None, None].float(), size) for m in kept]
                self.train_masks[t] = torch.cat(resized)[:, 0].numpy() > 0.5
        self.embeddings = TypeEmbeddings(len(self._defect_types), encoder.embedding_dim).to(backbone.device)
        with torch.no_grad():
            self.embeddings.vectors.copy_(encoder.word_embedding(o["init_word"]).expand_as(self.embeddings.vectors))
        noise_scheduler = backbone.noise_scheduler()
        prompt = self._prompt()

        def loss_fn(modules, step, generator):
            """Textual inversion, Gal et al. 2023, Eq. 2 (ε-prediction MSE). The batch is drawn whole
            on every process, each computes the loss on its rows (``batch_share``, for DDP)."""
            batch, share = o["batch_size"], batch_share(o["batch_size"])
            index = torch.randint(len(defects), (batch,), generator=generator)[share]
            z0 = latents[index].to(backbone.device)
            noise = torch.randn((batch, *z0.shape[1:]), generator=generator)[share].to(backbone.device)
            t = torch.randint(0, backbone.num_train_timesteps, (batch,), generator=generator)[share].to(backbone.device)
            vectors = modules["embeddings"](labels[index].to(backbone.device))[:, None]
            context = encoder([prompt] * len(index), {TOKEN: vectors}).hidden_states
            pred = backbone.unet(noise_scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=context).sample
            return F.mse_loss(pred.float(), noise)

        config = TrainConfig(
            max_steps=o["max_steps"], time_budget_s=o["time_budget_s"], lr=o["lr"], mixed_precision=o["mixed_precision"],
            checkpoint_every=o["checkpoint_every"], seed=o["seed"], device=o["device"], max_grad_norm=None,
        )
        with work_directory(o["work_dir"]) as work_dir:
            train({"embeddings": self.embeddings}, loss_fn, config, work_dir)

    def save_state(self, directory: Path) -> None:
        if self.embeddings is None:
            raise AnomalygenError("textual-inversion: nothing to save, call fit first")
        atomic_write_bytes(directory / "embeddings.safetensors", save({"vectors": self.embeddings.vectors.detach().cpu().contiguous()}))
        atomic_write_bytes(directory / "masks.safetensors",
                           save({t: torch.from_numpy(m.astype(np.uint8)) for t, m in self.train_masks.items()}))

    def load_state(self, directory: Path) -> None:
        path, masks_path = directory / "embeddings.safetensors", directory / "masks.safetensors"
        for file in (path, masks_path):
            if not file.is_file():
                raise AnomalygenError(f"{file}: missing; not a fitted textual-inversion model")
        _, encoder = self._setup()
        self.embeddings = TypeEmbeddings(len(self._defect_types), encoder.embedding_dim)
        with malformed_as_corrupt(path):  # one vector per defect type, as wide as the text encoder's embeddings
            copy_saved(self.embeddings.vectors, load_file(str(path))["vectors"], "vectors")
        self.embeddings.to(self._backbone.device)
        with malformed_as_corrupt(masks_path):
            self.train_masks = {t: m.numpy().astype(bool) for t, m in load_file(str(masks_path)).items()}

    def _mask(self, defect_type: str, shape: tuple[int, int], index: int, seed: int) -> np.ndarray:
        """An augmented real training mask of this type (flip/rotate/scale/shift), from ``(seed, index)``."""
        rng = sample_rng(seed, index)
        if defect_type not in self.train_masks:
            raise AnomalygenError(f"textual-inversion: no non-empty training mask of type {defect_type!r}; give masks to generate at")
        masks = self.train_masks[defect_type]
        return augment_mask(masks[rng.integers(len(masks))], rng, shape=shape)

    def generation_batch(self) -> int:
        backbone, _ = self._setup()
        rows = 2 if self.options["guidance_scale"] > 1 else 1
        return sampling_batch(backbone, self.options["generate_batch_size"], self.options["batch_size"], self.resolution, rows)

    def generate(self, good, n, *, masks=None, seed=0, start=0, defect_type=None) -> Iterator[AnomalySample]:
        if self.embeddings is None:
            raise AnomalygenError("textual-inversion: not fitted (call fit or load a saved model)")
        if defect_type is not None and defect_type not in self._defect_types:
            raise AnomalygenError(f"textual-inversion: unknown defect type {defect_type!r}; learned: {', '.join(self._defect_types)}")
        if not good:
            raise AnomalygenError("textual-inversion: no good images to generate on")
        o = self.options
        backbone, encoder = self._setup()
        vectors = self.embeddings.vectors.to(backbone.device)
        prompt = self._prompt()
        uncond = encoder([""]).hidden_states if o["guidance_scale"] > 1 else None
        indices = list(range(start, start + n))
        chunk = self.generation_batch()
        for first in range(0, n, chunk):
            batch = indices[first : first + chunk]
            types = [defect_type or self._defect_types[i % len(self._defect_types)] for i in batch]
            images = [good[i % len(good)] for i in batch]
            batch_masks = [
                np.asarray(masks[i % len(masks)], bool) if masks else self._mask(t, im.shape[:2], i, seed)
                for i, t, im in zip(batch, types, images)
            ]
            rows = torch.stack([vectors[self._defect_types.index(t)] for t in types])[:, None]
            with torch.no_grad():
                context = encoder([prompt] * len(batch), {TOKEN: rows}).hidden_states
            outputs = blended_generate(
                backbone, context, images, batch_masks, sample_generators(seed, batch), resolution=self.resolution,
                sampler=o["sampler"], num_inference_steps=o["num_inference_steps"], eta=o["eta"],
                guidance_scale=o["guidance_scale"], uncond_hidden_states=uncond,
            )
            for i, image, mask, t in zip(batch, outputs, batch_masks, types):
                yield AnomalySample(image, mask, t, prompt=o["prompt"].format(f"<{t}>"),
                                    meta={"index": i, "source_index": i % len(good), "model": backbone.label,
                                          "untrained": backbone.untrained})
