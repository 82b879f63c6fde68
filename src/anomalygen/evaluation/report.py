"""Evaluation reports: ``report.json`` (every number) and ``report.html`` (tables per defect type
and mean, a sample grid with mask overlays, precision-recall curves, the confusion matrix)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from anomalygen.io import atomic_write_text
from anomalygen.types import DefectExample
from anomalygen.visualize import Section, grid, overlay, write_html

LOCALIZATION_KEYS = ["pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_au_pro", "image_auroc", "image_ap", "image_f1_max"]


def protocol_labels(localization: dict[str, Any]) -> dict[str, str]:
    """The label of each protocol present in a localisation result (report, HTML, comparison)."""
    selected = localization.get("paper", {})
    labels = {
        "paper": f"paper (official script: epoch {selected.get('epoch')}, best {selected.get('selected_by')} on the test set)",
        "paper_per_metric": "paper, per metric (each metric at its own best test epoch; more optimistic than the official AnomalyDiffusion script)",
        "clean": "clean (last epoch)",
    }
    return {name: label for name, label in labels.items() if name in localization}


def shown(value: Any) -> Any:
    """A table cell: None (an undefined metric) reads "undefined" (the notes say why)."""
    return "undefined" if value is None else value


def plot_curves(curves: dict[str, dict[str, list[float]]], size: int = 320, margin: int = 36) -> np.ndarray:
    """Precision (y) over recall (x) of each named curve, drawn with PIL on [0, 1] axes."""
    canvas = Image.new("RGB", (size + margin + 8, size + margin + 8), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x0, y0 = margin, 8

    def point(x: float, y: float) -> tuple[float, float]:
        return x0 + x * size, y0 + (1.0 - y) * size

    draw.rectangle([x0, y0, x0 + size, y0 + size], outline="black")
    for tick in (0.0, 0.5, 1.0):
        draw.text((x0 + tick * size - 6, y0 + size + 4), f"{tick:.1f}", fill="black", font=font)
        draw.text((4, y0 + (1 - tick) * size - 6), f"{tick:.1f}", fill="black", font=font)
    draw.text((x0 + size // 2 - 15, y0 + size + 18), "recall", fill="black", font=font)
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    for k, (name, curve) in enumerate(curves.items()):
        colour = colours[k % len(colours)]
        draw.line([point(r, p) for r, p in zip(curve["recall"], curve["precision"])], fill=colour, width=2)
        draw.text((x0 + 8, y0 + 6 + 12 * k), f"{name} (precision vs recall)", fill=colour, font=font)
    return np.asarray(canvas)


def sample_grids(generated: dict[str, list[DefectExample]], per_type: int = 4) -> list[tuple[str, np.ndarray]]:
    """One captioned grid per defect type: (image, mask overlay) of its first ``per_type`` samples."""
    grids = []
    for defect_type, examples in generated.items():
        row: list[np.ndarray] = []
        for example in examples[:per_type]:
            row += [example.image, overlay(example.image, example.mask)]
        grids.append((defect_type, grid([row], ["image", "mask overlay"] * len(examples[:per_type]))))
    return grids


def _per_type_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    columns = {
        "IS": report.get("inception_score", {}).get("per_type"),
        "IC-LPIPS": report.get("ic_lpips", {}).get("per_type"),
        "classification accuracy": report.get("classification", {}).get("per_class_accuracy"),
    }
    columns = {name: values for name, values in columns.items() if values is not None}
    types = sorted(report["generated_counts"])
    rows = [{"defect type": t, "generated": report["generated_counts"][t],
             **{name: values.get(t, "") for name, values in columns.items()}} for t in types]
    means = {"IS": report.get("inception_score", {}).get("mean"), "IC-LPIPS": report.get("ic_lpips", {}).get("mean"),
             "classification accuracy": report.get("classification", {}).get("accuracy")}
    rows.append({"defect type": "mean (accuracy: all test images)", "generated": sum(report["generated_counts"].values()),
                 **{name: means[name] if means[name] is not None else "" for name in columns}})
    return rows


def write_report(report: dict[str, Any], out: Path, generated: dict[str, list[DefectExample]]) -> tuple[Path, Path]:
    """Write ``out/report.json`` and ``out/report.html``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    about_is = report.get("inception_score", {}).get("implementation")
    sections = [Section("Per defect type", "IS: Inception Score (10 splits)" + (f", computed by {about_is}" if about_is else "")
                        + "; IC-LPIPS: intra-cluster LPIPS; accuracy: ResNet-34 trained on generated defects, tested on "
                        "real test defects.", table=_per_type_rows(report))]
    if report.get("notes"):
        sections.append(Section("Notes", " | ".join(report["notes"])))
    loc = report.get("localization", {})
    if "history" in loc:
        rows = [{"protocol": label, **{k: shown(loc[name][k]) for k in LOCALIZATION_KEYS}}
                for name, label in protocol_labels(loc).items()]
        config = loc["config"]
        text = (f"DRAEM discriminative U-Net, base {config['base']}, {config['resolution']} px, {config['epochs']} epochs x "
                f"{config['samples_per_epoch']} samples; test images: {loc['test_images']}")
        sections.append(Section("Downstream localisation", text, table=rows))
        sections.append(Section("Precision-recall curves (last epoch)", images=[
            ("pixel level", plot_curves({"pixel": loc["pr_curves"]["pixel"]})),
            *([("image level", plot_curves({"image": loc["pr_curves"]["image"]}))] if "image" in loc["pr_curves"] else []),
        ]))
    if report.get("validity"):
        rows = [{"defect type": t, "samples": v["samples"], "first draw rejected": v["rejected_first"],
                 "kept failing": v["kept_failing"], **{f"rejected by {c}": n for c, n in v["rejected_draws"].items()}}
                for t, v in report["validity"].items()]
        sections.append(Section("Validity filter", "Share of samples whose first draw failed a validity check (and "
                                "was redrawn), share still failing after every draw, and rejected draws per check.",
                                table=rows))
    draem = report.get("draem_augmentation", {})
    if draem:
        runs = {"DRAEM alone": "draem", f"DRAEM + generated ({draem['config']['ratio']:.0%})": "augmented"}
        rows = [{"training": label, **{k: shown(draem[key][k]) for k in LOCALIZATION_KEYS}}
                for label, key in runs.items() if key in draem]
        text = (f"CAGen's protocol: DRAEM trained on good images with a share of its simulated anomalies replaced by "
                f"generated pairs ({draem['with_reconstruction_target']} of {draem['generated_pairs']} with a "
                f"reconstruction target); {draem['settings']}; {draem['test']} test split {draem['test_images']}.")
        sections.append(Section("DRAEM augmentation", text, table=rows))
    cls = report.get("classification", {})
    if "confusion_matrix" in cls:
        rows = [{"true \\ predicted": t, **dict(zip(cls["classes"], row))} for t, row in zip(cls["classes"], cls["confusion_matrix"])]
        sections.append(Section("Classification confusion matrix", f"ResNet-34 weights: {cls['weights']}", table=rows))
    sections.append(Section("Generated samples (first of each defect type)", images=sample_grids(generated)))
    html_path = write_html(out / "report.html", f"anomalygen evaluation: {report['category']}", sections)
    return json_path, html_path
