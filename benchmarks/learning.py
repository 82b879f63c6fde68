"""The learning benchmark (issue 13): does each diffusion method learn its defects on a prior trained here?

For each dataset (``--data``, one category folder each): a prior (``anomalygen.pretrain`` with a time
budget, or one given with ``--prior NAME=PATH``) -> every row below, for every seed -> pixel AP and
AU-PRO of the downstream U-Net (identical ``LocalizationConfig`` for all rows, ``clean`` protocol: the
last epoch, no selection on the test set) on the real test two-thirds of the paper split.

Rows: cutpaste, croppaste, draem, and for each diffusion method the method fitted on the training
third and its *untrained control*: the same method and options, zero fitting steps. Every method
refuses ``max_steps=0`` (``Int(.., 1)``), so the control sets ``time_budget_s`` to ``1e-9`` s: the
training loop checks the budget before the first step and stops there, after the method's own
initialisation (e.g. the token embeddings at ``init_word``); the steps each row trained are read back
from its ``loss.csv`` and shown in the table.

Each cell (dataset, seed, row) is one ``anomalygen.benchmark.benchmark`` run (fit once, N pairs per
defect type, evaluate) in ``OUT/cells/<dataset>/seed-<s>/<row>/``; a finished cell leaves
``cell.json`` and a re-run skips it (an interrupted one resumes its fit checkpoints and samples).
Writes ``OUT/learning.md`` + ``learning.json`` (table, command, wall time, machine) and a sample grid
per dataset, one row per method, ``OUT/samples-<dataset>.png``.

    PYTHONPATH=src python benchmarks/learning.py --data ../shared/data/magnetic_tile \
        --data ../shared/data/hazelnut_toy --out runs/learning --seeds 0 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalygen.benchmark import benchmark, markdown_table
from PIL import Image

from anomalygen.data import load_image
from anomalygen.data.images import is_image_file
from anomalygen.errors import AnomalygenError
from anomalygen.evaluation.inputs import resize_image, resize_mask
from anomalygen.evaluation.localization import LocalizationConfig
from anomalygen.io import atomic_write_text, read_json, save_png
from anomalygen.pipeline import build, load_training, parse_settings
from anomalygen.pretrain import PretrainConfig, pretrain
from anomalygen.visualize import grid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cells import CELL_FILE, CONTROL, MODEL_FREE, UNTRAINED, cell_dir, diffusion_options, row_options, rows, run_command  # noqa: E402

DIFFUSION = ("textual-inversion", "anomalydiffusion", "dualanodiff")


def options_of(args: argparse.Namespace, model: str, seed: int) -> Callable[[str], dict[str, Any]]:
    """A diffusion method's options in this benchmark (``cells.diffusion_options`` at ``--resolution``)."""
    return lambda method: diffusion_options(method, args, model, seed, args.resolution)


def trained_steps(work: Path) -> int | None:
    """Steps trained, summed over the ``loss.csv`` files under ``work`` (one per defect type for dualanodiff)."""
    logs = sorted(work.rglob("loss.csv"))
    if not logs:
        return None
    return sum(max(0, sum(1 for _ in csv.reader(log.open())) - 1) for log in logs)


def run_cell(cell: Path, data: Path, row: str, seed: int, options: dict[str, Any], args: argparse.Namespace,
             localization: LocalizationConfig) -> dict[str, Any]:
    """One benchmark run (fit, generate, evaluate) -> its ``cell.json`` record; a finished cell is read back."""
    if (cell / CELL_FILE).is_file():
        return {**read_json(cell / CELL_FILE), "resumed": True}
    method = row.removesuffix(CONTROL)
    if method in DIFFUSION:
        options = {**options, "work_dir": str((cell / "work").resolve())}
    started = time.perf_counter()
    result = benchmark(data, [method], cell, num_per_type=args.num_per_type, seed=seed, metrics=["localization"], skip_bad=args.skip_bad,
                       settings={f"{method}.{k}": v for k, v in options.items()}, device=args.device,
                       localization=localization, max_attempts=args.max_attempts, keep_failing=args.keep_failing,
                       with_baselines=False)  # each cell is one row; the controls are rows of their own
    (report,) = (by_method[method] for by_method in result["reports"].values())
    clean = report["localization"]["clean"]
    record = {"row": row, "method": method, "seed": seed, "pixel_ap": clean["pixel_ap"], "pixel_au_pro": clean["pixel_au_pro"],
              "steps": trained_steps(cell / "work") if method in DIFFUSION else None,
              "wall_s": round(time.perf_counter() - started, 1), "generated": report["generated_counts"],
              "test_defects": report["real_split"]["test_defects"], "options": options}
    atomic_write_text(cell / CELL_FILE, json.dumps(record, indent=2))
    return {**record, "resumed": False}


def resized_copy(data: Path, size: int, target: Path) -> Path:
    """``data`` copied once into ``target`` with every image area-resampled and every mask
    nearest-resampled to ``size``×``size`` (the evaluation's own resizers), names and layout kept;
    grayscale images stay one-channel files."""
    if (target / ".complete").is_file():
        return target
    for path in sorted(p for p in data.rglob("*") if is_image_file(p)):
        rel = path.relative_to(data)
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.parts[0] == "ground_truth":
            levels = np.asarray(Image.open(path).convert("L"))
            Image.fromarray(resize_mask(levels > (127 if levels.max() > 1 else 0), size).astype(np.uint8) * 255).save(target / rel)
        else:
            image = resize_image(load_image(path), size)
            gray = (image == image[..., :1]).all()
            Image.fromarray(image[..., 0] if gray else image).save(target / rel)
    atomic_write_text(target / ".complete", f"{data.resolve()} at {size} px\n")
    return target


def prior_for(name: str, data: Path, args: argparse.Namespace) -> str:
    """``tiny``, the ``--prior`` folder given for this dataset, or one pretrained into ``OUT/priors/<name>``
    (once: ``OUT/priors/<name>.json`` marks it finished)."""
    if args.model:
        return args.model
    if name in args.priors:
        return str(args.priors[name])
    out, done = args.out / "priors" / name, args.out / "priors" / f"{name}.json"
    if not done.is_file():
        config = PretrainConfig(resolution=args.resolution, size=args.prior_size, time_budget_s=args.prior_minutes * 60,
                                device=args.device, batch_size=8, include_defects=args.prior_defects)
        report = pretrain([data], out, config, say=lambda line: print(f"[pretrain {name}] {line}", flush=True))
        atomic_write_text(done, json.dumps(report, indent=2, default=str))
    return str(out.resolve())


def _spread(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def _delta(values: list[float]) -> str:
    if not values:
        return "—"
    text = f"{statistics.fmean(values):+.3f}"
    return text if len(values) == 1 else f"{text} ({', '.join(f'{v:+.3f}' for v in values)})"


def tables(records: list[dict[str, Any]], names: list[str], row_names: list[str], seeds: list[int]) -> dict[str, list[dict]]:
    """Results (mean over seeds, per-seed values in brackets) and trained − untrained per seed."""
    cells = {(r["dataset"], r["row"], r["seed"]): r for r in records}

    def values(name: str, row: str, key: str) -> list[float]:
        return [cells[name, row, s][key] for s in seeds if (name, row, s) in cells and cells[name, row, s][key] is not None]

    results = []
    for row in row_names:
        steps = sorted({cells[n, row, s]["steps"] for n in names for s in seeds if (n, row, s) in cells} - {None})
        line = {"row": row, "steps trained": ", ".join(map(str, steps)) or "—"}
        for name in names:
            line[f"{name} pixel AP"] = _spread(values(name, row, "pixel_ap"))
            line[f"{name} AU-PRO"] = _spread(values(name, row, "pixel_au_pro"))
        results.append(line)
    deltas = []
    for row in row_names:
        if row.endswith(CONTROL) or row in MODEL_FREE:
            continue
        line = {"method": row}
        for name in names:
            for other, label in ((row + CONTROL, "− untrained"), ("croppaste", "− croppaste")):
                paired = [cells[name, row, s]["pixel_ap"] - cells[name, other, s]["pixel_ap"]
                          for s in seeds if (name, row, s) in cells and (name, other, s) in cells]
                line[f"{name} {label}"] = _delta(paired)
        deltas.append(line)
    return {"results": results, "deltas": deltas}


def sample_grid(data: Path, cells: dict[str, Path], out: Path) -> None:
    """A real training defect, then each row's first sample, of every defect type: image and mask."""
    category, defects, _ = load_training(data, skip_bad=True)
    types = list(category.defect_types)
    real = [next(((d.image, d.mask) for d in defects if d.defect_type == t), (None, None)) for t in types]
    lines, labels = [[x for pair in real for x in pair]], ["real (train)"]
    for row, cell in cells.items():
        folder = cell / row.removesuffix(CONTROL) / category.name
        line = []
        for t in types:
            first = min((folder / "test" / t).glob("*.png"), default=None)
            line += [None, None] if first is None else [
                load_image(first), load_image(folder / "ground_truth" / t / f"{first.stem}_mask.png")[..., 0] > 127]
        lines.append(line)
        labels.append(row)
    save_png(out, grid(lines, [x for t in types for x in (t, "mask")], row_labels=labels, cell=96))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, action="append", required=True, help="a category folder (repeat for more)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--prior", action="append", default=[], metavar="NAME=PATH", help="an existing prior for dataset NAME")
    p.add_argument("--model", help="use this model for every dataset instead of a prior (e.g. tiny, for tests)")
    p.add_argument("--prior-minutes", type=float, default=10.0, help="pretrain time budget per dataset")
    p.add_argument("--prior-size", default="small")
    p.add_argument("--prior-defects", action="store_true",
                   help="pretrain the priors on the training third's defect images too (pretrain --include-defects; "
                        "never the test two-thirds)")
    p.add_argument("--methods", default=",".join(MODEL_FREE + DIFFUSION))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--num-per-type", type=int, default=16, help="generated pairs per defect type")
    p.add_argument("--resolution", type=int, default=64, help="diffusion, prior and U-Net resolution")
    p.add_argument("--steps", type=int, default=200, help="fitting steps of each diffusion method (per type: dualanodiff)")
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=10, help="U-Net epochs")
    p.add_argument("--samples-per-epoch", type=int, default=100)
    p.add_argument("--unet-base", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resize", type=int, help="first copy each dataset with images and masks resized to this square size "
                   "(textual-inversion and anomalydiffusion cannot fit on mixed-size images: magnetic_tile's); "
                   "masks are nearest-resampled, so a thin one can become empty (see --skip-bad)")
    p.add_argument("--max-attempts", type=int, default=5, help="the validity filter's cap: draws per valid pair")
    p.add_argument("--keep-failing", action="store_true", help="keep a sample that fails every one of its --max-attempts "
                   "draws (flagged in the manifest) instead of drawing until it passes")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad real files (e.g. an empty mask) instead of stopping")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="METHOD.KEY=VALUE")
    args = p.parse_args(argv)
    args.settings = parse_settings(args.settings)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(MODEL_FREE + DIFFUSION))
    if unknown or not args.methods:
        raise AnomalygenError(f"--methods: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(MODEL_FREE + DIFFUSION)}")
    names = [d.name for d in args.data]
    if len(set(names)) != len(names):
        raise AnomalygenError(f"--data: two datasets named alike ({', '.join(names)})")
    for d in args.data:
        if not d.is_dir():
            raise AnomalygenError(f"--data {d}: folder not found")
    args.priors = {}
    for pair in args.prior:
        name, sep, path = pair.partition("=")
        if not sep or name not in names:
            raise AnomalygenError(f"--prior {pair!r}: expected NAME=PATH with NAME one of {', '.join(names)}")
        if not (Path(path) / "model_index.json").is_file():
            raise AnomalygenError(f"--prior {pair!r}: {path} holds no model_index.json (not a prior folder)")
        args.priors[name] = Path(path).resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    localization = LocalizationConfig(epochs=args.epochs, samples_per_epoch=args.samples_per_epoch, resolution=args.resolution,
                                      base=args.unet_base, batch_size=8, protocol="clean")
    row_names = rows(args.methods, DIFFUSION)
    for row in row_names:  # every option checked before any training
        build(row.removesuffix(CONTROL), row_options(row, options_of(args, args.model or "tiny", args.seeds[0])))
    names = [d.name for d in args.data]
    records, failures, priors = [], [], {}
    for given in args.data:
        data = resized_copy(given, args.resize, args.out / "data" / given.name) if args.resize else given
        priors[data.name] = prior_for(data.name, data, args)
        for seed in args.seeds:
            for row in row_names:
                cell = cell_dir(args.out, data.name, seed, row)
                try:
                    record = run_cell(cell, data, row, seed, row_options(row, options_of(args, priors[data.name], seed)), args,
                                      replace(localization, seed=seed))
                except Exception as error:  # one line here, the traceback in the cell's error.txt; the next cell runs
                    cell.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(cell / "error.txt", traceback.format_exc())
                    failures.append(f"{data.name} seed {seed} {row}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                    print(f"FAILED {failures[-1]}", file=sys.stderr, flush=True)
                    continue
                records.append({**record, "dataset": data.name})
                done = "resumed" if record["resumed"] else f"{record['wall_s']:.0f} s"
                print(f"{data.name} seed {seed} {row}: pixel AP {record['pixel_ap']:.3f}, AU-PRO {record['pixel_au_pro']:.3f} ({done})",
                      flush=True)
        finished = {row: cell_dir(args.out, data.name, args.seeds[0], row) for row in row_names}
        sample_grid(data, {r: c for r, c in finished.items() if (c / CELL_FILE).is_file()}, args.out / f"samples-{data.name}.png")
    write_results(args, names, row_names, records, failures, priors, localization, time.perf_counter() - started)
    return 1 if failures else 0


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} on {torch.get_num_threads()} thread(s)"


def write_results(args, names, row_names, records, failures, priors, localization, wall_s) -> None:
    """``OUT/learning.md`` and ``learning.json``: the setup, the results and the paired differences."""
    command = "PYTHONPATH=src python " + " ".join([sys.argv[0] if sys.argv[0].endswith(".py") else "benchmarks/learning.py",
                                                   *(sys.argv[1:] if sys.argv[0].endswith(".py") else [])])
    table = tables(records, names, row_names, args.seeds)
    compute_s = sum(r["wall_s"] for r in records)
    setup = {
        "command": command, "machine": machine(), "wall_s_this_run": round(wall_s), "cells_compute_s": round(compute_s),
        "priors": priors, "prior_defects": args.prior_defects, "seeds": args.seeds, "num_per_type": args.num_per_type,
        "localization": {k: getattr(localization, k) for k in ("epochs", "samples_per_epoch", "resolution", "base", "batch_size", "protocol")},
        "diffusion_options": {m: options_of(args, "PRIOR", 0)(m) for m in DIFFUSION if m in args.methods},
        "untrained_control": UNTRAINED,
    }
    atomic_write_text(args.out / "learning.json", json.dumps({**setup, "tables": table, "cells": records, "failures": failures},
                                                             indent=2, default=str))
    loc = setup["localization"]
    text = [
        "# Learning benchmark (issue 13)", "",
        f"Command: `{command}`", "",
        f"Machine: {setup['machine']}. Wall time: this run {wall_s / 60:.1f} min; all cells (fit + generate + evaluate, "
        f"summed over runs) {compute_s / 60:.1f} min; priors not included.", "",
        f"Priors: {', '.join(f'{n}: {p}' for n, p in priors.items())}"
        f"{' (trained here on good images and the training third defect images)' if args.prior_defects else ''}. Seeds {args.seeds} (method, sampling and U-Net seed); "
        f"{args.num_per_type} generated pairs per defect type; U-Net {loc['epochs']} epochs × {loc['samples_per_epoch']} samples, "
        f"{loc['resolution']} px, base {loc['base']}, batch {loc['batch_size']}, last epoch (clean protocol); "
        f"pixel AP and AU-PRO on the real test two-thirds. Cells: mean over seeds (per-seed values). "
        f"Untrained control: same options, time_budget_s=1e-9 (0 steps).", "",
        markdown_table(table["results"]), "",
        "Pixel AP differences, paired by seed:", "",
        markdown_table(table["deltas"]), "",
        *([f"Failed cells: {len(failures)}", *[f"- {f}" for f in failures], ""] if failures else []),
    ]
    atomic_write_text(args.out / "learning.md", "\n".join(text))
    print(f"wrote {args.out / 'learning.md'}")


if __name__ == "__main__":
    run_command(main)
