"""CAGen (Jiang et al., ICASSP 2024) as an ``AnomalyGenerator`` on the shared diffusion core.

fit: one ControlNet per category, initialised from the frozen UNet, trained with the ε-MSE on up
to ``max_per_type`` real defects per type (the paper: three drawn at random, 1000 epochs; the draw
is seeded, ``training_pick="first"`` takes the first ones instead), conditioned on the
defect's mask and the prompt "{defect} {category}" (Eq. 1). generate: a location mask (object
foreground × Perlin noise, the paper's recipe; textures: Perlin alone), ControlNet-guided
denoising from noise to z_g, then anomaly feature fusion with the normal image's latent
z_i = E(x_n): z_f = z_g·c_m + z_i·(1 − c_m), once at the end (Eqs. 2-5), decoded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel

from anomalygen.data.captions import caption_for, load_captions
from anomalygen.diffusion.sampling import blended_generate, encode_images, to_tensor
from anomalygen.diffusion.train import batch_share
from anomalygen.errors import DataError
from anomalygen.masks import augment_onto, foreground_mask, perlin_mask, resize_mask, resolve_mode
from anomalygen.methods.base import malformed_as_corrupt
from anomalygen.methods.cagen.config import OPTIONS
from anomalygen.methods.cagen.control import build_controlnet, control_image, controlled_eps
from anomalygen.methods.kit.batch import Batch
from anomalygen.methods.kit.method import DiffusionMethod
from anomalygen.methods.kit.state import mask_paths, read_masks, write_masks
from anomalygen.types import AnomalySample, DefectExample

CONTROLNET_DIR = "controlnet"


class CAGen(DiffusionMethod):
    """A ControlNet on mask + text, fused into the normal image's latents."""

    name = "cagen"
    outside_mask = "changed"
    OPTIONS = OPTIONS

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.controlnet: ControlNetModel | None = None
        self.category = self.opt["category"]
        self.training_masks: dict[str, list[np.ndarray]] = {}
        self.foreground_mode = self.opt["foreground"]
        self.loss_log: list[float] = []
        self.caption_file = load_captions(self.opt["captions"]) if self.opt["captions"] else None
        self.captions: dict[str, list[str]] = {}  # with a captions file: type -> its training images' captions

    def config(self) -> dict[str, Any]:
        """The options without the captions path: a saved model holds the captions it trained on."""
        return {k: v for k, v in self.options.items() if k != "captions"}

    def prompt(self, defect_type: str, index: int = 0) -> str:
        """c_p: the template with the defect type and category names (underscores as spaces); with
        captions, the caption of training image ``index mod n`` of the type instead."""
        if self.captions.get(defect_type):
            listed = self.captions[defect_type]
            return listed[index % len(listed)]
        words = {"defect": defect_type.replace("_", " "), "category": (self.category or "object").replace("_", " ")}
        return self.opt["prompt"].format(**words).strip()

    def _contexts(self, prompts: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.prompts(list(prompts)).hidden_states

    # ----------------------------------------------------------------- training
    def _pick(self, k: int, examples: list[DefectExample]) -> list[DefectExample]:
        """``max_per_type`` of type ``k``'s defects, in their order: drawn at random (seeded by
        ``seed`` and ``k``: the paper's "three images at random") or the first ones."""
        keep = self.opt["max_per_type"]
        if self.opt["training_pick"] == "first" or len(examples) <= keep:
            return examples[:keep]
        rng = np.random.default_rng([self.opt["seed"], k])
        return [examples[i] for i in sorted(rng.choice(len(examples), keep, replace=False))]

    def fit(self, defects: Sequence[DefectExample], good: Sequence[np.ndarray]) -> None:
        if not defects:
            raise DataError(None, "cagen needs at least one training defect image with its mask")
        self._defect_types = sorted({d.defect_type for d in defects})
        chosen = [d for k, t in enumerate(self._defect_types) for d in self._pick(k, [e for e in defects if e.defect_type == t])]
        if self.category is None:
            folders = {d.source.parents[2].name for d in chosen if d.source is not None and len(d.source.parents) > 2}
            self.category = folders.pop() if len(folders) == 1 else "object"
        self.training_masks = {t: [np.asarray(d.mask, bool) for d in chosen if d.defect_type == t] for t in self._defect_types}
        if self.caption_file is not None:
            self.captions = {t: [caption_for(self.caption_file, self.opt["captions"], self.category, t, d.source)
                                 for d in chosen if d.defect_type == t] for t in self._defect_types}
        self.foreground_mode = resolve_mode(self.opt["foreground"], list(good) or [d.image for d in chosen])
        backbone = self.backbone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.opt["seed"])
            self.controlnet = build_controlnet(backbone.unet, backbone.vae_scale_factor).to(backbone.device)
        self.controlnet.train()
        self.loss_log = self._train(chosen)
        self.controlnet.eval().requires_grad_(False)

    def _train(self, chosen: list[DefectExample]) -> list[float]:
        """Eq. 1's ε-MSE on the chosen defects, only the ControlNet training (the core's loop:
        checkpoints in ``work_dir``, exact resume, bf16)."""
        opt, backbone = self.opt, self.backbone
        size = opt["resolution"]
        latents = encode_images(backbone, to_tensor([d.image for d in chosen], (size, size)))
        control = control_image([d.mask for d in chosen], size)
        # each image's own prompt: its type's template, or its caption
        per_type = {t: 0 for t in self._defect_types}
        prompts = []
        for d in chosen:
            prompts.append(self.prompt(d.defect_type, per_type[d.defect_type]))
            per_type[d.defect_type] += 1
        contexts = self._contexts(prompts)
        steps = opt["max_steps"] or math.ceil(opt["epochs"] * len(chosen) / opt["batch_size"])

        def loss_fn(modules, step, generator):
            picks, timesteps, noise, noisy = self.draw_noised(latents, generator, batch_share(opt["batch_size"]))
            device, dtype = backbone.device, backbone.unet.dtype
            eps = controlled_eps(backbone.unet, modules["controlnet"], noisy.to(device, dtype), timesteps.to(device),
                                 contexts[picks].to(device, dtype), control[picks])
            return F.mse_loss(eps.float(), noise.to(device))

        return self.train_modules({"controlnet": self.controlnet}, loss_fn, self.train_config(max_steps=steps))

    # ----------------------------------------------------------------- generation
    def location_mask(self, good: np.ndarray, defect_type: str, rng: np.random.Generator) -> np.ndarray:
        """Where the anomaly goes: object foreground × Perlin noise (the paper; a texture: Perlin
        alone), or an augmented training mask of the type on the same foreground (``mask_source="augment"``)."""
        shape = good.shape[:2]
        if self.opt["mask_source"] == "augment":
            masks = self.training_masks[defect_type]
            return augment_onto(masks[int(rng.integers(len(masks)))], good, rng, self.foreground_mode)
        foreground = foreground_mask(good, self.foreground_mode)
        return perlin_mask(shape, rng, threshold=self.opt["perlin_threshold"],
                           foreground=None if foreground.all() else foreground)

    def sampling_rows(self) -> float:
        return super().sampling_rows() * 1.5  # the ControlNet adds about half a UNet

    @property
    def fitted(self) -> bool:
        return self.controlnet is not None and super().fitted

    def sample_batch(self, batch: Batch) -> list[AnomalySample]:
        """A location mask per sample (or the given one), then stage 2 per group of same-size good images."""
        if batch.given is not None:
            masks = [resize_mask(m, image.shape[:2]) for m, image in zip(batch.given, batch.images)]
        else:
            masks = [self.location_mask(image, t, rng) for image, t, rng in zip(batch.images, batch.types, batch.rngs)]
        outputs: dict[int, np.ndarray] = {}
        for group in batch.split([image.shape for image in batch.images]):
            outputs.update(zip(group, self._fuse(batch.subset(group), [masks[j] for j in group])))
        mask_source = "given" if batch.given is not None else self.opt["mask_source"]
        return [AnomalySample(image=outputs[j], mask=masks[j], defect_type=t, prompt=self.prompt(t, i),
                              meta={"source_index": batch.sources[j], "mask_source": mask_source,
                                    "fusion": self.opt["fusion"], "model": self.backbone.label})
                for j, (i, t) in enumerate(zip(batch.indices, batch.types))]

    def _fuse(self, batch: Batch, masks: list[np.ndarray]) -> list[np.ndarray]:
        """Stage 2 (Eqs. 2-5): z_g by ControlNet-guided denoising, z_f = z_g·c_m + z_i·(1 − c_m), decoded."""
        opt, backbone = self.opt, self.backbone
        size = opt["resolution"]
        control = control_image(masks, size)
        if self.controlnet.dtype != backbone.unet.dtype:
            self.controlnet.to(backbone.unet.dtype)
        guided = opt["guidance_scale"] > 1
        with torch.no_grad():
            return blended_generate(
                backbone, self._contexts([self.prompt(t, i) for t, i in zip(batch.types, batch.indices)]), batch.images,
                masks, batch.generators, resolution=size, final_paste=opt["final_paste"],
                blend=opt["fusion"], sampler=opt["sampler"], num_inference_steps=opt["num_inference_steps"],
                guidance_scale=opt["guidance_scale"], uncond_hidden_states=self.prompts([""]).hidden_states if guided else None,
                denoiser=lambda x, t, ctx: controlled_eps(backbone.unet, self.controlnet, x, t, ctx, control),
                progress=len(batch) > 1)

    # ----------------------------------------------------------------- persistence
    def save_state(self, directory: Path) -> None:
        """The ControlNet in diffusers format (``controlnet/``: ``ControlNetModel.from_pretrained``
        loads it as is), ``cagen.json`` and the training masks (PNG)."""
        self.controlnet.float().save_pretrained(directory / CONTROLNET_DIR, safe_serialization=True)
        names = write_masks(directory, self.training_masks, self._defect_types)
        self.write_meta(directory, {"category": self.category, "foreground_mode": self.foreground_mode, "training_masks": names,
                                    "captions": self.captions, "loss_log": self.loss_log})

    def load_state(self, directory: Path) -> None:
        meta, meta_path = self.read_meta(directory), self.meta_file(directory)
        with malformed_as_corrupt(meta_path):
            category, mode = meta["category"], meta["foreground_mode"]
            if not isinstance(category, str) or mode not in ("object", "texture"):
                raise ValueError(f"category must be a name and foreground_mode object or texture, got {category!r}, {mode!r}")
            files = mask_paths(directory, meta["training_masks"], self._defect_types, meta_path)
            loss_log = [float(v) for v in meta.get("loss_log", [])]
            captions = meta.get("captions", {})
            if not isinstance(captions, dict) or not all(isinstance(c, list) and all(isinstance(x, str) for x in c)
                                                         for c in captions.values()):
                raise ValueError("captions must map defect types to lists of captions")
        weights = self.fitted_file(directory / CONTROLNET_DIR / "diffusion_pytorch_model.safetensors")
        with malformed_as_corrupt(weights):
            controlnet = ControlNetModel.from_pretrained(directory / CONTROLNET_DIR, use_safetensors=True)
        self.controlnet = controlnet.to(self.backbone.device).eval().requires_grad_(False)
        self.category, self.foreground_mode, self.loss_log, self.captions = category, mode, loss_log, captions
        self.training_masks = read_masks(files)

