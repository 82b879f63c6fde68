"""AnomalyDiffusion (Hu et al., "AnomalyDiffusion: Few-Shot Anomaly Image Generation with
Diffusion Model", AAAI 2024) as an ``AnomalyGenerator`` on the shared diffusion core.

fit: per defect type an anomaly embedding e_a (k tokens) and one spatial encoder E per category
are learned with the masked diffusion loss (Eqs. 4-6), the diffusion model frozen; with
``mask_source="learned"`` a mask embedding e_m (k' tokens) per type is learned too (Eq. 9).
generate: a mask (given, sampled from e_m and filtered, or an augmented training mask), then
blended latent diffusion of the good image conditioned on {e_a, E(m)} with Adaptive Attention
Re-weighting (Eqs. 7-8) at every step; the good image is pasted back outside the mask.

The ablation switches ``spatial_embedding``, ``masked_loss`` and ``aar`` are the rows of the
paper's Table 4. Options that act only at generation (``sampling=True``: AAR, steps, eta,
guidance, mask sampling and filtering) may be changed on a fitted model (``generate --checkpoint
--set``), so those rows need no refit.

Where the paper and the official code (``sjtuplayer/anomalydiffusion``) differ, or where a choice
is ours, each is an option named for its source (defaults in brackets): AAR off unless asked
[official: ``--adaptive_mask``, meant for texture defects], re-weighting the start column, the
anomaly and the spatial tokens [official] or the anomaly tokens only (ours); masked loss ÷ latent
size [official] / plain sum (Eq. 5) / ÷ mask area (ours); prompts from the official templates
[official] or the tokens alone (ours); mask threshold 0.8 on [-1, 1], η = 1 and the border-third
rejection [official] or our constants; k = 8 anomaly tokens [paper; the official code uses 4];
the spatial-token bound is ours (``spatial_encoder.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anomalygen.diffusion.attention import AttentionReweight, install_hooks, remove_hooks, select_layers
from anomalygen.diffusion.backbone import LDM_MODEL
from anomalygen.diffusion.sampling import StepState, blended_generate, decode_latents, encode_images, sample_latents, to_tensor
from anomalygen.diffusion.tokens import TypeTokens
from anomalygen.diffusion.train import batch_share
from anomalygen.errors import DataError
from anomalygen.masks import augment_onto, resize_mask
from anomalygen.methods.anomalydiffusion.aar import DEFAULT_APPLY, HOOK_STAGE, dilation_scale, latent_weights, paper_weights
from anomalygen.methods.anomalydiffusion.augment import augment_pair
from anomalygen.methods.anomalydiffusion.config import OPTIONS
from anomalygen.methods.anomalydiffusion.loss import latent_mask, masked_diffusion_loss
from anomalygen.methods.anomalydiffusion.mask_model import MaskStats, binarize, official_rejection
from anomalygen.methods.anomalydiffusion.prompts import PROMPTS, prompt
from anomalygen.methods.anomalydiffusion.spatial_encoder import PRESETS, RANDOM, SpatialEncoder
from anomalygen.methods.base import malformed_as_corrupt
from anomalygen.methods.kit.batch import Batch
from anomalygen.methods.kit.method import DiffusionMethod
from anomalygen.methods.kit.state import copy_saved, mask_paths, read_masks, read_modules, write_masks, write_modules
from anomalygen.types import AnomalySample, DefectExample

ANOMALY, SPATIAL, MASK = "<anomaly>", "<spatial>", "<mask>"
STATE_FILE = "anomalydiffusion.safetensors"
FALLBACK = "augment (fallback: learned masks rejected)"  # mask_source of a sample whose learned masks were all rejected


class AnomalyDiffusion(DiffusionMethod):
    """Few-shot anomaly image + mask generation with spatial anomaly embeddings and AAR."""

    name = "anomalydiffusion"
    OPTIONS = OPTIONS
    BASE_MODEL = LDM_MODEL  # the paper's base: LDM text2im-256

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.anomaly_tokens: TypeTokens | None = None
        self.training_masks: dict[str, list[np.ndarray]] = {}
        self.mask_stats: dict[str, MaskStats] = {}
        self.loss_log: list[float] = []

    # ----------------------------------------------------------------- components
    def placeholders(self) -> dict[str, int]:
        opt = self.opt
        return {ANOMALY: opt["num_anomaly_tokens"], SPATIAL: opt["num_spatial_tokens"], MASK: opt["mask_tokens"]}

    def _build(self, types: list[str], encoder: dict[str, str] | None = None) -> None:
        """e_a, e_m and E for ``types`` (all on the backbone's device, fp32).

        ``encoder``: a saved model's ``{"preset", "source", "equalized", "bound"}`` record of E,
        rebuilt as it was; None (fitting): the ``spatial_encoder`` and ``spatial_token_bound``
        options, ImageNet weights when cached (``resnet50``)."""
        backbone, opt = self.backbone, self.opt
        init = self.prompts.word_embedding(opt["init_word"]).float()
        self.anomaly_tokens = TypeTokens(types, opt["num_anomaly_tokens"], init).to(backbone.device)
        self.mask_tokens = TypeTokens(types, opt["mask_tokens"], init).to(backbone.device)
        preset = (encoder or {}).get("preset") or opt["spatial_encoder"] or ("tiny" if backbone.untrained else "resnet50")
        if preset not in PRESETS:
            raise DataError(None, f"anomalydiffusion: spatial_encoder must be one of {sorted(PRESETS)}, got {preset!r}")
        if encoder is None:  # fitting: the options; a saved model: as it was fitted (older ones: plain heads, unbounded)
            vocabulary = float(backbone.text_encoder.get_input_embeddings().weight.detach().float().norm(dim=-1).mean())
            bound = opt["spatial_token_bound"]
            encoder = {"equalized": True, "bound": None if bound is None else bound * vocabulary}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(opt["seed"])
            self.spatial_encoder = SpatialEncoder.from_preset(
                preset, opt["num_spatial_tokens"], init, source=encoder.get("source"),
                equalized=bool(encoder.get("equalized", False)), bound=encoder.get("bound")).to(backbone.device)
        self._encoder_preset = preset
        self._defect_types = list(types)

    def _modules(self) -> dict[str, torch.nn.Module]:
        return {"anomaly_tokens": self.anomaly_tokens, "spatial_encoder": self.spatial_encoder,
                "mask_tokens": self.mask_tokens}

    def condition(self, type_indices: torch.Tensor, masks: torch.Tensor,
                  modules: dict[str, torch.nn.Module] | None = None,
                  rngs: Sequence[np.random.Generator] | None = None) -> torch.Tensor:
        """e = {e_a, E(m)} through the text encoder (Eq. 4): (B, 77, D) cross-attention context.

        ``masks`` (B, 1, H, W) in {0, 1}; without the spatial embedding (ablation) only e_a.
        ``modules``: e_a and E as handed to the loss by the trainer (DDP-wrapped); default ours.
        ``rngs``: one per row, drawing its prompt template (``prompt="official"``)."""
        modules = modules or self._modules()
        vectors = {ANOMALY: modules["anomaly_tokens"](type_indices)}
        tokens = ANOMALY
        if self.opt["spatial_embedding"]:
            vectors[SPATIAL] = modules["spatial_encoder"](masks.to(self.backbone.device))
            tokens = f"{ANOMALY} {SPATIAL}"
        return self.prompts(self._prompts(tokens, len(type_indices), rngs), vectors)

    def _prompts(self, tokens: str, count: int, rngs: Sequence[np.random.Generator] | None) -> list[str]:
        rngs = rngs or [np.random.default_rng(0)] * count
        return [prompt(self.opt["prompt"], tokens, rng) for rng in rngs]

    # ----------------------------------------------------------------- training
    def _noised(self, latents: torch.Tensor, generator: torch.Generator, share: slice):
        """ε, then t, drawn for the whole batch, ``share`` of them kept; returns (z_t, ε, t)."""
        noise = self.draw_noise(latents.shape[1:], generator, share).to(latents.device)
        timesteps = self.draw_timesteps(generator, share).to(latents.device)
        return self.backbone.noise_scheduler().add_noise(latents, noise, timesteps), noise, timesteps

    def _eps(self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        unet = self.backbone.unet
        return unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states=context.to(unet.dtype)).sample.float()

    def training_loss(self, defects: Sequence[DefectExample], type_indices: list[int], rng: np.random.Generator,
                      generator: torch.Generator, modules: dict[str, torch.nn.Module] | None = None) -> torch.Tensor:
        """One batch: masked diffusion loss of the SAE (Eqs. 5-6) + mask textual inversion (Eq. 9).

        The two objectives train disjoint parameters, so summing them equals training them apart.
        ``modules``: the trainable modules as the trainer hands them (DDP-wrapped); default ours.
        Every process draws the same ``batch_size`` picks, augmentations and noise and computes
        the loss on its rows (``batch_share``): per-sample means, so N processes averaging their
        gradients equal one process on the whole batch.
        """
        size, share = self.opt["resolution"], batch_share(self.opt["batch_size"])
        picks = rng.integers(0, len(defects), self.opt["batch_size"])
        rngs = rng.spawn(len(picks))  # one augmentation stream per row: a share needs only its own
        prompt_rngs = rng.spawn(len(picks))[share]  # and one drawing its prompt templates
        pairs = [augment_pair(defects[p].image, defects[p].mask, r, size) for p, r in list(zip(picks, rngs))[share]]
        images = torch.stack([p[0] for p in pairs])
        masks = torch.stack([p[1] for p in pairs])
        types = torch.tensor([type_indices[p] for p in picks[share]], device=self.backbone.device)
        modules = modules or self._modules()
        latents = encode_images(self.backbone, (images + 1) / 2)
        noisy, noise, timesteps = self._noised(latents, generator, share)
        context = self.condition(types, masks, modules, prompt_rngs).hidden_states
        eps = self._eps(noisy, timesteps, context)
        weight = latent_mask(masks, tuple(latents.shape[-2:])).to(eps.device)
        loss = masked_diffusion_loss(eps, noise, weight if self.opt["masked_loss"] else torch.ones_like(weight),
                                     self.opt["masked_loss_norm"])
        if self.opt["mask_source"] == "learned":
            mask_latents = encode_images(self.backbone, masks.expand(-1, 3, -1, -1))
            noisy, noise, timesteps = self._noised(mask_latents, generator, share)
            context = self.prompts(self._prompts(MASK, len(types), prompt_rngs), {MASK: modules["mask_tokens"](types)}).hidden_states
            loss = loss + F.mse_loss(self._eps(noisy, timesteps, context), noise)
        return loss

    def fit(self, defects: Sequence[DefectExample], good: Sequence[np.ndarray]) -> None:
        if not defects:
            raise DataError(None, "anomalydiffusion needs at least one training defect image with its mask")
        types = sorted({d.defect_type for d in defects})
        self._build(types)
        index = {t: i for i, t in enumerate(types)}
        type_indices = [index[d.defect_type] for d in defects]
        size = self.opt["resolution"]
        self.training_masks = {t: [d.mask for d in defects if d.defect_type == t] for t in types}
        self.mask_stats = {t: MaskStats.from_masks([resize_mask(m, (size, size)) for m in ms])
                           for t, ms in self.training_masks.items()}
        self.loss_log = self._train(defects, type_indices)

    def _trainable(self) -> dict[str, torch.nn.Module]:
        """What Eq. 6 (and Eq. 9 for learned masks) trains: e_a, E (unless ablated) and e_m."""
        skip = {"spatial_encoder": not self.opt["spatial_embedding"], "mask_tokens": self.opt["mask_source"] != "learned"}
        return {name: module for name, module in self._modules().items() if not skip.get(name)}

    def _train(self, defects: Sequence[DefectExample], type_indices: list[int]) -> list[float]:
        """The core's training loop (``diffusion.train``): Adam (lr 5e-3 × batch by default, as the
        official code; ``spatial_encoder_lr`` gives E its own) for ``max_steps`` steps or until ``time_budget_s`` runs out; checkpoints in
        ``work_dir`` (a re-run resumes there). Returns the loss of every step."""
        opt = self.opt

        def loss_fn(modules: dict[str, torch.nn.Module], step: int, generator: torch.Generator) -> torch.Tensor:
            rng = np.random.default_rng(np.random.SeedSequence([opt["seed"], 0, step]))  # augmentation of this step
            return self.training_loss(defects, type_indices, rng, generator, modules)

        config = self.train_config(
            lr=opt["lr"] or 5e-3 * opt["batch_size"], max_grad_norm=None,
            module_lr={} if opt["spatial_encoder_lr"] is None else {"spatial_encoder": opt["spatial_encoder_lr"]})
        return self.train_modules(self._trainable(), loss_fn, config)

    # ----------------------------------------------------------------- masks
    def _sample_masks(self, type_indices: list[int], seeds: list[np.random.SeedSequence]) -> list[np.ndarray | None]:
        """Masks from e_m (Eq. 9): guided DDIM from noise, decode, threshold; None where rejected
        (``mask_filter``: the official border rule or ours, ``mask_model.py``)."""
        backbone, opt = self.backbone, self.opt
        size = opt["resolution"]
        factor = backbone.vae_scale_factor
        types = torch.tensor(type_indices, device=backbone.device)
        with torch.no_grad():
            rngs = [np.random.default_rng(s.spawn(1)[0]) for s in seeds]
            context = self.prompts(self._prompts(MASK, len(types), rngs), {MASK: self.mask_tokens(types)}).hidden_states
            uncond = self.prompts([""]).hidden_states
            generators = [torch.Generator().manual_seed(int(s.generate_state(1)[0])) for s in seeds]
            latents = sample_latents(
                backbone, context, generators, latent_size=(size // factor, size // factor),
                sampler=opt["mask_sampler"], num_inference_steps=opt["mask_inference_steps"], eta=opt["mask_eta"],
                guidance_scale=opt["mask_guidance_scale"], uncond_hidden_states=uncond)
            masks = binarize(decode_latents(backbone, latents) * 2 - 1, opt["mask_threshold"]).cpu().numpy()
        out: list[np.ndarray | None] = []
        for mask, t in zip(masks, type_indices):
            rule = official_rejection if opt["mask_filter"] == "official" else self.mask_stats[self._defect_types[t]].rejection
            out.append(None if rule(mask) else mask)
        return out

    def _augmented_mask(self, defect_type: str, rng: np.random.Generator, good: np.ndarray) -> np.ndarray:
        masks = self.training_masks[defect_type]
        return augment_onto(masks[int(rng.integers(len(masks)))], good, rng, self.opt["foreground"])

    def _masks_for(self, indices: list[int], types: list[int], goods: list[np.ndarray],
                   seed: int) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
        """Learned masks with rejection (up to ``mask_tries`` draws each, then an augmented
        training mask: ``FALLBACK``), or augmented training masks (on each good image's foreground),
        at each good image's size.
        Returns the masks and each one's manifest meta (``mask_source``, ``mask_draws``)."""
        result: dict[int, tuple[np.ndarray, dict[str, Any]]] = {}
        learned = self.opt["mask_source"] == "learned"
        if learned:
            pending = list(range(len(indices)))
            for attempt in range(self.opt["mask_tries"]):
                if not pending:
                    break
                seeds = [np.random.SeedSequence([seed, indices[j], 1, attempt]) for j in pending]
                sampled = self._sample_masks([types[j] for j in pending], seeds)
                for j, mask in zip(pending, sampled):
                    if mask is not None:
                        result[j] = (resize_mask(mask, goods[j].shape[:2]), {"mask_source": "learned", "mask_draws": attempt + 1})
                pending = [j for j in pending if j not in result]
        for j in range(len(indices)):
            if j not in result:
                rng = np.random.default_rng(np.random.SeedSequence([seed, indices[j], 2]))
                meta = {"mask_source": FALLBACK, "mask_draws": self.opt["mask_tries"]} if learned else {"mask_source": "augment"}
                result[j] = (self._augmented_mask(self._defect_types[types[j]], rng, goods[j]), meta)
        return [result[j][0] for j in range(len(indices))], [result[j][1] for j in range(len(indices))]

    # ----------------------------------------------------------------- generation
    def _guided_eps(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                    uncond: torch.Tensor | None) -> torch.Tensor:
        """ε_t of one UNet pass on ``latents``, classifier-free guided as the sampler does when
        ``uncond`` is given."""
        unet = self.backbone.unet
        if uncond is not None:
            latents, context = torch.cat([latents, latents]), torch.cat([uncond.expand_as(context), context])
        eps = unet(latents.to(unet.dtype), timestep, encoder_hidden_states=context.to(unet.dtype)).sample.float()
        if uncond is None:
            return eps
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + self.opt["guidance_scale"] * (eps_cond - eps_uncond)

    def _aar_callback(self, hook: AttentionReweight, good: torch.Tensor, masks: torch.Tensor,
                      uncond: torch.Tensor | None):
        """Per-step AAR (Eqs. 7-8): before each UNet call set the hook's weight map for this step
        and its rows (the conditional half of the batch under CFG).

        ``good`` (B, 3, H, W) in [0, 1] and ``masks`` (B, 1, H, W) at the working resolution.
        ``paper``: x̂0 of the *current* step, from an extra UNet pass with the hook off
        (x̂0 = (z_t − √(1−ᾱ_t)·ε_t)/√ᾱ_t), decoded and compared with the good image in [-1, 1].
        """
        opt, backbone = self.opt, self.backbone
        if opt["aar"] == "latent":
            scale = opt["aar_dilation_scale"]
            scale = dilation_scale(opt["num_inference_steps"]) if scale is None else scale

            def callback(state: StepState) -> None:
                hook.rows = state.cond_rows
                hook.weights = latent_weights(state.latents, state.known_latents, state.mask, int(state.timestep),
                                              scale=scale, num_train_timesteps=backbone.num_train_timesteps)[:, None]
            return callback
        alphas = backbone.noise_scheduler().alphas_cumprod

        def callback(state: StepState) -> None:
            hook.rows, hook.weights = state.cond_rows, None  # the x̂0 pass runs without reweighting
            eps = self._guided_eps(state.latents, state.timestep, state.encoder_hidden_states, uncond)
            alpha = alphas[int(state.timestep)].to(state.latents.device)
            x0 = (state.latents.float() - (1 - alpha).sqrt() * eps) / alpha.sqrt()
            hook.weights = paper_weights(decode_latents(backbone, x0) * 2 - 1, good * 2 - 1, masks)[:, None]
        return callback

    def _aar_positions(self, encoded) -> list[list[int]]:
        """The token columns AAR re-weights, per row: ``aar_tokens="official"`` the start column
        (0), the anomaly and the spatial tokens, as the official code (``attention.py``: the weight
        map is reset to 1 on columns 1 .. start-1 and end .. 76 only); ``"anomaly"`` those tokens only."""
        anomaly = encoded.positions[ANOMALY]
        if self.opt["aar_tokens"] == "anomaly":
            return anomaly
        spatial = encoded.positions.get(SPATIAL, [[] for _ in anomaly])
        return [[0, *a, *s] for a, s in zip(anomaly, spatial)]

    def sampling_rows(self) -> float:
        return 2  # the learned masks sample with CFG

    @property
    def fitted(self) -> bool:
        return self.anomaly_tokens is not None and super().fitted

    def sample_batch(self, batch: Batch) -> list[AnomalySample]:
        """A mask per sample (given, learned or augmented), then blended sampling per group of same-size good images."""
        opt, backbone = self.opt, self.backbone
        types = [self._defect_types.index(t) for t in batch.types]
        if batch.given is not None:
            masks = [resize_mask(m, im.shape[:2]) for m, im in zip(batch.given, batch.images)]
            mask_meta = [{"mask_source": "given"}] * len(batch)
        else:
            masks, mask_meta = self._masks_for(batch.indices, types, batch.images, batch.seed)
        outputs: dict[int, np.ndarray] = {}
        for group in batch.split([image.shape for image in batch.images]):  # the core batches images of one size
            outputs.update(zip(group, self._sample_images(batch.subset(group), [masks[j] for j in group],
                                                          [types[j] for j in group])))
        aar = opt["aar"] if opt["aar"] == "off" else f"{opt['aar']} ({opt['aar_apply'] or DEFAULT_APPLY[opt['aar']]})"
        return [AnomalySample(image=outputs[j], mask=masks[j], defect_type=batch.types[j], prompt=None,
                              meta={"source_index": batch.sources[j], **mask_meta[j], "aar": aar, "model": backbone.label})
                for j in range(len(batch))]

    def _sample_images(self, batch: Batch, masks: list[np.ndarray], types: list[int]) -> list[np.ndarray]:
        """Blended latent diffusion of same-size good images conditioned on {e_a, E(m)}, with AAR
        on the cross-attention of the anomaly tokens (``aar.py``)."""
        opt, backbone = self.opt, self.backbone
        size = opt["resolution"]
        square = torch.stack([torch.from_numpy(resize_mask(m, (size, size))) for m in masks])[:, None].float()
        sampling = dict(sampler=opt["sampler"], num_inference_steps=opt["num_inference_steps"], eta=opt["eta"],
                        guidance_scale=opt["guidance_scale"], progress=len(batch) > 1)
        installed = None
        try:
            with torch.no_grad():
                rngs = [np.random.default_rng(np.random.SeedSequence([batch.seed, i, 3])) for i in batch.indices]
                encoded = self.condition(torch.tensor(types, device=backbone.device), square, rngs=rngs)
                uncond = self.prompts([""]).hidden_states if opt["guidance_scale"] > 1 else None
                sampling["uncond_hidden_states"] = uncond
                if opt["aar"] != "off":
                    hook = AttentionReweight(HOOK_STAGE[opt["aar_apply"] or DEFAULT_APPLY[opt["aar"]]])
                    hook.positions = self._aar_positions(encoded)
                    installed = install_hooks(backbone.unet, lambda layer: [hook],
                                              select_layers(backbone.unet, kinds=("cross",)))
                    sampling["callback"] = self._aar_callback(
                        hook, to_tensor(batch.images, (size, size)).to(backbone.device), square.to(backbone.device), uncond)
                return blended_generate(backbone, encoded.hidden_states, batch.images, masks, batch.generators,
                                        resolution=size, **sampling)
        finally:
            if installed is not None:
                remove_hooks(backbone.unet, installed)

    # ----------------------------------------------------------------- persistence
    def save_state(self, directory: Path) -> None:
        """e_a and e_m (``anomaly_tokens``, ``mask_tokens``) and E (``spatial_encoder.*``) in
        ``anomalydiffusion.safetensors``; E's record, the mask statistics and the training masks
        (PNG) in ``anomalydiffusion.json``."""
        write_modules(directory / STATE_FILE, {"spatial_encoder": self.spatial_encoder},
                      {"anomaly_tokens": self.anomaly_tokens.tokens, "mask_tokens": self.mask_tokens.tokens})
        self.write_meta(directory, {
            "defect_types": self._defect_types,
            "spatial_encoder": {"preset": self._encoder_preset, "source": self.spatial_encoder.source,
                                "equalized": self.spatial_encoder.gain != 1.0, "bound": self.spatial_encoder.bound},
            "prompt": self.opt["prompt"],
            "mask_stats": {t: s.to_json() for t, s in self.mask_stats.items()},
            "training_masks": write_masks(directory, self.training_masks, self._defect_types),
            "loss_log": self.loss_log})

    def load_state(self, directory: Path) -> None:
        state_path, meta_path = self.fitted_file(directory / STATE_FILE), self.meta_file(directory)
        meta = self.read_meta(directory)
        with malformed_as_corrupt(meta_path):
            types = meta["defect_types"]
            if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
                raise TypeError(f"defect_types must be a non-empty list of names, got {types!r}")
            mask_stats = {t: MaskStats(**{k: float(v) for k, v in meta["mask_stats"][t].items()}) for t in types}
            mask_files = mask_paths(directory, meta["training_masks"], types, meta_path)
            loss_log = [float(v) for v in meta.get("loss_log", [])]
            encoder = meta.get("spatial_encoder", {"source": RANDOM})
            fitted_prompt = meta.get("prompt", "tokens")  # models saved before the option: the tokens alone
            if fitted_prompt not in PROMPTS:
                raise TypeError(f"prompt must be one of {PROMPTS}, got {fitted_prompt!r}")
            if not isinstance(encoder, dict) or encoder.get("preset") not in (None, *PRESETS):
                raise TypeError(f"spatial_encoder must be an object naming a preset of {sorted(PRESETS)}, got {encoder!r}")
        self._build(types, encoder)
        tensors = read_modules(state_path, {"spatial_encoder": self.spatial_encoder}, self.backbone.device)
        with malformed_as_corrupt(state_path):
            copy_saved(self.anomaly_tokens.tokens, tensors["anomaly_tokens"], "anomaly_tokens")
            copy_saved(self.mask_tokens.tokens, tensors["mask_tokens"], "mask_tokens")
        self.opt["prompt"] = fitted_prompt
        self.mask_stats = mask_stats
        self.training_masks = read_masks(mask_files)
        self.loss_log = loss_log
