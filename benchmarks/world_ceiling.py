"""The generator's ceiling in the procedural world (issue 31): how well can a defect of a held-out pair be
judged at all once it passes through the prior's autoencoder and blended latent inpainting, whatever a
method learned? It separates what the methods' tokens learn from what the prior and the sampler allow.

For each pair of ``--pairs``, ``--renders`` fresh renders of the pair's family on the pair's category (their
good image known exactly: ``data.world.render_defect``), and for each row the judges of
``world_learning.py`` (family accuracy on the mask's crop, alignment IoU, outside change):

- ``real``: the rendered defects themselves (the judges' own ceiling);
  (every row also gets the family judge trained through the prior's autoencoder: ``world_learning.prior_judge``)
- ``autoencoder``: each defect image through the prior's autoencoder, pasted on its good image outside the mask;
- ``latent paste``: the defect image's latents inside the latent mask and the good image's outside,
  decoded and pasted: a method that knew the defect's latents exactly, through AnomalyDiffusion's mask;
- ``words "<prompt>"``: blended latent inpainting (``diffusion.sampling.blended_generate``: the sampler,
  steps and eta that ``world_learning.py`` gives AnomalyDiffusion) inside the same masks, conditioned on the
  prior's own words, for the family (held out: the prior never saw it on this category), for each other
  family (seen on this category: masks of renders of that family, judged against it), and for the good
  part (the floor), at guidance 1 (AnomalyDiffusion's) and ``--guidance``.

    PYTHONPATH=src python benchmarks/world_ceiling.py --out runs/world5 --pairs pill:stain,fabric:hole

``--out`` is a ``world_learning.py`` folder (its ``judges.safetensors`` and ``prior/``, or ``--prior``);
writes ``OUT/ceiling.json``, ``ceiling.md`` and ``ceiling-<pair>.png`` (a line of samples per row).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cells import run_command  # noqa: E402
from world_learning import _pair, autoencoded, judge, judges_for, machine, pair_name, prior_judge  # noqa: E402

from anomalygen.benchmark import markdown_table  # noqa: E402
from anomalygen.data.world import FAMILIES, render_defect  # noqa: E402
from anomalygen.diffusion.backbone import load_backbone  # noqa: E402
from anomalygen.diffusion.conditioning import PromptEncoder  # noqa: E402
from anomalygen.diffusion.sampling import blended_generate, sample_generators  # noqa: E402
from anomalygen.errors import AnomalygenError  # noqa: E402
from anomalygen.io import atomic_write_text, save_png  # noqa: E402
from anomalygen.visualize import grid  # noqa: E402

SHOWN = 6  # samples per row in the grid


def renders(pair: tuple[str, str], family: str, count: int, size: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``count`` (good, defect, mask) renders of ``family`` on the pair's category, from seeds no world folder uses."""
    return [render_defect(pair[0], family, np.random.default_rng([31, FAMILIES.index(family), k]), size) for k in range(count)]


def prompted(backbone, prompt: str, goods: list[np.ndarray], masks: list[np.ndarray], args: argparse.Namespace,
             guidance: float) -> list[np.ndarray]:
    """Blended latent inpainting inside ``masks`` on ``goods`` conditioned on ``prompt`` (AnomalyDiffusion's sampling)."""
    encoder = PromptEncoder(backbone.text_encoder, backbone.tokenizer, {})
    with torch.no_grad():
        context = encoder([prompt] * len(goods)).hidden_states
        uncond = encoder([""]).hidden_states if guidance > 1 else None
        return blended_generate(backbone, context, goods, masks, sample_generators(args.seed, range(len(goods))),
                                resolution=args.size, sampler="ddim", num_inference_steps=args.sampling_steps, eta=1.0,
                                guidance_scale=guidance, uncond_hidden_states=uncond)


def pair_rows(backbone, judges, pair: tuple[str, str], args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[list[np.ndarray]], list[str]]:
    """Every row of one pair: its judged record, and its first samples for the grid."""
    category, family = pair
    records, shown, labels = [], [], []

    def add(row: str, judged_as: str, images: list[np.ndarray], masks: list[np.ndarray], goods: list[np.ndarray]) -> None:
        record = judge(judges, images, masks, judged_as, category, goods)
        records.append({"pair": pair_name(pair), "row": row, "judged_as": judged_as, **record})
        shown.append(images[:SHOWN])
        labels.append(row)
        print(f"  {pair_name(pair)} {row}: family {record['family_accuracy']:.3f} (as the prior draws "
              f"{record.get('family_accuracy_prior', float('nan')):.3f}), alignment {record['alignment_iou']:.3f}", flush=True)

    goods, defects, masks = map(list, zip(*renders(pair, family, args.renders, args.size)))
    add("real", family, defects, masks, goods)
    add("autoencoder", family, autoencoded(backbone, goods, defects, masks, args.size, False), masks, goods)
    add("latent paste", family, autoencoded(backbone, goods, defects, masks, args.size, True), masks, goods)
    for guidance in sorted({1.0, args.guidance}) if args.words else []:
        suffix = f", guidance {guidance:g}"
        for other in (family, *(f for f in FAMILIES if f != family)):
            other_goods, _, other_masks = map(list, zip(*renders(pair, other, args.renders, args.size)))
            seen = "held out" if other == family else "seen"
            add(f'words "{category} with {other}" ({seen}){suffix}', other,
                prompted(backbone, f"a photo of {category} with {other}", other_goods, other_masks, args, guidance),
                other_masks, other_goods)
        add(f'words "{category}" (good){suffix}', family,
            prompted(backbone, f"a photo of {category}", goods, masks, args, guidance), masks, goods)
    return records, shown, labels


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="a world_learning.py folder (judges, prior)")
    p.add_argument("--pairs", default="pill:stain,fabric:hole", help="held-out CATEGORY:FAMILY pairs of that folder's world")
    p.add_argument("--prior", help="the prior (default OUT/prior; tiny for tests)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--renders", type=int, default=24, help="samples per row")
    p.add_argument("--sampling-steps", type=int, default=20, help="as world_learning.py's --sampling-steps")
    p.add_argument("--guidance", type=float, default=3.0, help="a second guidance scale for the prompted rows (besides 1)")
    p.add_argument("--words", action=argparse.BooleanOptionalAction, default=True,
                   help="the prompted rows (--no-words: the autoencoder rows only, e.g. before the prior's UNet is trained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge-renders", type=int, default=800, help="as world_learning.py (used only where OUT has no judges)")
    p.add_argument("--judge-steps", type=int, default=400)
    args = p.parse_args(argv)
    args.pairs = [_pair(t.strip()) for t in args.pairs.split(",") if t.strip()]
    args.prior = args.prior or str(args.out / "prior")
    if args.prior != "tiny" and not (Path(args.prior) / "model_index.json").is_file():
        raise AnomalygenError(f"--prior {args.prior}: holds no model_index.json (train it with world_learning.py first)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    judges, _ = judges_for(args)
    prior_judge(args, args.prior, judges)
    backbone = load_backbone(args.prior)
    records = []
    for pair in args.pairs:
        rows, shown, labels = pair_rows(backbone, judges, pair, args)
        records += rows
        save_png(args.out / f"ceiling-{pair_name(pair)}.png",
                 grid(shown, [f"sample {k + 1}" for k in range(max(map(len, shown)))], row_labels=labels, cell=80))
    wall = time.perf_counter() - started
    table = markdown_table([{"pair": r["pair"], "row": r["row"], "family accuracy": f"{r['family_accuracy']:.3f}",
                             "as the prior draws": f"{r['family_accuracy_prior']:.3f}",
                             "alignment IoU": f"{r['alignment_iou']:.3f}",
                             "outside change": f"{r['outside_change']:.3f}" if r["outside_change"] is not None else "—",
                             "judged": ", ".join(f"{k} {v}" for k, v in r["verdicts"].items())} for r in records])
    command = "PYTHONPATH=src python benchmarks/world_ceiling.py " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_write_text(args.out / "ceiling.md", f"# The generator's ceiling in the world\n\n`{command}`\n\n"
                      f"{machine()}, {wall / 60:.1f} min, {args.renders} samples a row.\n\n{table}\n")
    atomic_write_text(args.out / "ceiling.json", json.dumps({"command": command, "machine": machine(), "wall_s": round(wall, 1),
                                                             "records": records}, indent=2))
    print(f"wrote {args.out / 'ceiling.md'}")
    return 0


if __name__ == "__main__":
    run_command(main)
