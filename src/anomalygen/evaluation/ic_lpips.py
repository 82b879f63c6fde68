"""IC-LPIPS: intra-cluster pairwise LPIPS (Ojha et al., CVPR 2021, Sec. 4.2), as used by
AnomalyDiffusion (Hu et al., AAAI 2024) and DualAnoDiff to measure the diversity of generated defects.

Per defect type: the cluster centres are the real training defect images of that type; each
generated image joins the centre nearest by LPIPS; in each cluster up to ``max_members`` seeded-
random members are kept and their mean pairwise LPIPS is taken; clusters with fewer than two
members are skipped; the type's score is the mean over clusters, the category's the mean over
types. LPIPS (Zhang et al., CVPR 2018, Eq. 1) comes from the ``lpips`` package, both inputs
scaled to [-1, 1] at ``size`` px.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track

from anomalygen.errors import OptionError
from anomalygen.weights import find_weights, load_into, load_state_dict, missing

BACKBONE_URLS = {
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}


def load_lpips(net: str = "vgg", random_backbone: bool = False) -> torch.nn.Module:
    """``lpips.LPIPS`` with its linear heads and the torchvision ImageNet backbone from the hub cache.

    The module is built without weights; the heads (shipped with ``lpips``) and the backbone file
    are read by ``load_state_dict`` (no pickle code) and handed to it. ``random_backbone=True``
    keeps a randomly initialised backbone (tests only: the score is then not LPIPS). A missing
    backbone file raises ``ModelNotFoundError`` naming it.
    """
    import lpips

    if net not in BACKBONE_URLS:
        raise OptionError("lpips_net", f"{net}: choose one of {', '.join(BACKBONE_URLS)}")
    backbone = None if random_backbone else find_weights(BACKBONE_URLS[net])
    if backbone is None and not random_backbone:
        raise missing(f"IC-LPIPS ({net})", BACKBONE_URLS[net])
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated ``pretrained=False``
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    load_into(model.lins, {key.removeprefix("lin"): value for key, value in load_state_dict(heads).items()},
              heads, f"LPIPS {net} linear heads")
    if backbone is not None:
        # lpips splits torchvision's ``features`` into slices that keep the layer indices.
        state = load_state_dict(backbone)
        names = {name: "features." + name.split(".", 1)[1] for name in model.net.state_dict()}
        load_into(model.net, {name: state[source] for name, source in names.items() if source in state},
                  backbone, f"torchvision {net} ImageNet")
    return model.eval().requires_grad_(False)


def to_lpips_tensor(images: Sequence[np.ndarray], size: int = 256) -> torch.Tensor:
    """uint8 RGB arrays -> (N, 3, size, size) float tensor in [-1, 1] (bilinear, antialiased)."""
    tensors = [
        F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float(), size=(size, size), mode="bilinear", antialias=True)
        for image in images
    ]
    return torch.cat(tensors).div(127.5).sub(1.0).clamp(-1.0, 1.0)


@torch.no_grad()
def lpips_matrix(model: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """LPIPS distance of every row image to every column image: (len(rows), len(cols))."""
    pairs = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    out = torch.zeros(len(rows), len(cols))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        a = rows[[i for i, _ in chunk]]
        b = cols[[j for _, j in chunk]]
        out[[i for i, _ in chunk], [j for _, j in chunk]] = model(a, b).flatten().cpu().float()
    return out


@torch.no_grad()
def mean_pairwise_lpips(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 16) -> float:
    """Mean LPIPS over all unordered pairs of ``images`` (N >= 2)."""
    i, j = torch.triu_indices(len(images), len(images), offset=1)
    total = 0.0
    for start in range(0, len(i), batch_size):
        a, b = i[start : start + batch_size], j[start : start + batch_size]
        total += float(model(images[a], images[b]).sum())
    return total / len(i)


def ic_lpips(
    model: torch.nn.Module, centres: Sequence[np.ndarray], generated: Sequence[np.ndarray], *,
    size: int = 256, max_members: int = 50, seed: int = 0, device: str = "cpu",
) -> float | None:
    """IC-LPIPS of one defect type; None when every cluster has fewer than two members."""
    centre_t = to_lpips_tensor(centres, size).to(device)
    generated_t = to_lpips_tensor(generated, size).to(device)
    nearest = lpips_matrix(model, generated_t, centre_t).argmin(dim=1).numpy()
    rng = np.random.default_rng(seed)
    cluster_scores = []
    for centre in range(len(centres)):
        members = np.flatnonzero(nearest == centre)
        if len(members) < 2:
            continue
        if len(members) > max_members:
            members = np.sort(rng.choice(members, size=max_members, replace=False))
        cluster_scores.append(mean_pairwise_lpips(model, generated_t[torch.from_numpy(members).to(device)]))
    return float(np.mean(cluster_scores)) if cluster_scores else None


def ic_lpips_scores(
    model: torch.nn.Module, centres: dict[str, Sequence[np.ndarray]], generated: dict[str, Sequence[np.ndarray]], **options
) -> dict[str, object]:
    """IC-LPIPS per defect type present in both ``centres`` and ``generated``, and their mean."""
    per_type = {}
    for defect_type in track(sorted(set(centres) & set(generated)), description="IC-LPIPS", transient=True):
        score = ic_lpips(model, centres[defect_type], generated[defect_type], **options)
        if score is not None:
            per_type[defect_type] = score
    return {"per_type": per_type, "mean": float(np.mean(list(per_type.values()))) if per_type else None}
