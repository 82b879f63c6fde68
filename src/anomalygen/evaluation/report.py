"""Evaluation reports: ``report.json`` (every number) and ``report.html``: the notes as a list,
tables per defect type and mean, localisation per protocol and per defect type, precision-recall
curves with their AP and the chance line, the U-Net's training curve, the confusion matrix as a
heat map, and real training defects beside generated ones (``evaluation.figures`` draws)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from anomalygen.evaluation import figures
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


def sample_grids(generated: dict[str, list[DefectExample]], real: dict[str, list[DefectExample]] | None = None,
                 per_type: int = 4, real_per_type: int = 2) -> list[tuple[str, np.ndarray]]:
    """One captioned grid per defect type: its first ``real_per_type`` real training defects, then its
    first ``per_type`` generated samples, each as (image, mask overlay)."""
    real = real or {}
    grids = []
    for defect_type, examples in generated.items():
        shown_real = real.get(defect_type, [])[:real_per_type]
        row: list[np.ndarray] = []
        labels: list[str] = []
        for kind, items in (("real", shown_real), ("generated", examples[:per_type])):
            for example in items:
                row += [example.image, overlay(example.image, example.mask)]
                labels += [kind, f"{kind}: mask"]
        caption = f"{defect_type}: {len(shown_real)} real training defects, then {len(examples[:per_type])} generated"
        grids.append((caption, grid([row], labels)))
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


def write_report(report: dict[str, Any], out: Path, generated: dict[str, list[DefectExample]],
                 real: dict[str, list[DefectExample]] | None = None) -> tuple[Path, Path]:
    """Write ``out/report.json`` and ``out/report.html``; ``real``: the real training defects per type,
    shown beside the generated ones."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    about_is = report.get("inception_score", {}).get("implementation")
    sections = []
    if report.get("notes"):
        sections.append(Section("Notes", items=list(report["notes"])))
    sections.append(Section("Per defect type", "IS: Inception Score (10 splits)" + (f", computed by {about_is}" if about_is else "")
                            + "; IC-LPIPS: intra-cluster LPIPS; accuracy: ResNet-34 trained on generated defects, tested on "
                            "real test defects.", table=_per_type_rows(report)))
    loc = report.get("localization", {})
    if "history" in loc:
        sections += localization_sections(loc)
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
        sections.append(Section("Classification confusion matrix", f"ResNet-34 weights: {cls['weights']}; accuracy "
                                f"{cls['accuracy']:.3f} over {sum(map(sum, cls['confusion_matrix']))} real test defects.",
                                images=[("rows: true type, columns: predicted; colour: share of the row",
                                         figures.confusion(cls["confusion_matrix"], cls["classes"]))]))
    sections.append(Section("Real and generated defects", "Per defect type: real training defects (the few shots the "
                            "generator learned from), then generated samples; each image beside its mask overlay.",
                            images=sample_grids(generated, real)))
    html_path = write_html(out / "report.html", f"anomalygen evaluation: {report['category']}", sections)
    return json_path, html_path


def localization_sections(loc: dict[str, Any]) -> list[Section]:
    """The downstream U-Net: figures per protocol, per defect type, PR curves and the training curve."""
    rows = [{"protocol": label, **{k: shown(loc[name][k]) for k in LOCALIZATION_KEYS}}
            for name, label in protocol_labels(loc).items()]
    config = loc["config"]
    text = (f"DRAEM discriminative U-Net, base {config['base']}, {config['resolution']} px, {config['epochs']} epochs x "
            f"{config['samples_per_epoch']} samples; test images: {loc['test_images']}")
    sections = [Section("Downstream localisation", text, table=rows)]
    if loc.get("per_type"):
        sections.append(Section("Localisation per defect type (last epoch)", "Each type's real test defects together with "
                                "every real test/good image.",
                                table=[{"defect type": t, **{k: shown(v.get(k)) for k in LOCALIZATION_KEYS}}
                                       for t, v in loc["per_type"].items()]))
    last = loc["history"][-1]
    images = [(f"{level} level, last epoch", figures.pr_curves({"generated": curve}, {"generated": last.get(f"{level}_ap")},
                                                               f"{level}-level precision-recall"))
              for level, curve in loc["pr_curves"].items()]
    images.append(("loss per epoch; test metrics at the tested epochs", figures.training_curve(loc["history"])))
    sections.append(Section("Precision-recall curves and training curve", images=images))
    return sections
