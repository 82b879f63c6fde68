"""Pictures for people: mask overlays, labelled sample grids, and a small self-contained HTML page.

Used by ``anomalygen demo`` and by evaluation reports. Images are uint8 RGB (H, W, 3), masks
bool (H, W), as everywhere in anomalygen.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage.segmentation import find_boundaries

from anomalygen.io import MANIFEST, atomic_write_bytes, atomic_write_text, encode_png, read_manifest, save_png

FRAME = (160, 160, 160)  # the grey frame round each tile of a grid


def overlay(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 0, 0), alpha: float = 0.4) -> np.ndarray:
    """The image with the mask tinted in ``color`` (opacity ``alpha``) and its outline drawn solid."""
    image = _rgb(image)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, dtype=np.float32)
    out[find_boundaries(mask, mode="inner")] = color
    return np.round(out).astype(np.uint8)


def grid(
    rows: Sequence[Sequence[np.ndarray | None]],
    labels: Sequence[str] | None = None,
    *,
    row_labels: Sequence[str] | None = None,
    cell: int = 128,
    pad: int = 4,
    background: int = 255,
) -> np.ndarray:
    """One RGB image of ``rows`` of images, each fitted into a ``cell``×``cell`` square.

    ``labels`` (optional) head the columns, ``row_labels`` (optional) stand left of the rows.
    ``None`` entries leave a cell empty; masks (2-D bool) are shown white on black. Every image
    gets a grey 1-px frame, so that a white tile (e.g. a mask covering the whole image) is told
    apart from an empty cell.
    """
    if not rows:
        raise ValueError("grid needs at least one row")
    columns = max(len(row) for row in rows)
    header = 18 if labels else 0
    left = 6 * max(len(str(label)) for label in row_labels) + pad if row_labels else 0
    height = header + len(rows) * (cell + pad) + pad
    width = left + columns * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (background,) * 3)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for column, label in enumerate(labels or []):
        draw.text((left + pad + column * (cell + pad), 2), str(label)[: cell // 6], fill=(0, 0, 0), font=font)
    for row, label in enumerate(row_labels or []):
        draw.text((pad, header + pad + row * (cell + pad) + cell // 2 - 6), str(label), fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        for c, item in enumerate(row):
            if item is None:
                continue
            tile = Image.fromarray(_rgb(item))
            tile.thumbnail((cell, cell), Image.Resampling.BILINEAR)
            x = left + pad + c * (cell + pad) + (cell - tile.width) // 2
            y = header + pad + r * (cell + pad) + (cell - tile.height) // 2
            canvas.paste(tile, (x, y))
            draw.rectangle((x - 1, y - 1, x + tile.width, y + tile.height), outline=FRAME)
    return np.asarray(canvas)


@dataclass
class Section:
    """One part of an HTML page: a heading, optional text, images with captions, and a table.

    ``images`` holds ``(caption, image)`` pairs where ``image`` is an array or a path to an
    image file; ``table`` is a list of rows (dicts sharing their keys); ``items`` a bulleted list
    of lines or of ``(text, path)`` links (relative to the page).
    """

    heading: str
    text: str = ""
    images: list[tuple[str, np.ndarray | str | Path]] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)
    items: list[str | tuple[str, str | Path]] = field(default_factory=list)  # a list: text, or (text, path) links


def write_html(path: str | Path, title: str, sections: Sequence[Section], *, embed: bool = True) -> Path:
    """Write a self-contained HTML page (atomically).

    Arrays are embedded as base64 PNG when ``embed`` is true, otherwise saved as PNG files in
    ``<page name>_files/`` next to the page and linked; image paths are linked relative to the page.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    assets = path.parent / f"{path.stem}_files"
    parts = [
        "<!doctype html>",
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}figure{display:inline-block;margin:0 1em 1em 0;"
        "vertical-align:top}figcaption{font-size:90%;color:#444}table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left}li{margin:2px 0}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for number, section in enumerate(sections):
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        if section.items:
            parts.append("<ul>" + "".join(
                f"<li><a href='{html.escape(_relative_link(Path(item[1]), path.parent))}'>{html.escape(item[0])}</a></li>"
                if isinstance(item, tuple) else f"<li>{html.escape(item)}</li>" for item in section.items) + "</ul>")
        for k, (caption, image) in enumerate(section.images):
            if isinstance(image, np.ndarray):
                if embed:
                    src = "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")
                else:
                    target = assets / f"s{number:02d}_{k:03d}.png"
                    save_png(target, image)
                    src = target.relative_to(path.parent).as_posix()
            else:
                src = _relative_link(Path(image), path.parent)
            parts.append(
                f"<figure><img src='{html.escape(src)}' alt='{html.escape(caption)}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        if section.table:
            parts.append(_table(section.table))
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts) + "\n")
    return path


def _table(rows: Sequence[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{html.escape(str(key))}</th>" for key in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row.get(key, '')))}</td>" for key in keys) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _relative_link(target: Path, base: Path) -> str:
    return Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB image or a 2-D mask, got {image.dtype} {image.shape}")
    return image


def preview_path(category_out: str | Path) -> Path:
    """``OUT/<category>-preview.png``, beside the category folder: an image inside it would be read as
    one more sample by MVTec readers (anomalib's MVTecAD globs every image under the category)."""
    category_out = Path(category_out)
    return category_out.parent / f"{category_out.name}-preview.png"


def pick(entries: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to ``n`` manifest entries, taken from each defect type in turn (first ones first)."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_type.setdefault(entry["defect_type"], []).append(entry)
    picked: list[dict[str, Any]] = []
    for rank in range(max((len(v) for v in by_type.values()), default=0)):
        picked += [v[rank] for v in by_type.values() if rank < len(v)]
    return picked[:n]


def write_preview(category_out: str | Path, n: int = 8, cell: int = 160) -> Path:
    """``preview_path(category_out)``: a grid of up to ``n`` written pairs (every defect type in turn),
    one row each: the good image it was made from, the generated image, the mask overlaid on it."""
    from anomalygen.data import load_image

    category_out = Path(category_out)
    rows, labels = [], []
    for entry in pick(read_manifest(category_out / MANIFEST), n):
        image = load_image(category_out / entry["image"])
        mask = load_image(category_out / entry["mask"])
        mask = (mask[..., 0] if mask.ndim == 3 else mask) > 127
        good = _readable(entry.get("source"))
        rows.append([good, image, overlay(image, mask, contrasting(image, mask))])
        labels.append(f"{entry['index']:06d} {entry['defect_type']}")
    path = preview_path(category_out)
    atomic_write_bytes(path, encode_png(grid(rows, ["good (source)", "generated", "mask overlay"], row_labels=labels, cell=cell)))
    return path


def contrasting(image: np.ndarray, mask: np.ndarray) -> tuple[int, int, int]:
    """The complement of the mean colour under ``mask``, saturated: an overlay that shows on a red
    defect as on a blue one (a red overlay vanishes on a red stain)."""
    mean = _rgb(image)[np.asarray(mask, bool)].mean(axis=0) if np.any(mask) else np.zeros(3)
    complement = 255.0 - mean
    spread = complement.max() - complement.min()
    if spread < 1:
        return (255, 0, 0)
    return tuple(int(v) for v in np.round(255 * (complement - complement.min()) / spread))


def _readable(path: str | None) -> np.ndarray | None:
    """The image at ``path``; None when there is none or it cannot be read (a source file broken since)."""
    from anomalygen.data import load_image
    from anomalygen.errors import AnomalygenError

    try:
        return load_image(path) if path else None
    except (AnomalygenError, OSError):
        return None
