"""Proof of learning in a procedural defect world (issue 31): do the diffusion methods learn a defect
family that their prior knows from other categories, measured against the world's ground truth?

Stages, each resumable (a finished one leaves its file and is skipped on a re-run):

1. The world (``data.world``): ``OUT/world/prior/`` holds every category's good images and, for every
   (category, family) pair except the held-out ones, ``3 x --prior-defects`` defect images (``pretrain
   --include-defects`` trains on the paper split's first third); ``OUT/world/pairs/<category>-<family>/``
   holds each held-out pair's own category folder (other seeds: not one image is shared with the prior).
2. The judges (``world_judges.py``): a family classifier, a defect segmenter and a category classifier,
   trained on fresh renders of every pair.
3. The prior: ``anomalygen.pretrain`` on ``OUT/world/prior`` with ``include_defects`` (prompts "a photo
   of {category}" and "a photo of {category} with {family}"; the autoencoder's loss weighs the defect
   pixels by ``--prior-defect-weight``, the UNet's by ``--prior-unet-defect-weight``): the autoencoder
   (``--prior-vae-steps``),
   then the gate: the family classifier on real defects of every seen pair and on their
   reconstructions (``prior-autoencoder.json``; below ``--min-kept`` the run stops: nothing built on
   an autoencoder that loses the families can draw them), then the UNet (``--prior-steps``; steps,
   not minutes, so that the prior does not depend on the machine's load). Then a grid of its samples
   for every prompt, seen and held-out (``prior-samples.png``), judged like the methods' samples, and a
   second family classifier trained on the judges' renders through this prior's autoencoder
   (``prior_judge``, ``judges-prior.json``): the family a region shows as this prior can draw it (its
   autoencoder turns a pill's wine-red stain dark maroon, which the renderer's judge calls crack or hole).
4. The cells: for each held-out pair, seed and row (CutPaste, Crop-Paste, DRAEM; each diffusion method
   fitted on the pair's training third, and its untrained control: the same options with
   ``time_budget_s=1e-9``, i.e. 0 steps), one ``anomalygen.benchmark`` run (fit, ``--num-per-type``
   samples, the downstream U-Net's pixel AP / AU-PRO on the pair's real test two-thirds, the same
   ``LocalizationConfig`` for every row), then the judges on every generated sample: family accuracy
   (the classifier on the mask's crop; and as the prior draws, by the second one), alignment (IoU of the segmenter's pixels with the mask),
   outside the mask (mean |generated - source good image| there, and the share of samples the category
   classifier gives the pair's category), and for diffusion rows the denoising loss of the fitted
   state on the held-out two-thirds (``heldout_loss``, reported only). ``--jobs N`` runs the cells
   in N processes (1 thread each).
5. ``OUT/world_learning.md`` / ``.json`` (tables, command, wall time, machine), ``world_learning.png``
   (per metric and row: mean and per-seed points, every pair), ``samples-<pair>.png``.

    PYTHONPATH=src python benchmarks/world_learning.py --out runs/world --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world_judges  # noqa: E402
from cells import CELL_FILE, CONTROL, MODEL_FREE, UNTRAINED, diffusion_options, row_options, rows, run_command  # noqa: E402
from cells import cell_dir as named_cell_dir  # noqa: E402

from anomalygen.benchmark import benchmark, markdown_table  # noqa: E402
from anomalygen.data import load_category, load_defects, load_goods, load_image, paper_split  # noqa: E402
from anomalygen.data.world import CATEGORIES, FAMILIES, make_world, render_defect  # noqa: E402
from anomalygen.diffusion.sampling import decode_latents, encode_images, latent_mask, paste, to_tensor, to_uint8  # noqa: E402
from anomalygen.errors import AnomalygenError  # noqa: E402
from anomalygen.evaluation.localization import LocalizationConfig  # noqa: E402
from anomalygen.io import atomic_write_text, folder_lock, read_json, read_manifest, save_png  # noqa: E402
from anomalygen.pipeline import build, parse_settings  # noqa: E402
from anomalygen.visualize import grid  # noqa: E402

DIFFUSION = ("textual-inversion", "anomalydiffusion", "dualanodiff", "cagen", "anomalyxfusion")
# a Latin diagonal: each category and each family held out once, each family seen in the 3 other categories
HELD_OUT = ("wood:scratch", "nut:crack", "pill:stain", "fabric:hole")
METRICS = {"family_accuracy": "family accuracy", "family_accuracy_prior": "family acc. (as the prior draws)",
           "alignment_iou": "alignment IoU", "outside_change": "outside change",
           "category_kept": "category kept", "pixel_ap": "pixel AP", "pixel_au_pro": "AU-PRO",
           "heldout_loss": "held-out loss"}


def options_of(args: argparse.Namespace, model: str, seed: int) -> Callable[[str], dict[str, Any]]:
    """A diffusion method's options in this benchmark (``cells.diffusion_options`` at ``--size``); AnomalyXFusion
    gets an untrained CLIP image encoder at the prior's width (CLIP ViT-L/14 in the paper)."""
    def options(method: str) -> dict[str, Any]:
        extra = {"image_encoder": "tiny" if model == "tiny" else str((args.out / "image_encoder").resolve())} \
            if method == "anomalyxfusion" else {}
        return diffusion_options(method, args, model, seed, args.size, **extra)
    return options


def pair_name(pair: tuple[str, str]) -> str:
    return f"{pair[0]}-{pair[1]}"


def pair_data(out: Path, pair: tuple[str, str]) -> Path:
    return out / "world" / "pairs" / pair_name(pair) / pair[0]


def cell_dir(out: Path, pair: tuple[str, str], seed: int, row: str) -> Path:
    return named_cell_dir(out, pair_name(pair), seed, row)


# ----------------------------------------------------------------------------- stages 1-3


def build_world(args: argparse.Namespace) -> None:
    """The prior's world and each held-out pair's folder, and ``OUT/world.png``: two renders of every pair."""
    lines = []
    for c, category in enumerate(CATEGORIES):
        renders = [render_defect(category, family, np.random.default_rng([3, c, f, k]), args.size)
                   for f, family in enumerate(FAMILIES) for k in range(2)]
        lines.append([x for _, image, mask in renders for x in (image, mask)])
    labels = [c + "".join(f" (held out: {f})" for f in FAMILIES if (c, f) in args.pairs) for c in CATEGORIES]
    save_png(args.out / "world.png", grid(lines, [x for f in FAMILIES for k in (1, 2) for x in (f"{f} {k}", "mask")], row_labels=labels, cell=80))
    seen = [(c, f) for c in CATEGORIES for f in FAMILIES if (c, f) not in args.pairs]
    make_world(args.out / "world" / "prior", seen, size=args.size, n_good=args.prior_good, n_test_good=0,
               n_defect=3 * args.prior_defects, seed=1, categories=CATEGORIES)
    for pair in args.pairs:
        make_world(pair_data(args.out, pair).parent, [pair], size=args.size, n_good=args.pair_good, n_test_good=args.pair_test_good,
                   n_defect=args.pair_defects, seed=2)


def prior_path(args: argparse.Namespace, judges: world_judges.Judges | None = None) -> str:
    """``--model``, ``--prior``, or ``OUT/prior`` pretrained here once (``OUT/prior.json`` marks it finished):
    the autoencoder first, by steps, then the gate (``autoencoder_gate``), then the UNet."""
    if args.model:
        return args.model
    if args.prior:
        return str(args.prior)
    out, done = args.out / "prior", args.out / "prior.json"
    if not done.is_file():
        from anomalygen.pretrain import PretrainConfig, pretrain

        def config(**stage: Any) -> PretrainConfig:
            return PretrainConfig(resolution=args.size, size=args.prior_size, device=args.device, vae_steps=args.prior_vae_steps,
                                  batch_size=args.prior_batch, include_defects=True, sample_every=10**6,
                                  vae_defect_weight=args.prior_defect_weight, unet_defect_weight=args.prior_unet_defect_weight, **stage)

        def say(line: str) -> None:
            print(f"[pretrain] {line}", flush=True)

        pretrain([args.out / "world" / "prior"], out, config(max_steps=0), say=say)  # steps, not time: load-independent
        autoencoder_gate(args, out, judges or judges_for(args)[0])
        budget = args.prior_minutes * 60 if args.prior_minutes else None
        report = pretrain([args.out / "world" / "prior"], out, config(max_steps=args.prior_steps, time_budget_s=budget), say=say)
        atomic_write_text(done, json.dumps(report, indent=2, default=str))
    return str(out.resolve())


def autoencoder_gate(args: argparse.Namespace, prior: Path, judges: world_judges.Judges) -> dict[str, Any]:
    """Does the prior's autoencoder keep the families? The family classifier on real defect images of every
    seen pair and on their reconstructions (``OUT/prior-autoencoder.json``). Nothing built on an autoencoder
    that loses a family can draw it (a 470-step one turned red stains into blue spots, holes into the
    background: 0 of 60 kept), so the UNet is not trained on one that keeps fewer than ``--min-kept``."""
    from diffusers import AutoencoderKL

    from anomalygen.diffusion.sampling import to_tensor, to_uint8

    vae = AutoencoderKL.from_pretrained(prior / "training" / "vae_final").eval()
    kept: dict[str, list[int]] = {}
    for category in CATEGORIES:
        data = load_category(args.out / "world" / "prior" / category)
        for family in FAMILIES:
            if (category, family) in args.pairs:
                continue
            defects = load_defects(data.defects.get(family, [])[: args.gate_images])
            images, masks = [d.image for d in defects], [d.mask.astype(bool) for d in defects]
            with torch.no_grad():
                decoded = vae.decode(vae.encode(to_tensor(images) * 2 - 1).latent_dist.mode()).sample
            rebuilt = to_uint8((decoded + 1) / 2)
            real, again = judges.families(images, masks), judges.families(rebuilt, masks)
            counts = kept.setdefault(family, [0, 0, 0])
            counts[0] += sum(v == family for v in real)
            counts[1] += sum(v == family for v in again)
            counts[2] += len(images)
    share = sum(c[1] for c in kept.values()) / max(1, sum(c[0] for c in kept.values()))
    result = {"families": {f: {"real": c[0], "reconstructed": c[1], "images": c[2]} for f, c in kept.items()},
              "kept": share, "min_kept": args.min_kept}
    atomic_write_text(args.out / "prior-autoencoder.json", json.dumps(result, indent=2))
    print("[prior] autoencoder keeps the family in " + ", ".join(f"{f} {c[1]}/{c[0]}" for f, c in kept.items())
          + f" of the real defects the classifier recognises ({share:.0%})", flush=True)
    if share < args.min_kept:
        raise AnomalygenError(f"the prior's autoencoder keeps {share:.0%} of the families (--min-kept {args.min_kept:.0%}): "
                              f"train it longer with a larger --prior-vae-steps (a new --out)")
    return result


def write_image_encoder(model: str, args: argparse.Namespace) -> None:
    """``OUT/image_encoder``: the tiny CLIP image encoder's shape, randomly initialised, projecting to the
    prior's cross-attention width (AnomalyXFusion's image branch; no CLIP weights here)."""
    target = args.out / "image_encoder"
    if model == "tiny" or (target / "config.json").is_file():
        return
    from anomalygen.diffusion.image_encoder import build_image_encoder
    from anomalygen.diffusion.tiny import tiny_image_encoder_config

    width = read_json(Path(model) / "unet" / "config.json")["cross_attention_dim"]
    build_image_encoder({**tiny_image_encoder_config(), "projection_dim": width}).save_pretrained(target)


def judges_for(args: argparse.Namespace) -> tuple[world_judges.Judges, dict[str, Any]]:
    from safetensors.torch import load_file, save_file

    weights, report = args.out / "judges.safetensors", args.out / "judges.json"
    if not report.is_file():
        judges, accuracy = world_judges.train_judges(args.size, args.judge_renders, args.judge_steps)
        save_file({k: v.contiguous() for k, v in judges.state().items()}, str(weights))
        atomic_write_text(report, json.dumps(accuracy, indent=2))
    return world_judges.build_judges().load(load_file(str(weights))), read_json(report)


def autoencoded(backbone, goods: list[np.ndarray], defects: list[np.ndarray], masks: list[np.ndarray], size: int,
                latent_paste: bool = False) -> list[np.ndarray]:
    """The defect images through the prior's autoencoder (``latent_paste``: their latents inside the latent
    mask only, the good images' outside), decoded and pasted on the good images outside the pixel masks."""
    with torch.no_grad():
        latents = encode_images(backbone, to_tensor(defects, (size, size)))
        if latent_paste:
            known = encode_images(backbone, to_tensor(goods, (size, size)))
            mask = latent_mask(torch.from_numpy(np.stack(masks))[:, None], tuple(latents.shape[-2:])).to(latents.device)
            latents = mask * latents + (1 - mask) * known
        images = to_uint8(decode_latents(backbone, latents))
    return [paste(image, good, mask) for image, good, mask in zip(images, goods, masks)]


def prior_judge(args: argparse.Namespace, model: str, judges: world_judges.Judges) -> dict[str, Any]:
    """``judges.prior_family``: the family classifier trained on renders through the prior's autoencoder
    (``world_judges.train_prior_family``; each render's defect and its good image inside the mask),
    trained once into ``OUT/judges-prior.safetensors`` / ``.json``; returns its report."""
    from safetensors.torch import load_file, save_file

    weights, report = args.out / "judges-prior.safetensors", args.out / "judges-prior.json"
    if not report.is_file():
        from anomalygen.diffusion.backbone import load_backbone

        backbone = load_backbone(model)

        def through(bank: world_judges.Bank) -> world_judges.Bank:
            goods, masks = list(bank.goods), list(bank.masks)
            return replace(bank, images=np.stack(autoencoded(backbone, goods, list(bank.images), masks, args.size)),
                           goods=np.stack(autoencoded(backbone, goods, goods, masks, args.size)))

        classifier, accuracy = world_judges.train_prior_family(through, args.size, args.judge_renders, args.judge_steps)
        save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(weights))
        atomic_write_text(report, json.dumps({**accuracy, "prior": model}, indent=2))
    judges.prior_family = world_judges.Classifier(len(world_judges.CLASSES))
    judges.prior_family.load_state_dict(load_file(str(weights)))
    judges.prior_family.eval()
    return read_json(report)


def judge(judges: world_judges.Judges, images: list[np.ndarray], masks: list[np.ndarray], family: str, category: str,
          sources: list[np.ndarray | None]) -> dict[str, Any]:
    """The judges' metrics of image/mask pairs of a (category, family) pair (see the module docstring)."""
    if not images:
        return {}
    as_drawn = {}
    if judges.prior_family is not None:
        seen = judges.families(images, masks, prior=True)
        as_drawn = {"family_accuracy_prior": float(np.mean([v == family for v in seen])),
                    "verdicts_prior": {c: seen.count(c) for c in world_judges.CLASSES if seen.count(c)}}
    marked = judges.segment(images)
    changes = [float(np.abs(im.astype(np.float32) - s.astype(np.float32))[~m].mean() / 255) for im, m, s in zip(images, masks, sources)
               if s is not None and s.shape == im.shape and (~m).any()]
    verdicts = judges.families(images, masks)
    return {"family_accuracy": float(np.mean([v == family for v in verdicts])),
            "verdicts": {c: verdicts.count(c) for c in world_judges.CLASSES if verdicts.count(c)},
            "alignment_iou": float(np.mean([world_judges.iou(p, m) for p, m in zip(marked, masks)])),
            "outside_change": float(np.mean(changes)) if changes else None,
            "category_kept": float(np.mean([c == category for c in judges.categories(images)])), "samples": len(images), **as_drawn}


def prior_samples(model: str, args: argparse.Namespace, judges: world_judges.Judges) -> dict[str, Any]:
    """The prior's samples of every prompt (2 each; held-out pairs marked), a grid, and the judges' verdicts:
    for "with {family}" prompts, the family the classifier sees in the segmenter's region."""
    target = args.out / "prior-samples.json"
    if target.is_file():
        return read_json(target)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    lines, labels, verdicts = [], [], {}
    for category in CATEGORIES:
        prompts = [f"a photo of {category}"] + [f"a photo of {category} with {family}" for family in FAMILIES]
        generator = torch.Generator().manual_seed(0)
        images = pipe(prompts * 2, num_inference_steps=25, guidance_scale=3.0, generator=generator, height=args.size,
                      width=args.size, output_type="np").images
        images = list(np.rint(images * 255).astype(np.uint8))
        lines.append(images)
        labels.append(category + "".join(f" (held out: {f})" for f in FAMILIES if (category, f) in args.pairs))
        masks = list(judges.segment(images))
        found = judges.families(images, masks)
        for k, family in enumerate(FAMILIES):
            verdicts[f"{category}:{family}"] = {"held_out": (category, family) in args.pairs, "seen_as": [found[1 + k], found[6 + k]],
                                                "marked_share": [float(masks[1 + k].mean()), float(masks[6 + k].mean())]}
    columns = ["good", *FAMILIES]
    save_png(args.out / "prior-samples.png", grid(lines, [*columns, *(c + " (2)" for c in columns)], row_labels=labels, cell=96))
    seen = [v for v in verdicts.values() if not v["held_out"]]
    result = {"pairs": verdicts, "seen_family_accuracy": float(np.mean([s == k.split(":")[1] for k, v in verdicts.items()
                                                                       if not v["held_out"] for s in v["seen_as"]])) if seen else None}
    atomic_write_text(target, json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- stage 4


class _LossDone(Exception):
    def __init__(self, loss: float):
        self.loss = loss


def heldout_loss(method: str, options: dict[str, Any], trained_work: Path, data: Path, batches: int, seed: int) -> float | None:
    """The method's own training loss on the pair's held-out two-thirds, in the state of ``trained_work``'s
    last checkpoint: the method is fitted on those images with ``diffusion.train.train`` replaced by one
    that loads that checkpoint's trainable state, averages ``batches`` losses (no step, generator seeded
    with ``seed``: the same draws for every row) and stops the fit."""
    import anomalygen.diffusion.train as training

    category = load_category(data)
    _, test = paper_split(category.defects)
    defects = load_defects([r for records in test.values() for r in records])
    good = load_goods(category.train_good)
    scratch = Path(tempfile.mkdtemp(prefix="heldout-"))

    def measure(modules, loss_fn, config, out_dir, **_):
        checkpoint = training.latest_checkpoint(trained_work / Path(out_dir).relative_to(scratch))
        if checkpoint is None:
            raise _LossDone(float("nan"))
        training.load_trainable(modules, checkpoint)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            raise _LossDone(float(np.mean([float(loss_fn(modules, 0, generator)) for _ in range(batches)])))

    patched = [m for name, m in list(sys.modules.items()) if name.startswith("anomalygen.methods") and getattr(m, "train", None) is training.train]
    generator = build(method, {**options, "work_dir": str(scratch)})
    for module in patched:
        module.train = measure
    try:
        generator.fit(defects, good)
    except _LossDone as done:
        return None if np.isnan(done.loss) else round(done.loss, 5)
    finally:
        for module in patched:
            module.train = training.train
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return None


def generated(cell: Path, method: str, pair: tuple[str, str]) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray | None]]:
    """A cell's samples: images, masks and source good images (None where the manifest names none)."""
    run = cell / method / "runs" / pair[1] / pair[0]
    images, masks, sources = [], [], []
    for entry in read_manifest(run / "manifest.jsonl"):
        images.append(load_image(run / entry["image"]))
        masks.append(load_image(run / entry["mask"])[..., 0] > 127)
        sources.append(load_image(entry["source"]) if entry.get("source") else None)
    return images, masks, sources


def run_cell(cell: Path, pair: tuple[str, str], row: str, seed: int, options: dict[str, Any], args: argparse.Namespace,
             localization: LocalizationConfig, judges: world_judges.Judges) -> dict[str, Any]:
    if (cell / CELL_FILE).is_file():
        return {**read_json(cell / CELL_FILE), "resumed": True}
    method = row.removesuffix(CONTROL)
    data = pair_data(args.out, pair)
    if method in DIFFUSION:
        options = {**options, "work_dir": str((cell / "work").resolve())}
    started, cpu = time.perf_counter(), time.process_time()
    result = benchmark(data, [method], cell, num_per_type=args.num_per_type, seed=seed, metrics=["localization"],
                       settings={f"{method}.{k}": v for k, v in options.items()}, device=args.device,
                       localization=localization, max_attempts=args.max_attempts, keep_failing=True,
                       with_baselines=False)  # each cell is one row; the controls are rows of their own
    (report,) = (by_method[method] for by_method in result["reports"].values())
    clean = report["localization"]["clean"]
    images, masks, sources = generated(cell, method, pair)
    record = {"pair": pair_name(pair), "row": row, "method": method, "seed": seed, "pixel_ap": clean["pixel_ap"],
              "pixel_au_pro": clean["pixel_au_pro"], **judge(judges, images, masks, pair[1], pair[0], sources)}
    if method in DIFFUSION:
        record["heldout_loss"] = heldout_loss(method, options, cell / "work", data, args.loss_batches, seed)
        record["steps"] = sum(max(0, len((log.read_text().strip().splitlines())) - 1) for log in (cell / "work").rglob("loss.csv"))
    record.update(wall_s=round(time.perf_counter() - started, 1), cpu_s=round(time.process_time() - cpu, 1), options=options)
    atomic_write_text(cell / CELL_FILE, json.dumps(record, indent=2, default=str))
    return {**record, "resumed": False}


def judged_as_drawn(cell: Path, pair: tuple[str, str], row: str, judges: world_judges.Judges) -> dict[str, Any]:
    """A finished cell's record; one run before the prior's family judge existed gets its verdicts now,
    from the samples on disk, written back to its ``cell.json``."""
    record = read_json(cell / CELL_FILE)
    if "family_accuracy_prior" in record or judges.prior_family is None:
        return record
    images, masks, sources = generated(cell, row.removesuffix(CONTROL), pair)
    drawn = judge(judges, images, masks, pair[1], pair[0], sources)
    record.update({k: v for k, v in drawn.items() if k.endswith("_prior")})
    atomic_write_text(cell / CELL_FILE, json.dumps(record, indent=2, default=str))
    return record


def cells(args: argparse.Namespace) -> list[tuple[tuple[str, str], int, str]]:
    return [(pair, seed, row) for pair in args.pairs for seed in args.seeds for row in rows(args.methods, DIFFUSION)]


def run_cells(args: argparse.Namespace, model: str, judges: world_judges.Judges, shard: tuple[int, int]) -> list[str]:
    """Process k of n: every cell no other process holds (each takes the next free one, so that one slow
    method's cells do not pile up in one process); one line per cell with an ETA."""
    localization = LocalizationConfig(epochs=args.epochs, samples_per_epoch=args.samples_per_epoch, resolution=args.size,
                                      base=args.unet_base, batch_size=8, protocol="clean")
    queue = cells(args)
    failures, spent, ran = [], 0.0, 0
    for i, (pair, seed, row) in enumerate(queue):
        cell = cell_dir(args.out, pair, seed, row)
        label = f"{pair_name(pair)} seed {seed} {row}"
        with ExitStack() as held:
            try:
                held.enter_context(folder_lock(cell, "world cell"))
            except AnomalygenError:  # another process runs it
                continue
            try:
                record = run_cell(cell, pair, row, seed, row_options(row, options_of(args, model, seed)), args,
                                  replace(localization, seed=seed), judges)
            except Exception as error:  # one line here, the traceback in the cell's error.txt; the next cell runs
                atomic_write_text(cell / "error.txt", traceback.format_exc())
                failures.append(f"{label}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                print(f"FAILED {failures[-1]}", file=sys.stderr, flush=True)
                continue
        if not record["resumed"]:
            spent, ran = spent + record["wall_s"], ran + 1
        left = sum(not (cell_dir(args.out, *c) / CELL_FILE).is_file() for c in queue[i + 1:]) / shard[1]
        eta = f", ETA {left * spent / ran / 60:.0f} min" if ran else ""
        shown = ", ".join(f"{METRICS[k]} {record[k]:.3f}" for k in METRICS if isinstance(record.get(k), float))
        done = "resumed" if record["resumed"] else f"{record['wall_s']:.0f} s"
        print(f"[{shard[0] + 1}/{shard[1]}] {i + 1}/{len(queue)} {label}: {shown} ({done}{eta})", flush=True)
    return failures


# ----------------------------------------------------------------------------- stage 5


def real_reference(args: argparse.Namespace, judges: world_judges.Judges) -> dict[str, dict[str, Any]]:
    """The judges on each pair's real test two-thirds: the ceiling a generator's samples are held to."""
    out = {}
    for pair in args.pairs:
        _, test = paper_split(load_category(pair_data(args.out, pair)).defects)
        defects = load_defects(test[pair[1]])
        out[pair_name(pair)] = judge(judges, [d.image for d in defects], [d.mask for d in defects], pair[1], pair[0],
                                     [None] * len(defects))
    return out


def _mean(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def tables(records: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Per pair and row: each metric's mean ± standard deviation over seeds; per pair and diffusion
    method: trained − untrained per seed (mean, min, max) for family accuracy and alignment, and whether
    the smallest paired difference beats the larger of the two rows' seed spreads."""
    by = {(r["pair"], r["row"], r["seed"]): r for r in records}

    def values(pair: str, row: str, key: str) -> list[float]:
        return [by[pair, row, s][key] for s in args.seeds if (pair, row, s) in by and isinstance(by[pair, row, s].get(key), float)]

    results, deltas = [], []
    for pair in map(pair_name, args.pairs):
        for row in rows(args.methods, DIFFUSION):
            results.append({"pair": pair, "row": row, **{label: _mean(values(pair, row, key)) for key, label in METRICS.items()}})
        for method in (m for m in DIFFUSION if m in args.methods):
            line = {"pair": pair, "method": method}
            for key in ("family_accuracy", "family_accuracy_prior", "alignment_iou"):
                paired = [by[pair, method, s][key] - by[pair, method + CONTROL, s][key] for s in args.seeds
                          if isinstance(by.get((pair, method, s), {}).get(key), float)
                          and isinstance(by.get((pair, method + CONTROL, s), {}).get(key), float)]
                spreads = [statistics.stdev(v) for v in (values(pair, method, key), values(pair, method + CONTROL, key)) if len(v) > 1]
                line[f"{METRICS[key]} − untrained"] = (f"{statistics.fmean(paired):+.3f} ({min(paired):+.3f} … {max(paired):+.3f})"
                                                       if paired else "—")
                line[f"{METRICS[key]}: beats spread"] = ("yes" if min(paired) > max(spreads) else "no") if paired and len(spreads) == 2 else "—"
            deltas.append(line)
    return {"results": results, "deltas": deltas}


def figure(records: list[dict[str, Any]], reference: dict[str, dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    """Per metric: one column per row (trained beside control beside model-free), a bar at the mean over
    seeds and pairs, a point per (pair, seed), coloured by pair; the real test defects as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, pairs = rows(args.methods, DIFFUSION), list(map(pair_name, args.pairs))
    colours = plt.cm.tab10(np.arange(len(pairs)) % 10)
    fig, axes = plt.subplots(len(METRICS), 1, figsize=(max(8, 0.75 * len(names)), 2.1 * len(METRICS)), sharex=True)
    for ax, (key, label) in zip(axes, METRICS.items()):
        for x, row in enumerate(names):
            points = [(p, r[key]) for p in pairs for r in records if r["pair"] == p and r["row"] == row and isinstance(r.get(key), float)]
            if points:
                ax.bar(x, np.mean([v for _, v in points]), color="#d9d9d9" if row.endswith(CONTROL) else "#9ecae1" if row in DIFFUSION else "#c7e9c0",
                       edgecolor="black", linewidth=0.5)
                jitter = np.linspace(-0.25, 0.25, max(2, len(points)))[: len(points)]
                ax.scatter([x + j for j in jitter], [v for _, v in points], s=10, zorder=3,
                           c=[colours[pairs.index(p)] for p, _ in points])
        real = [reference[p].get(key) for p in pairs if isinstance(reference.get(p, {}).get(key), float)]
        if real:
            ax.axhline(np.mean(real), color="black", linestyle="--", linewidth=0.8, label="real test defects")
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1].set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colours[i], label=p) for i, p in enumerate(pairs)]
    axes[0].legend(handles=handles, fontsize=7, loc="upper right", ncol=len(pairs))
    fig.suptitle("Procedural defect world: per seed (points, colour = held-out pair), mean (bar)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(args: argparse.Namespace, pair: tuple[str, str], path: Path) -> None:
    """Real training defects, then the first seed's first 4 samples of every row: image and mask."""
    category = load_category(pair_data(args.out, pair))
    train, _ = paper_split(category.defects)
    real = load_defects(train[pair[1]][:4])
    lines, labels = [[x for d in real for x in (d.image, d.mask)]], ["real (train third)"]
    for row in rows(args.methods, DIFFUSION):
        cell = cell_dir(args.out, pair, args.seeds[0], row)
        if not (cell / CELL_FILE).is_file():
            continue
        images, masks, _ = generated(cell, row.removesuffix(CONTROL), pair)
        lines.append([x for im, m in list(zip(images, masks))[:4] for x in (im, m)])
        labels.append(row)
    save_png(path, grid(lines, [x for i in range(4) for x in (f"{i}", "mask")], row_labels=labels, cell=72))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else platform.processor()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def write_results(args, model, records, failures, judge_report, prior_report, reference, wall_s) -> None:
    command = "PYTHONPATH=src python benchmarks/world_learning.py " + " ".join(args.argv)
    table = tables(records, args)
    setup = {"command": command, "machine": machine(), "wall_s_this_run": round(wall_s),
             "cells_compute_s": round(sum(r["wall_s"] for r in records)), "prior": model, "pairs": list(map(pair_name, args.pairs)),
             "seeds": args.seeds, "judges": judge_report, "prior_samples": prior_report, "real_reference": reference,
             "diffusion_options": {m: options_of(args, "PRIOR", 0)(m) for m in DIFFUSION if m in args.methods},
             "untrained_control": UNTRAINED}
    atomic_write_text(args.out / "world_learning.json", json.dumps({**setup, "tables": table, "cells": records, "failures": failures},
                                                                   indent=2, default=str))
    figure(records, reference, args, args.out / "world_learning.png")
    for pair in args.pairs:
        sample_grid(args, pair, args.out / f"samples-{pair_name(pair)}.png")
    real = markdown_table([{"pair": p, **{METRICS[k]: f"{v[k]:.3f}" for k in ("family_accuracy", "family_accuracy_prior",
                                                                             "alignment_iou", "category_kept") if k in v}}
                           for p, v in reference.items()])
    text = [
        "# Procedural defect world (issue 31)", "", f"Command: `{command}`", "",
        f"Machine: {setup['machine']}. Wall time this run {wall_s / 60:.1f} min; cells (fit + generate + U-Net + judges, "
        f"summed) {setup['cells_compute_s'] / 60:.1f} min. Prior: {model}.", "",
        f"Judges on fresh renders: {json.dumps({k: round(v, 3) for k, v in judge_report.items() if isinstance(v, float)})}; "
        f"the family judge as the prior draws, on fresh renders through its autoencoder: "
        f"{judge_report.get('as_the_prior_draws', {}).get('family_accuracy')}. "
        f"Prior's samples of seen pairs judged as their family: {prior_report.get('seen_family_accuracy')}.", "",
        "Judges on the real test two-thirds of each pair (the reference):", "", real, "",
        f"Per pair and row, mean ± standard deviation over seeds {args.seeds}:", "", markdown_table(table["results"]), "",
        "Trained − untrained, paired by seed (mean (min … max)); 'beats spread': the smallest paired difference exceeds "
        "both rows' seed standard deviation:", "", markdown_table(table["deltas"]), "",
        *([f"Failed cells: {len(failures)}", *[f"- {f}" for f in failures], ""] if failures else []),
    ]
    atomic_write_text(args.out / "world_learning.md", "\n".join(text))
    print(f"wrote {args.out / 'world_learning.md'}", flush=True)


# ----------------------------------------------------------------------------- command line


def _pair(text: str) -> tuple[str, str]:
    category, _, family = text.partition(":")
    if category not in CATEGORIES or family not in FAMILIES:
        raise AnomalygenError(f"--pairs {text!r}: expected CATEGORY:FAMILY with a category of {', '.join(CATEGORIES)} "
                              f"and a family of {', '.join(FAMILIES)}")
    return category, family


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pairs", default=",".join(HELD_OUT[:2]), help=f"held-out CATEGORY:FAMILY pairs (the diagonal: {','.join(HELD_OUT)})")
    p.add_argument("--methods", default=",".join(MODEL_FREE + DIFFUSION))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--size", type=int, default=64, help="world, prior, method and U-Net resolution")
    p.add_argument("--model", help="use this model instead of a prior (e.g. tiny, for tests)")
    p.add_argument("--prior", type=Path, help="an existing prior trained on this world (OUT/prior of an earlier run)")
    p.add_argument("--prior-minutes", type=float, help="a cap on the prior's UNet time (default: none, --prior-steps decide)")
    p.add_argument("--prior-size", default="small")
    p.add_argument("--prior-batch", type=int, default=16)
    p.add_argument("--prior-steps", type=int, default=2500, help="the prior's UNet steps")
    p.add_argument("--prior-vae-steps", type=int, default=1500, help="the prior's autoencoder steps")
    p.add_argument("--prior-defect-weight", type=float, default=1.0, help="pretrain's vae_defect_weight (0: LDM's "
                   "autoencoder loss, which loses the families: benchmarks/RESULTS.md)")
    p.add_argument("--prior-unet-defect-weight", type=float, default=0.0, help="pretrain's unet_defect_weight (0: DDPM's "
                   "loss; 1 drew a family over the whole part and no category: benchmarks/RESULTS.md)")
    p.add_argument("--min-kept", type=float, default=0.5, help="share of recognised real defects whose family the "
                   "prior's autoencoder must keep before its UNet trains")
    p.add_argument("--gate-images", type=int, default=10, help="real defect images per seen pair in the autoencoder gate")
    p.add_argument("--prior-good", type=int, default=60, help="good images per category for the prior")
    p.add_argument("--prior-defects", type=int, default=30, help="defect images per seen pair the prior trains on")
    p.add_argument("--pair-good", type=int, default=30)
    p.add_argument("--pair-test-good", type=int, default=10)
    p.add_argument("--pair-defects", type=int, default=30, help="defect images of a held-out pair (a third fits the methods)")
    p.add_argument("--num-per-type", type=int, default=24, help="samples per cell (generation is most of a cell's cost; with "
                   "8, one sample is 0.125 of family accuracy and the seed spread was that count's: benchmarks/RESULTS.md)")
    p.add_argument("--steps", type=int, default=200, help="fitting steps of every diffusion method")
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=10, help="U-Net epochs")
    p.add_argument("--samples-per-epoch", type=int, default=100)
    p.add_argument("--unet-base", type=int, default=16)
    p.add_argument("--judge-renders", type=int, default=800)
    p.add_argument("--judge-steps", type=int, default=400)
    p.add_argument("--loss-batches", type=int, default=8, help="batches averaged by the held-out loss")
    p.add_argument("--max-attempts", type=int, default=5, help="draws per sample; the least-failing one is kept, so that "
                   "every row (an untrained control too) measures what its method draws")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="cell processes (1 thread each when more than 1), each taking the next free cell")
    p.add_argument("--shard", help=argparse.SUPPRESS)  # K/N: process K of --jobs N, taking the cells no other holds
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="METHOD.KEY=VALUE")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = [a for a in argv]
    args.settings = parse_settings(args.settings)
    args.pairs = [_pair(t.strip()) for t in args.pairs.split(",") if t.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(MODEL_FREE + DIFFUSION))
    if unknown or not args.methods:
        raise AnomalygenError(f"--methods: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(MODEL_FREE + DIFFUSION)}")
    if not args.pairs:
        raise AnomalygenError("--pairs: no pair given")
    if args.prior is not None and not (args.prior / "model_index.json").is_file():
        raise AnomalygenError(f"--prior {args.prior}: holds no model_index.json (not a prior folder)")
    if args.jobs < 1:
        raise AnomalygenError(f"--jobs {args.jobs}: must be at least 1")
    for category in CATEGORIES:  # the prior must see every family somewhere and every category with some family
        if all((category, f) in args.pairs for f in FAMILIES):
            raise AnomalygenError(f"--pairs: every family of {category} is held out")
    return args


def timed(args: argparse.Namespace, stage: str, work):
    """``work()``; its wall and CPU seconds go to ``OUT/timings.json`` when it did work (more than 1 s)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if wall > 1:
        path = args.out / "timings.json"
        atomic_write_text(path, json.dumps({**(read_json(path) if path.is_file() else {}),
                                            stage: {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}}, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse(argv)
    for row in rows(args.methods, DIFFUSION):  # every option checked before anything is written
        build(row.removesuffix(CONTROL), row_options(row, options_of(args, args.model or "tiny", args.seeds[0])))
    if args.shard:
        torch.set_num_threads(1)
        k, n = map(int, args.shard.split("/"))
        judges, _ = judges_for(args)
        prior_judge(args, prior_path(args), judges)
        return 1 if run_cells(args, prior_path(args), judges, (k, n)) else 0
    args.out.mkdir(parents=True, exist_ok=True)
    print("[1/5] world", flush=True)
    timed(args, "world", lambda: build_world(args))
    print("[2/5] judges", flush=True)
    judges, judge_report = timed(args, "judges", lambda: judges_for(args))
    print("[3/5] prior", flush=True)
    model = timed(args, "prior", lambda: prior_path(args, judges))
    write_image_encoder(model, args)
    prior_report = timed(args, "prior_samples", lambda: prior_samples(model, args, judges)) if not args.model else {}
    judge_report = {**judge_report, "as_the_prior_draws": timed(args, "prior_judge", lambda: prior_judge(args, model, judges))}
    print(f"[4/5] {len(cells(args))} cells in {args.jobs} process(es)", flush=True)
    if args.jobs == 1:
        failures = run_cells(args, model, judges, (0, 1))
    else:
        children = [subprocess.Popen([sys.executable, __file__, *args.argv, "--shard", f"{k}/{args.jobs}"],
                                     env={**os.environ, "OMP_NUM_THREADS": "1"}) for k in range(args.jobs)]
        failures = ["a cell process failed (its FAILED lines above)" for child in children if child.wait()]
    print("[5/5] results", flush=True)
    records = [judged_as_drawn(cell_dir(args.out, pair, seed, row), pair, row, judges) for pair, seed, row in cells(args)
               if (cell_dir(args.out, pair, seed, row) / CELL_FILE).is_file()]
    failures += [f"{pair_name(p)} seed {s} {r}: see {cell_dir(args.out, p, s, r) / 'error.txt'}" for p, s, r in cells(args)
                 if (cell_dir(args.out, p, s, r) / "error.txt").is_file() and not (cell_dir(args.out, p, s, r) / CELL_FILE).is_file()]
    write_results(args, model, records, sorted(set(failures)), judge_report, prior_report, real_reference(args, judges),
                  time.perf_counter() - started)
    return 1 if failures else 0


if __name__ == "__main__":
    run_command(main)
