"""A recording stand-in for the wiring tests: what reaches the UNet, the ControlNet, the text encoder
and the autoencoder, per call and per batch row.

``with record(backbone, controlnet=...) as rec:`` wraps the real (tiny) components, without
changing what they compute, and keeps:

- ``rec.unet``: one ``UNetCall`` per UNet forward: its input latents, timestep per row, context
  (``encoder_hidden_states``) per row, the LoRA adapter routed to each row (``lora.route``), the
  attention hooks active on each layer with a copy of their state (token positions, weight maps,
  rows, modes), the extra residuals it was given (ControlNet) and its output;
- ``rec.control``: one ``ControlCall`` per ControlNet forward (latents, timestep, context, control
  image, the residuals it returned);
- ``rec.text``: the LoRA adapters routed to each row of every text-encoder call;
- ``rec.noised``: every ``add_noise(original, noise, t)`` of a diffusers scheduler (training's
  noising, blending's noised known image, BCM's noised background): which clean latent and which
  noise made which noisy latent;
- ``rec.steps``: every scheduler ``step`` (timestep, the latents it returned);
- ``rec.decoded``: every autoencoder decode (scaled latents in, images in [0, 1] out).

With ``oracle=True`` the UNet's output is replaced, row by row, by the noise that made its input
(looked up in ``rec.noised``): a loss that compares each row with its own noise is then 0, and one
that compares a row with another row's or another branch's noise is not, whatever masking or
weighting the loss applies. ``source(row, candidates)`` says which candidate latent a row is.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from anomalygen.diffusion import lora
from anomalygen.diffusion.attention import HookedAttnProcessor, attention_layers

SCHEDULERS = (DDIMScheduler, PNDMScheduler, DPMSolverMultistepScheduler)
HOOK_STATE = ("positions", "rows", "weights", "mode", "targets", "reference_rows", "whole", "part", "stage")


@dataclass
class HookState:
    kind: str  # the hook's class name
    state: dict[str, Any]  # copies of its routing attributes at the time of the call


@dataclass
class UNetCall:
    latents: torch.Tensor
    timesteps: torch.Tensor  # (B,)
    context: torch.Tensor
    hooks: dict[str, list[list[HookState]]]  # layer kind ("self" | "cross") -> per layer, its hooks in order
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    adapters: list[str] | None = None  # per row; None = not routed
    output: torch.Tensor | None = None

    def hook_kinds(self, layer_kind: str) -> list[list[str]]:
        return [[h.kind for h in layer] for layer in self.hooks[layer_kind]]


@dataclass
class ControlCall:
    latents: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    control: torch.Tensor
    down: list[torch.Tensor] = field(default_factory=list)
    mid: torch.Tensor | None = None


@dataclass
class Noised:
    original: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor


@dataclass
class Recording:
    unet: list[UNetCall] = field(default_factory=list)
    control: list[ControlCall] = field(default_factory=list)
    text: list[list[str] | None] = field(default_factory=list)
    noised: list[Noised] = field(default_factory=list)
    steps: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    decoded: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def _find(self, row: torch.Tensor) -> tuple[Noised, int] | None:
        for n in reversed(self.noised):
            for i in range(len(n.noisy)):
                if n.noisy[i].shape == row.shape and torch.equal(n.noisy[i], row):
                    return n, i
        return None

    def noise_of(self, row: torch.Tensor) -> torch.Tensor | None:
        """The noise that made the noisy latent ``row`` (None when no recorded add_noise made it)."""
        found = self._find(row)
        return None if found is None else found[0].noise[found[1]]

    def made(self, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clean latent, noise, timestep) that made the noisy latent ``row``; AssertionError if none did."""
        found = self._find(row)
        assert found is not None, "this input row was not made by any recorded add_noise"
        n, i = found
        t = n.timesteps.reshape(-1)
        return n.original[i], n.noise[i], t[i if len(t) > 1 else 0]


def source(row: torch.Tensor, candidates: torch.Tensor, atol: float = 1e-4) -> int:
    """The index of the candidate equal to ``row`` (within ``atol``); AssertionError if none or several are."""
    hits = [i for i in range(len(candidates)) if torch.allclose(row.float(), candidates[i].float(), atol=atol)]
    assert len(hits) == 1, f"row matches candidates {hits}"
    return hits[0]


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, slice) or value is None:
        return value
    return copy.deepcopy(value)


def _hooks(unet) -> dict[str, list[list[HookState]]]:
    found: dict[str, list[list[HookState]]] = {"self": [], "cross": []}
    for layer in attention_layers(unet):
        processor = layer.module.processor
        hooks = list(processor.hooks) if isinstance(processor, HookedAttnProcessor) else []
        found[layer.kind].append([HookState(type(h).__name__, {k: _copy(getattr(h, k)) for k in HOOK_STATE if hasattr(h, k)})
                                  for h in hooks])
    return found


def _first_lora(model) -> torch.nn.Module | None:
    layers = lora.lora_layers(model)
    return layers[0] if layers else None


@contextmanager
def record(backbone, controlnet: torch.nn.Module | None = None, oracle: bool = False):
    """Record what reaches ``backbone``'s UNet (and ``controlnet``, the text encoder, the
    autoencoder's decoder and the schedulers' ``add_noise`` / ``step``) inside the block."""
    rec = Recording()
    unet, text_encoder, vae = backbone.unet, backbone.text_encoder, backbone.vae
    handles = []

    def unet_pre(module, args, kwargs):
        latents = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(t).reshape(-1).expand(latents.shape[0]) if torch.as_tensor(t).numel() == 1 else torch.as_tensor(t)
        down = kwargs.get("down_block_additional_residuals")
        mid = kwargs.get("mid_block_additional_residual")
        rec.unet.append(UNetCall(latents.detach().clone(), t.detach().clone(), kwargs["encoder_hidden_states"].detach().clone(),
                                 _hooks(module), None if down is None else [d.detach().clone() for d in down],
                                 None if mid is None else mid.detach().clone()))

    def unet_post(module, args, kwargs, output):
        call = rec.unet[-1]
        sample = output.sample if hasattr(output, "sample") else output[0]
        call.output = sample.detach().clone()
        if not oracle:
            return None
        rows = [rec.noise_of(row) for row in call.latents]
        eps = torch.stack([sample[i].detach() if r is None else r.to(sample) for i, r in enumerate(rows)])
        return UNet2DConditionOutput(sample=eps) if hasattr(output, "sample") else (eps,)

    def unet_lora(module, args, kwargs, output):
        if rec.unet and rec.unet[-1].adapters is None and "adapter_names" in kwargs:
            rec.unet[-1].adapters = list(kwargs["adapter_names"])

    def text_pre(module, args, kwargs):
        rec.text.append(None)

    def text_lora(module, args, kwargs, output):
        if rec.text and rec.text[-1] is None and "adapter_names" in kwargs:
            rec.text[-1] = list(kwargs["adapter_names"])

    def control_pre(module, args, kwargs):
        latents = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(t).reshape(-1).expand(latents.shape[0]) if torch.as_tensor(t).numel() == 1 else torch.as_tensor(t)
        rec.control.append(ControlCall(latents.detach().clone(), t.detach().clone(),
                                       kwargs["encoder_hidden_states"].detach().clone(), kwargs["controlnet_cond"].detach().clone()))

    def control_post(module, args, kwargs, output):
        down, mid = (output[0], output[1]) if isinstance(output, tuple) else (output.down_block_res_samples, output.mid_block_res_sample)
        rec.control[-1].down, rec.control[-1].mid = [d.detach().clone() for d in down], mid.detach().clone()

    handles.append(unet.register_forward_pre_hook(unet_pre, with_kwargs=True))
    handles.append(unet.register_forward_hook(unet_post, with_kwargs=True))
    handles.append(text_encoder.register_forward_pre_hook(text_pre, with_kwargs=True))
    if controlnet is not None:
        handles.append(controlnet.register_forward_pre_hook(control_pre, with_kwargs=True))
        handles.append(controlnet.register_forward_hook(control_post, with_kwargs=True))
    with ExitStack() as stack:
        originals = []
        for cls in SCHEDULERS:
            add_noise, step = cls.add_noise, cls.step

            def recorded_add_noise(self, original, noise, timesteps, _add_noise=add_noise):
                noisy = _add_noise(self, original, noise, timesteps)
                rec.noised.append(Noised(original.detach().clone(), noise.detach().clone(),
                                         torch.as_tensor(timesteps).detach().clone(), noisy.detach().clone()))
                return noisy

            def recorded_step(self, model_output, timestep, sample, *args, _step=step, **kwargs):
                out = _step(self, model_output, timestep, sample, *args, **kwargs)
                prev = out.prev_sample if hasattr(out, "prev_sample") else out[0]
                rec.steps.append((int(timestep), prev.detach().clone()))
                return out

            originals.append((cls, add_noise, step))
            cls.add_noise, cls.step = recorded_add_noise, recorded_step
        stack.callback(lambda: [setattr(c, "add_noise", a) or setattr(c, "step", s) for c, a, s in originals])
        decode = vae.decode

        def recorded_decode(z, *args, **kwargs):
            out = decode(z, *args, **kwargs)
            rec.decoded.append((z.detach().float() * vae.config.scaling_factor, ((out.sample.float() + 1) / 2).clamp(0, 1)))
            return out

        vae.decode = recorded_decode
        stack.callback(lambda: vars(vae).pop("decode", None))
        for model, hook in ((unet, unet_lora), (text_encoder, text_lora)):  # the first LoRA layer sees every row's adapter
            layer = _first_lora(model)
            if layer is not None:
                handles.append(layer.register_forward_hook(hook, with_kwargs=True))
        stack.callback(lambda: [h.remove() for h in handles])
        yield rec

