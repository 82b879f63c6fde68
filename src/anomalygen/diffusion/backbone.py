"""Latent text-to-image components: from a hub id, a local diffusers folder, config dicts or ``tiny``.

Two diffusers layouts are read; ``model_index.json`` says which, and which class each part is:

- Stable Diffusion: ``vae/`` (AutoencoderKL), ``text_encoder/`` (CLIPTextModel), a CLIP tokenizer;
- CompVis LDM text-to-image (``CompVis/ldm-text2im-large-256``):
  ``vqvae/`` (an AutoencoderKL in that repository despite the folder's name; a VQModel is read as
  well), ``bert/`` (LDMBertModel), a BERT tokenizer.

Both have ``unet/`` (UNet2DConditionModel), ``tokenizer/`` and ``scheduler/``. ``load_backbone``
returns the parts frozen, on one device, in one dtype, with PyTorch's SDPA attention (diffusers'
default); ``build_backbone`` makes randomly initialised parts from config dicts (``tiny``, tests).
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VQModel
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
from transformers import CLIPTextModel

from anomalygen.devices import resolve_device
from anomalygen.errors import DataError, ModelNotFoundError, first_problem
from anomalygen.weights import refused_pickle

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LDM_MODEL = "CompVis/ldm-text2im-large-256"
MODEL_ENV = "ANOMALYGEN_MODEL"
TINY = "tiny"
DTYPES = {"fp32": torch.float32, "no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# slot -> subfolder, per layout; slot -> accepted classes by the name model_index.json gives
LAYOUTS = {
    "Stable Diffusion": {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder", "tokenizer": "tokenizer", "scheduler": "scheduler"},
    "LDM text-to-image": {"unet": "unet", "vae": "vqvae", "text_encoder": "bert", "tokenizer": "tokenizer", "scheduler": "scheduler"},
}
EXPECTED = "vae/ + text_encoder/ (Stable Diffusion) or vqvae/ + bert/ (LDM text-to-image), each with unet/, tokenizer/, scheduler/"
CLASSES: dict[str, dict[str, Any]] = {
    "unet": {"UNet2DConditionModel": UNet2DConditionModel},
    "vae": {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel},
    "text_encoder": {"CLIPTextModel": CLIPTextModel, "LDMBertModel": LDMBertModel},
    "tokenizer": {name: getattr(transformers, name) for name in ("CLIPTokenizer", "CLIPTokenizerFast", "BertTokenizer", "BertTokenizerFast")},
}


def default_model(fallback: str = DEFAULT_MODEL) -> str:
    """The model used when none is given: ``$ANOMALYGEN_MODEL``, else ``fallback`` (Stable Diffusion 1.5)."""
    return os.environ.get(MODEL_ENV) or fallback


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` is the fast path: ``"bf16"`` on CUDA, ``"fp32"`` elsewhere; other values pass."""
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (or ``"no"``, accelerate's word for fp32, or ``"auto"``: bf16 on a
    CUDA ``device``, else fp32) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = resolve_precision(dtype, device or torch.device("cpu"))
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


@dataclass
class Backbone:
    """The frozen components every diffusion method shares (either layout)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL | VQModel
    text_encoder: CLIPTextModel | LDMBertModel
    tokenizer: Any  # CLIP or BERT tokenizer
    scheduler_config: dict[str, Any]
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    untrained: bool = False  # random weights (``tiny``, ``build_backbone``): outputs are noise
    compile: bool = False  # ``fast.prepare_for_sampling`` compiles the UNet (on CUDA)
    prepared: bool = False  # ``fast.prepare_for_sampling`` ran
    compile_started: float | None = None  # set while a compiled UNet's first call is pending

    @property
    def label(self) -> str:
        """The model name as shown in outputs (random weights say so)."""
        return f"{self.name} (random init, UNTRAINED)" if self.untrained else self.name

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (8 for Stable Diffusion and LDM, 2 for ``tiny``)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    @property
    def native_resolution(self) -> int:
        """The size the model was trained at: UNet sample size × autoencoder factor (SD 1.x 512, LDM 256)."""
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    def resolution(self, requested: int | None) -> int:
        """``requested`` pixels, or the native size when None; warns below the native size of trained weights."""
        native = self.native_resolution
        if requested is None:
            return native
        if requested < native and not self.untrained:
            warnings.warn(
                f"resolution {requested} is below the {native} px that {self.name} was trained at and it generates "
                f"poorly there; leave resolution unset for {native} px, or use {LDM_MODEL} for 256 px", stacklevel=2)
        return int(requested)

    def noise_scheduler(self) -> DDIMScheduler:
        """A scheduler over the training noise schedule (``add_noise`` for losses and blending)."""
        return DDIMScheduler.from_config(self.scheduler_config)


def _not_found(model: str, reason: str, local: bool = False) -> ModelNotFoundError:
    if local:
        return ModelNotFoundError(
            f"{model}: could not be loaded ({reason}); the folder lacks weights: download the model into it with "
            f"`huggingface-cli download HUB_ID --local-dir {model}` (e.g. {DEFAULT_MODEL} or {LDM_MODEL})")
    return ModelNotFoundError(
        f"model {model!r} could not be loaded ({reason}). Download it once where there is network: "
        f"`huggingface-cli download {model} --local-dir DIR` (or `hf download {model} --local-dir DIR`), "
        f"then point anomalygen at the copy with `model` DIR or `export {MODEL_ENV}=DIR`; "
        f"`model` {TINY} runs an untrained test model without any download"
    )


def _listing(names: list[str]) -> str:
    names = [f"{n}/" for n in sorted(names)]
    if len(names) < 2:
        return names[0] if names else "no component folders"
    return ", ".join(names[:-1]) + " and " + names[-1]


def model_layout(index: dict[str, Any], where: str | Path) -> dict[str, tuple[str, Any]]:
    """slot -> (subfolder, class) from ``model_index.json`` entries (``{folder: [library, class name]}``).

    A folder set or a class outside the two layouts is a ``DataError`` naming what was found."""
    found = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, (list, tuple))]
    folders = next((f for f in LAYOUTS.values() if set(f.values()) <= set(found)), None)
    if folders is None:
        raise DataError(where, f"has {_listing(found)}; expected {EXPECTED}")
    layout = {}
    for slot, folder in folders.items():
        name = index[folder][-1]
        if slot in CLASSES and name not in CLASSES[slot]:
            raise DataError(where, f"{folder}/ is a {name}; expected {' or '.join(CLASSES[slot])}")
        layout[slot] = (folder, CLASSES.get(slot, {}).get(name))
    return layout


def _local_index(folder: Path) -> dict[str, Any]:
    """``model_index.json``, or the class names the subfolders' own config files give when it is absent."""
    if (folder / "model_index.json").is_file():
        return json.loads((folder / "model_index.json").read_text())
    index = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for file, key in (("config.json", "_class_name"), ("config.json", "architectures"),
                          ("tokenizer_config.json", "tokenizer_class"), ("scheduler_config.json", "_class_name")):
            value = json.loads((sub / file).read_text()).get(key) if (sub / file).is_file() else None
            if value:
                index[sub.name] = [None, value[0] if isinstance(value, list) else value]
                break
    return index


def build_backbone(
    configs: dict[str, dict[str, Any]], tokenizer: Any, *, name: str, seed: int = 0,
    device: str | torch.device | None = None, dtype: str | torch.dtype = "fp32",
) -> Backbone:
    """Randomly initialised parts from config dicts, as a diffusers folder's config files hold them.

    ``configs``: ``unet``, ``vae`` (``_class_name`` AutoencoderKL (default) or VQModel),
    ``text_encoder`` (``architectures`` [CLIPTextModel] or [LDMBertModel]) and ``scheduler``.
    The result is labelled untrained."""
    text_config = configs["text_encoder"]
    text_class = CLASSES["text_encoder"][text_config["architectures"][0]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = {
            "text_encoder": text_class(text_class.config_class.from_dict(text_config)),
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": CLASSES["vae"][configs["vae"].get("_class_name", "AutoencoderKL")].from_config(configs["vae"]),
        }
    return _finish(parts, tokenizer, dict(configs["scheduler"]), name, device, dtype, untrained=True)


def _finish(parts: dict[str, torch.nn.Module], tokenizer: Any, scheduler_config: dict[str, Any], name: str,
            device: str | torch.device | None, dtype: str | torch.dtype, untrained: bool = False) -> Backbone:
    device = resolve_device(str(device) if device is not None else None)
    torch_dtype = resolve_dtype(dtype, device)
    for module in parts.values():
        module.requires_grad_(False).eval().to(device)
        if module.dtype != torch_dtype:  # (a dtype in diffusers' `to` warns even when it changes nothing)
            module.to(torch_dtype)
    return Backbone(**parts, tokenizer=tokenizer, scheduler_config=scheduler_config, name=name, device=device,
                    dtype=torch_dtype, untrained=untrained)


def load_backbone(
    model: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "fp32",
    seed: int = 0,
) -> Backbone:
    """Load a diffusers-format Stable Diffusion or LDM text-to-image model (hub id or local folder), or ``tiny``.

    Raises ``ModelNotFoundError`` naming what to download and how to point anomalygen at it when
    the weights are neither cached nor reachable, and ``DataError`` for a folder of another layout.
    """
    model = model or default_model()
    if model == TINY:
        from anomalygen.diffusion.tiny import tiny_configs, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return build_backbone(tiny_configs(tokenizer), tokenizer, name=TINY, seed=seed, device=device, dtype=dtype)
    local = Path(model).expanduser()
    looks_local = local.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_local and not local.is_dir():
        raise ModelNotFoundError(f"{local}: not a diffusers model folder (no such folder)")
    source = str(local) if looks_local else model
    try:
        if looks_local:
            index, where = _local_index(local), local
        else:
            from huggingface_hub import hf_hub_download

            index, where = json.loads(Path(hf_hub_download(model, "model_index.json")).read_text()), f"{model}/model_index.json"
        layout = model_layout(index, where)
        parts = {slot: layout[slot][1].from_pretrained(source, subfolder=layout[slot][0]) for slot in ("unet", "vae", "text_encoder")}
        tokenizer = layout["tokenizer"][1].from_pretrained(source, subfolder=layout["tokenizer"][0])
        scheduler_config = dict(DDIMScheduler.load_config(source, subfolder=layout["scheduler"][0]))
    except (OSError, ValueError, pickle.UnpicklingError) as error:  # huggingface_hub's offline/missing errors are OSErrors
        refusal = refused_pickle(error, local) if looks_local else None
        if refusal is not None:  # a pickle weights file with code in it: refused, not missing
            raise refusal from None
        reason = first_problem(error)
        raise _not_found(model, reason, looks_local) from error
    return _finish(parts, tokenizer, scheduler_config, model, device, dtype)
