"""The generator's ceiling in the procedural world (``benchmarks/world_ceiling.py``): which latents, words,
masks and judgement reach each row."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomalygen.data.world import FAMILIES
from anomalygen.errors import AnomalygenError

torch.set_num_threads(1)

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "world_ceiling.py"
TINY = ["--prior", "tiny", "--size", "32", "--renders", "2", "--sampling-steps", "1", "--judge-renders", "16", "--judge-steps", "2"]


@pytest.fixture()
def ceiling():
    return runpy.run_path(str(SCRIPT))


def test_latent_paste_decodes_the_defects_latents_inside_the_latent_mask_and_the_goods_outside(ceiling, monkeypatch):
    """A codec that halves the size (2 x 2 means) and doubles it back, and no final paste: the autoencoder
    row is the defect everywhere, the latent paste the defect inside the (coarser) latent mask only."""
    glob = ceiling["autoencoded"].__globals__  # world_learning's, where it lives
    monkeypatch.setitem(glob, "encode_images", lambda backbone, images: F.avg_pool2d(images, 2))
    monkeypatch.setitem(glob, "decode_latents", lambda backbone, latents: F.interpolate(latents, scale_factor=2, mode="nearest"))
    monkeypatch.setitem(glob, "paste", lambda generated, good, mask: generated)
    good, defect = np.full((8, 8, 3), 40, np.uint8), np.full((8, 8, 3), 200, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[1, 1] = True  # latent pixel (0, 0): the pixels [0:2, 0:2]
    (whole,) = ceiling["autoencoded"](None, [good], [defect], [mask], 8, latent_paste=False)
    (pasted,) = ceiling["autoencoded"](None, [good], [defect], [mask], 8, latent_paste=True)
    assert (whole == 200).all()
    inside = np.zeros((8, 8), bool)
    inside[:2, :2] = True
    assert (pasted[inside] == 200).all() and (pasted[~inside] == 40).all()


def test_each_prompted_row_gets_its_familys_words_masks_and_judgement(ceiling):
    """Every family's words inpaint in the masks of that family's renders and are judged as that family;
    the good words use the pair's masks and are judged as the pair's family; at guidance 1 and --guidance."""
    glob = ceiling["pair_rows"].__globals__
    calls, judged = [], []

    def prompted(backbone, prompt, goods, masks, args, guidance):
        calls.append((prompt, guidance, [m.copy() for m in masks]))
        return [g.copy() for g in goods]

    def judge(judges, images, masks, family, category, sources):
        judged.append((family, [m.copy() for m in masks]))
        return {"family_accuracy": 0.0, "alignment_iou": 0.0, "outside_change": 0.0, "verdicts": {}}

    glob.update(prompted=prompted, judge=judge, autoencoded=lambda backbone, goods, defects, masks, size, paste: goods)
    args = ceiling["parse"](["--out", "unused", *TINY, "--guidance", "5"])
    records, shown, labels = ceiling["pair_rows"](None, None, ("pill", "stain"), args)
    mask_of = {f: [m for _, _, m in ceiling["renders"](("pill", "stain"), f, 2, 32)] for f in FAMILIES}
    assert labels[:3] == ["real", "autoencoder", "latent paste"]
    assert [g for _, g, _ in calls] == [1.0] * 5 + [5.0] * 5
    prompts = [p for p, _, _ in calls]
    assert prompts[:5] == ["a photo of pill with stain", "a photo of pill with scratch", "a photo of pill with crack",
                           "a photo of pill with hole", "a photo of pill"] == prompts[5:]
    for (prompt, _, masks), (family, judged_masks), record in zip(calls, judged[3:], records[3:]):
        family_of_prompt = prompt.rpartition(" with ")[2] if " with " in prompt else "stain"
        assert family == family_of_prompt == record["judged_as"]
        assert all((a == b).all() for a, b in zip(masks, mask_of[family_of_prompt]))
        assert all((a == b).all() for a, b in zip(judged_masks, mask_of[family_of_prompt]))
    assert "(held out)" in labels[3] and all("(seen)" in label for label in labels[4:7])
    assert len({f for f in FAMILIES}) == len({tuple(m.sum() for m in mask_of[f]) for f in FAMILIES})  # the masks differ


def test_a_tiny_run_writes_every_row_its_table_and_grid(ceiling, tmp_path):
    assert ceiling["main"](["--out", str(tmp_path), *TINY, "--pairs", "pill:stain"]) == 0
    result = json.loads((tmp_path / "ceiling.json").read_text())
    assert len(result["records"]) == 3 + 2 * (len(FAMILIES) + 1) and result["wall_s"] >= 0
    assert all(r["samples"] == 2 for r in result["records"])
    assert all(r["outside_change"] == 0 for r in result["records"])  # the good image outside every mask
    assert "latent paste" in (tmp_path / "ceiling.md").read_text()
    assert (tmp_path / "ceiling-pill-stain.png").stat().st_size > 0
    assert ceiling["main"](["--out", str(tmp_path), *TINY, "--pairs", "pill:stain", "--no-words"]) == 0
    rows = [r["row"] for r in json.loads((tmp_path / "ceiling.json").read_text())["records"]]
    assert rows == ["real", "autoencoder", "latent paste"]


def test_a_prior_folder_without_a_model_is_one_line_naming_it(ceiling, tmp_path):
    with pytest.raises(AnomalygenError, match="--prior .*model_index.json"):
        ceiling["parse"](["--out", str(tmp_path), "--prior", str(tmp_path)])
