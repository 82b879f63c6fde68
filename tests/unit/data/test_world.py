"""The procedural defect world (``data.world``) and its proof-of-learning benchmark (``benchmarks/world_learning.py``)."""

import hashlib
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalygen.data.world import CATEGORIES, FAMILIES, render_defect

torch.set_num_threads(1)

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "world_learning.py"
TINY_WORLD = ["--size", "32", "--prior-good", "2", "--prior-defects", "1", "--pair-good", "3", "--pair-test-good", "2",
              "--pair-defects", "6"]
TINY = [*TINY_WORLD, "--model", "tiny", "--seeds", "0", "--num-per-type", "2", "--steps", "2", "--sampling-steps", "1",
        "--batch-size", "2", "--epochs", "1", "--samples-per-epoch", "2", "--unet-base", "4", "--judge-renders", "16",
        "--judge-steps", "2", "--loss-batches", "1", "--max-attempts", "1"]


@pytest.fixture(scope="module")
def world():
    return runpy.run_path(str(SCRIPT))


def test_every_family_changes_exactly_its_mask_in_every_category_with_its_own_look():
    for c, category in enumerate(CATEGORIES):
        for f, family in enumerate(FAMILIES):
            good, image, mask = render_defect(category, family, np.random.default_rng([c, f]), 32)
            assert mask.sum() >= 4 and ((image != good).any(-1) == mask).all(), (category, family)
            before, after = good[mask].astype(float), image[mask].astype(float)
            if family == "scratch":  # brighter, towards white
                assert after.mean() > before.mean() + 20, category
            elif family == "crack":  # much darker
                assert after.mean() < 0.45 * before.mean(), category
            elif family == "stain":  # redder
                assert (after[:, 0] / after[:, 1:].mean(1)).mean() > 1.5 * (before[:, 0] / before[:, 1:].mean(1)).mean(), category
            else:  # hole: a near-black inside within a shaded rim
                assert (after.max(1) < 40).mean() > 0.25 and np.ptp(after.mean(1)) > 60, category


def _hashes(folder: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.png") if "ground_truth" not in p.parts}


def test_held_out_pairs_never_reach_the_priors_training_data(world, tmp_path):
    from anomalygen.pretrain.data import load_pretrain_images

    args = world["parse"](["--out", str(tmp_path), "--pairs", "wood:scratch,nut:crack", *TINY_WORLD])
    world["build_world"](args)
    images = load_pretrain_images([tmp_path / "world" / "prior"], 32, include_defects=True)
    expected = {f"a photo of {c}" for c in CATEGORIES} | {f"a photo of {c} with {f}" for c in CATEGORIES for f in FAMILIES
                                                           if (c, f) not in [("wood", "scratch"), ("nut", "crack")]}
    assert set(images.prompts) == expected
    pairs = tmp_path / "world" / "pairs"
    assert sorted(p.name for p in pairs.iterdir()) == ["nut-crack", "wood-scratch"]
    assert sorted(p.name for p in (pairs / "wood-scratch" / "wood" / "test").iterdir()) == ["good", "scratch"]
    assert not _hashes(tmp_path / "world" / "prior") & _hashes(pairs)  # not one image shared


def test_outside_change_is_measured_outside_the_mask_only(world):
    judge = world["judge"]

    class Stub:  # every judge answers the same; only the outside-mask arithmetic is tested here
        prior_family = None

        def segment(self, images):
            return np.zeros((len(images), 8, 8), bool)

        def families(self, images, masks):
            return ["scratch"] * len(images)

        def categories(self, images):
            return ["wood"] * len(images)

    source = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    inside = source.copy()
    inside[mask] = 255
    outside = inside.copy()
    outside[~mask] += 51
    result = judge(Stub(), [inside, outside], [mask, mask], "scratch", "wood", [source, source])
    assert result["outside_change"] == pytest.approx(0.1)  # (0 + 51 / 255) / 2
    assert result["family_accuracy"] == 1.0 and result["category_kept"] == 1.0 and result["alignment_iou"] == 0.0


def test_the_family_as_the_prior_draws_it_is_the_prior_family_judges_verdict(world):
    class Stub:
        prior_family = object()  # set: the judge of the prior's autoencoder exists

        def segment(self, images):
            return np.zeros((len(images), 8, 8), bool)

        def families(self, images, masks, prior=False):
            return ["crack" if prior else "scratch", "scratch"][: len(images)]

        def categories(self, images):
            return ["wood"] * len(images)

    image, mask = np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), bool)
    result = world["judge"](Stub(), [image, image], [mask, mask], "scratch", "wood", [None, None])
    assert result["family_accuracy"] == 1.0 and result["verdicts"] == {"scratch": 2}
    assert result["family_accuracy_prior"] == 0.5 and result["verdicts_prior"] == {"scratch": 1, "crack": 1}


def test_the_whole_pipeline_at_tiny_size_and_a_rerun_resumes(world, tmp_path, monkeypatch, capsys):
    argv = ["--out", str(tmp_path), "--pairs", "wood:scratch", "--methods", "croppaste,textual-inversion", *TINY]
    assert world["main"](argv) == 0
    result = json.loads((tmp_path / "world_learning.json").read_text())
    assert [r["row"] for r in result["tables"]["results"]] == ["croppaste", "textual-inversion", "textual-inversion (untrained)"]
    cells = {c["row"]: c for c in result["cells"]}
    assert cells["textual-inversion"]["steps"] == 2 and cells["textual-inversion (untrained)"]["steps"] == 0
    assert {k: v for k, v in cells["textual-inversion (untrained)"]["options"].items() if k not in ("time_budget_s", "work_dir")} == \
        {k: v for k, v in cells["textual-inversion"]["options"].items() if k != "work_dir"}
    assert all(isinstance(cells[r]["heldout_loss"], float) for r in ("textual-inversion", "textual-inversion (untrained)"))
    assert "heldout_loss" not in cells["croppaste"]
    assert all(c["samples"] == 2 and 0 <= c["family_accuracy"] <= 1 and 0 <= c["pixel_ap"] <= 1 for c in cells.values())
    assert cells["croppaste"]["outside_change"] == 0.0  # Crop-Paste keeps every pixel outside its mask
    assert all(0 <= c["family_accuracy_prior"] <= 1 and sum(c["verdicts_prior"].values()) == 2 for c in cells.values())
    for name in ("world_learning.md", "world_learning.png", "samples-wood-scratch.png", "judges.json", "judges-prior.json"):
        assert (tmp_path / name).stat().st_size > 0

    # the held-out loss is measured in the state of the cell's checkpoint: a scaled token moves it
    from safetensors.torch import load_file, save_file

    cell = tmp_path / "cells" / "wood-scratch" / "seed-0" / "textual-inversion"
    args = world["parse"](argv)
    options = world["row_options"]("textual-inversion", world["options_of"](args, "tiny", 0))
    data = world["pair_data"](tmp_path, ("wood", "scratch"))
    loss = world["heldout_loss"]("textual-inversion", options, cell / "work", data, 1, 0)
    assert loss == cells["textual-inversion"]["heldout_loss"]
    (weights,) = (cell / "work").rglob("trainable.safetensors")
    save_file({k: v * 50 for k, v in load_file(str(weights)).items()}, str(weights))
    assert world["heldout_loss"]("textual-inversion", options, cell / "work", data, 1, 0) != pytest.approx(loss, abs=1e-3)
    assert world["heldout_loss"]("textual-inversion", options, tmp_path / "nowhere", data, 1, 0) is None

    # a rerun resumes every cell
    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    # a cell judged before the prior's family judge existed gets its verdicts in the report, from its samples
    record_file = cell / world["CELL_FILE"]
    record = json.loads(record_file.read_text())
    drawn = {k: record.pop(k) for k in ("family_accuracy_prior", "verdicts_prior")}
    record_file.write_text(json.dumps(record))

    monkeypatch.setitem(world["run_cell"].__globals__, "benchmark", refuse)
    capsys.readouterr()
    assert world["main"](argv) == 0
    assert capsys.readouterr().out.count("resumed") == 3
    assert {k: json.loads(record_file.read_text())[k] for k in drawn} == drawn


def test_beats_spread_needs_every_paired_difference_above_both_rows_seed_spread(world, tmp_path):
    args = world["parse"](["--out", str(tmp_path), "--pairs", "wood:scratch", "--methods", "cagen", "--seeds", "0", "1"])

    def records(trained, control):
        return [{"pair": "wood-scratch", "row": row, "seed": s, "family_accuracy": v, "alignment_iou": 0.1}
                for row, values in (("cagen", trained), ("cagen (untrained)", control)) for s, v in enumerate(values)]

    (delta,) = world["tables"](records((0.5, 0.6), (0.1, 0.12)), args)["deltas"]
    assert delta["family accuracy − untrained"] == "+0.440 (+0.400 … +0.480)" and delta["family accuracy: beats spread"] == "yes"
    assert delta["alignment IoU: beats spread"] == "no"  # +0.000
    (delta,) = world["tables"](records((0.3, 0.9), (0.1, 0.12)), args)["deltas"]
    assert delta["family accuracy: beats spread"] == "no"  # mean difference 0.49, smallest 0.2: below the trained spread 0.42
    args.seeds = [0]
    (delta,) = world["tables"](records((0.5,), (0.1,)), args)["deltas"]
    assert delta["family accuracy: beats spread"] == "—"  # one seed: no spread to beat


def test_the_priors_autoencoder_and_unet_get_their_own_defect_weights(world, tmp_path, monkeypatch):
    import anomalygen.pretrain as pretrain_module

    configs = []
    monkeypatch.setattr(pretrain_module, "pretrain", lambda data, out, config, say: configs.append(config) or {})
    monkeypatch.setitem(world["prior_path"].__globals__, "autoencoder_gate", lambda *_: None)
    args = world["parse"](["--out", str(tmp_path), "--prior-defect-weight", "0.7", "--prior-unet-defect-weight", "0.2"])
    world["prior_path"](args, judges=object())
    assert [(c.max_steps, c.vae_defect_weight, c.unet_defect_weight) for c in configs] == [(0, 0.7, 0.2), (2500, 0.7, 0.2)]
    configs.clear()
    (tmp_path / "prior.json").unlink()
    world["prior_path"](world["parse"](["--out", str(tmp_path)]), judges=object())
    assert {(c.vae_defect_weight, c.unet_defect_weight) for c in configs} == {(1.0, 0.0)}  # the defaults


def test_cell_processes_take_the_next_cell_no_other_process_holds(world, tmp_path, monkeypatch):
    import fcntl

    args = world["parse"](["--out", str(tmp_path), "--pairs", "wood:scratch", "--methods", "cutpaste,croppaste,draem",
                           "--seeds", "0", "1"])
    ran = []

    def fake_cell(cell, pair, row, seed, *_):
        if (cell / "cell.json").is_file():
            return {**json.loads((cell / "cell.json").read_text()), "resumed": True}
        ran.append((seed, row))
        record = {"row": row, "seed": seed, "wall_s": 1.0, "pixel_ap": 0.5}
        (cell / "cell.json").write_text(json.dumps(record))
        return {**record, "resumed": False}

    monkeypatch.setitem(world["run_cells"].__globals__, "run_cell", fake_cell)
    cell_dir = world["cell_dir"]
    done = cell_dir(tmp_path, ("wood", "scratch"), 0, "cutpaste")
    done.mkdir(parents=True)
    (done / "cell.json").write_text(json.dumps({"row": "cutpaste", "seed": 0, "wall_s": 9.0}))
    busy = cell_dir(tmp_path, ("wood", "scratch"), 1, "croppaste")
    busy.mkdir(parents=True)
    with (busy / ".anomalygen.lock").open("w") as other:  # another process runs this cell
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert world["run_cells"](args, "tiny", None, (1, 2)) == []
    assert ran == [(0, "croppaste"), (0, "draem"), (1, "cutpaste"), (1, "draem")]  # not the held one, not the done one
    assert not (busy / "cell.json").exists()


def test_the_prior_family_judge_trains_on_renders_through_the_priors_autoencoder(world, tmp_path, monkeypatch):
    """Each bank reaching the classifier holds every defect and every good image after the round trip
    (a codec that adds 10 grey levels; no final paste: what the autoencoder returns reaches it)."""
    import anomalygen.diffusion.backbone as backbone_module

    glob = world["prior_judge"].__globals__
    loaded, reached = [], []
    monkeypatch.setattr(backbone_module, "load_backbone", lambda model: loaded.append(model) or "backbone")
    monkeypatch.setitem(glob, "encode_images", lambda backbone, images: images + 10 / 255)
    monkeypatch.setitem(glob, "decode_latents", lambda backbone, latents: latents)
    monkeypatch.setitem(glob, "paste", lambda generated, good, mask: generated)
    bank = world["world_judges"].render_bank(3, 32, 5)

    def train_prior_family(through, size, count, steps, seed=0):
        reached.append(through(bank))
        return world["world_judges"].Classifier(5), {"family_accuracy": 0.5}

    monkeypatch.setattr(world["world_judges"], "train_prior_family", train_prior_family)
    args = world["parse"](["--out", str(tmp_path), *TINY_WORLD])
    judges = world["world_judges"].build_judges()
    assert world["prior_judge"](args, "PRIOR", judges)["family_accuracy"] == 0.5 and loaded == ["PRIOR"]
    (through,) = reached
    assert np.array_equal(through.images, np.clip(bank.images.astype(int) + 10, 0, 255))
    assert np.array_equal(through.goods, np.clip(bank.goods.astype(int) + 10, 0, 255))
    assert np.array_equal(through.masks, bank.masks) and np.array_equal(through.families, bank.families)
    assert judges.prior_family is not None and not judges.prior_family.training
