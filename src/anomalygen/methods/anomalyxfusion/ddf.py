"""Dynamic Dif-Fusion (DDF; Hu et al., AnomalyXFusion, Eq. 14): e_t = f_φ(e_X, t).

The timestep's sinusoidal embedding, mapped to the X-embedding's width d by an MLP (SD's own
timestep embedding layers, ``diffusers.models.embeddings``), is concatenated to every token of
e_X; a conditioned MLP f_φ maps each (2d) token back to d. e_t replaces e_X in the UNet's
cross-attention at every step, in training and sampling alike.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn


class DDF(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timesteps = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(dim, dim)  # the timestep embedding aligned to d
        self.f = nn.Sequential(nn.Linear(2 * dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 14: (B, n, d) e_X and timesteps (B,) or a scalar -> (B, n, d) e_t."""
        t = t.reshape(-1).expand(tokens.shape[0]).to(tokens.device)
        time = self.time_embedding(self.timesteps(t).to(tokens.dtype))
        return self.f(torch.cat([tokens, time[:, None].expand_as(tokens)], dim=-1))
