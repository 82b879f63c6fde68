"""``anomalygen benchmark``: for each method, generate then evaluate, then one comparison table laid
out like the seed papers' tables (rows = categories / defect types, columns = methods).

Every method generates ``num_per_type`` samples for each real defect type (``defect_type=t``), so
that all methods are evaluated on the same types; methods that do not model defect types
(cutpaste, draem) only carry the label. A method that learns (``needs_fit``) is fitted once per
category and saved to ``OUT/<method>/models/<category>/``; a re-run loads it instead of training
again. Each type is one resumable writer run under ``OUT/<method>/runs/<type>/``;
``OUT/<method>/<category>/`` links them into one MVTec-layout folder that ``evaluate`` reads, and
holds that method's report. Every method name, method option and evaluation option is checked,
and the evaluation networks loaded, before anything is generated.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from anomalygen import pipeline
from anomalygen.data import list_categories, load_category, paper_split
from anomalygen.errors import AnomalygenError, OptionError
from anomalygen.evaluation import figures
from anomalygen.evaluation.inputs import load_evaluation_data
from anomalygen.evaluation.localization import SELECT_SUM, run_localization
from anomalygen.evaluation.report import LOCALIZATION_KEYS
from anomalygen.evaluation.presets import announce
from anomalygen.evaluation.run import evaluate, prepare, settings
from anomalygen.generation.writer import MAX_SAMPLES
from anomalygen.io import atomic_write_text, check_own_folder, folder_lock
from anomalygen.methods.base import CONFIG_FILE, AnomalyGenerator, get_method
from anomalygen.options import Int, check
from anomalygen.types import DefectExample
from anomalygen.visualize import Section, grid, overlay, write_html


def _categories(data: Path, category: str | None) -> list[str]:
    if category:
        return [category]
    return list_categories(data) or [load_category(data, require_good=False).name]


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        return
    os.symlink(os.path.relpath(target, link.parent), link, target_is_directory=True)


def method_options(settings: Mapping[str, Any], method: str) -> dict[str, Any]:
    """The options of ``method`` from ``--set`` pairs: ``key`` applies to every method,
    ``method.key`` to that method only (and wins over ``key``)."""
    options = {key: value for key, value in settings.items() if "." not in key}
    prefix = f"{method}."
    options.update({key[len(prefix):]: value for key, value in settings.items() if key.startswith(prefix)})
    return options


def generate_per_type(
    method: str, data: Path, out: Path, category: str, num_per_type: int, seed: int, skip_bad: bool = False,
    options: Mapping[str, Any] | None = None, max_attempts: int = pipeline.MAX_ATTEMPTS,
    keep_failing: bool = False,
) -> Path:
    """Write ``num_per_type`` samples of every real defect type; return the merged category folder.

    A method that learns is fitted once (``OUT/<method>/models/<category>``), loaded once, and
    every type is generated from it; a saved model is reused, so a re-run does not train again.
    The category's images are read once for the fit and every type.
    """
    training = pipeline.load_training(data, category, skip_bad=skip_bad)
    real = training[0]
    merged = out / method / real.name
    checkpoint = model = None
    if get_method(method).needs_fit:
        checkpoint = out / method / "models" / real.name
        saved = checkpoint / CONFIG_FILE
        if not saved.is_file():
            pipeline.fit(method, data, checkpoint, category=category, options=options, skip_bad=skip_bad, training=training)
        elif json.loads(saved.read_text())["options"] != pipeline.build(method, options or {}).config():
            raise AnomalygenError(f"{checkpoint}: a {method} model fitted with other options; delete it or "
                                  "benchmark into another `out`")
        model = AnomalyGenerator.load(checkpoint)  # once for every type
    for defect_type in real.defect_types:
        run = out / method / "runs" / defect_type
        result = pipeline.generate(None if checkpoint else method, data, run, num_per_type, category=category,
                                   seed=seed, checkpoint=checkpoint, loaded=model, training=training, defect_type=defect_type,
                                   options=None if checkpoint else options, skip_bad=skip_bad, max_attempts=max_attempts,
                                   keep_failing=keep_failing)
        for part in ("test", "ground_truth"):
            _link(result.out / part / defect_type, merged / part / defect_type)
    return merged


def benchmark(
    data: str | Path,
    methods: Sequence[str],
    out: str | Path,
    *,
    category: str | None = None,
    num_per_type: int = 500,
    seed: int = 0,
    skip_bad: bool = False,
    settings: Mapping[str, Any] | None = None,
    metrics: Sequence[str] | None = None,
    max_attempts: int = pipeline.MAX_ATTEMPTS,
    keep_failing: bool = False,
    with_baselines: bool = True,
    overwrite: bool = False,
    say: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    **evaluate_options: Any,
) -> dict[str, Any]:
    """Generate + evaluate every method on every category; write ``comparison.md`` / ``.html``.

    ``settings`` are method options (see ``method_options``), e.g. ``{"anomalydiffusion.model": "tiny"}``;
    ``metrics`` and ``evaluate_options`` are ``evaluation.run.prepare``'s; ``max_attempts`` and
    ``keep_failing``: the validity filter's (``pipeline.generate``). ``with_baselines``: also train
    the U-Net of the localisation protocol twice without generated data (``run_baselines``).
    """
    data, out = Path(data), Path(out)
    if not methods:
        raise OptionError("methods", "no method given", sep=": ")
    check("num_per_type", Int(low=1, high=MAX_SAMPLES), num_per_type)
    pipeline.check_max_attempts(max_attempts)
    for key, value in (settings or {}).items():
        if "." in key and key.partition(".")[0] not in methods:
            raise AnomalygenError(f"`settings` {key}={json.dumps(value)}: {key.partition('.')[0]!r} is not a benchmarked "
                                  f"method (`methods` {','.join(methods)})")
    for method in methods:
        pipeline.build(method, method_options(settings or {}, method))
    networks = prepare(metrics, seed=seed, **evaluate_options)
    check_own_folder(out, overwrite=overwrite)
    if say is not None:
        estimate(data, category, methods, num_per_type, networks, say, warn or say)
    with folder_lock(out, "benchmark"):
        return _run(data, methods, out, category, num_per_type, seed, skip_bad, settings or {}, max_attempts, keep_failing,
                    with_baselines, networks)


def _run(data: Path, methods: Sequence[str], out: Path, category: str | None, num_per_type: int, seed: int, skip_bad: bool,
         settings: Mapping[str, Any], max_attempts: int, keep_failing: bool, with_baselines: bool, networks) -> dict[str, Any]:
    """``benchmark``'s work once everything is checked and ``out`` is held."""
    reports: dict[str, dict[str, dict[str, Any]]] = {}
    timings: dict[str, float] = {}
    for method in methods:
        started = time.perf_counter()
        for name in _categories(data, category):
            merged = generate_per_type(method, data, out, name, num_per_type, seed, skip_bad,
                                       method_options(settings, method), max_attempts, keep_failing)
            reports.setdefault(name, {})[method] = evaluate(merged.parent, data, category=name, out=merged, seed=seed,
                                                           skip_bad=skip_bad, networks=networks)
        timings[method] = time.perf_counter() - started
    baselines = {}
    if with_baselines and "localization" in networks.metrics:
        for name, by_method in reports.items():
            first = next(iter(by_method.values()))
            baselines[name] = run_baselines(Path(first["generated"]), data, name, networks, skip_bad, seed)
    header = (f"Data: {data}; {num_per_type} generated samples per defect type; seed {seed}. "
              f"Wall time per method (generate + evaluate): " + ", ".join(f"{m} {t:.0f} s" for m, t in timings.items()) + ".")
    tables = write_comparison(out, reports, list(methods), header, baselines)
    return {"reports": reports, "tables": tables, "timings_s": timings, "baselines": baselines}


def estimate(data: Path, category: str | None, methods: Sequence[str], num_per_type: int, networks, say, warn) -> float:
    """Say (or warn about, past ``presets.WARN_AFTER_S``) how long the evaluations will take, from the
    categories' file counts (the paper split's test two thirds) before anything is generated."""
    test_images = generated = runs = 0
    for name in _categories(data, category):
        real = load_category(data, name, skip_bad=True)
        _, test = paper_split(real.defects)
        test_images = max(test_images, len(real.test_good) + sum(len(v) for v in test.values()))
        generated = max(generated, num_per_type * len(real.defect_types))
        runs += len(methods)
    loc = networks.localization
    return announce(settings(networks), networks.device, test_images=test_images, generated=generated,
                    metrics=[m for m in networks.metrics if m not in networks.skipped], protocol=loc.protocol,
                    eval_every=loc.eval_every, runs=runs, say=say, warn=warn)


def protocol_line(reports: dict[str, dict[str, dict[str, Any]]]) -> str:
    """How the downstream models were trained (all reports share it), next to the papers' settings."""
    report = next((r for by_method in reports.values() for r in by_method.values()), {})
    loc, cls = report.get("localization", {}).get("config"), report.get("classification", {}).get("config")
    parts = []
    if loc:
        parts.append(f"U-Net: {loc['epochs']} epochs × {loc['samples_per_epoch']} samples, {loc['resolution']} px, "
                     f"base {loc['base']}, batch {loc['batch_size']} (papers: 200 × 500, 256 px, base 64).")
    if cls:
        parts.append(f"ResNet-34: {cls['epochs']} epochs, {cls['resolution']} px, {report['classification']['weights']} "
                     f"(papers: 30 epochs, 256 px, ImageNet weights).")
    return " ".join(parts)


BASELINES = {
    "good": "baseline: good images only",
    "real": "baseline: real training defects (augmented)",
}
BASELINE_ABOUT = ("Baselines: the same U-Net, same settings and seed, trained without generated data: on the good "
                  "images only (every training mask empty, as unsupervised training sees the data), and on the real "
                  "few-shot training defects the generators learned from, each in its 8 rotations and flips (our "
                  "choice of augmentation) - does generated data help over what you already have?")


def dihedral(examples: Sequence[DefectExample]) -> list[DefectExample]:
    """Each example in its 8 rotations by 90 degrees and flips, the mask with its image."""
    out = []
    for example in examples:
        for flip in (False, True):
            image, mask = (example.image[:, ::-1], example.mask[:, ::-1]) if flip else (example.image, example.mask)
            out += [DefectExample(np.ascontiguousarray(np.rot90(image, k)), np.ascontiguousarray(np.rot90(mask, k)),
                                  example.defect_type) for k in range(4)]
    return out


def run_baselines(generated: Path, data: Path, category: str, networks, skip_bad: bool, seed: int) -> dict[str, Any]:
    """The localisation protocol's U-Net trained on good images only (empty masks) and on the real
    training defects (``dihedral``), tested on the same real test split as the methods."""
    inputs = load_evaluation_data(generated, data, category, skip_bad=skip_bad)
    empty = [DefectExample(image, np.zeros(image.shape[:2], bool), "good") for image in inputs.train_good]
    real = {t: dihedral(v) for t, v in inputs.train_defects.items() if v}
    return {key: run_localization(replace(inputs, generated=training), networks.localization, networks.device)
            for key, training in (("good", {"good": empty}), ("real", real))}


def first_samples(folder: Path, per_type: int = 2) -> list[np.ndarray]:
    """Mask overlays of the first ``per_type`` samples of each defect type in a merged method folder."""
    from anomalygen.data import load_image

    tiles = []
    for type_folder in sorted((folder / "test").iterdir()) if (folder / "test").is_dir() else []:
        for image_path in sorted(type_folder.glob("*.png"))[:per_type]:
            mask_path = folder / "ground_truth" / type_folder.name / f"{image_path.stem}_mask.png"
            if mask_path.is_file():
                image, mask = load_image(image_path), load_image(mask_path)[..., 0] > 127
                tiles.append(overlay(image, mask))
    return tiles


def write_comparison(out: Path, reports: dict[str, dict[str, dict[str, Any]]], methods: list[str],
                     header: str, baselines: dict[str, dict[str, Any]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """``OUT/comparison.md`` and ``.html``: the setup, the reports' notes, then the tables; the page
    also shows PR curves (one per method and baseline), samples and links to each method's report."""
    baselines = baselines or {}
    tables = {title: rows for title, rows in comparison_tables(reports, methods, baselines).items()
              if any(value != "—" for row in rows for key, value in row.items() if key not in ("category", "defect type"))}
    header = f"{header} {protocol_line(reports)}".strip()
    notes = sorted({note for by_method in reports.values() for report in by_method.values() for note in report["notes"]})
    notes += same_figures(reports)
    if baselines:
        notes.append(BASELINE_ABOUT)
    atomic_write_text(out / "comparison.md", f"# anomalygen benchmark\n\n{header}\n\n" + "".join(f"- {n}\n" for n in notes)
                      + "\n" + "\n\n".join(f"## {title}\n\n{markdown_table(rows)}" for title, rows in tables.items()) + "\n")
    links = [(f"{method} on {name}: full report (samples, per-type tables, confusion matrix)",
              out / method / name / "report.html") for name, by_method in reports.items() for method in by_method]
    sections = [Section("Setup", header), Section("Notes", items=notes), Section("Reports per method", items=links)]
    for name, by_method in reports.items():
        images = []
        for level in ("pixel", "image"):
            curves, ap = {}, {}
            for label, loc in [*((m, r.get("localization", {})) for m, r in by_method.items()),
                               *((BASELINES[k], v) for k, v in baselines.get(name, {}).items())]:
                if level in loc.get("pr_curves", {}):
                    curves[label], ap[label] = loc["pr_curves"][level], loc["history"][-1].get(f"{level}_ap")
            if curves:
                images.append((f"{name}: {level} level, last epoch", figures.pr_curves(curves, ap, f"{name}: {level}-level PR")))
        samples = [(f"{method}: first samples of each type (mask overlay)", grid([first_samples(out / method / name)], cell=96))
                   for method in by_method if first_samples(out / method / name)]
        sections.append(Section(f"{name}: precision-recall and samples", images=images + samples))
    sections += [Section(title, table=rows) for title, rows in tables.items()]
    write_html(out / "comparison.html", "anomalygen benchmark", sections)
    return tables


def same_figures(reports: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """A note per category where every method has the same last-epoch image-level figures."""
    notes = []
    for name, by_method in reports.items():
        figures_of = {m: tuple(r.get("localization", {}).get("clean", {}).get(k) for k in ("image_auroc", "image_ap"))
                      for m, r in by_method.items()}
        if len(figures_of) > 1 and len(set(figures_of.values())) == 1 and None not in next(iter(figures_of.values())):
            notes.append(f"{name}: every method has the same image-level figures: the U-Net (at these settings) does "
                         "not tell their data apart at image level; compare pixel-level figures, or train longer "
                         "(the paper preset)")
    return notes


# The localisation protocols as comparison rows: report key -> row label, and what each label means.
PROTOCOL_ROWS = {"clean": "clean", "paper": "paper", "paper_per_metric": "paper, per metric"}
PROTOCOL_ABOUT = {
    "clean": "last epoch",
    "paper": f"every metric at the epoch with the best {' + '.join(SELECT_SUM)} on the test set, as the official "
             "script (row epoch)",
    "paper, per metric": "each metric at its own best test epoch",
}


def _value(section: dict[str, Any], *keys: str) -> Any:
    """``section[k1][k2]...``; "skipped" where the metric was skipped, "undefined" where it has no
    value (see the notes for both), "—" if absent."""
    for key in keys:
        if isinstance(section, dict) and "skipped" in section:
            return "skipped"
        if not isinstance(section, dict) or key not in section:
            return "—"
        section = section[key]
    return "undefined" if section is None else section


def comparison_tables(reports: dict[str, dict[str, dict[str, Any]]], methods: list[str],
                      baselines: dict[str, dict[str, Any]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """The papers' layout: rows = category / defect type (+ mean), columns = methods; localisation:
    one row per category, method (and baseline) and protocol, columns = metrics."""
    baselines = baselines or {}
    quality, classification, localization, draem, validity = [], [], [], [], []
    for name, by_method in reports.items():
        for t in sorted({t for report in by_method.values() for t in report.get("validity", {})}, key=lambda t: (t == "all", t)):
            validity.append({"category": name, "defect type": t, **{m: _rates(by_method[m].get("validity", {}).get(t)) for m in methods}})
        baseline = next((r["draem_augmentation"]["draem"] for r in by_method.values() if "draem" in r.get("draem_augmentation", {})), {})
        for key in LOCALIZATION_KEYS if any("draem_augmentation" in r for r in by_method.values()) else []:
            draem.append({"category": name, "metric": key, "DRAEM alone": _value(baseline, key),
                          **{m: _value(by_method[m], "draem_augmentation", "augmented", key) for m in methods}})
        types = sorted({t for report in by_method.values() for t in report["generated_counts"]})
        for t in [*types, "mean"]:
            label = {"category": name, "defect type": t}
            if t == "mean":
                quality.append({**label, **{f"{m} IS": _value(by_method[m], "inception_score", "mean") for m in methods},
                                **{f"{m} IC-LPIPS": _value(by_method[m], "ic_lpips", "mean") for m in methods}})
                classification.append({**label, **{m: _value(by_method[m], "classification", "accuracy") for m in methods}})
                continue
            quality.append({**label, **{f"{m} IS": _value(by_method[m], "inception_score", "per_type", t) for m in methods},
                            **{f"{m} IC-LPIPS": _value(by_method[m], "ic_lpips", "per_type", t) for m in methods}})
            classification.append({**label, **{m: _value(by_method[m], "classification", "per_class_accuracy", t) for m in methods}})
        rows_of = [(m, by_method[m].get("localization", {})) for m in methods]
        rows_of += [(BASELINES[k], v) for k, v in (baselines.get(name) or {}).items()]
        for protocol, label in PROTOCOL_ROWS.items():
            for method, loc in rows_of:
                if protocol in loc or "skipped" in loc:
                    localization.append({"category": name, "training data": method, "protocol": label,
                                         "epoch": _value(loc, protocol, "epoch"),
                                         **{key: _value(loc, protocol, key) for key in LOCALIZATION_KEYS}})
    return {
        "Downstream localisation (U-Net; " + "; ".join(f"{label} = {about}" for label, about in PROTOCOL_ABOUT.items()) + ")":
            localization,
        "Downstream classification accuracy (ResNet-34; mean = over all test images)": classification,
        "Generation quality (IS higher = better, IC-LPIPS higher = more diverse)": quality,
        **({"Validity filter (share of samples whose first draw was rejected → share still failing after every draw)":
            validity} if validity else {}),
        **({"DRAEM augmentation (CAGen's protocol: DRAEM trained with a share of its simulated anomalies replaced by "
            "each method's pairs; last epoch)": draem} if draem else {}),
    }


def _rates(entry: dict[str, Any] | None) -> str:
    return "—" if entry is None else f"{entry['rejected_first']:.1%} → {entry['kept_failing']:.1%}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats with 3 decimals."""
    if not rows:
        return "(no rows)"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
