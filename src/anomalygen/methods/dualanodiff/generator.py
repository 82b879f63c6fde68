"""DualAnoDiff (Jin et al., "Dual-Interrelated Diffusion Model for Few-Shot Anomaly Image
Generation", CVPR 2025) as an ``AnomalyGenerator`` on the shared diffusion core.

One model per defect type, as the paper: two LoRA sets on one frozen SD 1.x UNet, the whole-image
branch (prompt "a x with y", target I) and the anomaly-part branch (prompt "y", target I·M) (Eq. 2),
trained together on the sum of their ε-MSE losses at one shared timestep (Eq. 4). SAIM (Eq. 3,
``saim.py``) lets the branches attend to each other after every attention layer; BCM (Eq. 5,
``bcm.py``) feeds the background of the image into the whole-image branch's self-attention keys
and values. Generation denoises both branches jointly from noise (PNDM; the official settings: 100
steps at CFG 2.5 without BCM, 50 steps at CFG 2.0 with it, 1.2 for screw) and segments the mask
from the anomaly-part image (``segment.py``: U²-Net saliency at 0.5 as the official code, with
``u2net_weights``; else our threshold).

UNet batch layout, per forward: ``[whole rows; part rows; background rows]`` (background rows only
with BCM), the first two stacked ``[uncond; cond]`` under CFG, the background rows after them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from anomalygen.diffusion import lora
from anomalygen.diffusion.attention import AttentionRecorder, ReferenceKV, attention_layers, install_hooks, remove_hooks
from anomalygen.diffusion.sampling import (
    SAMPLERS, StepState, decode_latents, encode_images, encode_posterior, sample_generators, sample_latents, to_tensor,
    to_uint8,
)
from anomalygen.diffusion.train import TrainConfig, batch_share, train, work_directory
from anomalygen.devices import resolve_device
from anomalygen.errors import AnomalygenError, DataError
from anomalygen.io import atomic_write_bytes, atomic_write_text, read_json
from anomalygen.masks import FOREGROUND_MODES, foreground_mask, resize_mask, resolve_mode
from anomalygen.methods.base import malformed_as_corrupt, model_path
from anomalygen.methods.dualanodiff.bcm import BCM_MIXES, BackgroundMix
from anomalygen.methods.dualanodiff.saim import SAIM
from anomalygen.methods.dualanodiff.segment import (
    MASK_REFERENCES, MASK_SOURCES, decoded_background, mask_from_attention, mask_from_part, mask_from_saliency,
    token_attention,
)
from anomalygen.methods.dualanodiff.u2net import load_u2net, saliency
from anomalygen.methods.diffusion_base import DiffusionGenerator
from anomalygen.options import (MAX_BATCH, MAX_INFERENCE_STEPS, MAX_RANK, MAX_RESOLUTION, Bool, Choice, Float,
                                        Int, OptionSpec, Text, diffusion_options, require)
from anomalygen.seeding import sample_rng
from anomalygen.types import AnomalySample, DefectExample

META_FILE = "dualanodiff.json"
TYPE_DIR = "types"
BRANCHES = ("whole", "part")
PART_BACKGROUNDS = {"gray": 0.5, "black": 0.0}  # the anomaly-part image's value outside the mask, in [0, 1]
# the official scripts' values without / with BCM (dual-interrelated_diff vs bcm-dual-interrelated_diff)
BCM_DEFAULTS = {"batch_size": (4, 2), "num_inference_steps": (100, 50), "guidance_scale": (2.5, 2.0)}
FLIPS = ((), (-1,), (-2,), (-2, -1))  # none, horizontal, vertical, both: the official augmentation


def _options() -> OptionSpec:
    shared = diffusion_options()
    del shared["init_word"]  # no learned token to initialise
    shared["sampler"] = Choice("pndm", SAMPLERS, sampling=True)  # the official code samples with SD's PNDM
    shared["guidance_scale"] = Float(None, 0, optional=True, sampling=True)  # None: 2.5, or 2.0 with BCM (official; 1.2 for screw)
    shared["batch_size"] = Int(None, 1, MAX_BATCH, optional=True)  # None: 4, or 2 with BCM (the official scripts)
    return OptionSpec(
        **shared,
        max_steps=Int(5000, 1),
        resolution=Int(None, 8, MAX_RESOLUTION, optional=True),  # None = the base model's native size (512 on SD 1.x)
        lr=Float(2e-5, 0, low_open=True),
        weight_decay=Float(1e-2, 0),  # AdamW's, as the official code
        flip=Bool(True),  # random horizontal + vertical flips of image and mask (official; it skips them for cable)
        part_background=Choice("gray", PART_BACKGROUNDS),  # I·M in [-1, 1] leaves 0 = gray outside M (official) | black
        rank=Int(32, 1, MAX_RANK),  # LoRA rank on every attention projection, per branch
        text_encoder_lora=Bool(True),  # a LoRA (same rank) on the text encoder too, per type, as the official code
        vae_latents=Choice("sample", ("sample", "mean")),  # a posterior sample per step (official) | its mean
        object_word=Text("vfx"),  # x of "a x with y" (Eq. 2); e.g. the category name
        defect_word=Text("sks"),  # y; "{type}" = the defect type's name
        saim=Bool(True),
        saim_zero_init=Bool(False),  # True: SAIM starts as the identity (the official code: default init)
        bcm=Bool(True),
        bcm_mix=Choice("paper", BCM_MIXES),  # "paper" (Eq. 5: φ + γ·MLP(φ_b), γ=0.1) | "official" ((1−a)φ + a·MLP(φ_b), a=0)
        bcm_uncond=Choice("gray", ("gray", "black"), sampling=True),  # CFG's negative background: a mid-gray image encoded (official) | black (ours)
        bcm_latent=Choice("unscaled", ("unscaled", "scaled")),  # I_b's latent without the VAE scaling factor (official) | scaled (ours)
        foreground=Choice("auto", (*FOREGROUND_MODES, "u2net")),  # BCM's object to remove: auto = U²-Net with u2net_weights (official), else masks/foreground.py
        num_inference_steps=Int(None, 1, MAX_INFERENCE_STEPS, optional=True, sampling=True),  # None: 100, or 50 with BCM (official)
        u2net_weights=Text(None, optional=True),  # U²-Net weights (u2net.pth / u2netp.pth or safetensors): the official masks
        mask_source=Choice("auto", ("auto", *MASK_SOURCES), sampling=True),  # auto: u2net with u2net_weights (official), else threshold (ours)
        mask_threshold=Float(0.15, 0, 1, sampling=True),  # how far from the part background ([0, 1]) a pixel must be
        mask_reference=Choice("nominal", MASK_REFERENCES, sampling=True),  # that background: its value | as the autoencoder returns it
        attention_threshold=Float(0.5, 0, 1, sampling=True),  # of the attention map scaled to [0, 1]
        mask_min_area=Float(5e-4, 0, 1, sampling=True),  # components smaller than this share of the image are dropped
        mask_tries=Int(4, 1, 100, sampling=True),  # draws per sample until its mask is not empty
        generate_batch_size=Int(0, 0, MAX_BATCH, sampling=True),  # 0: auto (fast.sampling_batch; 4 on the CPU)
        gradient_checkpointing=Bool(False),  # recompute UNet activations in backward: less memory, ~30 % slower
    )


class DualAnoDiff(DiffusionGenerator):
    """Dual-branch LoRA diffusion: the whole anomalous image and its anomaly part, generated together."""

    name = "dualanodiff"
    outside_mask = "none"
    OPTIONS = _options()
    CPU_BATCH = 4

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._defect_types: list[str] = []
        self.interaction: dict[str, dict[str, torch.nn.Module]] = {}  # type -> layer -> SAIM / BCM mix
        self.sizes: dict[str, list[int]] = {}  # type -> (H, W) of its real images: the output size
        opt = self.opt
        for name, values in BCM_DEFAULTS.items():
            if opt[name] is None:
                opt[name] = values[opt["bcm"]]
        weights = opt["u2net_weights"]
        if opt["mask_source"] == "auto":
            opt["mask_source"] = "u2net" if weights else "threshold"
        if opt["foreground"] == "auto" and weights and opt["bcm"]:
            opt["foreground"] = "u2net"
        require(weights or "u2net" not in (opt["mask_source"], opt["foreground"]), self.name,
                "mask_source / foreground u2net need u2net_weights=FILE (no U2-Net weights ship with anomalygen)")
        # read now, so a bad file is refused before anything is written
        self.u2net = load_u2net(weights).to(resolve_device(opt["device"])) if weights else None
        self.foreground_mode = opt["foreground"]
        self.loss_log: dict[str, list[float]] = {}

    # ----------------------------------------------------------------- components
    def words(self, defect_type: str) -> tuple[str, str]:
        """The nested prompts of Eq. 2: ("a x with y", "y")."""
        defect = self.opt["defect_word"].replace("{type}", defect_type.replace("_", " "))
        return f"a {self.opt['object_word']} with {defect}", defect

    @staticmethod
    def adapter(branch: str, k: int) -> str:
        """The LoRA adapter of ``branch`` ("whole", "part" on the UNet; "text" on the text encoder) of type ``k``."""
        return f"{branch}_{k}"

    def _models(self) -> list[torch.nn.Module]:
        backbone = self.backbone
        return [backbone.unet] + ([backbone.text_encoder] if self.opt["text_encoder_lora"] else [])

    def encode(self, k: int, prompts: list[str], encoder: torch.nn.Module | None = None) -> torch.Tensor:
        """(len(prompts), 77, D) text states, through type ``k``'s text-encoder LoRA when there is one."""
        if not self.opt["text_encoder_lora"]:
            return self.prompts(prompts, encoder=encoder).hidden_states
        with lora.route(self.backbone.text_encoder, [self.adapter("text", k)] * len(prompts)):
            return self.prompts(prompts, encoder=encoder).hidden_states

    def _add_branches(self, k: int, adapters: bool = True) -> None:
        """Type ``k``'s two LoRA sets (unless ``adapters`` is False: they are loaded instead) and its
        SAIM / BCM modules; seeded, so a re-run builds the same initial weights."""
        backbone, opt = self.backbone, self.opt
        unet = backbone.unet
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opt["seed"] + 1000 * k)
            if adapters:
                lora.add_adapters(unet, [self.adapter(b, k) for b in BRANCHES], rank=opt["rank"])
                if opt["text_encoder_lora"]:
                    lora.add_adapters(backbone.text_encoder, [self.adapter("text", k)], rank=opt["rank"],
                                      targets=lora.TEXT_TARGETS)
            modules: dict[str, torch.nn.Module] = {}
            hidden = unet.config.block_out_channels[0]
            for layer in attention_layers(unet):
                dim = layer.module.to_out[0].out_features
                if opt["saim"]:
                    modules[f"{layer.name}.saim"] = SAIM(dim, opt["saim_zero_init"])
                if opt["bcm"] and layer.kind == "self":
                    modules[f"{layer.name}.bcm"] = ReferenceKV(BackgroundMix(dim, hidden, opt["bcm_mix"]))
        self.interaction[self._defect_types[k]] = {n: m.to(backbone.device) for n, m in modules.items()}

    def _freeze_adapters(self, trainable: set[str] = frozenset()) -> None:
        """Adapters named in ``trainable`` train (in fp32, whatever the UNet's dtype); the others are frozen."""
        for model in self._models():
            for name in lora.adapter_names(model):
                for p in lora.trainable_parameters(model, name):
                    p.data = p.data.float()
                    p.requires_grad_(name in trainable)

    def _install(self, k: int, recorder: AttentionRecorder | None = None):
        """Put type ``k``'s SAIM / BCM (and a recorder on cross-attention) on the UNet; returns the handle."""
        modules = self.interaction[self._defect_types[k]]

        def hooks(layer):
            chosen = [modules[f"{layer.name}.{part}"] for part in ("bcm", "saim") if f"{layer.name}.{part}" in modules]
            return chosen + ([recorder] if recorder is not None and layer.kind == "cross" else [])

        return install_hooks(self.backbone.unet, hooks)

    def _set_rows(self, k: int, n: int, halves: int, background: bool) -> list[str]:
        """Point type ``k``'s hooks at the batch layout and return the per-row adapter list.

        ``n`` samples, ``halves`` = 2 under CFG (``[uncond; cond]`` of the branch rows), background
        rows (one per sample and half) after the branch rows when ``background``."""
        device = self.backbone.device
        rows = torch.arange(2 * n * halves, device=device).view(halves, 2, n)
        whole, part = rows[:, 0].flatten(), rows[:, 1].flatten()
        reference = torch.arange(2 * n * halves, 3 * n * halves, device=device) if background else None
        for name, module in self.interaction[self._defect_types[k]].items():
            if isinstance(module, SAIM):
                module.whole, module.part = whole, part
            else:
                module.mode = "inject" if background else "off"
                module.targets, module.reference_rows = whole, reference
        names = [self.adapter("whole", k)] * n + [self.adapter("part", k)] * n
        return names * halves + ([self.adapter("whole", k)] * n * halves if background else [])

    # ----------------------------------------------------------------- data
    def _square(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Images of any sizes -> (B, 3, R, R) in [0, 1] at the working resolution R."""
        size = self.opt["resolution"]
        return to_tensor(images, (size, size))

    def _background(self, image: np.ndarray) -> np.ndarray:
        """I_b = (1 − M_f)·I (Eq. 5): the image with its object (foreground) blacked out. With
        U²-Net, as the official code: I·(1 − s), s the saliency in [0, 1] (a soft paste)."""
        if self.foreground_mode == "u2net":
            salient = saliency(self.u2net, [image])[0]
            return np.round(image * (1 - salient[..., None])).astype(np.uint8)
        foreground = foreground_mask(image, self.foreground_mode)
        return np.where(foreground[..., None], 0, image).astype(np.uint8)

    def _unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """I_b's latent as BCM takes it: unscaled (the official code skips the VAE's scaling factor
        for the background) or, with ``bcm_latent=scaled``, as the branches' latents."""
        return latents / self.backbone.vae.config.scaling_factor if self.opt["bcm_latent"] == "unscaled" else latents

    def _latents(self, examples: Sequence[DefectExample]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The VAE posteriors (mean, std) of I, I·M and I_b for every training pair, encoded once for
        each flip the training draws (``FLIPS``, or none): row ``f·m + i`` is pair ``i`` under flip ``f``.

        I·M as the official code: the mask resized bilinearly and thresholded at 0.5, the image
        kept inside it and ``part_background`` outside."""
        size = self.opt["resolution"]
        whole = self._square([np.asarray(e.image) for e in examples])
        masks = torch.cat([F.interpolate(torch.from_numpy(np.asarray(e.mask, np.float32))[None, None], size=(size, size),
                                         mode="bilinear") for e in examples])
        masks = (masks >= 0.5).float()
        level = PART_BACKGROUNDS[self.opt["part_background"]]
        pixels = {"whole": whole, "part": whole * masks + level * (1 - masks)}
        if self.opt["bcm"]:
            pixels["background"] = self._square([self._background(np.asarray(e.image)) for e in examples])
        flips = FLIPS if self.opt["flip"] else FLIPS[:1]
        out = {b: encode_posterior(self.backbone, torch.cat([x.flip(f) if f else x for f in flips])) for b, x in pixels.items()}
        if "background" in out:
            out["background"] = tuple(self._unscale(v) for v in out["background"])
        return out

    # ----------------------------------------------------------------- training
    def training_loss(self, k: int, latents: dict[str, tuple[torch.Tensor, torch.Tensor]], generator: torch.Generator,
                      modules: dict[str, torch.nn.Module] | None = None) -> torch.Tensor:
        """Eq. 4: ‖ε_w − ε_θ(z_t^w, t, c_w)‖² + ‖ε_a − ε_θ(z_t^a, t, c_a)‖², one timestep t per pair
        shared by both branches (and the background), independent noise per branch.

        ``latents``: each branch's posterior (mean, std); ``modules``: the UNet (and text encoder)
        as the trainer hands them (DDP-wrapped), default ours. Every process draws the whole
        batch's picks and noise and keeps its rows (``batch_share``)."""
        backbone, opt = self.backbone, self.opt
        modules = modules or {"unet": backbone.unet}
        batch, share = opt["batch_size"], batch_share(opt["batch_size"])
        shape = latents["whole"][0].shape[1:]
        flips = len(FLIPS) if opt["flip"] else 1
        pairs = latents["whole"][0].shape[0] // flips
        picks = torch.randint(0, pairs, (batch,), generator=generator)
        timesteps = torch.randint(0, backbone.num_train_timesteps, (batch,), generator=generator)[share]
        picks = (torch.randint(0, flips, (batch,), generator=generator) * pairs + picks)[share]  # pair i under a flip
        branches = ["whole", "part"] + (["background"] if opt["bcm"] else [])
        noise = {b: torch.randn((batch, *shape), generator=generator)[share] for b in branches}
        clean = {b: latents[b][0][picks] for b in branches}
        if opt["vae_latents"] == "sample":  # z ~ N(mean, std²), drawn afresh every step
            clean = {b: clean[b] + latents[b][1][picks] * torch.randn((batch, *shape), generator=generator)[share].to(clean[b])
                     for b in branches}
        scheduler = backbone.noise_scheduler()
        device, n = backbone.device, len(picks)
        noisy = torch.cat([scheduler.add_noise(clean[b], noise[b].to(device), timesteps.to(device)) for b in branches])
        whole_ctx, part_ctx = self.encode(k, list(self.words(self._defect_types[k])), modules.get("text_encoder")).split(1)
        context = torch.cat([whole_ctx.expand(n, -1, -1), part_ctx.expand(n, -1, -1)]
                            + ([whole_ctx.expand(n, -1, -1)] if opt["bcm"] else []))
        adapters = self._set_rows(k, n, 1, opt["bcm"])
        with lora.route(backbone.unet, adapters):
            eps = modules["unet"](noisy.to(backbone.unet.dtype), timesteps.repeat(len(branches)).to(device),
                       encoder_hidden_states=context.to(device, backbone.unet.dtype)).sample.float()
        target = torch.cat([noise["whole"], noise["part"]]).to(device)
        per_row = F.mse_loss(eps[: 2 * n], target, reduction="none").mean(dim=(1, 2, 3))
        return per_row[:n].mean() + per_row[n:].mean()

    def fit(self, defects: Sequence[DefectExample], good: Sequence[np.ndarray]) -> None:
        if not defects:
            raise DataError(None, "dualanodiff needs at least one training defect image with its mask")
        types = sorted({d.defect_type for d in defects})
        self._defect_types = types
        mode = self.opt["foreground"]
        self.foreground_mode = mode if mode == "u2net" else resolve_mode(mode, list(good) or [d.image for d in defects])
        start, budget = time.monotonic(), self.opt["time_budget_s"]
        for k, defect_type in enumerate(types):
            examples = [d for d in defects if d.defect_type == defect_type]
            self.sizes[defect_type] = list(np.asarray(examples[0].image).shape[:2])
            share = None if budget is None else max(budget - (time.monotonic() - start), 0.0) / (len(types) - k)
            self.loss_log[defect_type] = self._fit_type(k, examples, share)

    def _fit_type(self, k: int, examples: list[DefectExample], time_budget_s: float | None) -> list[float]:
        """Train type ``k``'s two LoRA sets, SAIM and BCM on the core's loop for ``max_steps`` or
        ``time_budget_s`` (each type gets an equal share of what is left of the option's budget);
        checkpoints in ``work_dir/type-K``, resumed by a re-run; other types' weights stay frozen."""
        opt, backbone = self.opt, self.backbone
        self._add_branches(k)
        unet = backbone.unet
        self._freeze_adapters({self.adapter(b, k) for b in (*BRANCHES, "text")})
        latents = self._latents(examples)
        handle = self._install(k)
        config = TrainConfig(max_steps=int(opt["max_steps"]), time_budget_s=time_budget_s, lr=opt["lr"],
                             weight_decay=opt["weight_decay"],
                             mixed_precision=opt["mixed_precision"], checkpoint_every=opt["checkpoint_every"],
                             seed=opt["seed"] + k, device=opt["device"])

        def loss_fn(modules, step, generator):
            return self.training_loss(k, latents, generator, modules)

        trainable = dict(zip(("unet", "text_encoder"), self._models()))
        share = batch_share(opt["batch_size"])
        rows = self._set_rows(k, share.stop - share.start, 1, opt["bcm"])
        if opt["gradient_checkpointing"]:
            unet.enable_gradient_checkpointing()
        try:  # routed through backward too: checkpointing recomputes the forward there
            with work_directory(opt["work_dir"]) as work_dir, lora.route(unet, rows):
                result = train(trainable, loss_fn, config, Path(work_dir) / f"type-{k:03d}")
        finally:
            unet.disable_gradient_checkpointing()
            remove_hooks(unet, handle)
            self._freeze_adapters()
            for module in self.interaction[self._defect_types[k]].values():
                module.requires_grad_(False)
        return result.losses

    # ----------------------------------------------------------------- generation
    def sampling_rows(self) -> float:
        return 2 * super().sampling_rows() + self.opt["bcm"]  # whole + part (x CFG) + background

    def generate(self, good: Sequence[np.ndarray], n: int, *, masks: Sequence[np.ndarray] | None = None,
                 seed: int = 0, start: int = 0, defect_type: str | None = None) -> Iterator[AnomalySample]:
        """Samples ``start .. start+n-1``; sample ``i`` is of type ``defect_type`` or the i-th in turn.

        The whole image is generated (no good image is pasted); with BCM its background comes
        from a good image (``source_index`` in the manifest), without BCM no good image is used.
        ``masks`` cannot be given: the mask comes from the anomaly branch."""
        if not self._defect_types or not self.interaction:
            raise AnomalygenError("dualanodiff: call fit() or load a fitted model before generate()")
        if masks is not None:
            raise AnomalygenError("dualanodiff: masks come from the anomaly branch; generate() takes no masks")
        if defect_type is not None and defect_type not in self._defect_types:
            raise AnomalygenError(f"dualanodiff: defect type {defect_type!r} not learned; have {', '.join(self._defect_types)}")
        if self.opt["bcm"] and not good:
            raise DataError(None, "dualanodiff with BCM needs at least one good image for the background")
        chunk = self.generation_batch()
        for first in range(start, start + n, chunk):
            indices = list(range(first, min(first + chunk, start + n)))
            types = [self._defect_types.index(defect_type) if defect_type else i % len(self._defect_types) for i in indices]
            made: dict[int, AnomalySample] = {}
            for k in sorted(set(types)):
                group = [i for i, t in zip(indices, types) if t == k]
                made.update(zip(group, self._generate_type(k, group, good, seed)))
            yield from (made[i] for i in indices)

    def _generate_type(self, k: int, indices: list[int], good: Sequence[np.ndarray], seed: int) -> list[AnomalySample]:
        """Samples of type ``k``; a sample whose mask comes out empty is drawn again (``mask_tries``)."""
        defect_type = self._defect_types[k]
        sources = [int(sample_rng(seed, i).integers(len(good))) for i in indices] if self.opt["bcm"] else [None] * len(indices)
        result: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        pending = list(range(len(indices)))
        for attempt in range(self.opt["mask_tries"]):
            if not pending:
                break
            generators = [_generator(seed, indices[j], attempt) for j in pending]
            backgrounds = [good[sources[j]] for j in pending] if self.opt["bcm"] else None
            for j, (image, mask) in zip(pending, self._sample(k, generators, backgrounds)):
                if mask.any() or attempt == self.opt["mask_tries"] - 1:
                    result[j] = (image, mask, attempt + 1)
            pending = [j for j in pending if j not in result]
        size = tuple(self.sizes[defect_type])
        samples = []
        for j, i in enumerate(indices):
            image, mask, draws = result[j]
            if image.shape[:2] != size:
                image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
                mask = resize_mask(mask, size)
            meta: dict[str, Any] = {"mask_source": self.opt["mask_source"], "mask_draws": draws,
                                    "model": self.backbone.label}
            if sources[j] is None:
                meta["good_image"] = "none: the whole image is generated"
            else:
                meta.update(source_index=sources[j], good_image="background for BCM (whole image generated)")
            samples.append(AnomalySample(image=image, mask=mask, defect_type=defect_type,
                                         prompt=self.words(defect_type)[0], meta=meta))
        return samples

    def _sample(self, k: int, generators: list[torch.Generator], backgrounds: list[np.ndarray] | None):
        """Joint denoising of both branches of len(generators) samples; returns (image, mask) pairs."""
        backbone, opt = self.backbone, self.opt
        n = len(generators)
        size = opt["resolution"]
        factor = backbone.vae_scale_factor
        whole_prompt, part_prompt = self.words(self._defect_types[k])
        guided = opt["guidance_scale"] > 1
        halves = 2 if guided else 1
        scheduler = backbone.noise_scheduler()
        with torch.no_grad():
            whole_ctx, part_ctx, uncond = self.encode(k, [whole_prompt, part_prompt, ""]).split(1)
            context = torch.cat([whole_ctx.expand(n, -1, -1), part_ctx.expand(n, -1, -1)])
            if backgrounds is not None:  # the negative half's background: a plain gray (official) or black image
                reference = encode_images(backbone, self._square([self._background(np.asarray(b)) for b in backgrounds]))
                plain = torch.full((1, 3, size, size), 0.5 if opt["bcm_uncond"] == "gray" else 0.0)
                negative = encode_images(backbone, plain).expand(n, -1, -1, -1)
                reference = self._unscale(torch.cat([negative, reference]) if guided else reference)
        recorder = AttentionRecorder() if opt["mask_source"] == "attention" else None
        tokens = len(backbone.tokenizer(part_prompt, add_special_tokens=False).input_ids)
        attention = torch.zeros(n, size // factor, size // factor)
        rows = self._set_rows(k, n, halves, backgrounds is not None)
        part_rows = slice(2 * n * halves - n, 2 * n * halves)  # the conditional half's part rows

        def accumulate() -> None:  # the part rows' attention to the defect word (after the start token)
            if recorder.maps:
                attention.add_(token_attention(recorder.maps, part_rows, slice(1, 1 + tokens), attention.shape[-2:]))
            recorder.maps.clear()

        def denoiser(model_in: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
            if backgrounds is not None:  # I_b noised to t with its own noise, whole-image prompt (Eq. 5)
                noise = torch.stack([torch.randn(reference.shape[1:], generator=g) for g in generators * halves])
                noisy = scheduler.add_noise(reference, noise.to(reference.device), t.reshape(1)).to(model_in)
                model_in = torch.cat([model_in, noisy])
                whole_rows = ctx.view(halves, 2, n, *ctx.shape[1:])[:, 0].flatten(0, 1)
                ctx = torch.cat([ctx, whole_rows])
            with lora.route(backbone.unet, rows):
                eps = backbone.unet(model_in, t, encoder_hidden_states=ctx).sample
            return eps[: 2 * n * halves]

        def callback(state: StepState) -> None:
            if recorder is not None:
                accumulate()

        handle = self._install(k, recorder)
        unet_dtype = backbone.unet.dtype  # the fp32 LoRA / SAIM / BCM weights run in the UNet's dtype
        try:
            with torch.no_grad(), torch.autocast(backbone.device.type, unet_dtype, enabled=unet_dtype != torch.float32):
                latents = sample_latents(
                    backbone, context, generators + generators, latent_size=(size // factor, size // factor),
                    sampler=opt["sampler"], num_inference_steps=opt["num_inference_steps"],
                    guidance_scale=opt["guidance_scale"], uncond_hidden_states=uncond, denoiser=denoiser,
                    callback=callback, progress=n > 1)
                if recorder is not None:
                    accumulate()
                images = to_uint8(decode_latents(backbone, latents))
        finally:
            remove_hooks(backbone.unet, handle)
        background = PART_BACKGROUNDS[opt["part_background"]]
        if recorder is None and opt["mask_reference"] == "decoded":
            background = decoded_background(backbone, background, size)
        out = []
        for j in range(n):
            whole, part = images[j], images[n + j]
            if recorder is not None:
                mask = mask_from_attention(attention[j].numpy(), part.shape[:2], opt["attention_threshold"],
                                           opt["mask_min_area"])
            elif opt["mask_source"] == "u2net":
                mask = mask_from_saliency(saliency(self.u2net, [part])[0])
            else:
                mask = mask_from_part(part, background, opt["mask_threshold"], opt["mask_min_area"])
            out.append((whole, mask))
        return out

    # ----------------------------------------------------------------- persistence
    def save_state(self, directory: Path) -> None:
        """Per type: each branch's LoRA (with the type's text-encoder LoRA, if any) as a diffusers
        ``pytorch_lora_weights.safetensors`` (loads with ``StableDiffusionPipeline.load_lora_weights``),
        SAIM + BCM in ``interaction.safetensors``."""
        unet = self.backbone.unet
        types = {}
        for k, defect_type in enumerate(self._defect_types):
            folder = directory / TYPE_DIR / f"{k:03d}"
            text = dict(text_encoder=self.backbone.text_encoder, text_name=self.adapter("text", k)) \
                if self.opt["text_encoder_lora"] else {}
            for branch in BRANCHES:
                lora.save_adapter(unet, self.adapter(branch, k), folder / branch, **text)
            tensors = {f"{name}.{key}": value.detach().float().cpu().contiguous()
                       for name, module in self.interaction[defect_type].items()
                       for key, value in module.state_dict().items()}
            atomic_write_bytes(folder / "interaction.safetensors", save(tensors))
            types[defect_type] = f"{TYPE_DIR}/{k:03d}"
        meta = {"types": types, "sizes": self.sizes, "foreground_mode": self.foreground_mode, "loss_log": self.loss_log}
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=1))

    def load_state(self, directory: Path) -> None:
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise DataError(meta_path, "missing: not a fitted dualanodiff model folder")
        meta = read_json(meta_path)
        with malformed_as_corrupt(meta_path):
            types = list(meta["types"])
            if not types or types != self._defect_types:
                raise ValueError(f"types {types} do not match generator.json's defect_types {self._defect_types}")
            folders = [model_path(directory, meta["types"][t], meta_path) for t in types]
            self.sizes = {t: [int(v) for v in meta["sizes"][t]][:2] for t in types}
            if self.opt["bcm"] and meta["foreground_mode"] not in ("object", "texture", "u2net"):
                raise ValueError(f"foreground_mode must be object, texture or u2net, got {meta['foreground_mode']!r}")
            if meta["foreground_mode"] == "u2net" and self.u2net is None:
                raise ValueError("BCM's foreground was segmented with U2-Net: give u2net_weights=FILE")
            self.foreground_mode = meta["foreground_mode"]
            self.loss_log = {t: [float(v) for v in meta.get("loss_log", {}).get(t, [])] for t in types}
        for k, folder in enumerate(folders):
            self._add_branches(k, adapters=False)
            unet = self.backbone.unet
            for branch in BRANCHES:
                path = folder / branch / lora.WEIGHT_NAME
                if not path.is_file():
                    raise DataError(path, "missing: not a fitted dualanodiff model folder")
                text = dict(text_encoder=self.backbone.text_encoder, text_name=self.adapter("text", k)) \
                    if self.opt["text_encoder_lora"] and branch == "whole" else {}
                with malformed_as_corrupt(path):
                    lora.load_adapter(unet, folder / branch, self.adapter(branch, k), **text)
            path = folder / "interaction.safetensors"
            if not path.is_file():
                raise DataError(path, "missing: not a fitted dualanodiff model folder")
            with malformed_as_corrupt(path):
                tensors = load_file(str(path), device=str(self.backbone.device))
                for name, module in self.interaction[types[k]].items():
                    prefix = name + "."
                    module.load_state_dict({key[len(prefix):]: v for key, v in tensors.items() if key.startswith(prefix)})
                    module.requires_grad_(False)
        self._freeze_adapters()


def _generator(seed: int, index: int, attempt: int) -> torch.Generator:
    """Sample ``index``'s generator for its ``attempt``-th draw (the first: ``sample_generators``'s)."""
    if attempt == 0:
        return sample_generators(seed, [index])[0]
    state = np.random.SeedSequence([seed, index, attempt]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
