"""SAIM, the self-attention interaction module (DualAnoDiff, Jin et al. CVPR 2025, §3.2, Eq. 3).

After every attention layer of the UNet (self and cross), the two branches' attention outputs at
each spatial position, o_w (whole image) and o_a (anomaly part), attend to each other:

    x = Linear_in(LayerNorm([o_w; o_a]))            stacked per position to (b·N, 2, C)
    [o_w; o_a] ← [o_w; o_a] + Linear_o(Attn(q(x), k(x), v(x)))   one head over the branch axis

then split again. This is the official code's module (LayerNorm, an input projection, q/k/v/o
projections, single-head attention over the 2 branches, added as a residual), written as an
``output``-stage hook of the shared core. ``zero_init`` starts Linear_o at zero so that SAIM is the
identity at step 0 (a documented option; the official code uses PyTorch's default init).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomalygen.diffusion.attention import AttentionHook


class SAIM(AttentionHook):
    """Eq. 3 on one attention layer of width ``dim``.

    ``whole`` / ``part``: equally long index tensors of UNet batch rows; row ``whole[k]`` and row
    ``part[k]`` are the two branches of one sample (set per forward by the method). Other rows
    (e.g. background rows) pass unchanged.
    """

    def __init__(self, dim: int, zero_init: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, dim)
        if zero_init:
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)
        self.whole: torch.Tensor | None = None
        self.part: torch.Tensor | None = None

    def interact(self, whole: torch.Tensor, part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, N, C) outputs of the two branches -> the same after the branch attention and residual."""
        n, tokens, dim = whole.shape
        stacked = torch.stack([whole, part], dim=2)  # (n, N, 2, C)
        x = self.proj_in(self.norm(stacked)).reshape(n * tokens, 2, dim)
        x = F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))
        stacked = stacked + self.proj_out(x).reshape(n, tokens, 2, dim).to(stacked.dtype)
        return stacked[:, :, 0], stacked[:, :, 1]

    def output(self, layer, out):
        if self.whole is None:
            return out
        whole, part = self.interact(out[self.whole], out[self.part])
        return out.index_copy(0, self.whole, whole).index_copy(0, self.part, part)
