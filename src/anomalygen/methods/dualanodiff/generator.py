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

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from anomalygen.diffusion import lora
from anomalygen.diffusion.attention import AttentionRecorder, ReferenceKV, attention_layers, install_hooks, remove_hooks
from anomalygen.diffusion.sampling import (
    StepState, decode_latents, encode_images, encode_posterior, sample_latents, to_tensor, to_uint8,
)
from anomalygen.diffusion.train import batch_share
from anomalygen.devices import resolve_device
from anomalygen.errors import AnomalygenError, DataError
from anomalygen.masks import foreground_mask, resize_mask, resolve_mode
from anomalygen.methods.base import malformed_as_corrupt, model_path
from anomalygen.methods.dualanodiff.bcm import BackgroundMix
from anomalygen.methods.dualanodiff.config import BCM_DEFAULTS, OPTIONS, PART_BACKGROUNDS
from anomalygen.methods.dualanodiff.saim import SAIM
from anomalygen.methods.dualanodiff.segment import (
    decoded_background, mask_from_attention, mask_from_part, mask_from_saliency, token_attention,
)
from anomalygen.methods.dualanodiff.u2net import load_u2net, saliency
from anomalygen.methods.kit.batch import Batch
from anomalygen.methods.kit.method import DiffusionMethod
from anomalygen.methods.kit.state import read_modules, write_modules
from anomalygen.options import require
from anomalygen.types import AnomalySample, DefectExample

TYPE_DIR = "types"
BRANCHES = ("whole", "part")
FLIPS = ((), (-1,), (-2,), (-2, -1))  # none, horizontal, vertical, both: the official augmentation


class DualAnoDiff(DiffusionMethod):
    """Dual-branch LoRA diffusion: the whole anomalous image and its anomaly part, generated together."""

    name = "dualanodiff"
    outside_mask = "none"
    OPTIONS = OPTIONS
    CPU_BATCH = 4
    GOOD_USE = " for BCM's background"

    def __init__(self, **options: Any):
        super().__init__(**options)
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
        share = batch_share(opt["batch_size"])
        shape = latents["whole"][0].shape[1:]
        flips = len(FLIPS) if opt["flip"] else 1
        pairs = latents["whole"][0].shape[0] // flips
        picks = self.draw_picks(pairs, generator, share)
        timesteps = self.draw_timesteps(generator, share)
        picks = self.draw_picks(flips, generator, share) * pairs + picks  # pair i under a flip
        branches = ["whole", "part"] + (["background"] if opt["bcm"] else [])
        noise = {b: self.draw_noise(shape, generator, share) for b in branches}
        clean = {b: latents[b][0][picks] for b in branches}
        if opt["vae_latents"] == "sample":  # z ~ N(mean, std²), drawn afresh every step
            clean = {b: clean[b] + latents[b][1][picks] * self.draw_noise(shape, generator, share).to(clean[b]) for b in branches}
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
        config = self.train_config(time_budget_s=time_budget_s, weight_decay=opt["weight_decay"], seed=opt["seed"] + k)

        def loss_fn(modules, step, generator):
            return self.training_loss(k, latents, generator, modules)

        trainable = dict(zip(("unet", "text_encoder"), self._models()))
        share = batch_share(opt["batch_size"])
        rows = self._set_rows(k, share.stop - share.start, 1, opt["bcm"])
        if opt["gradient_checkpointing"]:
            unet.enable_gradient_checkpointing()
        try:  # routed through backward too: checkpointing recomputes the forward there
            with lora.route(unet, rows):
                return self.train_modules(trainable, loss_fn, config, f"type-{k:03d}")
        finally:
            unet.disable_gradient_checkpointing()
            remove_hooks(unet, handle)
            self._freeze_adapters()
            for module in self.interaction[self._defect_types[k]].values():
                module.requires_grad_(False)

    # ----------------------------------------------------------------- generation
    def sampling_rows(self) -> float:
        return 2 * super().sampling_rows() + self.opt["bcm"]  # whole + part (x CFG) + background

    @property
    def fitted(self) -> bool:
        return bool(self.interaction) and super().fitted

    def needs_good(self) -> bool:
        return self.opt["bcm"]  # BCM's background; without BCM no good image is used

    def check_inputs(self, good: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None,
                     defect_type: str | None) -> None:
        if masks is not None:
            raise AnomalygenError("dualanodiff: masks come from the anomaly branch; generate() takes no masks")
        super().check_inputs(good, masks, defect_type)

    def sample_batch(self, batch: Batch) -> list[AnomalySample]:
        """The whole image is generated (no good image is pasted); with BCM its background comes
        from a good image (``source_index`` in the manifest). One pass per type (its LoRA sets)."""
        made: dict[int, AnomalySample] = {}
        for group in batch.split(batch.types):
            made.update(zip(group, self._generate_type(batch.subset(group))))
        return [made[j] for j in range(len(batch))]

    def _generate_type(self, batch: Batch) -> list[AnomalySample]:
        """Samples of one type; a sample whose mask comes out empty is drawn again (``mask_tries``)."""
        defect_type = batch.types[0]
        k = self._defect_types.index(defect_type)
        sources = batch.sources if self.opt["bcm"] else [None] * len(batch)
        result: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        pending = list(range(len(batch)))
        for attempt in range(self.opt["mask_tries"]):
            if not pending:
                break
            generators = [batch.generators[j] if attempt == 0 else _redraw(batch.seed, batch.indices[j], attempt)
                          for j in pending]
            backgrounds = [batch.images[j] for j in pending] if self.opt["bcm"] else None
            for j, (image, mask) in zip(pending, self._sample(k, generators, backgrounds)):
                if mask.any() or attempt == self.opt["mask_tries"] - 1:
                    result[j] = (image, mask, attempt + 1)
            pending = [j for j in pending if j not in result]
        size = tuple(self.sizes[defect_type])
        samples = []
        for j in range(len(batch)):
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
            write_modules(folder / "interaction.safetensors", self.interaction[defect_type])
            types[defect_type] = f"{TYPE_DIR}/{k:03d}"
        self.write_meta(directory, {"types": types, "sizes": self.sizes, "foreground_mode": self.foreground_mode,
                                    "loss_log": self.loss_log})

    def load_state(self, directory: Path) -> None:
        meta, meta_path = self.read_meta(directory), self.meta_file(directory)
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
                path = self.fitted_file(folder / branch / lora.WEIGHT_NAME)
                text = dict(text_encoder=self.backbone.text_encoder, text_name=self.adapter("text", k)) \
                    if self.opt["text_encoder_lora"] and branch == "whole" else {}
                with malformed_as_corrupt(path):
                    lora.load_adapter(unet, folder / branch, self.adapter(branch, k), **text)
            modules = self.interaction[types[k]]
            read_modules(self.fitted_file(folder / "interaction.safetensors"), modules, self.backbone.device)
            for module in modules.values():
                module.requires_grad_(False)
        self._freeze_adapters()


def _redraw(seed: int, index: int, attempt: int) -> torch.Generator:
    """Sample ``index``'s generator for its ``attempt``-th draw (> 0; the first is ``Batch.generators``')."""
    state = np.random.SeedSequence([seed, index, attempt]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
