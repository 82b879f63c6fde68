"""``anomalygen evaluate``: run the seed papers' protocol on one generated folder and write the report.

Every option is checked and every pretrained network loaded (without pickle code) before the data
are read or anything is written. A metric whose weights are missing offline is skipped with a
note in the report when it was only on by default (``metrics=None``); one asked for by name
(``--metrics``) is an error naming the file to download.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from anomalygen.devices import resolve_device
from anomalygen.errors import ModelNotFoundError, OptionError
from anomalygen.evaluation.draem_augmentation import DraemAugmentationConfig, run_draem_augmentation
from anomalygen.evaluation.classification import ClassificationConfig, resnet34_weights, run_classification
from anomalygen.evaluation.ic_lpips import BACKBONE_URLS, ic_lpips_scores, load_lpips
from anomalygen.evaluation.inception_score import inception_scores, load_inception
from anomalygen.evaluation.inputs import load_evaluation_data
from anomalygen.evaluation.localization import LocalizationConfig, run_localization
from anomalygen.evaluation.presets import announce
from anomalygen.evaluation.rejections import rejection_rates
from anomalygen.evaluation.report import protocol_labels, write_report
from anomalygen.options import Choice, Int, check
from anomalygen.seeding import check_seed

METRICS = ("is", "ic-lpips", "localization", "classification")  # the default set
EXTRA_METRICS = ("draem-augmentation",)  # run only when named (CAGen's protocol trains DRAEM twice)
METRIC_NAMES = {"is": "Inception Score", "ic-lpips": "IC-LPIPS", "classification": "Classification"}


@dataclass
class Networks:
    """What the evaluation runs, checked and loaded once (``prepare``), before any data are read."""

    metrics: list[str]
    device: torch.device
    localization: LocalizationConfig
    classification: ClassificationConfig
    draem: DraemAugmentationConfig
    inception: torch.nn.Module | None = None
    inception_about: str = ""
    lpips: torch.nn.Module | None = None
    lpips_about: str = ""
    resnet_weights: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    draem_baselines: dict[str, dict[str, Any]] = field(default_factory=dict)  # category -> DRAEM alone


def prepare(
    metrics: Sequence[str] | None = None,
    *,
    device: str | None = None,
    localization: LocalizationConfig | None = None,
    classification: ClassificationConfig | None = None,
    draem: DraemAugmentationConfig | None = None,
    inception_weights: str | None = None,
    inception_extractor: torch.nn.Module | None = None,
    lpips_net: str = "vgg",
    lpips_model: torch.nn.Module | None = None,
    seed: int = 0,
) -> Networks:
    """Check the options and load the pretrained networks the chosen metrics need.

    ``metrics=None`` means ``METRICS``, skipping (with a note) those whose weights are missing offline;
    a metric named in ``metrics`` whose weights are missing raises ``ModelNotFoundError``.
    ``inception_extractor`` / ``lpips_model`` replace the pretrained networks (tests).
    """
    chosen = list(METRICS if metrics is None else metrics)
    unknown = sorted(set(chosen) - set(METRICS + EXTRA_METRICS))
    if unknown or not chosen:
        raise OptionError("metrics", f"unknown metric(s) {', '.join(unknown) or '(none given)'}; "
                                     f"choose from {', '.join(METRICS + EXTRA_METRICS)}", sep=": ")
    check("lpips_net", Choice(None, tuple(BACKBONE_URLS)), lpips_net)
    nets = Networks(chosen, resolve_device(device), localization or LocalizationConfig(seed=seed),
                    classification or ClassificationConfig(seed=seed), draem or DraemAugmentationConfig(seed=seed))
    for metric in ("is", "ic-lpips", "classification"):
        if metric not in chosen:
            continue
        try:
            if metric == "is":
                nets.inception, nets.inception_about = ((inception_extractor, "an injected feature extractor (not Inception-v3)")
                                                        if inception_extractor is not None else load_inception(inception_weights))
            elif metric == "ic-lpips":
                nets.lpips = lpips_model if lpips_model is not None else load_lpips(lpips_net)
                nets.lpips_about = "injected" if lpips_model is not None else lpips_net
            else:
                nets.resnet_weights = resnet34_weights(nets.classification)
        except ModelNotFoundError as error:
            if metrics is not None:
                raise
            nets.skipped[metric] = str(error)
    return nets


def evaluate(
    generated: str | Path,
    data: str | Path,
    *,
    category: str | None = None,
    metrics: Sequence[str] | None = None,
    out: str | Path | None = None,
    networks: Networks | None = None,
    lpips_size: int = 256,
    seed: int = 0,
    skip_bad: bool = False,
    say: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    **prepare_options: Any,
) -> dict[str, Any]:
    """Evaluate the generated folder against the real category; writes report.json + report.html.

    ``out`` defaults to the generated category folder. ``networks`` comes from ``prepare`` (else
    it is built here from ``metrics`` and ``prepare_options``: device, localization, classification,
    inception_weights, inception_extractor, lpips_net, lpips_model). ``skip_bad`` leaves out bad
    real files (noted in the report) instead of stopping at the first. With ``say`` / ``warn``, the
    run's length is estimated once the data are read (``presets.announce``) and said, or warned
    about past ``presets.WARN_AFTER_S``.
    """
    check_seed(seed)
    nets = networks or prepare(metrics, seed=seed, **prepare_options)
    check("lpips_size", Int(low=1), lpips_size)
    torch_device = nets.device
    inputs = load_evaluation_data(generated, data, category, skip_bad=skip_bad)
    for problem in inputs.problems if warn is not None else []:
        warn(f"skipped bad real file: {problem}")  # now, not after hours of training
    if say is not None:
        test_images = len(inputs.test_good) + sum(len(v) for v in inputs.test_defects.values())
        running = [m for m in nets.metrics if m not in nets.skipped]  # a metric without its weights is not run
        announce(settings(nets), torch_device, test_images=test_images, metrics=running,
                 generated=sum(len(v) for v in inputs.generated.values()), protocol=nets.localization.protocol,
                 eval_every=nets.localization.eval_every, runs=1, say=say, warn=warn or say)
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
    report["validity"] = rejection_rates([line for _, line in inputs.manifest.values()])
    if not report["validity"]:
        report["notes"].append("the generated samples were written without the validity filter (or by another tool)")
    sections = {"is": "inception_score", "ic-lpips": "ic_lpips", "classification": "classification"}
    for metric, reason in nets.skipped.items():
        report[sections[metric]] = {"skipped": reason}
        report["notes"].append(f"{METRIC_NAMES[metric]} skipped: {reason}")
    by_type = {t: [e.image for e in v] for t, v in inputs.generated.items()}
    if nets.inception is not None:
        scores = inception_scores(by_type, nets.inception, seed=seed, device=str(torch_device))
        report["inception_score"] = {"implementation": nets.inception_about, **scores}
        report["notes"] += scores["warnings"]
    if nets.lpips is not None:
        centres = {t: [e.image for e in v] for t, v in inputs.train_defects.items() if v}
        report["ic_lpips"] = {"net": nets.lpips_about, "size": lpips_size,
                              **ic_lpips_scores(nets.lpips.to(torch_device), centres, by_type, size=lpips_size, seed=seed,
                                                device=str(torch_device))}
    if "localization" in nets.metrics:
        report["localization"] = run_localization(inputs, nets.localization, torch_device)
        report["localization"]["protocol_labels"] = protocol_labels(report["localization"])
        undefined = report["localization"].get("undefined", {})
        for reason in dict.fromkeys(undefined.values()):
            keys = ", ".join(key for key, why in undefined.items() if why == reason)
            report["notes"].append(f"Localisation {keys} undefined: {reason}")
    if "draem-augmentation" in nets.metrics:
        section = run_draem_augmentation(inputs, nets.draem, torch_device, nets.draem_baselines.get(inputs.category))
        if "draem" in section:
            nets.draem_baselines[inputs.category] = section["draem"]
        report["draem_augmentation"] = section
        report["notes"].append(f"DRAEM augmentation ({section['test']} test split): {section['settings']}")
    if "classification" in nets.metrics and "classification" not in nets.skipped:
        matched = sorted(t for t in inputs.generated if inputs.test_defects.get(t))
        if len(matched) < 2:
            report["classification"] = {"skipped": f"needs >= 2 generated defect types with real test images, got {matched}"}
            report["notes"].append(f"Classification skipped: {report['classification']['skipped']}")
        else:
            report["classification"] = cls = run_classification(inputs, nets.classification, torch_device, nets.resnet_weights)
            report["notes"].append("ResNet-34 accuracy: " + "; ".join(
                f"{name} {cls[name]['accuracy']:.4f} (epoch {cls[name]['epoch']})" for name in ("clean", "paper") if name in cls)
                + ("; the tables show clean" if "clean" in cls and "paper" in cls else ""))
            if nets.resnet_weights is None:
                report["notes"].append("ResNet-34 trained from random initialisation (--cls-random-init): its accuracy "
                                       "is not comparable with the papers' (ImageNet weights).")
    out_dir = Path(out) if out else _category_dir(Path(generated), inputs.category)
    report["files"] = [str(p) for p in write_report(report, out_dir, inputs.generated, inputs.train_defects)]
    return report


def settings(nets: Networks) -> dict[str, Any]:
    """The settings ``presets.estimate_seconds`` reads, from the checked configs."""
    loc = nets.localization
    return {"epochs": loc.epochs, "samples_per_epoch": loc.samples_per_epoch, "resolution": loc.resolution, "base": loc.base,
            "batch_size": loc.batch_size, "cls_epochs": nets.classification.epochs}


def _category_dir(generated: Path, category: str) -> Path:
    return generated / category if (generated / category).is_dir() else generated
