"""``anomalygen evaluate``: run the seed papers' protocol on one generated folder and write the report.

A metric whose weights are missing offline is skipped with a note in the report, not a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from anomalygen.errors import AnomalygenError, ModelNotFoundError
from anomalygen.evaluation.classification import ClassificationConfig, run_classification
from anomalygen.evaluation.ic_lpips import ic_lpips_scores, load_lpips
from anomalygen.evaluation.inception_score import inception_scores, load_inception
from anomalygen.evaluation.inputs import load_evaluation_data
from anomalygen.evaluation.localization import LocalizationConfig, run_localization
from anomalygen.evaluation.report import write_report

METRICS = ("is", "ic-lpips", "localization", "classification")
PROTOCOLS = ("paper", "clean", "both")


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise AnomalygenError(f"--device {device}: CUDA is not available on this machine")
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate(
    generated: str | Path,
    data: str | Path,
    *,
    category: str | None = None,
    metrics: Sequence[str] = METRICS,
    out: str | Path | None = None,
    device: str | None = None,
    localization: LocalizationConfig | None = None,
    classification: ClassificationConfig | None = None,
    inception_weights: str | None = None,
    inception_extractor: torch.nn.Module | None = None,
    lpips_net: str = "vgg",
    lpips_model: torch.nn.Module | None = None,
    lpips_size: int = 256,
    seed: int = 0,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Evaluate the generated folder against the real category; writes report.json + report.html.

    ``out`` defaults to the generated category folder. ``inception_extractor`` / ``lpips_model``
    replace the pretrained networks (tests use random-weight ones). ``skip_bad`` leaves out bad
    real files (noted in the report) instead of stopping at the first.
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise AnomalygenError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    localization = localization or LocalizationConfig(seed=seed)
    if localization.protocol not in PROTOCOLS:
        raise AnomalygenError(f"unknown protocol {localization.protocol!r}; choose from {', '.join(PROTOCOLS)}")
    classification = classification or ClassificationConfig(seed=seed)
    torch_device = pick_device(device)
    inputs = load_evaluation_data(generated, data, category, skip_bad=skip_bad)
    report: dict[str, Any] = {
        "category": inputs.category,
        "generated": str(generated),
        "data": str(data),
        "device": str(torch_device),
        "seed": seed,
        "generated_counts": {t: len(v) for t, v in inputs.generated.items()},
        "real_split": {"train_defects": {t: len(v) for t, v in inputs.train_defects.items()},
                       "test_defects": {t: len(v) for t, v in inputs.test_defects.items()},
                       "train_good": len(inputs.train_good), "test_good": len(inputs.test_good)},
        "notes": [f"skipped bad real file: {problem}" for problem in inputs.problems],
    }
    by_type = {t: [e.image for e in v] for t, v in inputs.generated.items()}
    if "is" in metrics:
        try:
            extractor = inception_extractor or load_inception(inception_weights)
            report["inception_score"] = inception_scores(by_type, extractor, seed=seed, device=str(torch_device))
        except ModelNotFoundError as error:
            report["inception_score"] = {"skipped": str(error)}
            report["notes"].append(f"Inception Score skipped: {error}")
    if "ic-lpips" in metrics:
        try:
            model = (lpips_model or load_lpips(lpips_net)).to(torch_device)
            centres = {t: [e.image for e in v] for t, v in inputs.train_defects.items() if v}
            report["ic_lpips"] = {"net": lpips_net if lpips_model is None else "injected", "size": lpips_size,
                                  **ic_lpips_scores(model, centres, by_type, size=lpips_size, seed=seed, device=str(torch_device))}
        except ModelNotFoundError as error:
            report["ic_lpips"] = {"skipped": str(error)}
            report["notes"].append(f"IC-LPIPS skipped: {error}")
    if "localization" in metrics:
        report["localization"] = run_localization(inputs, localization, torch_device)
    matched = sorted(t for t in inputs.generated if inputs.test_defects.get(t))
    if "classification" in metrics and len(matched) < 2:
        report["classification"] = {"skipped": f"needs >= 2 generated defect types with real test images, got {matched}"}
        report["notes"].append(f"Classification skipped: {report['classification']['skipped']}")
    elif "classification" in metrics:
        report["classification"] = run_classification(inputs, classification, torch_device)
        if report["classification"]["weights"].startswith("random"):
            report["notes"].append("ResNet-34 started from random weights (ImageNet weights not in the torch hub cache).")
    out_dir = Path(out) if out else _category_dir(Path(generated), inputs.category)
    report["files"] = [str(p) for p in write_report(report, out_dir, inputs.generated)]
    return report


def _category_dir(generated: Path, category: str) -> Path:
    return generated / category if (generated / category).is_dir() else generated
