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

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel

from anomalygen.data.captions import caption_for, load_captions
from anomalygen.diffusion.sampling import (
    blended_generate, encode_images, sample_generators, to_tensor,
)
from anomalygen.diffusion.train import TrainConfig, batch_share, train, work_directory
from anomalygen.errors import AnomalygenError, DataError
from anomalygen.io import atomic_write_text, read_json
from anomalygen.masks import FOREGROUND_MODES, augment_mask, foreground_mask, perlin_mask, resize_mask, resolve_mode
from anomalygen.methods.base import malformed_as_corrupt, mask_paths, read_masks, write_masks
from anomalygen.methods.cagen.control import build_controlnet, control_image, controlled_eps
from anomalygen.methods.diffusion_base import DiffusionGenerator
from anomalygen.options import (MAX_BATCH, MAX_INFERENCE_STEPS, MAX_RESOLUTION, Bool, Choice, Float, Int,
                                        OptionSpec, Text, diffusion_options)
from anomalygen.seeding import sample_rng
from anomalygen.types import AnomalySample, DefectExample

META_FILE = "cagen.json"
CONTROLNET_DIR = "controlnet"
FUSIONS = ("end", "step")


def _options() -> OptionSpec:
    shared = diffusion_options()
    del shared["init_word"]
    shared["guidance_scale"] = Float(7.5, 0, sampling=True)  # not in the paper; diffusers' ControlNet pipeline default
    return OptionSpec(
        **shared,
        epochs=Int(1000, 1),  # the paper: 1000 epochs over the training images
        max_steps=Int(None, 1, optional=True),  # None = epochs × images / batch_size
        lr=Float(1e-5, 0, low_open=True),  # ours: the paper gives no learning rate
        resolution=Int(None, 8, MAX_RESOLUTION, optional=True),  # None = the base model's native size
        max_per_type=Int(3, 1),  # real defects per type the ControlNet trains on (the paper: 3)
        training_pick=Choice("random", ("random", "first")),  # which of them: drawn at random with the seed (the paper) | the first (ours)
        prompt=Text("{defect} {category}", contains="{defect}"),
        captions=Text(None, optional=True),  # a captions file (MVTec Caption format): each training image's caption is its prompt
        category=Text(None, optional=True),  # None = the dataset's category folder name (the captions file's key)
        mask_source=Choice("perlin", ("perlin", "augment"), sampling=True),  # foreground × Perlin (paper) | augmented training masks
        foreground=Choice("auto", FOREGROUND_MODES),
        perlin_threshold=Float(0.5, 0, 1, sampling=True),
        fusion=Choice("end", FUSIONS, sampling=True),  # "end": Eqs. 2-5, fused once | "step": blended every step (ablation)
        num_inference_steps=Int(50, 1, MAX_INFERENCE_STEPS, sampling=True),
        final_paste=Bool(False, sampling=True),  # True: the good image's pixels outside the mask (the paper decodes z_f as is)
        generate_batch_size=Int(0, 0, MAX_BATCH, sampling=True),  # 0: auto (fast.sampling_batch; 8 on the CPU)
    )


class CAGen(DiffusionGenerator):
    """A ControlNet on mask + text, fused into the normal image's latents."""

    name = "cagen"
    outside_mask = "changed"
    OPTIONS = _options()

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._defect_types: list[str] = []
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
            batch, share = opt["batch_size"], batch_share(opt["batch_size"])
            picks = torch.randint(0, len(chosen), (batch,), generator=generator)[share]
            timesteps = torch.randint(0, backbone.num_train_timesteps, (batch,), generator=generator)[share]
            noise = torch.randn((batch, *latents.shape[1:]), generator=generator)[share]
            device, dtype = backbone.device, backbone.unet.dtype
            noisy = backbone.noise_scheduler().add_noise(latents[picks].cpu(), noise, timesteps)
            eps = controlled_eps(backbone.unet, modules["controlnet"], noisy.to(device, dtype), timesteps.to(device),
                                 contexts[picks].to(device, dtype), control[picks])
            return F.mse_loss(eps.float(), noise.to(device))

        config = TrainConfig(max_steps=int(steps), time_budget_s=opt["time_budget_s"], lr=opt["lr"],
                             mixed_precision=opt["mixed_precision"], checkpoint_every=opt["checkpoint_every"],
                             seed=opt["seed"], device=opt["device"])
        with work_directory(opt["work_dir"]) as work_dir:
            return train({"controlnet": self.controlnet}, loss_fn, config, work_dir).losses

    # ----------------------------------------------------------------- generation
    def location_mask(self, good: np.ndarray, defect_type: str, rng: np.random.Generator) -> np.ndarray:
        """Where the anomaly goes: object foreground × Perlin noise (the paper; a texture: Perlin
        alone), or an augmented training mask of the type (``mask_source="augment"``)."""
        shape = good.shape[:2]
        if self.opt["mask_source"] == "augment":
            masks = self.training_masks[defect_type]
            return augment_mask(masks[int(rng.integers(len(masks)))], rng, shape=shape)
        foreground = foreground_mask(good, self.foreground_mode)
        return perlin_mask(shape, rng, threshold=self.opt["perlin_threshold"],
                           foreground=None if foreground.all() else foreground)

    def sampling_rows(self) -> float:
        return super().sampling_rows() * 1.5  # the ControlNet adds about half a UNet

    def generate(self, good: Sequence[np.ndarray], n: int, *, masks: Sequence[np.ndarray] | None = None,
                 seed: int = 0, start: int = 0, defect_type: str | None = None) -> Iterator[AnomalySample]:
        if self.controlnet is None or not self._defect_types:
            raise AnomalygenError("cagen: call fit() or load a fitted model before generate()")
        if not good:
            raise DataError(None, "cagen.generate needs at least one good image")
        if defect_type is not None and defect_type not in self._defect_types:
            raise AnomalygenError(f"cagen: defect type {defect_type!r} not learned; have {', '.join(self._defect_types)}")
        chunk = self.generation_batch()
        for first in range(start, start + n, chunk):
            yield from self._generate_batch(good, list(range(first, min(first + chunk, start + n))), masks, seed, defect_type)

    def _generate_batch(self, good, indices, given, seed, defect_type) -> list[AnomalySample]:
        types, images, masks, sources = [], [], [], []
        for i in indices:
            rng = sample_rng(seed, i)
            name = defect_type or self._defect_types[i % len(self._defect_types)]
            source = int(rng.integers(len(good)))
            image = np.asarray(good[source])
            if given is not None:
                mask = resize_mask(given[i % len(given)], image.shape[:2])
            else:
                mask = self.location_mask(image, name, rng)
            types.append(name), images.append(image), masks.append(mask), sources.append(source)
        outputs: dict[int, np.ndarray] = {}
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for j, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(j)
        for group in by_shape.values():
            made = self._fuse([images[j] for j in group], [masks[j] for j in group], [types[j] for j in group],
                              [indices[j] for j in group], seed)
            outputs.update(zip(group, made))
        mask_source = "given" if given is not None else self.opt["mask_source"]
        return [AnomalySample(image=outputs[j], mask=masks[j], defect_type=types[j], prompt=self.prompt(types[j], indices[j]),
                              meta={"source_index": sources[j], "mask_source": mask_source,
                                    "fusion": self.opt["fusion"], "model": self.backbone.label})
                for j in range(len(indices))]

    def _fuse(self, images: list[np.ndarray], masks: list[np.ndarray], types: list[str], indices: list[int],
              seed: int) -> list[np.ndarray]:
        """Stage 2 (Eqs. 2-5): z_g by ControlNet-guided denoising, z_f = z_g·c_m + z_i·(1 − c_m), decoded."""
        opt, backbone = self.opt, self.backbone
        size = opt["resolution"]
        control = control_image(masks, size)
        if self.controlnet.dtype != backbone.unet.dtype:
            self.controlnet.to(backbone.unet.dtype)
        guided = opt["guidance_scale"] > 1
        with torch.no_grad():
            return blended_generate(
                backbone, self._contexts([self.prompt(t, i) for t, i in zip(types, indices)]), images, masks,
                sample_generators(seed, indices), resolution=size, final_paste=opt["final_paste"],
                blend=opt["fusion"], sampler=opt["sampler"], num_inference_steps=opt["num_inference_steps"],
                guidance_scale=opt["guidance_scale"], uncond_hidden_states=self.prompts([""]).hidden_states if guided else None,
                denoiser=lambda x, t, ctx: controlled_eps(backbone.unet, self.controlnet, x, t, ctx, control),
                progress=len(indices) > 1)

    # ----------------------------------------------------------------- persistence
    def save_state(self, directory: Path) -> None:
        """The ControlNet in diffusers format (``controlnet/``: ``ControlNetModel.from_pretrained``
        loads it as is), ``cagen.json`` and the training masks (PNG)."""
        self.controlnet.float().save_pretrained(directory / CONTROLNET_DIR, safe_serialization=True)
        names = write_masks(directory, self.training_masks, self._defect_types)
        meta = {"category": self.category, "foreground_mode": self.foreground_mode, "training_masks": names,
                "captions": self.captions, "loss_log": self.loss_log}
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=1))

    def load_state(self, directory: Path) -> None:
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise DataError(meta_path, "missing: not a fitted cagen model folder")
        meta = read_json(meta_path)
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
        weights = directory / CONTROLNET_DIR / "diffusion_pytorch_model.safetensors"
        if not weights.is_file():
            raise DataError(weights, "missing: not a fitted cagen model folder")
        with malformed_as_corrupt(weights):
            controlnet = ControlNetModel.from_pretrained(directory / CONTROLNET_DIR, use_safetensors=True)
        self.controlnet = controlnet.to(self.backbone.device).eval().requires_grad_(False)
        self.category, self.foreground_mode, self.loss_log, self.captions = category, mode, loss_log, captions
        self.training_masks = read_masks(files)

