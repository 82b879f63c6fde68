"""Multi-modal In-Fusion (MIF; Hu et al., AnomalyXFusion, Eqs. 1-5): the caption, the mask
and the masked defect image fused into one X-embedding of 3k tokens of width d (the UNet's
cross-attention width).

- Eq. 1, semantic: e_sem = E_CLIP_t(Y_sem), L2-normalised, repeated k times (frozen);
- Eq. 2, location: e_loc = E_CNN(E_mask(M)), a mask encoder (ISTR's autoencoder encoder layout,
  trainable by default or loaded pretrained) then one conv + FC to k × d;
- Eq. 3, textural: e_tex, k trainable tokens per defect type initialised from the CLIP image
  embedding of image × mask (computed once per training image);
- Eq. 4: e_mul = concat(e_sem, e_loc, e_tex) along the tokens (3k × d);
- Eq. 5, aggregator: e_X = e_mul + MLP(SelfAttention(e_mul)).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from anomalygen.errors import DataError, first_problem

MASK_SIZE = 112  # ISTR's autoencoder input: 112 -> 56 -> 28 -> 14 -> 7 -> 1


def semantic_embedding(pooled: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 1: (B, d) pooled CLIP text embeddings -> (B, k, d), each row L2-normalised."""
    return F.normalize(pooled.float(), dim=-1)[:, None].expand(-1, k, -1)


class MaskEncoder(nn.Module):
    """E_mask: ISTR's mask autoencoder encoder (Hu et al., ISTR, 2021): four stride-2 4×4 convs
    (16, 32, 64, 128 channels, BatchNorm, ELU) on a 112 × 112 mask, then a 7 × 7 conv to an
    ``embedding``-d vector. Its state-dict keys are ISTR's (``encoder.0.weight`` ...), so a
    converted ISTR checkpoint loads as is (``load_mask_encoder``). BatchNorm always runs on its
    running statistics (eval mode; identity at initialisation): a few-shot batch is too small for
    batch statistics, and only parameters are checkpointed."""

    def __init__(self, embedding: int = 256):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((1, 16), (16, 32), (32, 64), (64, 128)):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.BatchNorm2d(c_out), nn.ELU(True)]
        self.encoder = nn.Sequential(*layers, nn.Conv2d(128, embedding, 7, 1))
        self.embedding = embedding

    def train(self, mode: bool = True) -> "MaskEncoder":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) masks in {0, 1} -> (B, embedding, 1, 1)."""
        masks = F.interpolate(masks.float(), size=(MASK_SIZE, MASK_SIZE), mode="area")
        return self.encoder(masks.to(self.encoder[0].weight.dtype))


def load_mask_encoder(path: str | Path) -> MaskEncoder:
    """A pretrained E_mask from a safetensors file holding ISTR's encoder weights (keys
    ``[prefix]encoder.0.weight`` ... ``encoder.12.bias``; any common prefix, e.g. the one of a whole
    ISTR model, is stripped). Frozen. Problems are one ``DataError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "mask encoder weights not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise DataError(path, f"not a safetensors file ({first_problem(error)})") from None
    first = next((key for key in tensors if key.endswith("encoder.0.weight")), None)
    if first is None:
        raise DataError(path, "holds no ISTR mask encoder (no key ending in encoder.0.weight)")
    prefix = first[: -len("encoder.0.weight")]
    state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix + "encoder.")}
    last = state.get("encoder.12.weight")
    if last is None or last.dim() != 4:
        raise DataError(path, "holds no ISTR mask encoder (encoder.12.weight missing or not a conv weight)")
    encoder = MaskEncoder(int(last.shape[0]))
    try:
        result = encoder.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise DataError(path, f"does not fit ISTR's mask encoder layout ({str(error).splitlines()[-1].strip()})") from None
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise DataError(path, f"does not fit ISTR's mask encoder layout (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    return encoder.requires_grad_(False)


class LocationEmbedding(nn.Module):
    """Eq. 2: e_loc = E_CNN(E_mask(M)); E_CNN is one (1 × 1) conv and one FC layer to k × d."""

    def __init__(self, mask_encoder: MaskEncoder, k: int, dim: int):
        super().__init__()
        self.mask_encoder = mask_encoder
        width = mask_encoder.embedding
        self.conv = nn.Conv2d(width, width, 1)
        self.fc = nn.Linear(width, k * dim)
        self.k, self.dim = k, dim

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, k, d)."""
        features = F.elu(self.conv(self.mask_encoder(masks))).flatten(1)
        return self.fc(features).view(-1, self.k, self.dim)


class Aggregator(nn.Module):
    """Eq. 5: e_X = e_X + MLP(SelfAttention(e_X)) over the 3k tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return tokens + self.mlp(attended)


class MIF(nn.Module):
    """Eqs. 1-5 for a batch: (e_sem, masks, type ids) -> e_X (B, 3k, d).

    ``textures`` (T, k, d) are the per-type e_tex tokens (Eq. 3), initialised by the caller from
    the CLIP image embeddings of the type's masked defect images."""

    def __init__(self, mask_encoder: MaskEncoder, textures: torch.Tensor, *, heads: int):
        super().__init__()
        types, k, dim = textures.shape
        self.location = LocationEmbedding(mask_encoder, k, dim)
        self.textures = nn.Parameter(textures.clone().float())
        self.aggregator = Aggregator(dim, heads)

    def embeddings(self, semantic: torch.Tensor, masks: torch.Tensor, type_ids: torch.Tensor) -> torch.Tensor:
        """Eq. 4: e_mul = concat(e_sem, e_loc, e_tex), (B, 3k, d)."""
        location = self.location(masks)
        return torch.cat([semantic.to(location), location, self.textures[type_ids].to(location)], dim=1)

    def forward(self, semantic: torch.Tensor, masks: torch.Tensor, type_ids: torch.Tensor) -> torch.Tensor:
        return self.aggregator(self.embeddings(semantic, masks, type_ids))


def texture_init(image_embeds: torch.Tensor, type_ids: torch.Tensor, types: int, k: int) -> torch.Tensor:
    """Eq. 3's initialisation: per type, the mean CLIP image embedding of its masked training
    images, repeated k times -> (T, k, d)."""
    table = torch.stack([image_embeds[type_ids == t].mean(0) for t in range(types)])
    return table[:, None].expand(-1, k, -1).contiguous()
