"""Figures of the reports, drawn with matplotlib (Agg, no display needed) as RGB arrays: PR curves
with their AP and the chance line, the U-Net's training curve, the confusion matrix as a heat map."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_array(figure) -> np.ndarray:
    """The figure as an RGB uint8 array (100 dpi PNG), then closed."""
    from PIL import Image

    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def pr_curves(curves: dict[str, dict[str, Any]], ap: dict[str, float | None], title: str) -> np.ndarray:
    """Precision over recall of each named curve, its AP in the legend; the chance line (the positive
    share: a random ranking's precision) dashed, from the first curve that records it."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(4.2, 3.8))
    for k, (name, curve) in enumerate(curves.items()):
        value = ap.get(name)
        label = f"{name} (AP {value:.3f})" if value is not None else f"{name} (AP undefined)"
        axes.plot(curve["recall"], curve["precision"], color=COLOURS[k % len(COLOURS)], lw=1.8, label=label)
    chance = next((curve["chance"] for curve in curves.values() if "chance" in curve), None)
    if chance is not None:
        axes.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.3f})")
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)  # below: never over a curve
    return to_array(figure)


def training_curve(history: Sequence[dict[str, Any]], keys: Sequence[str] = ("pixel_ap", "pixel_au_pro", "image_auroc")) -> np.ndarray:
    """The U-Net's focal loss per epoch (left axis) and its test metrics at the tested epochs (right)."""
    plt = _pyplot()
    figure, loss_axes = plt.subplots(figsize=(5.6, 3.4))
    epochs = [row["epoch"] for row in history]
    loss_axes.plot(epochs, [row["loss"] for row in history], color="black", marker="." if len(epochs) < 30 else None,
                   label="training loss (focal)")
    loss_axes.set(xlabel="epoch", ylabel="focal loss")
    from matplotlib.ticker import MaxNLocator

    loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    metric_axes = loss_axes.twinx()
    for k, key in enumerate(keys):
        points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
        if points:
            metric_axes.plot(*zip(*points), color=COLOURS[k], marker="." if len(points) < 30 else None, label=key)
    metric_axes.set(ylim=(0, 1), ylabel="test metric")
    lines = loss_axes.get_legend_handles_labels()[0] + metric_axes.get_legend_handles_labels()[0]
    loss_axes.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    loss_axes.set_title("U-Net training (test metrics: the real test split)")
    loss_axes.grid(alpha=0.3)
    return to_array(figure)


def confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> np.ndarray:
    """The confusion matrix as a heat map (rows: true type, columns: predicted), counts written in."""
    plt = _pyplot()
    values = np.asarray(matrix, dtype=float)
    size = 1.2 + 0.55 * len(classes)
    figure, axes = plt.subplots(figsize=(size + 1.2, size))
    shares = values / np.maximum(values.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(values):
        axes.text(j, i, f"{int(count)}", ha="center", va="center", fontsize=9,
                  color="white" if shares[i, j] > 0.6 else "black")
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set(xlabel="predicted", ylabel="true", title="ResNet-34 on the real test defects")
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true type")
    return to_array(figure)
