"""The ``anomalygen demo`` job: demo dataset -> every chosen method on every category -> HTML page.

Layout under ``out``: ``data/`` (the procedural demo dataset), ``samples/<method>/<category>/``
(the writer's MVTec-layout output, resumable, valid pairs only) and ``index.html`` (one grid
per method: good image, generated image, mask overlay).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from anomalygen import pipeline
from anomalygen.data import list_categories, load_image
from anomalygen.data.demo import make_demo_dataset
from anomalygen.io import MANIFEST, check_own_folder, folder_lock, read_manifest
from anomalygen.seeding import check_seed
from anomalygen.visualize import Section, grid, overlay, write_html

MODEL_FREE = ("cutpaste", "croppaste", "draem")
COLUMNS = ("good", "generated", "mask overlay")
# draws per valid pair the demo allows: CutPaste's patches (2-15 % of the image) fit on the demo's nut
# about once in 30 draws; the demo shows valid pairs only, however many draws they take
DEMO_DRAWS = 300


def run_demo(
    out: str | Path,
    methods: Sequence[str] | None = None,
    *,
    num: int = 6,
    seed: int = 0,
    console: Console | None = None,
    warn: pipeline.Warn | None = None,
    overwrite: bool = False,
) -> Path:
    """Run the demo into ``out`` and return the path of its ``index.html``. A folder holding files
    anomalygen did not write is refused unless ``overwrite``."""
    check_seed(seed)
    pipeline.check_num(num)
    out = Path(out)
    methods = list(methods or MODEL_FREE)
    for method in methods:  # every option checked, and every base model loaded, before the dataset is written
        generator = pipeline.build(method, {})
        if hasattr(type(generator), "backbone"):  # a diffusion method: a missing or unreadable base model is refused here
            generator.backbone  # noqa: B018 (loads it)
    check_own_folder(out, overwrite=overwrite)
    with folder_lock(out, "demo"):
        return _run(out, methods, num, seed, console, warn)


def _run(out: Path, methods: list[str], num: int, seed: int, console: Console | None, warn: pipeline.Warn | None) -> Path:
    """``run_demo``'s work once everything is checked and ``out`` is held."""
    data = make_demo_dataset(out / "data", seed=seed)
    sections = []
    for method in methods:
        rows, captions, draws = [], [], {}
        for category in list_categories(data):
            result = pipeline.generate(
                method, data, out / "samples" / method, num, category=category, seed=seed, warn=warn, console=console,
                max_attempts=DEMO_DRAWS, give_up_after=0,
            )
            entries = read_manifest(result.out / MANIFEST)[:num]
            draws[category] = sum(entry["meta"]["validity"]["attempts"] for entry in entries)
            for entry in entries:
                rows.append(sample_row(result.out, entry))
                captions.append(f"{category}/{entry['defect_type']}")
        picture = grid(rows, COLUMNS, row_labels=captions, cell=192)
        text = (f"{num} samples per category, seed {seed}; only pairs that pass the validity checks "
                f"(draws needed: {', '.join(f'{c} {n}' for c, n in draws.items())}).")
        sections.append(Section(method, text=text, images=[(f"{method}: {' | '.join(COLUMNS)}", picture)]))
    return write_html(out / "index.html", "anomalygen demo", sections)


def sample_row(category_out: Path, entry: dict) -> list:
    """(good image, generated image, overlay of the mask on the generated image) of a manifest entry."""
    image = load_image(category_out / entry["image"])
    mask = load_image(category_out / entry["mask"])[..., 0] > 127
    good = load_image(entry["source"]) if entry.get("source") else None
    return [good, image, overlay(image, mask)]
