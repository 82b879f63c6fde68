"""Downstream localisation: train DRAEM's discriminative U-Net on generated pairs + good images and
test it on the real test split, as AnomalyDiffusion (Hu et al., AAAI 2024, Sec. 4.1) and
DualAnoDiff do.

Training: each sample is a coin flip between a real good image with an empty mask and a generated
(image, mask) pair; focal loss (gamma 2), Adam (lr 1e-4), learning rate x0.2 at 80 % and 90 % of
the epochs (DRAEM's schedule). Test: real test/good + the test two thirds of every defect type;
anomaly map = softmax probability of the anomalous class; image score = max of its 21 x 21
average-pooled map (DRAEM, Sec. 3.4).

The U-Net's convolutions and batch norms start from DRAEM's ``weights_init`` (``unet.py``).

Protocols: ``paper`` is what the official AnomalyDiffusion script does (``train-localization.py``:
test after every epoch, keep the one epoch with the best sum image AUROC + pixel AUROC + pixel AP
+ PRO, ``SELECT_SUM``; optimistic: the test set picks the epoch), every metric read at that epoch.
``paper_per_metric`` (reported with ``paper``) is each metric's best value over the tested epochs,
possibly from different epochs: more optimistic still and not the official AnomalyDiffusion
script's rule, kept as its own labelled variant. ``clean`` takes the last epoch (no test-set selection). Non-finite values are
never "best"; non-finite anomaly maps (a diverged U-Net) stop the run with one error.

Image-level metrics need anomaly-free test images: without real ``test/good`` images they are
undefined (None, with the reason in ``undefined``), not NaN or a perfect 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from anomalygen.errors import AnomalygenError
from anomalygen.evaluation.inputs import EvaluationData, resize_image, resize_mask
from anomalygen.evaluation.metrics import image_scores, localization_metrics, pr_curve
from anomalygen.evaluation.unet import DiscriminativeUNet, focal_loss
from anomalygen.options import MAX_BATCH, Choice, Float, Int, OptionSpec
from anomalygen.progress import Bar
from anomalygen.seeding import check_seed

PROTOCOLS = ("paper", "clean", "both")
# the largest input size and network width the evaluation networks can use (the papers: 256 px, U-Net base 64)
MAX_RESOLUTION = 1024
MAX_WIDTH = 512
# the checks the evaluation configs share (their fields' defaults are the dataclasses')
POSITIVE = Int(low=1)
RESOLUTION = Int(low=32, high=MAX_RESOLUTION, multiple=32)
WIDTH = Int(low=1, high=MAX_WIDTH)
BATCH = Int(low=1, high=MAX_BATCH)
LR = Float(low=0, low_open=True)
SELECT_SUM = ("image_auroc", "pixel_auroc", "pixel_ap", "pixel_au_pro")  # the official script's epoch rule


@dataclass
class LocalizationConfig:
    """The protocol's knobs; defaults are the papers' (200 epochs x 500 samples, 256 px, base 64).

    ``eval_every``: for the ``paper`` protocol, test every this many epochs (1 = every epoch, as
    the official scripts; larger values make the selection less optimistic and cheaper).
    """

    epochs: int = 200
    samples_per_epoch: int = 500
    resolution: int = 256
    base: int = 64
    batch_size: int = 8
    lr: float = 1e-4
    protocol: str = "both"
    eval_every: int = 1
    seed: int = 0

    FIELDS = OptionSpec(epochs=POSITIVE, samples_per_epoch=POSITIVE, resolution=RESOLUTION, base=WIDTH, batch_size=BATCH,
                        lr=LR, protocol=Choice(None, PROTOCOLS), eval_every=POSITIVE)

    def __post_init__(self) -> None:
        self.FIELDS.check_fields(self, "localization")
        check_seed(self.seed)


def tensor_images(images: list[np.ndarray], size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([resize_image(image, size) for image in images])).permute(0, 3, 1, 2).contiguous()


def tensor_masks(masks: list[np.ndarray], size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([resize_mask(mask, size) for mask in masks]))


def as_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    batch = images.to(device, non_blocking=True).float().div_(255.0)
    return batch.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else batch


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 16) -> torch.Tensor:
    """Anomaly maps (N, H, W): softmax probability of the anomalous class."""
    model.eval()
    maps = []
    for start in range(0, len(images), batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(as_input(images[start : start + batch_size], device))
        maps.append(logits.float().softmax(dim=1)[:, 1].cpu())
    model.train()
    return torch.cat(maps)


def measure(model, test_images, test_masks, device, epoch: int,
            network: str = "U-Net") -> tuple[dict[str, float | None], np.ndarray, np.ndarray]:
    """Metrics, anomaly maps and image scores of ``model`` on the test images (uint8 NCHW) and
    their bool masks; NaN / inf maps are the one ``diverged`` error of ``network`` at ``epoch``."""
    maps = predict(model, test_images, device)
    if not torch.isfinite(maps).all():
        bad = int((~torch.isfinite(maps)).sum())
        raise diverged(network, epoch, f"{bad} of {maps.numel()} anomaly-map values are NaN or infinite", device)
    scores = image_scores(maps).numpy()
    masks = test_masks.numpy()
    return localization_metrics(masks, maps.numpy(), scores), maps.numpy(), scores


def diverged(network: str, epoch: int, what: str, device: torch.device) -> AnomalygenError:
    """The one error for a downstream network whose outputs became NaN / inf, and what to do."""
    if device.type == "cuda":
        return AnomalygenError(f"downstream {network} diverged at epoch {epoch}: {what} (bf16 autocast on cuda); "
                               "re-run with `device` cpu (fp32) or another `seed`")
    return AnomalygenError(f"downstream {network} diverged at epoch {epoch}: {what}; re-run with another `seed`")


def best_row(history: Sequence[dict[str, float | None]], key: str) -> dict[str, float | None] | None:
    """The first row with the highest finite ``key``; None if no row has one (NaN is never best)."""
    finite = [row for row in history if row.get(key) is not None and math.isfinite(row[key])]
    return max(finite, key=lambda row: row[key]) if finite else None


def selection_sum(row: dict[str, float | None]) -> float | None:
    """The official epoch score: the sum of the ``SELECT_SUM`` metrics of ``row`` that are defined
    (image AUROC is undefined without real test/good images; the official script would stop
    there); None when none is, or one is not finite."""
    values = [row.get(key) for key in SELECT_SUM if row.get(key) is not None]
    return float(sum(values)) if values and all(math.isfinite(v) for v in values) else None


def paper_protocol(history: Sequence[dict[str, float | None]], keys: Sequence[str]) -> dict[str, dict[str, object]]:
    """``paper``: every metric at the first epoch with the best ``selection_sum`` (the official
    ``if sum_metric > last_sum``; the last epoch if no sum is finite). ``paper_per_metric``: each
    metric at its own best epoch."""
    best = {key: best_row(history, key) for key in keys}
    per_metric: dict[str, object] = {key: None if row is None else row[key] for key, row in best.items()}
    per_metric["best_epoch"] = {key: None if row is None else row["epoch"] for key, row in best.items()}
    scored = [{**row, "selection_sum": selection_sum(row)} for row in history]
    chosen = best_row(scored, "selection_sum") or scored[-1]
    summed = [key for key in SELECT_SUM if chosen.get(key) is not None]
    selected = {"epoch": chosen["epoch"], "selected_by": " + ".join(summed), "selection_sum": chosen["selection_sum"],
                **{key: chosen[key] for key in keys}}
    return {"paper": selected, "paper_per_metric": per_metric}


def run_localization(data: EvaluationData, config: LocalizationConfig, device: torch.device) -> dict[str, object]:
    """Train the U-Net on ``data.generated`` + ``data.train_good``, test on the real test split."""
    size = config.resolution
    generated = [example for examples in data.generated.values() for example in examples]
    # the training data go to the device once (uint8), batches are gathered there
    gen_images = tensor_images([e.image for e in generated], size).to(device)
    gen_masks = tensor_masks([e.mask for e in generated], size).to(device)
    good_images = tensor_images(data.train_good, size).to(device)
    test = [e for examples in data.test_defects.values() for e in examples]
    if not test:
        raise AnomalygenError(f"{data.category}: no real test defect images to localise (the paper split keeps two "
                              "thirds of each defect type for testing)")
    test_images = tensor_images(data.test_good + [e.image for e in test], size)
    test_masks = torch.cat([torch.zeros(len(data.test_good), size, size, dtype=torch.bool), tensor_masks([e.mask for e in test], size)])

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = DiscriminativeUNet(3, 2, config.base).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    milestones = [int(config.epochs * 0.8), int(config.epochs * 0.9)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.2)
    test_during = config.protocol in ("paper", "both")
    history: list[dict[str, float]] = []
    with Bar(config.epochs, "U-Net training", leave=False) as bar:
        for epoch in range(config.epochs):
            loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
            for start in range(0, config.samples_per_epoch, config.batch_size):
                count = min(config.batch_size, config.samples_per_epoch - start)
                use_good = torch.from_numpy(rng.random(count) < 0.5).to(device)
                pick_good = torch.from_numpy(rng.integers(len(good_images), size=count)).to(device)
                pick_gen = torch.from_numpy(rng.integers(len(gen_images), size=count)).to(device)
                images = torch.where(use_good[:, None, None, None], good_images[pick_good], gen_images[pick_gen])
                masks = gen_masks[pick_gen] & ~use_good[:, None, None]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = model(as_input(images, device))
                loss = focal_loss(logits, masks)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
            scheduler.step()
            mean_loss = loss_sum.item() / -(-config.samples_per_epoch // config.batch_size)
            if (test_during and (epoch + 1) % config.eval_every == 0) or epoch == config.epochs - 1:
                metrics, maps, scores = measure(model, test_images, test_masks, device, epoch + 1)
                history.append({"epoch": epoch + 1, "loss": mean_loss, **metrics})
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            bar.update(1)

    masks_np = test_masks.numpy()
    result: dict[str, object] = {
        "config": vars(config).copy(),
        "test_images": {"good": len(data.test_good), **{t: len(v) for t, v in data.test_defects.items()}},
        "history": history,
        "pr_curves": {"pixel": pr_curve(masks_np, maps)},
    }
    image_labels = masks_np.reshape(len(masks_np), -1).any(axis=1)
    if image_labels.all():
        result["undefined"] = {key: "the real test split has no test/good images (every test image is anomalous)"
                               for key in metrics if key.startswith("image_")}
    else:
        result["pr_curves"]["image"] = pr_curve(image_labels, scores)
    result["pr_curves"]["pixel"]["chance"] = float(masks_np.mean())  # the precision of a random ranking
    if "image" in result["pr_curves"]:
        result["pr_curves"]["image"]["chance"] = float(image_labels.mean())
    result["per_type"] = per_type_metrics(data, masks_np, maps, scores)
    if config.protocol in ("clean", "both"):
        result["clean"] = {"epoch": history[-1]["epoch"], **{k: v for k, v in history[-1].items() if k not in ("epoch", "loss")}}
    if config.protocol in ("paper", "both"):
        result.update(paper_protocol(history, [k for k in history[-1] if k not in ("epoch", "loss")]))
    return result


def per_type_metrics(data: EvaluationData, masks: np.ndarray, maps: np.ndarray, scores: np.ndarray) -> dict[str, dict]:
    """The last epoch's metrics per defect type: its real test defects with every test/good image
    (in ``run_localization``'s order: good images first, then each type's defects)."""
    n_good, start, out = len(data.test_good), len(data.test_good), {}
    for defect_type, examples in data.test_defects.items():
        if not examples:
            continue
        rows = np.r_[0:n_good, start:start + len(examples)]
        start += len(examples)
        out[defect_type] = localization_metrics(masks[rows], maps[rows], scores[rows])
    return out
