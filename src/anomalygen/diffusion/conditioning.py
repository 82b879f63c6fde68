"""Conditioning hooks: learned token embeddings fed through the text encoder (CLIP or LDMBert).

A prompt names *placeholders* (e.g. ``"a photo of <crack>"``). Each placeholder stands for ``k``
token positions whose input embeddings are replaced by given vectors — learned ones (trained through
the encoder), or vectors computed per sample from a mask or an image — before the text transformer
runs, so gradients reach them. The result is the usual ``encoder_hidden_states``; extra context
tokens can also be concatenated to it directly (``torch.cat([states, tokens], dim=1)``), the UNet's
cross-attention takes any length.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch


def placeholder_tokens(name: str, count: int) -> list[str]:
    """The tokenizer tokens standing for placeholder ``name`` (``count`` positions)."""
    return [f"{name}#{j}" for j in range(count)]


@dataclass
class EncodedPrompts:
    """Text-encoder output plus where each placeholder's tokens sit (same positions in each row)."""

    hidden_states: torch.Tensor  # (B, 77, D): 77 = the text encoder's positions
    positions: dict[str, list[list[int]]]  # name -> per batch row, its token positions
    # (B, P): the pooled prompt embedding: CLIP's end-token state after the final layer norm
    # (``pooler_output``), projected by ``text_projection`` when the encoder has one
    # (``CLIPTextModelWithProjection``: ``text_embeds``); None for LDMBert (no pooled output)
    pooled: torch.Tensor | None = None


class PromptEncoder:
    """Encodes prompts with placeholder vectors substituted at the token-embedding layer.

    ``counts`` maps each placeholder name (as written in prompts) to its number of token
    positions. A copy of ``tokenizer`` (CLIP or BERT) gains one added token per position; the
    given one, shared by other users of the backbone, is left unchanged. Prompts are padded to
    the text encoder's number of positions (77 for SD's CLIP and LDM's BERT), with the
    tokenizer's own start/end tokens (``<|startoftext|>``/``<|endoftext|>`` or ``[CLS]``/``[SEP]``).
    """

    def __init__(self, text_encoder: torch.nn.Module, tokenizer: Any, counts: dict[str, int]):
        self.text_encoder = text_encoder
        self.tokenizer = copy.deepcopy(tokenizer)
        self.max_length = min(self.tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
        self.counts = dict(counts)
        self.tokenizer.add_tokens([t for name, k in self.counts.items() for t in placeholder_tokens(name, k)])
        self.token_ids = {
            name: self.tokenizer.convert_tokens_to_ids(placeholder_tokens(name, k)) for name, k in self.counts.items()
        }

    @property
    def embedding_dim(self) -> int:
        return self.text_encoder.get_input_embeddings().embedding_dim

    def word_embedding(self, word: str) -> torch.Tensor:
        """Mean input embedding of ``word``'s tokens: the usual initialisation of a learned token."""
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        table = self.text_encoder.get_input_embeddings().weight
        return table[torch.tensor(ids, device=table.device)].mean(0).detach().clone()

    def expand(self, prompt: str) -> str:
        """Write each placeholder name as its ``k`` tokens."""
        for name, k in self.counts.items():
            prompt = prompt.replace(name, " ".join(placeholder_tokens(name, k)))
        return prompt

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            [self.expand(p) for p in prompts],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def __call__(self, prompts: list[str], vectors: dict[str, torch.Tensor] | None = None,
                 encoder: torch.nn.Module | None = None) -> EncodedPrompts:
        """Encode ``prompts``; ``vectors[name]`` is ``(k, D)`` (shared) or ``(B, k, D)`` (per row).

        A placeholder present in a prompt but absent from ``vectors`` is an error. ``encoder``: the
        module to call instead of ``text_encoder`` itself, e.g. the trainer's DDP wrapper of it.
        """
        vectors = vectors or {}
        embedding = self.text_encoder.get_input_embeddings()
        device = embedding.weight.device
        ids = self.tokenize(prompts).to(device)
        positions: dict[str, list[list[int]]] = {}
        substitutions = []
        for name, token_ids in self.token_ids.items():
            hits = [(ids == t) for t in token_ids]
            if not any(h.any() for h in hits):
                continue
            if name not in vectors:
                raise ValueError(f"prompt uses placeholder {name!r} but no vectors were given for it")
            rows = vectors[name].to(device=device, dtype=embedding.weight.dtype)
            rows = rows.expand(len(prompts), *rows.shape[-2:]) if rows.dim() == 2 else rows
            positions[name] = [[int(p) for p in torch.cat([h[b].nonzero()[:, 0] for h in hits])] for b in range(len(prompts))]
            substitutions += [(h, rows[:, j]) for j, h in enumerate(hits)]

        def substitute(module, inputs, output):
            for hit, row_vectors in substitutions:
                output = torch.where(hit[..., None], row_vectors[:, None, :].to(output.dtype), output)
            return output

        safe_ids = torch.where(ids < embedding.num_embeddings, ids, torch.zeros_like(ids))
        handle = embedding.register_forward_hook(substitute)
        try:
            output = (encoder or self.text_encoder)(safe_ids)
        finally:
            handle.remove()
        pooled = getattr(output, "text_embeds", None)
        pooled = getattr(output, "pooler_output", None) if pooled is None else pooled
        return EncodedPrompts(output.last_hidden_state, positions, pooled)
