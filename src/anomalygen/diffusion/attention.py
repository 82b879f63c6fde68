"""Attention-processor hooks for diffusers UNets, installed on chosen layers.

``install_hooks(unet, factory, where=...)`` replaces the processor of every attention layer that
``where`` selects (by block ``down|mid|up``, level = downsampling power of 2 from the latent
resolution, kind ``self|cross``) with a ``HookedAttnProcessor`` running the hooks ``factory(layer)``
returns. Hooks are ``nn.Module``s (so learned ones train and save with the UNet's state):

- ``AttentionReweight`` (a): scale the attention of chosen token positions by a per-pixel weight
  map W (resized to each layer's resolution by area averaging), at one of three stages:
  ``"logits"`` (pre-softmax ``logits·W``; not monotone: a negative logit times W > 1 falls),
  ``"log_logits"`` (pre-softmax ``logits + log W``: monotone, the same as multiplying the
  probabilities by W and renormalising over tokens) or ``"probabilities"`` (post-softmax
  ``probs·W``, renormalised over tokens only with ``renormalise=True``). ``rows`` names the rows
  of the UNet batch it changes (under classifier-free guidance the conditional half only);
- ``ReferenceKV`` (b): in ``record`` mode store each layer's K/V source from a reference pass; in
  ``inject`` mode give chosen rows the K/V source ``mix(own, reference)`` with a caller's ``mix``
  (a learnable ``nn.Module`` trains with the hook), the reference taken from the record or from
  other rows of the same batch;
- ``AttentionRecorder`` (c): keep the attention probabilities (mean over heads) per layer.

Every hook can also change the attention output (``output`` stage: after ``to_out``, before the
residual). Installs compose and are undone exactly: ``remove_hooks(unet, handle)`` gives the
layers back the processors they had before (see ``install_hooks``).

The processor uses ``F.scaled_dot_product_attention`` unless a hook needs the logits or the
probabilities (a, c); then it computes ``softmax(QKᵀ·scale)`` explicitly.
Hooks run in their order, so a recorder placed after a reweighting hook sees the changed
probabilities. All hook state (weight maps, token positions, rows, recorded tensors, modes) lives
on the hook objects, so a per-step sampling callback can change it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn


def expand_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Tile a per-sample tensor over a batch that stacks copies (e.g. ``[uncond; cond]`` for CFG)."""
    if tensor.shape[0] == batch:
        return tensor
    if batch % tensor.shape[0]:
        raise ValueError(f"batch {batch} is not a multiple of the hook's {tensor.shape[0]} samples")
    return tensor.repeat(batch // tensor.shape[0], *([1] * (tensor.dim() - 1)))


@dataclass(frozen=True)
class AttnLayer:
    """Where an attention layer sits in the UNet."""

    name: str  # e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    block: str  # "down" | "mid" | "up"
    level: int  # latent downsampling power of 2 (0 = full latent resolution)
    kind: str  # "self" | "cross"
    module: Attention


def attention_layers(unet: nn.Module) -> list[AttnLayer]:
    """Every attention layer of a ``UNet2DConditionModel`` with its block, level and kind."""
    depth = len(unet.config.block_out_channels)
    layers = []
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        head = name.split(".")
        block = head[0].removesuffix("_blocks").removesuffix("_block")
        index = int(head[1]) if block in ("down", "up") else depth - 1
        level = {"down": index, "up": depth - 1 - index, "mid": depth - 1}[block]
        layers.append(AttnLayer(name, block, level, "cross" if module.is_cross_attention else "self", module))
    return layers


def select_layers(
    unet: nn.Module,
    *,
    kinds: Iterable[str] = ("self", "cross"),
    blocks: Iterable[str] = ("down", "mid", "up"),
    levels: Iterable[int] | None = None,
) -> list[AttnLayer]:
    """The attention layers of the given kinds, blocks and levels (``None`` = all levels)."""
    kinds, blocks = set(kinds), set(blocks)
    levels = None if levels is None else set(levels)
    return [l for l in attention_layers(unet) if l.kind in kinds and l.block in blocks and (levels is None or l.level in levels)]


class AttentionHook(nn.Module):
    """A no-op hook; subclasses override the stage they change."""

    needs_logits = False

    def context(self, layer: str, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The K/V source (``hidden`` itself for self-attention), shape (B, S, C)."""
        return context

    def logits(self, layer: str, logits: torch.Tensor) -> torch.Tensor:
        """Pre-softmax logits, shape (B, heads, N, S); only called when ``needs_logits``."""
        return logits

    def probabilities(self, layer: str, probs: torch.Tensor) -> torch.Tensor | None:
        """The attention probabilities (B, heads, N, S): return changed ones, or ``None`` to only
        observe them; only called when ``needs_logits``."""

    def output(self, layer: str, out: torch.Tensor) -> torch.Tensor:
        """The attention output after ``to_out`` (projection + dropout), before the residual
        connection and output rescaling, shape (B, N, C)."""
        return out


class HookedAttnProcessor(AttnProcessor2_0, nn.Module):
    """diffusers' SDPA processor with hook points; the explicit path runs only when a hook needs it."""

    def __init__(self, layer: str, hooks: Iterable[AttentionHook], previous=None):
        AttnProcessor2_0.__init__(self)
        nn.Module.__init__(self)
        self.layer = layer
        self.hooks = nn.ModuleList(hooks)
        object.__setattr__(self, "previous", previous)  # the processor to restore; not a submodule

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None:
            raise NotImplementedError("hooked attention supports the SD-style attention layers only")
        residual = hidden_states
        spatial = hidden_states.dim() == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        for hook in self.hooks:
            context = hook.context(self.layer, hidden_states, context)
        heads = attn.heads

        def split(x):
            return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)

        query, key, value = split(attn.to_q(hidden_states)), split(attn.to_k(context)), split(attn.to_v(context))
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch).view(batch, heads, -1, key.shape[2])
        if any(hook.needs_logits for hook in self.hooks):
            logits = query @ key.transpose(-1, -2) * attn.scale
            if mask is not None:
                logits = logits + mask
            for hook in self.hooks:
                logits = hook.logits(self.layer, logits)
            probs = logits.softmax(dim=-1)
            for hook in self.hooks:
                changed = hook.probabilities(self.layer, probs)
                probs = probs if changed is None else changed
            out = probs.to(value.dtype) @ value
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        for hook in self.hooks:
            out = hook.output(self.layer, out)
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_hooks(
    unet: nn.Module,
    factory: Callable[[AttnLayer], Iterable[AttentionHook]],
    layers: Iterable[AttnLayer] | None = None,
) -> dict[str, HookedAttnProcessor]:
    """Give each selected layer (default: all) a ``HookedAttnProcessor`` with ``factory(layer)``'s hooks.

    Installs compose: on a layer that already has a ``HookedAttnProcessor`` the new processor runs
    the earlier hooks first, then the new ones (one list, so each stage sees the earlier hooks'
    changes). Any other processor (diffusers' or a user's) is replaced, since the hooked processor
    computes the attention itself. Each new processor keeps the one it replaced in ``.previous``.
    Returns the installed processors by layer name: the handle to pass to ``remove_hooks``.
    """
    installed = {}
    device = unet.device  # (diffusers' ``device`` walks every submodule: once, not per layer)
    for layer in attention_layers(unet) if layers is None else layers:
        previous = layer.module.processor
        earlier = list(previous.hooks) if isinstance(previous, HookedAttnProcessor) else []
        processor = HookedAttnProcessor(layer.name, [*earlier, *factory(layer)], previous)
        processor.to(device=device)
        layer.module.set_processor(processor)
        installed[layer.name] = processor
    return installed


def _restore(module: Attention, processor) -> None:
    # diffusers drops a module processor from ``_modules`` itself; ``None``: set by hand, no record
    module.set_processor(AttnProcessor2_0() if processor is None else processor)


def remove_hooks(unet: nn.Module, handle: dict[str, HookedAttnProcessor] | None = None) -> None:
    """Undo installs. With ``handle`` (what ``install_hooks`` returned): give each of its layers
    back the processor it had before that install; installs are undone last first, so each of
    those layers must still run the handle's processor (``RuntimeError`` otherwise). Without:
    undo every install on every layer, back to the processor each had before the first one."""
    modules = {layer.name: layer.module for layer in attention_layers(unet)}
    if handle is not None:
        for name, processor in handle.items():
            if modules[name].processor is not processor:
                raise RuntimeError(f"{name}: a later install_hooks is still on this layer; remove it first")
            _restore(modules[name], processor.previous)
        return
    for module in modules.values():
        processor = module.processor
        while isinstance(processor, HookedAttnProcessor):
            processor = processor.previous
        if processor is not module.processor:
            _restore(module, processor)


def _per_pixel(weights: torch.Tensor, tokens: int) -> torch.Tensor:
    """Area-resize a (B, 1, H, W) map to a layer with ``tokens`` pixels of the same aspect: (B, tokens)."""
    height, width = weights.shape[-2:]
    factor = math.sqrt(height * width / tokens)
    size = (round(height / factor), round(width / factor))
    return F.adaptive_avg_pool2d(weights.float(), size).flatten(1)


class AttentionReweight(AttentionHook):
    """(a) Scale the attention that pixel ``p`` pays to token ``s`` by ``W[b, p]`` for the token
    positions ``s`` in ``positions[b]`` (other tokens keep weight 1), at ``stage``:

    - ``"logits"``: ``logits·W`` before the softmax. Not monotone: where a logit is negative a
      weight W > 1 *lowers* that token's attention.
    - ``"log_logits"``: ``logits + log W`` before the softmax; monotone (W > 1 always raises the
      token's attention) and equal to ``"probabilities"`` with ``renormalise=True``.
    - ``"probabilities"``: ``probs·W`` after the softmax; with ``renormalise`` each pixel's row
      is divided by its new sum over tokens, otherwise rows may sum to more (or less) than 1.

    ``weights``: (B, 1, H, W) map (``None`` = off), area-resized to each layer. ``rows``: the rows
    of the UNet batch the B maps belong to (e.g. ``slice(B, 2B)`` for the conditional half of a
    ``[uncond; cond]`` batch); ``None`` = every row, and then the batch must hold exactly B rows.
    Set the attributes from a sampling callback to change them per step.
    """

    needs_logits = True
    STAGES = ("logits", "log_logits", "probabilities")

    def __init__(self, stage: str = "logits", renormalise: bool = False) -> None:
        super().__init__()
        if stage not in self.STAGES:
            raise ValueError(f"stage must be one of {self.STAGES}, got {stage!r}")
        self.stage, self.renormalise = stage, renormalise
        self._factors: dict[tuple, torch.Tensor] = {}
        self.weights: torch.Tensor | None = None
        self.positions: list[list[int]] = []
        self.rows: slice | None = None

    # a new map or new positions (set by reassignment) drop the factors made from the old ones
    @property
    def weights(self) -> torch.Tensor | None:
        return self._weights

    @weights.setter
    def weights(self, value: torch.Tensor | None) -> None:
        self._weights = value
        self._factors.clear()

    @property
    def positions(self) -> list[list[int]]:
        return self._positions

    @positions.setter
    def positions(self, value: list[list[int]]) -> None:
        self._positions = value
        self._factors.clear()

    def _factor(self, scores: torch.Tensor) -> torch.Tensor:
        """(n, 1, N, S) per-pixel, per-token factor for the rows this hook changes; made once per
        map, positions and layer shape (the layers of one resolution share it), on the host side
        without a device sync."""
        _, _, pixels, tokens = scores.shape
        key = (pixels, tokens, scores.device, scores.dtype)
        if key not in self._factors:
            weight = _per_pixel(self.weights, pixels).to(scores.device, scores.dtype)
            selected = torch.zeros(len(self.positions), tokens, dtype=torch.bool)
            for row, cols in enumerate(self.positions):
                selected[row, cols] = True
            if weight.shape[0] != selected.shape[0]:
                raise ValueError(f"{weight.shape[0]} weight maps for {selected.shape[0]} rows of token positions")
            selected = selected.to(scores.device, non_blocking=True)
            self._factors[key] = torch.where(selected[:, None, :], weight[:, :, None], torch.ones_like(weight[:, :, None]))[:, None]
        return self._factors[key]

    def _reweight_rows(self, scores: torch.Tensor, change) -> torch.Tensor:
        rows = slice(None) if self.rows is None else self.rows
        chosen = scores[rows]
        if chosen.shape[0] != self.weights.shape[0]:
            raise ValueError(f"{self.weights.shape[0]} weight maps for {chosen.shape[0]} reweighted batch rows "
                             f"(batch {scores.shape[0]}, rows {self.rows})")
        out = scores.clone()
        out[rows] = change(chosen, self._factor(chosen))
        return out

    def logits(self, layer, logits):
        if self.weights is None or self.stage == "probabilities":
            return logits
        if self.stage == "logits":
            return self._reweight_rows(logits, lambda x, factor: x * factor)
        return self._reweight_rows(logits, lambda x, factor: x + factor.log())

    def probabilities(self, layer, probs):
        if self.weights is None or self.stage != "probabilities":
            return None

        def scale(x, factor):
            scaled = x * factor
            return scaled / scaled.sum(-1, keepdim=True) if self.renormalise else scaled

        return self._reweight_rows(probs, scale)


Rows = slice | Sequence[int] | torch.Tensor


def _row_index(rows: Rows, batch: int, device) -> torch.Tensor:
    """Batch rows as an index tensor: a slice, indices, or a bool mask (tiled over the batch if shorter)."""
    if isinstance(rows, slice):
        return torch.arange(batch, device=device)[rows]
    rows = torch.as_tensor(rows, device=device)
    if rows.dtype == torch.bool:
        return expand_batch(rows, batch).nonzero().flatten()
    return rows.long()


def use_reference(hidden: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The default mix: the reference's K/V source replaces the row's own."""
    return reference.to(hidden.dtype)


class ReferenceKV(AttentionHook):
    """(b) K/V source from a reference: target rows use ``mix(own, reference)`` as their K/V source.

    ``mix(hidden, reference) -> context`` comes from the caller (default ``use_reference``: attend
    to the reference only); an ``nn.Module`` mix is a submodule, so its parameters train and save
    with the hook. ``mode``: ``"off"`` passes; ``"record"`` stores this layer's K/V source in
    ``stored``; ``"inject"`` mixes a reference into the ``targets`` rows. The reference is
    ``stored`` from an earlier record pass (tiled over the batch; target row i pairs with reference
    row i), or, when ``reference_rows`` is set, those rows of the same batch (recorded into
    ``stored`` in the same call; the k-th target pairs with the k-th reference row, tiled).
    ``targets``/``reference_rows``: a slice, row indices or a bool mask per sample (tiled over the
    batch); ``targets = None`` is every row that is not a reference row. Other rows pass unchanged.
    """

    def __init__(self, mix: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = use_reference) -> None:
        super().__init__()
        self.mix = mix
        self.mode = "off"
        self.stored: torch.Tensor | None = None
        self.targets: Rows | None = None
        self.reference_rows: Rows | None = None

    def context(self, layer, hidden, context):
        if self.mode == "record":
            self.stored = context
            return context
        if self.mode != "inject":
            return context
        batch, device = context.shape[0], context.device
        every = torch.arange(batch, device=device)
        if self.reference_rows is not None:
            references = _row_index(self.reference_rows, batch, device)
            if not len(references):
                raise ValueError(f"{layer}: reference_rows {self.reference_rows} select no row of a batch of {batch}")
            self.stored = context[references]
        elif self.stored is None:
            raise RuntimeError(f"{layer}: ReferenceKV in inject mode before a reference pass was recorded")
        if self.targets is not None:
            targets = _row_index(self.targets, batch, device)
        elif self.reference_rows is not None:
            targets = every[~torch.isin(every, references)]
        else:
            targets = every
        if self.reference_rows is not None:
            reference = expand_batch(self.stored, len(targets))
        else:
            reference = expand_batch(self.stored, batch)[targets]
        mixed = self.mix(context[targets], reference)
        return context.index_copy(0, targets, mixed.to(context.dtype))


class AttentionRecorder(AttentionHook):
    """(c) Keeps ``maps[layer]``: the attention probabilities averaged over heads, (B, N, S)."""

    needs_logits = True

    def __init__(self) -> None:
        super().__init__()
        self.maps: dict[str, torch.Tensor] = {}

    def probabilities(self, layer, probs):
        self.maps[layer] = probs.mean(dim=1).detach()
