"""Learnable token embeddings per defect type: ``k`` vectors per type in the text encoder's
input-embedding space, initialised from the embedding of a word (``PromptEncoder.word_embedding``)
and fed through a placeholder (``conditioning.PromptEncoder``); a method decides how many and what
they stand for."""

from __future__ import annotations

import torch
from torch import nn


class TypeTokens(nn.Module):
    """``tokens[t]``: the (k, D) learnable embedding of defect type ``types[t]``."""

    def __init__(self, types: list[str], num_tokens: int, init: torch.Tensor):
        super().__init__()
        self.tokens = nn.Parameter(init.float().expand(len(types), num_tokens, -1).clone())

    def forward(self, type_indices: torch.Tensor) -> torch.Tensor:
        """(B,) type indices -> (B, k, D) token embeddings (called through the module, so DDP sees it)."""
        return self.tokens[type_indices]
