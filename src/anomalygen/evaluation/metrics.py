"""Detection and localisation metrics: AUROC, AP, F1-max, AU-PRO, and the image score.

AUROC, AP, F1-max and the precision-recall curve are scikit-learn's definitions, computed from one
stable sort of the scores (``_counts``) instead of the several sorts and input checks each
scikit-learn call makes (on the ~7 M test pixels of a category that was ~10 s per curve, paid at
every tested epoch of the paper protocol); the tests check them against scikit-learn. AU-PRO
(which no library computes with the MVTec definition) and the DRAEM image score are written here too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def _counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives (float64) at each distinct score, highest first: scikit-learn's
    ``confusion_matrix_at_thresholds`` (one descending sort, the last index of each tie run)."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores).ravel()
    scores = scores if np.issubdtype(scores.dtype, np.floating) else scores.astype(np.float64)
    order = np.argsort(scores)[::-1]  # the order within a tie run changes no count at its end
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(labels, dtype=np.float64)[last]
    return tps, 1 + last - tps


def _precision_recall(tps: np.ndarray, fps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.metrics.precision_recall_curve``: recall decreasing, ending at (P=1, R=0)."""
    precision = tps / (tps + fps)
    recall = tps / tps[-1] if tps[-1] else np.ones_like(tps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]


def _auroc(tps: np.ndarray, fps: np.ndarray) -> float:
    """``sklearn.metrics.roc_auc_score`` (its ``roc_curve`` with ``drop_intermediate``, trapezoids)."""
    if not tps[-1] or not fps[-1]:
        raise ValueError("Only one class present in y_true. ROC AUC score is not defined in that case.")
    if len(fps) > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        tps, fps = tps[keep], fps[keep]
    return float(np.trapezoid(np.r_[0.0, tps] / tps[-1], np.r_[0.0, fps] / fps[-1]))


def _f1_max(precision: np.ndarray, recall: np.ndarray) -> float:
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(f1.max())


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Maximum F1 over every threshold of the exact precision-recall curve (no threshold grid).

    F1 = 2PR / (P + R) at each operating point of ``sklearn.metrics.precision_recall_curve``.
    """
    return _f1_max(*_precision_recall(*_counts(labels, scores)))


def detection_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """AUROC, AP and F1-max of binary ``labels`` (1 = anomalous) against ``scores``: scikit-learn's
    ``roc_auc_score``, ``average_precision_score`` (AP = −Σ ΔR·P) and F1-max, from one sort."""
    tps, fps = _counts(labels, scores)
    precision, recall = _precision_recall(tps, fps)
    return {
        "auroc": _auroc(tps, fps),
        "ap": float(max(0.0, -np.sum(np.diff(recall) * precision[:-1]))),
        "f1_max": _f1_max(precision, recall),
    }


def pr_curve(labels: np.ndarray, scores: np.ndarray, points: int = 200) -> dict[str, list[float]]:
    """The precision-recall curve thinned to about ``points`` points (for plots in reports)."""
    precision, recall = _precision_recall(*_counts(labels, scores))
    keep = np.unique(np.linspace(0, len(precision) - 1, min(points, len(precision))).astype(int))
    return {"precision": precision[keep].tolist(), "recall": recall[keep].tolist()}


def au_pro(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` FPR.

    MVTec AD definition (Bergmann et al., IJCV 2021, Sec. 5.2; MVTec LOCO, Eq. 1): at threshold
    t, PRO(t) = mean over every connected ground-truth region C_k (8-connectivity) of
    |P(t) ∩ C_k| / |C_k|, FPR(t) = false-positive pixels / all anomaly-free pixels. The curve is
    computed exactly at every distinct score (each region pixel adds 1/(K·|C_k|) to PRO, each
    anomaly-free pixel 1/N_neg to FPR), integrated with the trapezoidal rule up to ``fpr_limit``
    (interpolated there) and divided by ``fpr_limit`` so that a perfect map scores 1.
    """
    weights = []
    all_scores = []
    negatives = []
    n_regions = 0
    region_sizes = []
    for mask, anomaly_map in zip(masks, maps):
        mask = np.asarray(mask, dtype=bool)
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        sizes = np.bincount(labelled.ravel(), minlength=count + 1).astype(np.float64)
        region_sizes.append((labelled, sizes))
        n_regions += count
        all_scores.append(np.asarray(anomaly_map, dtype=np.float64).ravel())
        negatives.append(~mask.ravel())
    if n_regions == 0:
        raise ValueError("AU-PRO needs at least one anomalous region in the ground truth")
    n_negative = sum(int(n.sum()) for n in negatives)
    for labelled, sizes in region_sizes:
        flat = labelled.ravel()
        per_pixel = np.where(flat > 0, 1.0 / (n_regions * sizes[flat]), 0.0)
        weights.append(per_pixel)
    scores = np.concatenate(all_scores)
    pro_step = np.concatenate(weights)
    fpr_step = np.concatenate(negatives).astype(np.float64) / max(n_negative, 1)
    order = np.argsort(-scores, kind="stable")
    scores, pro_step, fpr_step = scores[order], pro_step[order], fpr_step[order]
    pro = np.cumsum(pro_step)
    fpr = np.cumsum(fpr_step)
    # A threshold admits every pixel with an equal score at once: keep the last of each run of ties.
    last_of_ties = np.r_[scores[1:] != scores[:-1], True]
    fpr = np.r_[0.0, fpr[last_of_ties]]
    pro = np.r_[0.0, pro[last_of_ties]]
    fpr = np.minimum(fpr, 1.0)
    cut = np.searchsorted(fpr, fpr_limit, side="right")
    if cut < len(fpr):
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        pro_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
        fpr = np.r_[fpr[:cut], fpr_limit]
        pro = np.r_[pro[:cut], pro_at_limit]
    return float(np.trapezoid(pro, fpr) / fpr_limit)


def image_scores(anomaly_maps: torch.Tensor, kernel: int = 21) -> torch.Tensor:
    """Image anomaly score = max of the ``kernel`` x ``kernel`` average-pooled map (DRAEM, Sec. 3.4).

    ``anomaly_maps``: (N, H, W) anomaly probabilities; returns (N,).
    """
    pooled = F.avg_pool2d(anomaly_maps[:, None].float(), kernel, stride=1, padding=kernel // 2)
    return pooled.flatten(1).amax(dim=1)


def localization_metrics(masks: np.ndarray, maps: np.ndarray, image_score: np.ndarray) -> dict[str, float | None]:
    """Pixel AUROC/AP/F1-max/AU-PRO over all test pixels and image AUROC/AP/F1-max.

    ``masks``: (N, H, W) bool ground truth; ``maps``: (N, H, W) anomaly maps; ``image_score``: (N,).
    Image metrics are None when every test image is anomalous (no anomaly-free image to rank
    against: AUROC is undefined and AP / F1-max would read 1.0 whatever the scores).
    """
    pixel = detection_metrics(masks, maps)
    labels = masks.reshape(len(masks), -1).any(axis=1)
    image = detection_metrics(labels, image_score) if not labels.all() else dict.fromkeys(("auroc", "ap", "f1_max"))
    return {
        **{f"pixel_{key}": value for key, value in pixel.items()},
        "pixel_au_pro": au_pro(list(masks), list(maps)),
        **{f"image_{key}": value for key, value in image.items()},
    }
