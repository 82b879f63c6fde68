"""Several LoRA adapters on one UNet (or text encoder), all trainable at once, routed per batch row.

Built on peft (``LoraConfig``, its ``LoraLayer`` mixed-batch forward) and diffusers (``add_adapter``,
the LoRA file format). Two library facts this module works around (``tests/unit/diffusion/test_lora.py``
asserts both, so a library change is noticed):

- ``set_adapter(name)`` (diffusers and peft) turns ``requires_grad`` off for every other adapter;
  ``add_adapters`` therefore leaves every adapter active and trainable.
- peft routes rows to adapters at layer level (``LoraLayer.forward(x, adapter_names=[...])``,
  ``_mixed_batch_forward``), but diffusers' attention processors call ``attn.to_q(x)`` without it,
  so passing ``adapter_names`` to the UNet does not route. ``route`` puts the row list on every
  LoRA layer with a forward pre-hook instead. peft's model-level refusal of ``adapter_names`` in
  training mode (``LoraModel``) is not involved: the layer-level mixed forward is plain indexing, and
  gradients reach each adapter through the rows that use it (none reach an unused adapter).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's (and LDMBert's) attention projections
BASE = "__base__"  # peft's row name for "no adapter"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_layers(unet: torch.nn.Module) -> list[LoraLayer]:
    return [module for module in unet.modules() if isinstance(module, LoraLayer)]


def adapter_names(unet: torch.nn.Module) -> list[str]:
    return list(getattr(unet, "peft_config", {}))


def activate_all(unet: torch.nn.Module) -> None:
    """Every adapter active and trainable (peft's layer ``set_adapter`` with the full list)."""
    names = adapter_names(unet)
    for layer in lora_layers(unet):
        layer.set_adapter([name for name in names if name in layer.lora_A])


@contextmanager
def _several_adapters() -> Iterator[None]:
    """Quiet adapter loading: peft warns whenever a second adapter is added (that is the point
    here), transformers reports the other adapters' weights as "missing" from each file and shows
    a progress bar per file."""
    from transformers.utils import logging as transformers_logging

    verbosity, bar = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bar:
            transformers_logging.enable_progress_bar()


def add_adapters(
    unet: torch.nn.Module,
    names: Iterable[str],
    rank: int = 32,
    alpha: float | None = None,
    targets: Sequence[str] = ATTENTION_TARGETS,
) -> None:
    """One LoRA adapter per name on the ``targets`` projections of every attention layer (peft init: B = 0).

    ``alpha`` defaults to ``rank`` (scale 1). Afterwards all adapters are active and trainable; an
    unrouted forward adds them all, so use ``route`` to pick adapters per row. Works on a text
    encoder too (diffusers' and transformers' ``add_adapter``), with ``targets=TEXT_TARGETS``.
    """
    for name in names:
        config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=list(targets), init_lora_weights=True)
        with _several_adapters():
            unet.add_adapter(config, adapter_name=name)
    activate_all(unet)


def trainable_parameters(unet: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The LoRA A/B weights of adapter ``name`` (one list per adapter, for an optimizer group)."""
    if name not in adapter_names(unet):
        raise ValueError(f"no LoRA adapter {name!r} on this UNet (has {adapter_names(unet)})")
    return [p for layer in lora_layers(unet) if name in layer.lora_A for p in (*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters())]


@contextmanager
def route(unet: torch.nn.Module, row_adapters: Sequence[str]) -> Iterator[None]:
    """Inside the block, batch row i of every UNet forward uses adapter ``row_adapters[i]`` (``BASE``: none).

    The list must match the UNet batch (under CFG stacking: one entry per stacked row); every LoRA
    layer's input must have that batch as its leading dimension (true of diffusers' attention).
    """
    rows = list(row_adapters)
    unknown = set(rows) - set(adapter_names(unet)) - {BASE}
    if unknown:
        raise ValueError(f"no LoRA adapter(s) {sorted(unknown)} on this UNet (has {adapter_names(unet)})")

    def put_rows(module, args, kwargs):
        return args, {**kwargs, "adapter_names": rows}

    handles = [layer.register_forward_pre_hook(put_rows, with_kwargs=True) for layer in lora_layers(unet)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _diffusers_state(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=name))
    return {key: value.detach().float().contiguous() for key, value in state.items()}


def save_adapter(unet: torch.nn.Module, name: str, folder: str | Path, *, text_encoder: torch.nn.Module | None = None,
                 text_name: str | None = None) -> Path:
    """Write adapter ``name`` (and, when given, the text encoder's adapter ``text_name``) as
    ``folder/pytorch_lora_weights.safetensors``, loadable by diffusers'
    ``StableDiffusionPipeline.load_lora_weights(folder)`` (keys ``unet.…`` / ``text_encoder.…``,
    the LoraConfigs as metadata)."""
    for model, adapter in ((unet, name), (text_encoder, text_name)):
        if model is not None and adapter not in adapter_names(model):
            raise ValueError(f"no LoRA adapter {adapter!r} on this model (has {adapter_names(model)})")
    text = {}
    if text_encoder is not None:
        text = dict(text_encoder_lora_layers=_diffusers_state(text_encoder, text_name),
                    text_encoder_lora_adapter_metadata=text_encoder.peft_config[text_name].to_dict())
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=_diffusers_state(unet, name), unet_lora_adapter_metadata=unet.peft_config[name].to_dict(),
        weight_name=WEIGHT_NAME, **text,
    )
    return Path(folder) / WEIGHT_NAME


def load_adapter(unet: torch.nn.Module, folder: str | Path, name: str, *, text_encoder: torch.nn.Module | None = None,
                 text_name: str | None = None) -> None:
    """Load a diffusers LoRA file (``save_adapter``'s, or any SD LoRA) as adapter ``name`` of the
    UNet and, when ``text_encoder`` is given, its ``text_encoder.…`` part as adapter ``text_name``;
    afterwards all adapters are active and trainable, as after ``add_adapters``."""
    with _several_adapters():
        unet.load_lora_adapter(str(folder), prefix="unet", adapter_name=name, weight_name=WEIGHT_NAME)
        if text_encoder is not None:
            state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
                str(folder), weight_name=WEIGHT_NAME, return_lora_metadata=True)
            if not any(key.startswith("text_encoder.") for key in state):
                raise ValueError(f"{Path(folder) / WEIGHT_NAME} holds no text encoder LoRA")
            StableDiffusionPipeline.load_lora_into_text_encoder(
                state, alphas, text_encoder, prefix="text_encoder", adapter_name=text_name, metadata=metadata)
    activate_all(unet)
    if text_encoder is not None:
        activate_all(text_encoder)
