"""Learnable token embeddings per defect type (Hu et al., AAAI 2024, §3.2).

The anomaly embedding e_a holds ``k`` tokens per defect type (Eq. 4; paper k = 8); the mask
embedding of the mask model (Eq. 9) holds ``k'`` tokens per type (k' = 4). Both are textual
inversion (Gal et al., ICLR 2023): vectors in the text encoder's input-embedding space,
initialised from the embedding of a word (``PromptEncoder.word_embedding``).
"""

from __future__ import annotations

import torch
from torch import nn

from anomalygen.errors import AnomalygenError


class TypeTokens(nn.Module):
    """``tokens[t]``: the (k, D) learnable embedding of defect type ``types[t]``."""

    def __init__(self, types: list[str], num_tokens: int, init: torch.Tensor):
        super().__init__()
        self.types = list(types)
        self.tokens = nn.Parameter(init.float().expand(len(types), num_tokens, -1).clone())

    def index(self, defect_type: str) -> int:
        if defect_type not in self.types:
            raise AnomalygenError(f"defect type {defect_type!r} was not learned; known: {self.types}")
        return self.types.index(defect_type)

    def forward(self, type_indices: torch.Tensor) -> torch.Tensor:
        """(B,) type indices -> (B, k, D) token embeddings."""
        return self.tokens[type_indices]
