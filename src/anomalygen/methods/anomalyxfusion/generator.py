"""AnomalyXFusion (Hu et al., "AnomalyXFusion: Multi-modal Anomaly Synthesis with Diffusion", 2024)
as an ``AnomalyGenerator`` on the shared diffusion core. The paper gives Eqs. 1-17; the authors'
partial code (``hujiecpp/MVTec-Caption``: their loss, prompt and base model, no MIF aggregator or
DDF) settles what the paper leaves open.

fit: per training defect (image, mask, caption) the frozen UNet is conditioned on e_t, the
X-embedding of MIF (Eqs. 1-5, ``mif.py``) passed through DDF (Eq. 14, ``ddf.py``) at the step's
timestep, placed as the authors' code places its embedding (``placement="template"``, default):
its tokens stand for the "*" of "a photo of a *" (``template``) at the text encoder's input, the
caption reaching the UNet only through e_sem; ``placement="caption"`` (ours) appends e_t to the
caption's token states instead. The loss (Eq. 17) is the authors' masked ε-MSE by default
(``loss="masked"``: (ε − ε_θ) inside the mask resized to the latent and binarised at 0.5, averaged
over the whole latent; "to enhance the focus on the anomaly region", as the paper says of image
and mask) or the plain whole-image ε-MSE (``loss="plain"``, ours). It trains MIF and DDF only.
generate: blended diffusion (Eq. 16): at every step the latent keeps the model's values inside
the mask and the good image's latent, noised to that step, outside it; e_t is recomputed at every
timestep (the core's ``conditioning(t)`` hook). A sample is a (caption, mask) of a training
defect of its type (the mask augmented unless ``mask_augment=false``, or a given mask) with the
type's learned textural tokens, on a good image.

Ablations (the paper's Table 6): ``mif`` / ``ddf`` switch the modules and with them the trainable
set. Both on: e = DDF(MIF(...), t); MIF only: e = MIF(...) at every step; DDF only:
e = DDF(e_sem, t); both off ("text only"): the caption tokens alone, nothing trains (fit only
records the captions and masks; the caption's tokens are the prompt). Trainable: MIF's location
embedding with its mask encoder (a pretrained ISTR encoder is fine-tuned, as the paper;
``mask_encoder_finetune=false`` freezes it, ours), textural tokens and aggregator; DDF's f_φ and
timestep embedding. The UNet, VAE, CLIP text and image encoders stay frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anomalygen.data.captions import caption_for, default_caption, load_captions
from anomalygen.diffusion.backbone import default_model
from anomalygen.diffusion.conditioning import PromptEncoder
from anomalygen.diffusion.image_encoder import image_embeds, load_image_encoder, load_text_encoder
from anomalygen.diffusion.sampling import blended_generate, encode_images, to_tensor
from anomalygen.diffusion.train import batch_share
from anomalygen.errors import AnomalygenError, DataError
from anomalygen.masks import augment_onto, resize_mask
from anomalygen.methods.anomalyxfusion.config import OPTIONS
from anomalygen.methods.anomalyxfusion.ddf import DDF
from anomalygen.methods.anomalyxfusion.mif import MIF, MaskEncoder, load_mask_encoder, semantic_embedding, texture_init
from anomalygen.methods.base import malformed_as_corrupt
from anomalygen.methods.kit.batch import Batch
from anomalygen.methods.kit.method import DiffusionMethod
from anomalygen.methods.kit.state import mask_paths, read_masks, read_modules, write_masks, write_modules
from anomalygen.options import require
from anomalygen.types import AnomalySample, DefectExample

X_TOKEN = "<x-embedding>"  # the placeholder standing for e_t's tokens in the template
WEIGHTS_FILE = "anomalyxfusion.safetensors"


def _mask_tensor(masks: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Bool masks of any sizes -> (B, 1, size, size) in {0, 1} (nearest)."""
    return torch.cat([F.interpolate(torch.from_numpy(np.asarray(m, np.float32))[None, None], size=(size, size), mode="nearest")
                      for m in masks])


class AnomalyXFusion(DiffusionMethod):
    """Caption + mask + image fused into a timestep-dependent X-embedding; blended diffusion."""

    name = "anomalyxfusion"
    outside_mask = "changed"  # exactly kept with final_paste (default); the decoder's small changes without it
    OPTIONS = OPTIONS
    CPU_BATCH = 4

    def __init__(self, **options: Any):
        super().__init__(**options)
        require(self.opt["mif"] or not self.opt["mask_encoder"], self.name, "mask_encoder is MIF's (Eq. 2): it needs mif=true")
        # files are read now, so a bad one is refused before anything is written
        self.caption_file = load_captions(self.opt["captions"]) if self.opt["captions"] else None
        self.pretrained_mask_encoder = load_mask_encoder(self.opt["mask_encoder"]) if self.opt["mask_encoder"] else None
        self.category = self.opt["category"]
        self.captions: dict[str, list[str]] = {}  # type -> the caption of each training defect
        self.training_masks: dict[str, list[np.ndarray]] = {}
        self.mif: MIF | None = None
        self.ddf: DDF | None = None
        self.projection: torch.nn.Linear | None = None  # e_sem -> d when the semantic encoder's width is not d (the authors' mlp)
        self.loss_log: list[float] = []
        self._image_encoder = None
        self._template: PromptEncoder | None = None
        self._semantic = None  # (CLIP text model, tokenizer) of ``semantic_encoder``
        self.semantic_width: int | None = None  # e_sem's width before its projection (when it is not d)

    def config(self) -> dict[str, Any]:
        """The options without the captions / mask-encoder paths: a saved model holds their content."""
        config = {k: v for k, v in self.options.items() if k not in ("captions", "mask_encoder")}
        if self.pretrained_mask_encoder is not None:
            config["mask_embedding"] = self.pretrained_mask_encoder.embedding
        return config

    # ----------------------------------------------------------------- components
    @property
    def image_encoder(self):
        if self._image_encoder is None:
            self._image_encoder = load_image_encoder(self.opt["image_encoder"], model=self.opt["model"] or default_model(),
                                                     device=self.backbone.device, dtype=self.backbone.dtype, seed=self.opt["seed"])
        return self._image_encoder

    @property
    def width(self) -> int:
        """d: the UNet's cross-attention width, the width of every X-embedding token."""
        return int(self.backbone.unet.config.cross_attention_dim)

    def modules(self) -> dict[str, torch.nn.Module]:
        """The enabled trainable modules by name (none in the text-only ablation)."""
        return {name: m for name, m in (("semantic", self.projection), ("mif", self.mif), ("ddf", self.ddf)) if m is not None}

    def _build(self, textures: torch.Tensor) -> None:
        """MIF (with ``textures`` as e_tex's initial value) and DDF, as the options enable them; seeded."""
        dim = self.width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.opt["seed"])
            if self.opt["mif"]:
                encoder = copy.deepcopy(self.pretrained_mask_encoder) if self.pretrained_mask_encoder else None
                encoder = (encoder.requires_grad_(self.opt["mask_encoder_finetune"]) if encoder
                           else MaskEncoder(self.opt["mask_embedding"]))
                self.mif = MIF(encoder, textures, heads=dim // 64 if dim % 64 == 0 else 1).to(self.backbone.device)
            if self.opt["ddf"]:
                self.ddf = DDF(dim).to(self.backbone.device)
            if (self.opt["mif"] or self.opt["ddf"]) and self.semantic_width != dim:
                self.projection = torch.nn.Linear(self.semantic_width, dim).to(self.backbone.device)

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(caption token states (B, 77, d), e_sem (B, k, P), Eq. 1), frozen. e_sem comes from the
        base's CLIP text encoder (P = d) or from ``semantic_encoder`` (P its width, projected to d
        by the trainable ``projection``, as the authors' Linear(512, 1280) on LDM)."""
        with torch.no_grad():
            encoded = self.prompts(captions)
            pooled = encoded.pooled if self.opt["semantic_encoder"] is None else self._semantic_pooled(captions)
        if pooled is None or (self.opt["semantic_encoder"] is None and pooled.shape[-1] != self.width):
            raise AnomalygenError(f"anomalyxfusion: e_sem needs a CLIP text encoder whose pooled embedding is "
                                  f"{self.width}-d (the UNet's cross-attention width); {self.backbone.label} has none of that "
                                  f"width: give semantic_encoder=CLIP_TEXT_MODEL (the authors use CLIP ViT-B/32 on LDM)")
        self.semantic_width = int(pooled.shape[-1])
        return encoded.hidden_states, semantic_embedding(pooled, self.opt["tokens"])

    def _semantic_pooled(self, captions: list[str]) -> torch.Tensor:
        """The pooled embeddings of ``semantic_encoder`` (loaded on first use)."""
        if self._semantic is None:
            self._semantic = load_text_encoder(self.opt["semantic_encoder"], device=self.backbone.device)
        model, tokenizer = self._semantic
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.backbone.device)
        output = model(ids)
        pooled = getattr(output, "text_embeds", None)
        return (output.pooler_output if pooled is None else pooled).float()

    def x_embedding(self, modules: dict[str, torch.nn.Module], semantic: torch.Tensor, masks: torch.Tensor,
                    type_ids: torch.Tensor) -> torch.Tensor | None:
        """e_X = MIF(e_sem, M, type) (Eqs. 1-5); e_sem alone without MIF; None in the text-only ablation."""
        if not modules:
            return None
        if "semantic" in modules:
            semantic = modules["semantic"](semantic.to(modules["semantic"].weight))
        return modules["mif"](semantic, masks, type_ids) if "mif" in modules else semantic

    def step_context(self, modules: dict[str, torch.nn.Module], states: torch.Tensor, tokens: torch.Tensor | None,
                     t: torch.Tensor) -> torch.Tensor:
        """The UNet's cross-attention input at timestep t, with e_t = DDF(e_X, t) (Eq. 14) or e_X
        itself without DDF: the template encoded with e_t's tokens at its "*" (``template``) or
        ``[caption tokens; e_t]`` (``caption``); the caption tokens alone in the text-only ablation."""
        if tokens is None:
            return states
        if "ddf" in modules:
            tokens = modules["ddf"](tokens, t)
        if self.opt["placement"] == "caption":
            return torch.cat([states, tokens.to(states)], dim=1)
        encoder = self.template_encoder(tokens.shape[1])
        prompt = self.opt["template"].replace("*", X_TOKEN)
        return encoder([prompt] * len(tokens), {X_TOKEN: tokens}).hidden_states

    def template_encoder(self, count: int) -> PromptEncoder:
        """The text encoder with ``count`` placeholder positions for e_t's tokens (built once)."""
        if self._template is None or self._template.counts[X_TOKEN] != count:
            backbone = self.backbone
            self._template = PromptEncoder(backbone.text_encoder, backbone.tokenizer, {X_TOKEN: count})
            if self._template.embedding_dim != self.width:
                raise AnomalygenError(f"anomalyxfusion: placement=template needs the text encoder's token width "
                                      f"({self._template.embedding_dim}) to be the UNet's ({self.width}); use placement=caption")
        return self._template

    # ----------------------------------------------------------------- training
    def _caption(self, example: DefectExample) -> str:
        if self.caption_file is None:
            return default_caption(self.category, example.defect_type)
        return caption_for(self.caption_file, self.opt["captions"], self.category, example.defect_type, example.source)

    def fit(self, defects: Sequence[DefectExample], good: Sequence[np.ndarray]) -> None:
        if not defects:
            raise DataError(None, "anomalyxfusion needs at least one training defect image with its mask")
        data = self._setup(defects)
        if self.modules():
            self.loss_log = self._train(*data)
        for module in self.modules().values():
            module.eval().requires_grad_(False)

    def _setup(self, defects: Sequence[DefectExample]) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
        """Types, category, captions and masks of the training defects; MIF / DDF built (e_tex from
        the CLIP features of image × mask, Eq. 3). Returns what training reads: images and masks at
        the working resolution, captions, type ids."""
        self._defect_types = sorted({d.defect_type for d in defects})
        if self.category is None:
            folders = {Path(d.source).parents[2].name for d in defects if d.source is not None and len(Path(d.source).parents) > 2}
            self.category = folders.pop() if len(folders) == 1 else "object"
        captions = [self._caption(d) for d in defects]
        self.captions = {t: [c for c, d in zip(captions, defects) if d.defect_type == t] for t in self._defect_types}
        self.training_masks = {t: [np.asarray(d.mask, bool) for d in defects if d.defect_type == t] for t in self._defect_types}
        self.encode_text(captions[:1])  # loads the backbone (settling the resolution); refuses a text encoder without e_sem
        size = self.opt["resolution"]
        images, masks = to_tensor([d.image for d in defects], (size, size)), _mask_tensor([d.mask for d in defects], size)
        type_ids = torch.tensor([self._defect_types.index(d.defect_type) for d in defects])
        textures = torch.zeros(len(self._defect_types), self.opt["tokens"], self.width)
        if self.opt["mif"]:  # Eq. 3: CLIP features of image × mask, once per training image
            features = image_embeds(self.image_encoder, images * masks)
            if features.shape[-1] != self.width:
                raise AnomalygenError(f"anomalyxfusion: the image encoder projects to {features.shape[-1]} dims, the UNet's "
                                      f"cross-attention takes {self.width}; use an image encoder projecting to {self.width}")
            textures = texture_init(features.cpu(), type_ids, len(self._defect_types), self.opt["tokens"])
        self._build(textures)
        return images, masks, captions, type_ids

    def _train(self, images: torch.Tensor, masks: torch.Tensor, captions: list[str], type_ids: torch.Tensor) -> list[float]:
        """Eq. 17: ‖ε − ε_θ(z_t, t, [caption; e_t])‖² over random training defects and timesteps,
        MIF / DDF training (the core's loop: checkpoints in ``work_dir``, exact resume, bf16)."""
        opt, backbone = self.opt, self.backbone
        latents = encode_images(backbone, images)
        states, semantic = self.encode_text(captions)
        device = backbone.device

        def loss_fn(modules, step, generator):
            picks, timesteps, noise, noisy = self.draw_noised(latents, generator, batch_share(opt["batch_size"]))
            t = timesteps.to(device)
            tokens = self.x_embedding(modules, semantic[picks], masks[picks].to(device), type_ids[picks].to(device))
            context = self.step_context(modules, states[picks], tokens, t)
            eps = backbone.unet(noisy.to(device, backbone.unet.dtype), t,
                                encoder_hidden_states=context.to(backbone.unet.dtype)).sample
            error = eps.float() - noise.to(device)
            if opt["loss"] == "masked":  # the authors' code: the mask resized to the latent, binarised at 0.5
                error = error * (F.interpolate(masks[picks].to(device), size=error.shape[-2:], mode="bilinear") >= 0.5)
            return error.pow(2).mean()

        modules = self.modules()
        for module in modules.values():
            module.train()
        return self.train_modules(modules, loss_fn, self.train_config())

    # ----------------------------------------------------------------- generation
    @property
    def fitted(self) -> bool:
        return bool(self.captions) and super().fitted

    def _draw(self, batch: Batch, j: int) -> dict[str, Any]:
        """Sample ``j``'s training defect (its caption) and mask, drawn on from its ``(seed, i)`` generator."""
        rng, name, image = batch.rngs[j], batch.types[j], batch.images[j]
        k = int(rng.integers(len(self.captions[name])))
        if batch.given is not None:
            mask, origin = resize_mask(batch.given[j], image.shape[:2]), "given"
        elif self.opt["mask_augment"]:
            mask, origin = augment_onto(self.training_masks[name][k], image, rng, self.opt["foreground"]), "augment"
        else:
            mask, origin = resize_mask(self.training_masks[name][k], image.shape[:2]), "training"
        return {"caption": self.captions[name][k], "mask": mask, "mask_source": origin}

    def sample_batch(self, batch: Batch) -> list[AnomalySample]:
        draws = [self._draw(batch, j) for j in range(len(batch))]
        opt, backbone = self.opt, self.backbone
        size = opt["resolution"]
        modules = self.modules()
        states, semantic = self.encode_text([d["caption"] for d in draws])
        device = backbone.device
        masks = _mask_tensor([d["mask"] for d in draws], size).to(device)
        type_ids = torch.tensor([self._defect_types.index(t) for t in batch.types], device=device)
        with torch.no_grad():
            tokens = self.x_embedding(modules, semantic, masks, type_ids)  # e_X does not depend on t: once per batch

            def conditioning(t: torch.Tensor) -> torch.Tensor:
                return self.step_context(modules, states, tokens, t)

            first = conditioning(torch.tensor(backbone.num_train_timesteps - 1))
            sampling: dict[str, Any] = {"conditioning": conditioning} if "ddf" in modules else {}
            if opt["guidance_scale"] > 1:  # unconditional rows: the empty prompt, zero X-embedding tokens
                empty = self.prompts([""]).hidden_states
                extra = empty.new_zeros(1, first.shape[1] - empty.shape[1], empty.shape[-1])
                sampling["uncond_hidden_states"] = torch.cat([empty, extra], dim=1)
            made = blended_generate(
                backbone, first, batch.images, [d["mask"] for d in draws], batch.generators,
                resolution=size, final_paste=opt["final_paste"], sampler=opt["sampler"],
                num_inference_steps=opt["num_inference_steps"], guidance_scale=opt["guidance_scale"],
                progress=len(batch) > 1, **sampling)
        return [AnomalySample(image=image, mask=d["mask"], defect_type=t, prompt=d["caption"],
                              meta={"source_index": source, "mask_source": d["mask_source"], "model": backbone.label,
                                    "modules": "+".join(self.modules()) or "text only"})
                for image, d, t, source in zip(made, draws, batch.types, batch.sources)]

    # ----------------------------------------------------------------- persistence
    def save_state(self, directory: Path) -> None:
        """MIF / DDF weights (``anomalyxfusion.safetensors``: ``mif.*``, ``ddf.*``), the captions
        and training masks (PNG) of every type, ``anomalyxfusion.json``."""
        write_modules(directory / WEIGHTS_FILE, self.modules())
        names = write_masks(directory, self.training_masks, self._defect_types)
        self.write_meta(directory, {"category": self.category, "captions": self.captions, "training_masks": names,
                                    "loss_log": self.loss_log})

    def load_state(self, directory: Path) -> None:
        meta, meta_path = self.read_meta(directory), self.meta_file(directory)
        with malformed_as_corrupt(meta_path):
            category, captions = meta["category"], meta["captions"]
            if not isinstance(category, str) or sorted(captions) != self._defect_types:
                raise ValueError(f"category must be a name and captions hold every type of {self._defect_types}")
            if not all(isinstance(c, list) and c and all(isinstance(x, str) for x in c) for c in captions.values()):
                raise ValueError("captions must be non-empty lists of strings")
            files = mask_paths(directory, meta["training_masks"], self._defect_types, meta_path)
            if any(len(files[t]) != len(captions[t]) for t in self._defect_types):
                raise ValueError("each type needs one training mask per caption")
            loss_log = [float(v) for v in meta.get("loss_log", [])]
        weights = self.fitted_file(directory / WEIGHTS_FILE)
        self.encode_text(["x"])  # e_sem's width: whether a projection was trained
        self._build(torch.zeros(len(self._defect_types), self.opt["tokens"], self.width))
        read_modules(weights, self.modules(), self.backbone.device)
        for module in self.modules().values():
            module.eval().requires_grad_(False)
        self.category, self.captions, self.loss_log = category, captions, loss_log
        self.training_masks = read_masks(files)
