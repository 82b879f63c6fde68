"""Validity checks: hand-made failed pairs fail the check they break, good pairs pass, and the
calibration lets >= 95 % of the real training pairs pass each check (../shared/data)."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomalygen.data.demo import render_pair
from anomalygen.data.images import load_image
from anomalygen.errors import AnomalygenError, DataError
from anomalygen.generation import redraw
from anomalygen.generation.redraw import sub_seed
from anomalygen.generation.validity import CHECKS, Calibration, CheckResult, failures, fit_category

SIZE = 128
SEEDS = range(6)


def _pairs(category: str, types: tuple[str, ...]):
    """(good, image, mask, type) demo pairs: the demo's defect is a real pair with a known source."""
    return [(*render_pair(category, t, seed, SIZE), t) for t in types for seed in SEEDS]


@pytest.fixture(scope="module")
def fabric():
    pairs = _pairs("fabric", ("cut", "hole", "stain"))
    calibration = Calibration.fit([(im, m, t) for _, im, m, t in pairs], [g for g, *_ in pairs])
    return pairs, calibration


@pytest.fixture(scope="module")
def nut():
    pairs = _pairs("nut", ("dent", "scratch"))
    calibration = Calibration.fit([(im, m, t) for _, im, m, t in pairs], [g for g, *_ in pairs])
    return pairs, calibration


def _passed(results) -> dict[str, bool]:
    return {name: r.passed for name, r in results.items()}


def test_demo_pairs_pass_with_and_without_source(fabric, nut):
    for pairs, calibration in (fabric, nut):
        for good, image, mask, t in pairs[::4]:
            assert failures(calibration.check(image, mask, t)) == []
            assert failures(calibration.check(image, mask, t, source=good, blended=True)) == []


def test_pair_identical_to_its_good_image_is_not_visible(fabric):
    (good, _, mask, t), calibration = fabric[0][0], fabric[1]
    with_source = calibration.check(good, mask, t, source=good)
    assert with_source["visible"].score == 0.0 and not with_source["visible"].passed
    assert with_source["aligned"].passed  # nothing changed anywhere
    assert not calibration.check(good, mask, t)["visible"].passed  # surroundings variant
    assert "hardly differs" in with_source["visible"].reason


def test_change_outside_the_mask_is_not_aligned(fabric):
    (good, image, mask, t), calibration = fabric[0][0], fabric[1]
    moved = image.copy()
    moved[:SIZE // 8, :] = 255 - moved[:SIZE // 8, :]  # a band far from the demo defect (10 % margin)
    assert not mask[:SIZE // 8].any()
    for blended in (True, False):
        result = calibration.check(moved, mask, t, source=good, blended=blended)["aligned"]
        assert not result.passed and result.score > 0.1
    # one changed pixel: a blended method fails, a whole-image one is allowed a little
    speck = image.copy()
    speck[0, 0] = 255 - speck[0, 0]
    assert not calibration.check(speck, mask, t, source=good, blended=True)["aligned"].passed
    assert calibration.check(speck, mask, t, source=good, blended=False)["aligned"].passed


def test_mask_covering_part_of_the_defect_spills(fabric):
    """Without a source, a mask that misses most of its defect fails "aligned"."""
    calibration = fabric[1]
    for good, image, mask, t in fabric[0]:
        if t != "stain":
            continue
        ys, xs = np.nonzero(mask)
        core = np.zeros_like(mask)
        cy, cx = int(ys.mean()), int(xs.mean())
        core[cy - 2:cy + 3, cx - 2:cx + 3] = True
        core &= mask
        if core.sum() < 5:
            continue
        assert not calibration.check(image, core, t)["aligned"].passed
        return
    pytest.fail("no stain with a 5x5 core")


def test_mask_on_the_background_is_not_on_the_object(nut):
    (good, image, mask, t), calibration = nut[0][0], nut[1]
    assert calibration.mode == "object"
    corner = np.zeros_like(mask)
    corner[2:12, 2:12] = True  # the demo nut sits in the middle of a plain background
    result = calibration.check(image, corner, t, source=good)["on_object"]
    assert not result.passed and result.score == 0.0
    assert calibration.check(image, mask, t, source=good)["on_object"].passed


def test_texture_category_has_no_background(fabric):
    (good, image, _, t), calibration = fabric[0][0], fabric[1]
    corner = np.zeros(good.shape[:2], bool)
    corner[2:12, 2:12] = True
    assert calibration.mode == "texture"
    assert calibration.check(image, corner, t, source=good)["on_object"].passed


def test_tiny_and_huge_masks_are_implausible(fabric):
    (good, image, mask, t), calibration = fabric[0][0], fabric[1]
    lo, hi = calibration.area[t]
    tiny = np.zeros_like(mask)
    tiny[60, 60] = True
    huge = np.ones_like(mask)
    assert 1 / mask.size < lo / calibration.size_margin and hi * calibration.size_margin < 1.0
    for bad in (tiny, huge):
        result = calibration.check(image, bad, t, source=good)["size"]
        assert not result.passed and "outside" in result.reason
    assert calibration.check(image, mask, t, source=good)["size"].passed


def test_size_of_a_made_up_type_is_not_checked(fabric):
    calibration = fabric[1]
    assert calibration.area["*"][0] == min(lo for lo, _ in calibration.area.values())
    huge = np.ones((SIZE, SIZE), bool)
    huge[:4] = False
    image = fabric[0][0][1]
    assert not calibration.check(image, huge, "cut")["size"].passed  # a real type: far too large
    made_up = calibration.check(image, huge, "patch")["size"]
    assert made_up.passed and "no real 'patch' defects" in made_up.reason


@settings(max_examples=25, deadline=None)
@given(
    st.integers(20, 108), st.integers(20, 108), st.integers(6, 18), st.integers(6, 18), st.integers(0, 5)
)
def test_pasted_foreign_texture_is_visible_and_aligned(fabric, cy, cx, ry, rx, which):
    """A checkerboard pasted into its source inside any ellipse passes visible and aligned (blended);
    without the source it is still visible against its surroundings."""
    good, _, _, t = fabric[0][which]
    calibration = fabric[1]
    yy, xx = np.mgrid[:SIZE, :SIZE]
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    checker = np.where(((yy // 3 + xx // 3) % 2 == 0)[..., None], 255, 0).astype(np.uint8)
    image = np.where(mask[..., None], checker, good)
    # and a zero-mean change of texture: +-50 grey levels in a checkerboard, same mean brightness
    signs = np.where((yy // 2 + xx // 2) % 2 == 0, 1, -1)[..., None]
    retextured = np.where(mask[..., None], np.clip(good.astype(int) + 50 * signs, 0, 255), good).astype(np.uint8)
    for pasted in (image, retextured):
        results = calibration.check(pasted, mask, t, source=good, blended=True)
        assert results["visible"].passed, results["visible"].reason
        assert results["aligned"].passed, results["aligned"].reason
        assert calibration.check(pasted, mask, t)["visible"].passed


def test_empty_mask_fails_everything_and_sizes_must_match(fabric):
    (_, image, mask, t), calibration = fabric[0][0], fabric[1]
    results = calibration.check(image, np.zeros_like(mask), t)
    assert [r.passed for r in results.values()] == [False] * len(CHECKS)
    with pytest.raises(AnomalygenError, match="sizes differ"):
        calibration.check(image, mask[:-1], t)


def test_calibration_json_round_trip(fabric, tmp_path):
    calibration = fabric[1]
    path = tmp_path / "validity.json"
    calibration.save(path)
    assert Calibration.load(path) == calibration
    path.write_text('{"mode": "texture"}')
    with pytest.raises(DataError, match="validity.json: not a validity calibration"):
        Calibration.load(path)
    path.write_text('{"mode": "texture", "visible": {"cut": 1}, "spill": {"*": 1}, "on_object": {"*": 1}, "area": {"*": [0, 1]}}')
    with pytest.raises(DataError, match="validity.json: validity calibration lacks the all-types entry '\\*' of visible"):
        Calibration.load(path)


def test_calibration_lets_95_percent_of_the_real_pairs_pass(fabric, nut):
    for pairs, calibration in (fabric, nut):
        passed = np.array([list(_passed(calibration.check(im, m, t)).values()) for _, im, m, t in pairs])
        assert passed.mean(axis=0).min() >= 0.95


@pytest.mark.shared
@pytest.mark.parametrize("name", ["magnetic_tile", "mvtec_ad_grid_subset"])
def test_real_training_pairs_pass_each_check(shared_data, name):
    from anomalygen.data import load_category, load_defects, paper_split

    data = load_category(shared_data / name)
    calibration = fit_category(data)
    train, _ = paper_split(data.defects)
    rows = [
        list(_passed(calibration.check(ex.image, ex.mask, ex.defect_type)).values())
        for records in train.values()
        for ex in load_defects(records)
    ]
    rates = dict(zip(CHECKS, np.mean(rows, axis=0)))
    assert min(rates.values()) >= 0.95, rates


def _fussy(calibration, sample, goods, method):
    """A stand-in for ``judge`` that rejects (as "size") half the draws, by their pixels."""
    ok = int(sample.image.astype(np.int64).sum()) % 2 == 0
    return {name: CheckResult(name, 0.0, ok or name != "size", "") for name in CHECKS}


def _manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_filter_redraws_rejected_samples_deterministically(demo_root, tmp_path, monkeypatch):
    from anomalygen import pipeline

    monkeypatch.setattr(redraw, "judge", _fussy)
    data = demo_root / "fabric"
    result = pipeline.generate("cutpaste", data, tmp_path / "a", 6, filter=True, max_attempts=10)
    lines = _manifest(result.out)
    validity = [line["meta"]["validity"] for line in lines]
    assert all(v["passed"] for v in validity) and result.invalid == 0
    redrawn = collections.Counter(line["defect_type"] for line, v in zip(lines, validity) if v["attempts"] > 1)
    assert result.redrawn == dict(redrawn) and sum(redrawn.values()) > 0
    assert result.rejected == {"size": sum(len(v["rejected"]) for v in validity)}
    assert all(r["checks"] == ["size"] for v in validity for r in v["rejected"])
    # the kept draw of sample i is sample i of seed sub_seed(0, i, kept)
    _, defects, goods = pipeline.load_training(data)
    generator = pipeline.build("cutpaste", {})
    generator.fit(defects, goods)
    for i, v in enumerate(validity):
        seed = 0 if v["kept"] == 0 else sub_seed(0, i, v["kept"])
        expected = next(iter(generator.generate(goods, 1, seed=seed, start=i)))
        assert np.array_equal(load_image(result.out / lines[i]["image"]), expected.image)
    # a re-run and a resumed run write the same bytes
    pipeline.generate("cutpaste", data, tmp_path / "b", 6, filter=True, max_attempts=10)
    pipeline.generate("cutpaste", data, tmp_path / "c", 3, filter=True, max_attempts=10)
    pipeline.generate("cutpaste", data, tmp_path / "c", 6, filter=True, max_attempts=10)
    for other in ("b", "c"):
        assert (tmp_path / other / "fabric" / "manifest.jsonl").read_text() == (result.out / "manifest.jsonl").read_text()
        for line in lines:
            assert (tmp_path / other / "fabric" / line["image"]).read_bytes() == (result.out / line["image"]).read_bytes()


def test_filter_keeps_the_least_bad_draw_when_all_fail(demo_root, tmp_path, monkeypatch):
    from anomalygen import pipeline

    monkeypatch.setattr(redraw, "judge", lambda *a: {n: CheckResult(n, 0.0, n != "visible", "") for n in CHECKS})
    warnings = []
    result = pipeline.generate("cutpaste", demo_root / "fabric", tmp_path, 2, filter=True, max_attempts=3,
                               keep_failing=True, warn=warnings.append)
    assert result.invalid == 2 and result.rejected == {"visible": 6}
    assert [line["meta"]["validity"]["attempts"] for line in _manifest(result.out)] == [3, 3]
    assert warnings == ["cutpaste on fabric: 2 samples (patch 1, scar 1) failed a validity check in all 3 draws; "
                        "kept (`keep_failing`; flagged in the manifest)"]


def test_only_valid_pairs_by_default_a_broken_model_stops_after_its_first_draws(demo_root, tmp_path, monkeypatch):
    from anomalygen import pipeline

    calls = []
    monkeypatch.setattr(redraw, "judge", lambda *a: calls.append(1) or {n: CheckResult(n, 0.0, n != "visible", "")
                                                                          for n in CHECKS})
    with pytest.raises(AnomalygenError) as error:
        pipeline.generate("cutpaste", demo_root / "fabric", tmp_path, 4, give_up_after=7)
    assert len(calls) == 7 and "cutpaste on fabric: the first 7 draws all failed" in str(error.value)
    manifest = tmp_path / "fabric" / "manifest.jsonl"
    assert "rejected by visible 7" in str(error.value) and not (manifest.exists() and manifest.read_text())


def test_the_cap_names_method_category_and_type_and_a_rerun_with_a_higher_cap_resumes(demo_root, tmp_path, monkeypatch):
    from anomalygen import pipeline

    monkeypatch.setattr(redraw, "judge", _fussy)
    data = demo_root / "fabric"
    for seed in range(2, 20):  # a seed whose first rejected draw is not the first sample's (which pixels the
        whole = pipeline.generate("cutpaste", data, tmp_path / f"whole{seed}", 8, seed=seed, max_attempts=10)
        lines = _manifest(whole.out)  # stand-in rejects depends on the image libraries' versions)
        attempts = [line["meta"]["validity"]["attempts"] for line in lines]
        first = next((i for i, a in enumerate(attempts) if a > 1), 0)  # the first sample whose first draw failed
        if first > 0:
            break
    assert first > 0  # samples are written before the cap stops the run
    with pytest.raises(AnomalygenError) as error:  # at most 1 draw per valid pair: stops there
        pipeline.generate("cutpaste", data, tmp_path / "capped", 8, seed=seed, max_attempts=1, give_up_after=0)
    assert str(error.value).startswith(f"cutpaste on fabric/{lines[first]['defect_type']}: ")
    assert "more than `max_attempts` 1 draws per valid pair" in str(error.value)
    assert len(_manifest(tmp_path / "capped" / "fabric")) == first
    pipeline.generate("cutpaste", data, tmp_path / "capped", 8, seed=seed, max_attempts=10)
    assert (tmp_path / "capped" / "fabric" / "manifest.jsonl").read_text() == (whole.out / "manifest.jsonl").read_text()
    for line in lines:
        assert (tmp_path / "capped" / "fabric" / line["image"]).read_bytes() == (whole.out / line["image"]).read_bytes()


def test_filter_with_real_checks_and_cli(demo_root, tmp_path):
    from typer.testing import CliRunner

    from anomalygen.cli import app

    command = ["generate", "--method", "croppaste", "--data", str(demo_root / "fabric"), "--num", "6"]
    run = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "on"), "--filter"])
    assert run.exit_code == 0 and "filter: " in run.output
    assert all(line["meta"]["validity"]["attempts"] >= 1 for line in _manifest(tmp_path / "on" / "fabric"))
    run = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "off"), "--no-filter"])
    assert run.exit_code == 0 and "filter: " not in run.output
    assert all("validity" not in line["meta"] for line in _manifest(tmp_path / "off" / "fabric"))
    run = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "x"), "--filter", "--max-attempts", "0"])
    assert run.exit_code == 2 and "--max-attempts 0" in run.output


def test_sub_seeds_differ_per_sample_attempt_and_run():
    seeds = {sub_seed(run, i, a) for run in (0, 1) for i in range(20) for a in range(1, 6)}
    assert len(seeds) == 200


def test_first_valid_keeps_the_earliest_draw_failing_fewest_checks():
    from anomalygen.types import AnomalySample
    from anomalygen.generation.redraw import first_valid

    failing = [["visible", "size"], ["size"], ["visible", "aligned", "size"], ["aligned"]]
    draw = lambda a: AnomalySample(np.zeros((2, 2), np.uint8), np.ones((2, 2), bool), "cut", meta={"draw": a})
    check = lambda s: {n: CheckResult(n, 0.0, n not in failing[s.meta["draw"]], "") for n in CHECKS}
    kept = first_valid(draw(0), draw, check, max_attempts=4)
    assert kept.meta["draw"] == 1
    assert kept.meta["validity"] == {"attempts": 4, "kept": 1, "passed": False,
                                     "rejected": [{"attempt": a, "checks": sorted(f, key=CHECKS.index)}
                                                  for a, f in enumerate(failing)]}
    failing.insert(2, [])
    assert first_valid(draw(0), draw, check, max_attempts=5).meta["validity"]["kept"] == 2


def test_each_method_says_what_it_keeps_of_its_source():
    from anomalygen.methods.base import available_methods, get_method

    kinds = {name: get_method(name).outside_mask for name in available_methods()}
    assert kinds == {"anomalydiffusion": "kept", "anomalyxfusion": "changed", "cagen": "changed", "croppaste": "kept", "cutpaste": "kept",
                     "draem": "kept", "dualanodiff": "none", "textual-inversion": "kept"}


def test_filter_is_on_by_default_and_its_rates_reach_the_report(demo_root, tmp_path, monkeypatch):
    from anomalygen import pipeline
    from anomalygen.evaluation.localization import LocalizationConfig
    from anomalygen.evaluation.run import evaluate

    monkeypatch.setattr(redraw, "judge", _fussy)
    result = pipeline.generate("cutpaste", demo_root / "fabric", tmp_path, 6, max_attempts=10)
    lines = _manifest(result.out)
    assert all("validity" in line["meta"] for line in lines)
    report = evaluate(tmp_path, demo_root, category="fabric", metrics=["localization"], device="cpu",
                      localization=LocalizationConfig(epochs=1, samples_per_epoch=4, resolution=32, base=4, protocol="clean"))
    redrawn = sum(line["meta"]["validity"]["attempts"] > 1 for line in lines)
    assert report["validity"]["all"]["samples"] == 6
    assert report["validity"]["all"]["rejected_first"] == pytest.approx(redrawn / 6) and redrawn > 0
    assert report["validity"]["all"]["rejected_draws"]["size"] == result.rejected["size"]
    assert "Validity filter" in (result.out / "report.html").read_text()


def test_rejection_rates_count_first_draws_and_final_failures():
    from anomalygen.evaluation.rejections import rejection_rates

    def line(defect_type, rejected, passed):
        return {"defect_type": defect_type, "meta": {"validity": {
            "rejected": [{"attempt": a, "checks": c} for a, c in rejected], "passed": passed}}}

    lines = [line("cut", [], True), line("cut", [(0, ["size"]), (1, ["size", "visible"])], True),
             line("hole", [(0, ["visible"]), (1, ["visible"])], False), line("hole", [], True),
             {"defect_type": "hole", "meta": {}}]  # written without the filter: not counted
    rates = rejection_rates(lines)
    assert list(rates) == ["cut", "hole", "all"]
    assert rates["cut"] == {"samples": 2, "rejected_first": 0.5, "kept_failing": 0.0,
                            "rejected_draws": {"visible": 1, "aligned": 0, "on_object": 0, "size": 2}}
    assert rates["hole"]["kept_failing"] == 0.5 and rates["hole"]["rejected_draws"]["visible"] == 2
    assert rates["all"]["samples"] == 4 and rates["all"]["rejected_first"] == 0.5 and rates["all"]["kept_failing"] == 0.25
    assert rejection_rates([{"defect_type": "cut", "meta": {}}]) == {}
