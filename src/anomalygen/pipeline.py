"""Load a category -> paper split -> fit a generator -> write samples: the work behind the CLI.

``generate`` fits a generator on the generator-training third of each defect type (the paper
split, ``anomalygen.data.paper_split``) plus ``train/good`` — or loads a fitted one from a
checkpoint — and writes ``num`` samples built on the ``train/good`` images with
``anomalygen.generation.writer.SampleWriter`` (resumable). ``fit`` does the same fitting and saves the model.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from anomalygen.data import CategoryData, Training, load_training
from anomalygen.data.training import Warn
from anomalygen.errors import AnomalygenError, OptionError
from anomalygen.generation.redraw import GIVE_UP_AFTER, MAX_ATTEMPTS, check_max_attempts, draw_budget, filtered
from anomalygen.generation.sharding import ShardJob, sharded_samples
from anomalygen.generation.validity import Calibration
from anomalygen.generation.writer import MAX_SAMPLES, SampleWriter
from anomalygen.io import atomic_write_bytes, check_own_folder, folder_lock
from anomalygen.methods.base import AnomalyGenerator, create
from anomalygen.progress import display
from anomalygen.seeding import check_seed


@dataclass
class GenerateResult:
    """What a ``generate`` call left on disk: ``out/<category>`` holds ``total`` samples.
    ``mask_sources`` counts the ``mask_source`` of the samples written by this call (e.g. how
    many learned masks fell back to augmented ones)."""

    out: Path
    category: str
    method: str
    written: int
    total: int
    mask_sources: dict[str, int] = field(default_factory=dict)
    # with ``filter``: check -> rejected draws, defect type -> samples written / redrawn, samples kept failing
    rejected: dict[str, int] = field(default_factory=dict)
    written_types: dict[str, int] = field(default_factory=dict)
    redrawn: dict[str, int] = field(default_factory=dict)
    invalid: int = 0


def parse_settings(pairs: Iterable[str]) -> dict[str, Any]:
    """``["k=v", ...]`` from ``--set`` as a dict; each value is parsed as JSON when it is JSON
    (``3`` -> int, ``0.5`` -> float, ``true``, ``[1,2]``), otherwise kept as a string."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise AnomalygenError(f"`settings` {pair!r}: expected key=value")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value
    return settings


def launched() -> tuple[int, int]:
    """(rank, number of processes) of a multi-process launch (``accelerate launch``, ``torchrun``: their
    ``RANK`` and ``WORLD_SIZE``); ``(0, 1)`` for a plain run."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise AnomalygenError(f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: "
                              "not the whole numbers a multi-process launcher sets") from None


def build(method: str, options: Mapping[str, Any]) -> AnomalyGenerator:
    """``create(method, **options)``, with a wrong option reported as a user error."""
    try:
        return create(method, **options)
    except TypeError as error:
        raise AnomalygenError(f"method {method!r} does not accept these options {dict(options)}: {error}") from error


def fit(
    method: str,
    data: str | Path,
    out: str | Path,
    *,
    category: str | None = None,
    options: Mapping[str, Any] | None = None,
    skip_bad: bool = False,
    warn: Warn | None = None,
    training: Training | None = None,
    overwrite: bool = False,
) -> Path:
    """Fit ``create(method, **options)`` on the training split of a category and save it to ``out``.

    ``out`` is locked (``anomalygen.io.folder_lock``) before fitting: a file in the way, a place
    that cannot be written or a second fit into it is refused before any training time is spent.
    Under a multi-process launch every process fits (the core trainer averages their gradients)
    and the first one alone locks ``out`` and saves. ``training``: ``load_training(data, category,
    skip_bad=skip_bad)``, already loaded by the caller. A folder holding files anomalygen did not
    write is refused (``check_own_folder``) unless ``overwrite``.
    """
    generator = build(method, options or {})
    first = launched()[0] == 0
    if first:
        check_own_folder(out, overwrite=overwrite)
    _, defects, goods = training if training is not None else load_training(data, category, skip_bad=skip_bad, warn=warn)
    with folder_lock(out, "fit") if first else nullcontext():
        generator.fit(defects, goods)
        if first:
            generator.save(out)
    return Path(out)


def check_num(num: int) -> None:
    if not 1 <= num <= MAX_SAMPLES:
        raise OptionError("num", f"{num}: give a number of samples from 1 to {MAX_SAMPLES}")


def check_defect_type(defect_type: str | None, types: Iterable[str], category: str) -> None:
    """``defect_type`` names one of ``types``, the defect types there are to generate."""
    types = sorted(types)
    if defect_type is not None and defect_type not in types:
        raise OptionError("defect_type", f"{defect_type!r}: not a defect type of {category!r}; "
                                         f"give one of {', '.join(types) or '(none)'}")


def generate(
    method: str | None,
    data: str | Path,
    out: str | Path,
    num: int,
    *,
    category: str | None = None,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    loaded: AnomalyGenerator | None = None,
    training: Training | None = None,
    defect_type: str | None = None,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    filter: bool = True,
    max_attempts: int = MAX_ATTEMPTS,
    keep_failing: bool = False,
    give_up_after: int = GIVE_UP_AFTER,
    processes: int = 1,
    compile: bool = False,
    with_good: bool = False,
    warn: Warn | None = None,
    say: Warn | None = None,
    status: Warn | None = None,
    console: Console | None = None,
) -> GenerateResult:
    """Write ``num`` samples of ``method`` (or of the model at ``checkpoint``) for one category.

    Resumes an interrupted run of the same command; see ``generation.writer`` for the guarantees.
    With ``filter`` each sample must pass the validity checks (``generation.validity``, calibrated
    on the training defects, judged by the method's ``outside_mask``, which ``run.json`` records): a
    rejected sample ``i`` is redrawn with seed ``sub_seed(seed, i, attempt)`` until a draw passes
    (``generation.redraw``), so re-runs and resumes stay identical and the output holds
    ``num`` valid pairs with the defect types of an unfiltered run. A defect type using more than
    ``max_attempts`` draws per valid pair on average (the cap), or the first ``give_up_after`` draws of
    the call all failing (0: never), stops the run with an error naming method, category and type
    (``DrawBudget``; what is written stays, a re-run goes on). With ``keep_failing`` every
    sample gets at most ``max_attempts`` draws and the least-failing one is kept when none passes
    (flagged in the manifest, counted in a warning).
    Samples of a grayscale category (``is_grayscale``) are written as grayscale PNGs.
    ``out/<category>-preview.png`` shows a few of the pairs (``visualize.write_preview``).
    ``processes`` > 1 shards the samples over that many processes (``generation.sharding``; one per
    GPU): the same output as one process. ``compile``: sample with a ``torch.compile``'d UNet on CUDA
    (diffusion methods; its compile time is printed once).
    With ``with_good`` the real good images are copied too (``copy_goods``).
    ``loaded``: the model at ``checkpoint``, already loaded by the caller (e.g. once for all defect
    types), used instead of loading it again; ``training`` likewise ``load_training(data, category,
    skip_bad=skip_bad)``. ``say`` is told when a method must train first, with its limits;
    ``status`` gets a line at each step before the samples' progress bar (reading, calibrating).
    """
    say = say or (lambda message: None)
    status = status or (lambda message: None)
    check_num(num)
    check_max_attempts(max_attempts, give_up_after)
    check_seed(seed)
    if isinstance(processes, bool) or not isinstance(processes, int) or not 1 <= processes <= 64:
        raise OptionError("processes", f"{processes}: give a number from 1 to 64")
    if loaded is not None and checkpoint is None:
        raise ValueError("loaded needs the checkpoint it was loaded from")
    if checkpoint is not None:
        # --set on a fitted model: sampling-time options only (options.Option.sampling)
        generator = loaded if loaded is not None and not options else AnomalyGenerator.load(checkpoint, options)
        if method is not None and method != generator.name:
            raise AnomalygenError(f"{checkpoint}: holds a {generator.name!r} model, not {method!r}")
    elif method is None:
        raise AnomalygenError("give `method` (or `checkpoint` with a fitted model)")
    else:
        generator = build(method, options or {})
    if compile:
        generator.compile_unet()
    if training is None:
        status(f"reading {data}" + (f" (category {category})" if category else ""))
    category_data, defects, goods = training if training is not None else load_training(data, category, skip_bad=skip_bad,
                                                                                          warn=warn)
    check_defect_type(defect_type, generator.defect_types if checkpoint is not None else {d.defect_type for d in defects},
                      category_data.name)
    run = {
        "method": generator.name,
        "outside_mask": generator.outside_mask,  # how the validity checks judged it, and what evaluation reads
        "seed": seed,
        "config": generator.config(),
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        "data": str(category_data.root.resolve()),
        "category": category_data.name,
        "defect_type": defect_type,
    }
    if filter:  # the cap changes the output only of samples kept failing
        run["filter"] = {"keep_failing": True, "max_attempts": max_attempts} if keep_failing else {"valid_only": True}
    mask_sources: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    redrawn: Counter[str] = Counter()
    written_types: Counter[str] = Counter()
    failing: Counter[str] = Counter()
    invalid = 0
    with SampleWriter(out, category_data.name, run, overwrite=overwrite) as writer:
        start = writer.done
        if start > num:
            raise AnomalygenError(
                f"{writer.root}: holds {start} samples, more than `num` {num}; give `num` {start} or more to keep "
                f"them, or add `overwrite` to start over with {num}"
            )
        if start < num:
            if checkpoint is None:
                if "max_steps" in generator.config():  # a training loop (diffusion methods), not a crop bank
                    say(training_note(generator, len(defects), len(goods)))
                generator.fit(defects, goods)
            calibration = None
            if filter:
                status(f"calibrating the validity checks on {len(defects)} real defects")
                calibration = Calibration.fit([(d.image, d.mask, d.defect_type) for d in defects], goods[:8])
            # a sample's numbers depend on the batch it is made in: a resumed run starts at the batch of
            # its first missing sample (and drops what is already written), and the processes of a
            # sharded run get whole batches, so every sample is made as in one uninterrupted run
            gray = is_grayscale(category_data)
            block = generator.generation_batch()
            first = start - start % block
            label = f"{generator.name} {category_data.name}" + (f"/{defect_type}" if defect_type else "")
            with display(console) as progress:
                if processes > 1:
                    job = ShardJob(None if checkpoint is None or options else str(checkpoint), str(data), category, skip_bad,
                                   seed, first, num, block, processes, defect_type, calibration, max_attempts,
                                   keep_failing, give_up_after, f"{generator.name} on {category_data.name}", compile)
                    samples = sharded_samples(job, generator)
                else:
                    made = generator.generate(goods, num - first, seed=seed, start=first, defect_type=defect_type)
                    samples = made if calibration is None else filtered(
                        made, generator, goods, calibration, seed, first, defect_type, max_attempts,
                        draw_budget(max_attempts, keep_failing, give_up_after, f"{generator.name} on {category_data.name}"))
                samples = itertools.islice(samples, start - first, None)
                task = progress.add_task(label, total=num, completed=start, postfix="")
                for sample in samples:
                    if filter:
                        validity = sample.meta["validity"]
                        rejected.update(check for draw in validity["rejected"] for check in draw["checks"])
                        redrawn[sample.defect_type] += validity["attempts"] > 1
                        written_types[sample.defect_type] += 1
                        invalid += not validity["passed"]
                        failing[sample.defect_type] += not validity["passed"]
                    if gray:
                        sample.image = to_gray(sample.image)
                    index = sample.meta.get("source_index")
                    source = None if index is None else category_data.train_good[index].path.resolve()
                    writer.add(sample, source=source)
                    if "mask_source" in sample.meta:
                        mask_sources[sample.meta["mask_source"]] += 1
                    progress.advance(task)
        if with_good:
            copy_goods(writer.root, category_data)
        if writer.done:
            from anomalygen.visualize import write_preview  # skimage: not on every CLI call's path

            write_preview(writer.root)
    if invalid and warn is not None:
        warn(f"{generator.name} on {category_data.name}: {invalid} samples ({', '.join(f'{t} {n}' for t, n in sorted(failing.items()))}) "
             f"failed a validity check in all {max_attempts} draws; kept (`keep_failing`; flagged in the manifest)")
    return GenerateResult(writer.root, category_data.name, generator.name, writer.done - start, writer.done,
                          dict(mask_sources), dict(rejected), dict(written_types), dict(+redrawn), invalid)


GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L")


def is_grayscale(category_data: CategoryData) -> bool:
    """Whether the category's good images are grayscale files (as MVTec's grid, screw, zipper): its
    samples are then written as grayscale PNGs too."""
    from PIL import Image

    with Image.open(category_data.train_good[0].path) as image:
        return image.mode in GRAY_MODES


def to_gray(image):
    """An RGB sample as one channel (ITU-R 601 luma, PIL's "L": exact where the channels are equal)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).convert("L")) if image.ndim == 3 else image


def training_note(generator: AnomalyGenerator, defects: int, goods: int) -> str:
    """What a ``generate`` without a fitted model is about to train, and how to bound it."""
    config = generator.config()
    limits = []
    if config.get("max_steps") is not None:
        limits.append(f"{config['max_steps']} steps")
    if config.get("time_budget_s") is not None:
        limits.append(f"at most {config['time_budget_s'] / 60:g} min")
    device = f" on {config['device']}" if config.get("device") else ""
    return (f"{generator.name} has no fitted model (`checkpoint`): training it first on {defects} defects and {goods} good "
            f"images{device} ({', '.join(limits) or 'until done'}); `max_steps` / `time_budget_s` bound it, and "
            "`anomalygen fit` saves a model to generate from again")


def copy_goods(root: Path, category_data: CategoryData) -> None:
    """Byte copies of the category's real good images in ``root/train/good`` and ``root/test/good``,
    so that ``root.parent`` reads as an MVTec AD dataset (anomalib's ``MVTecAD(root=OUT, category=C)``).

    Files keep their names with the extension in lower case, as ``MVTecAD`` needs (``NNNNNN.<ext>``
    when names repeat across folders). Each copy is atomic and an identical file is left alone, so
    a killed run resumes; other files there are removed.
    """
    for split, records in (("train", category_data.train_good), ("test", category_data.test_good)):
        folder = root / split / "good"
        names = [record.path.stem + record.path.suffix.lower() for record in records]
        if len(set(names)) < len(names):
            names = [f"{i:06d}{record.path.suffix.lower()}" for i, record in enumerate(records)]
        for name, record in zip(names, records):
            data = record.path.read_bytes()
            if not ((folder / name).is_file() and (folder / name).read_bytes() == data):
                atomic_write_bytes(folder / name, data)
        for stale in sorted(set(p.name for p in folder.iterdir()) - set(names)) if folder.is_dir() else []:
            (folder / stale).unlink()
