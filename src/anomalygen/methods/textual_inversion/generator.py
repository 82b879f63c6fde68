"""Textual inversion per defect type + blended latent sampling: the first method on the core.

Learns one token embedding per defect type (Gal et al., "An Image is Worth One Word", ICLR 2023,
Eq. 2: ``v* = argmin_v E‖ε − ε_θ(z_t, t, c_θ("a photo of S*"))‖²``) on the few-shot defect
images, with the UNet, VAE and text encoder frozen. Generation writes the type's token into the
prompt and denoises inside a mask on a good image by blended latent diffusion, pasting the good
pixels back outside the mask. It is the "no components" row of AnomalyDiffusion's ablation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from anomalygen.diffusion.sampling import blended_generate, encode_images, to_tensor
from anomalygen.diffusion.tokens import TypeTokens
from anomalygen.diffusion.train import batch_share
from anomalygen.errors import AnomalygenError
from anomalygen.masks import augment_onto
from anomalygen.methods.base import malformed_as_corrupt
from anomalygen.methods.kit.batch import Batch
from anomalygen.methods.kit.method import DiffusionMethod
from anomalygen.methods.kit.state import copy_saved, write_modules
from anomalygen.methods.textual_inversion.config import OPTIONS
from anomalygen.types import AnomalySample, DefectExample

TOKEN = "<defect>"
EMBEDDINGS_FILE, MASKS_FILE = "embeddings.safetensors", "masks.safetensors"


class TextualInversionGenerator(DiffusionMethod):
    name = "textual-inversion"
    OPTIONS = OPTIONS

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.embeddings: TypeTokens | None = None  # one token per type
        self.train_masks: dict[str, np.ndarray] = {}

    def config(self) -> dict[str, Any]:
        """Every option, defaults included (a saved textual-inversion model has always listed them all)."""
        return {**self.OPTIONS.defaults(), **self.options}

    def placeholders(self) -> dict[str, int]:
        return {TOKEN: 1}

    def cpu_batch(self) -> int:
        return self.opt["batch_size"]

    def _prompt(self) -> str:
        return self.opt["prompt"].format(TOKEN)

    def fit(self, defects: Sequence[DefectExample], good: Sequence[np.ndarray]) -> None:
        if not defects:
            raise AnomalygenError("textual-inversion: no defect images to learn from")
        opt, backbone = self.opt, self.backbone
        self._defect_types = sorted({d.defect_type for d in defects})
        size = (opt["resolution"], opt["resolution"])
        latents = encode_images(backbone, to_tensor([d.image for d in defects], size))
        labels = torch.tensor([self._defect_types.index(d.defect_type) for d in defects])
        self.train_masks = {}
        for t in self._defect_types:
            kept = [d.mask for d in defects if d.defect_type == t and d.mask.any()]
            if kept:  # max-pooled so that small defects survive the resize
                resized = [F.adaptive_max_pool2d(torch.from_numpy(np.asarray(m, bool))[None, None].float(), size) for m in kept]
                self.train_masks[t] = torch.cat(resized)[:, 0].numpy() > 0.5
        init = self.prompts.word_embedding(opt["init_word"])
        self.embeddings = TypeTokens(self._defect_types, 1, init).to(backbone.device)
        noise_scheduler = backbone.noise_scheduler()
        prompt, device = self._prompt(), backbone.device

        def loss_fn(modules, step, generator):
            """Textual inversion, Gal et al. 2023, Eq. 2 (ε-prediction MSE). The batch is drawn whole
            on every process, each computes the loss on its rows (``batch_share``, for DDP)."""
            share = batch_share(opt["batch_size"])
            index = self.draw_picks(len(defects), generator, share)
            z0 = latents[index].to(device)
            noise = self.draw_noise(z0.shape[1:], generator, share).to(device)
            t = self.draw_timesteps(generator, share).to(device)
            vectors = modules["embeddings"](labels[index].to(device))
            context = self.prompts([prompt] * len(index), {TOKEN: vectors}).hidden_states
            pred = backbone.unet(noise_scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=context).sample
            return F.mse_loss(pred.float(), noise)

        self.train_modules({"embeddings": self.embeddings}, loss_fn, self.train_config(max_grad_norm=None))

    def save_state(self, directory: Path) -> None:
        """The types' tokens as ``vectors`` (types, D) and their training masks at the working resolution."""
        if self.embeddings is None:
            raise AnomalygenError("textual-inversion: nothing to save, call fit first")
        write_modules(directory / EMBEDDINGS_FILE, {}, {"vectors": self.embeddings.tokens[:, 0]})
        write_modules(directory / MASKS_FILE, {}, {t: torch.from_numpy(m.astype(np.uint8)) for t, m in self.train_masks.items()})

    def load_state(self, directory: Path) -> None:
        path, masks_path = self.fitted_file(directory / EMBEDDINGS_FILE), self.fitted_file(directory / MASKS_FILE)
        self.embeddings = TypeTokens(self._defect_types, 1, torch.zeros(self.prompts.embedding_dim))
        with malformed_as_corrupt(path):  # one vector per defect type, as wide as the text encoder's embeddings
            copy_saved(self.embeddings.tokens[:, 0], load_file(str(path))["vectors"], "vectors")
        self.embeddings.to(self.backbone.device)
        with malformed_as_corrupt(masks_path):
            self.train_masks = {t: m.numpy().astype(bool) for t, m in load_file(str(masks_path)).items()}

    @property
    def fitted(self) -> bool:
        return self.embeddings is not None and super().fitted

    def _mask(self, defect_type: str, good: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """An augmented real training mask of this type (flip/rotate/scale/shift) on the ``good`` image's
        foreground (``foreground``), drawn from the sample's ``rng``."""
        if defect_type not in self.train_masks:
            raise AnomalygenError(f"textual-inversion: no non-empty training mask of type {defect_type!r}; give masks to generate at")
        masks = self.train_masks[defect_type]
        return augment_onto(masks[rng.integers(len(masks))], good, rng, self.opt["foreground"])

    def sample_batch(self, batch: Batch) -> list[AnomalySample]:
        """Each sample on the good image drawn from ``(seed, i)`` (as every method), inside an
        augmented training mask drawn on from the same generator, or the given mask."""
        opt, backbone = self.opt, self.backbone
        if batch.given is not None:
            masks = [np.asarray(m, bool) for m in batch.given]
        else:
            masks = [self._mask(t, im, rng) for t, im, rng in zip(batch.types, batch.images, batch.rngs)]
        rows = self.embeddings(torch.tensor([self._defect_types.index(t) for t in batch.types], device=backbone.device))
        with torch.no_grad():
            context = self.prompts([self._prompt()] * len(batch), {TOKEN: rows}).hidden_states
        uncond = self.prompts([""]).hidden_states if opt["guidance_scale"] > 1 else None
        outputs = blended_generate(
            backbone, context, batch.images, masks, batch.generators, resolution=opt["resolution"],
            sampler=opt["sampler"], num_inference_steps=opt["num_inference_steps"], eta=opt["eta"],
            guidance_scale=opt["guidance_scale"], uncond_hidden_states=uncond,
        )
        return [AnomalySample(image, mask, t, prompt=opt["prompt"].format(f"<{t}>"),
                              meta={"index": i, "source_index": source, "model": backbone.label,
                                    "untrained": backbone.untrained})
                for i, image, mask, t, source in zip(batch.indices, outputs, masks, batch.types, batch.sources)]
