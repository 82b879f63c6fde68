"""CutPaste, Crop-Paste and DRAEM: changes only inside the mask, types, determinism, save/load."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from anomalygen.errors import AnomalygenError, DataError
from anomalygen.methods import create
from anomalygen.methods.base import AnomalyGenerator
from anomalygen.synthesis.blending import blend, feather_alpha, place, random_point, rotate_patch
from anomalygen.types import DefectExample

cv2.setNumThreads(1)
METHODS = ("cutpaste", "croppaste", "draem")


def textures(k=3, shape=(64, 80)):
    rng = np.random.default_rng(100)
    out = []
    for _ in range(k):
        noise = cv2.GaussianBlur(rng.uniform(0, 255, (*shape, 3)).astype(np.float32), (0, 0), 1.5)
        out.append(np.clip((noise - noise.mean()) * 4 + 128, 0, 255).astype(np.uint8))
    return out


def objects(k=3, shape=(72, 96)):
    rng = np.random.default_rng(200)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    images, discs = [], []
    for i in range(k):
        disc = (yy - 36) ** 2 + (xx - 40 - 5 * i) ** 2 < 22**2
        image = np.full((*shape, 3), 30, np.float32) + rng.normal(0, 2, (*shape, 3))
        image[disc] = (160, 120, 80) + rng.normal(0, 8, (disc.sum(), 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
        discs.append(disc)
    return images, discs


def defects():
    """Two defect types on 48x64 images: a blob + a thin line ("scratch"), a square ("hole")."""
    rng = np.random.default_rng(300)
    out = []
    for k, kind in enumerate(["scratch", "scratch", "hole"]):
        image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        mask = np.zeros((48, 64), bool)
        if kind == "scratch":
            mask[10 + k, 5:50] = True
            mask[11 + k, 5:50] = True
            mask[30:38, 40:50] = True
        else:
            mask[20:30, 20:32] = True
        out.append(DefectExample(image, mask, kind))
    return out


def fitted(method, good, **options):
    generator = create(method, **options)
    generator.fit(defects(), good)
    return generator


def same(a, b):
    return all(
        np.array_equal(x.image, y.image)
        and np.array_equal(x.mask, y.mask)
        and x.defect_type == y.defect_type
        and x.meta == y.meta
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("method", METHODS)
def test_changes_only_inside_nonempty_mask(method):
    good = textures()
    samples = list(fitted(method, good).generate(good, 6, seed=3))
    assert len(samples) == 6
    for s in samples:
        source = good[s.meta["source_index"]]
        assert s.image.dtype == np.uint8 and s.image.shape == source.shape
        assert s.mask.dtype == bool and s.mask.shape == source.shape[:2]
        assert s.mask.sum() >= 4
        changed = (s.image != source).any(axis=2)
        assert not (changed & ~s.mask).any()
        assert changed.sum() >= 0.5 * s.mask.sum()
        json.dumps(s.meta)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_bytes_resume_and_other_seed(method):
    good = textures()
    generator = fitted(method, good)
    full = list(generator.generate(good, 6, seed=7))
    assert same(full, list(generator.generate(good, 6, seed=7)))
    assert same(full[4:], list(generator.generate(good, 2, seed=7, start=4)))
    other = list(generator.generate(good, 6, seed=8))
    assert not any(np.array_equal(a.image, b.image) for a, b in zip(full, other, strict=True))


@pytest.mark.parametrize("method", METHODS)
def test_save_load_generates_identically(method, tmp_path):
    good = textures()
    generator = fitted(method, good)
    generator.save(tmp_path / "model")
    loaded = AnomalyGenerator.load(tmp_path / "model")
    assert type(loaded) is type(generator) and loaded.config() == generator.config()
    assert loaded.defect_types == generator.defect_types
    assert same(list(generator.generate(good, 4, seed=1)), list(loaded.generate(good, 4, seed=1)))


@pytest.mark.parametrize("method", METHODS)
def test_given_masks_fix_the_anomaly_region(method):
    good = textures()
    mask = np.zeros((32, 40), bool)  # half size: resized to the image
    mask[8:20, 10:30] = True
    samples = list(fitted(method, good).generate(good, 3, masks=[mask], seed=0))
    expected = cv2.resize(mask.astype(np.uint8), (80, 64), interpolation=cv2.INTER_NEAREST).astype(bool)
    for s in samples:
        assert np.array_equal(s.mask, expected)
        assert not ((s.image != good[s.meta["source_index"]]).any(axis=2) & ~expected).any()
    with pytest.raises(AnomalygenError, match="empty"):
        list(fitted(method, good).generate(good, 1, masks=[np.zeros((8, 8), bool)]))


@pytest.mark.parametrize("method", ["croppaste", "draem"])
def test_object_anomalies_stay_on_the_object(method):
    good, discs = objects()
    samples = list(fitted(method, good).generate(good, 6, seed=2))
    for s in samples:
        assert s.meta["foreground"] == "object"
        disc = discs[s.meta["source_index"]]
        # the foreground estimate may differ from the true disc by a rim of a pixel or two
        near = cv2.dilate(disc.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert s.mask.any() and not (s.mask & ~near).any()


def test_cutpaste_variants_and_labels():
    good = textures()
    generator = create("cutpaste")
    assert generator.defect_types == ["patch", "scar"]
    cycled = list(generator.generate(good, 4))
    assert [s.defect_type for s in cycled] == ["patch", "scar", "patch", "scar"]
    areas = [s.mask.mean() for s in cycled[::2]]
    assert all(0.015 <= a <= 0.16 for a in areas)
    scars = list(generator.generate(good, 3, defect_type="scar"))
    assert all(
        s.defect_type == "scar" and s.meta["variant"] == "scar" and s.mask.mean() < 0.05 for s in scars
    )
    labelled = list(generator.generate(good, 4, defect_type="cutpaste"))
    assert {s.defect_type for s in labelled} == {"cutpaste"}
    with pytest.raises(AnomalygenError, match="variants"):
        create("cutpaste", variants=["blob"])


def test_croppaste_keeps_types_and_loads_without_training_data(tmp_path):
    good = textures()
    generator = fitted("croppaste", good)
    assert generator.defect_types == ["scratch", "hole"]
    assert [s.defect_type for s in generator.generate(good, 4)] == ["scratch", "hole", "scratch", "hole"]
    assert {s.defect_type for s in generator.generate(good, 3, defect_type="hole")} == {"hole"}
    with pytest.raises(AnomalygenError, match="not learned"):
        list(generator.generate(good, 1, defect_type="crack"))
    generator.save(tmp_path)
    saved = json.loads((tmp_path / "crops.json").read_text())
    # scratch images: the line and the blob are separate crops; the hole is one
    assert [e["defect_type"] for e in saved] == ["scratch"] * 4 + ["hole"]
    assert all((tmp_path / e["image"]).is_file() and (tmp_path / e["mask"]).is_file() for e in saved)
    with pytest.raises(AnomalygenError, match="at least one"):
        create("croppaste").fit([], good)
    with pytest.raises(AnomalygenError, match="fit"):
        list(create("croppaste").generate(good, 1))


def test_draem_beta_texture_sources_and_errors(tmp_path):
    good = textures()
    samples = list(create("draem", beta=[0.5, 0.5]).generate(good, 3, seed=0))
    assert all(
        s.defect_type == "draem" and s.meta["beta"] == 0.5 and len(s.meta["ops"]) == 3 for s in samples
    )
    assert {s.meta["texture"] for s in create("draem").generate(good, 12)} <= {"brick", "grass", "gravel"}
    own = list(create("draem", texture_source="good").generate(good, 2, defect_type="stain"))
    assert all(s.meta["texture"].startswith("good:") and s.defect_type == "stain" for s in own)
    folder = tmp_path / "tex"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), textures(1, (30, 30))[0])
    from_folder = list(create("draem", texture_source=str(folder)).generate(good, 2))
    assert all(s.meta["texture"] == "a.png" for s in from_folder)
    with pytest.raises(DataError, match="not found"):
        list(create("draem", texture_source=str(tmp_path / "missing")).generate(good, 1))
    with pytest.raises(AnomalygenError, match="no good images"):
        list(create("draem").generate([], 1))


def test_feathered_blend_is_soft_inside_and_exact_outside():
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    alpha = feather_alpha(mask, 3)
    assert np.array_equal(alpha > 0, mask)
    assert alpha[10, 10] == 1.0 and 0 < alpha[5, 10] < 0.5
    image, patch = np.zeros((20, 20, 3), np.uint8), np.full((20, 20, 3), 200, np.uint8)
    out = blend(image, patch, alpha)
    assert out[10, 10, 0] == 200 and 0 < out[5, 10, 0] < 100 and not out[~mask].any()


def test_blend_is_the_convex_combination_rounded():
    """(1 − α)·image + α·patch, rounded, at a few α; a black patch on black stays black."""
    alpha = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    image = np.array([[[40] * 3, [40] * 3, [41] * 3, [40] * 3]], np.uint8)
    patch = np.array([[[200] * 3, [200] * 3, [200] * 3, [0] * 3]], np.uint8)
    assert blend(image, patch, alpha)[0, :, 0].tolist() == [40, 80, 120, 0]
    black = np.zeros((1, 4, 3), np.uint8)
    assert not blend(black, black, alpha).any()


def test_random_point_picks_from_the_region_or_anywhere_when_it_is_empty():
    region = np.zeros((3, 50), bool)
    region[2, 40] = True
    rng = np.random.default_rng(0)
    assert {random_point(rng, region) for _ in range(5)} == {(2, 40)}
    points = [random_point(rng, np.zeros((3, 50), bool)) for _ in range(200)]
    assert all(0 <= y < 3 and 0 <= x < 50 for y, x in points) and max(x for _, x in points) > 40


@pytest.mark.parametrize(("category", "mode"), [("fabric", "texture"), ("nut", "object")])
def test_demo_categories(demo_root, category, mode):
    from anomalygen.data import load_category, load_defects, load_goods, paper_split

    data = load_category(demo_root, category)
    train, _ = paper_split(data.defects)
    training = load_defects([r for records in train.values() for r in records])
    good = load_goods(data.train_good, limit=6)
    for method in METHODS:
        generator = create(method)
        generator.fit(training, good)
        for s in generator.generate(good, 3, seed=1):
            assert s.meta["foreground"] == mode and s.mask.any()
            assert not ((s.image != good[s.meta["source_index"]]).any(axis=2) & ~s.mask).any()
    assert create("croppaste").defect_types == []
    fitted_types = sorted({d.defect_type for d in training})
    croppaste = create("croppaste")
    croppaste.fit(training, good)
    assert sorted(croppaste.defect_types) == fitted_types


def test_photometric_ops_are_seeded_and_bounded():
    from anomalygen.synthesis.photometric import RAND_AUGMENT_OPS, color_jitter, rand_augment

    image = textures(1)[0]
    a, names = rand_augment(image, np.random.default_rng(4))
    b, _ = rand_augment(image, np.random.default_rng(4))
    assert np.array_equal(a, b) and len(set(names)) == 3 and a.shape == image.shape and a.dtype == np.uint8
    for op in RAND_AUGMENT_OPS:
        out = op(image, np.random.default_rng(0))
        assert out.shape == image.shape and out.dtype == np.uint8
    jittered = color_jitter(image, np.random.default_rng(0))
    assert 0 < np.abs(jittered.astype(int) - image).mean() < 20
    assert np.array_equal(color_jitter(image, np.random.default_rng(0), 0, 0, 0, 0), image)


@pytest.mark.parametrize("name", ["cutpaste", "croppaste", "draem", "textual-inversion", "anomalydiffusion"])
def test_every_method_declares_its_options_and_saved_configs_rebuild(name):
    """Defaults pass their own checks; a config survives JSON and rebuilds the same generator."""
    import json

    from anomalygen.methods.base import get_method

    spec = get_method(name).OPTIONS
    assert spec.validate(name, spec.defaults()) == spec.defaults()
    config = create(name).config()
    assert create(name, **json.loads(json.dumps(config))).config() == config
    with pytest.raises(AnomalygenError, match=rf"^{name}: unknown option\(s\) colour; known: "):
        create(name, colour="red")


@given(low=st.floats(-2, 2) | st.just(float("nan")), high=st.floats(-2, 2))
def test_range_option_accepts_exactly_ordered_pairs_within_bounds(low, high):
    from anomalygen.options import OptionSpec, Range

    spec = OptionSpec(r=Range([0, 1], 0, 1))
    valid = 0 <= low <= high <= 1
    try:
        assert spec.validate("m", {"r": [low, high]})["r"] == [low, high]
        assert valid
    except AnomalygenError as error:
        assert not valid
        assert str(error).startswith("m: option r got [")


def test_int_and_device_options_name_what_is_allowed():
    from anomalygen.options import Device, Int, OptionSpec

    spec = OptionSpec(n=Int(1, 1), device=Device())
    for value in (True, 1.5, "3", 0):
        with pytest.raises(AnomalygenError, match=r"^m: option n got .*; allowed: an integer >= 1$"):
            spec.validate("m", {"n": value})
    for device in ("quantum", "cuda:99", "", 3):
        with pytest.raises(AnomalygenError, match=r"^m: option device got .*allowed: auto or a torch device available here \(cpu"):
            spec.validate("m", {"device": device})
    assert spec.validate("m", {"device": "cpu", "n": 2}) == {"n": 2, "device": "cpu"}


@given(st.integers(1, 9), st.integers(1, 9), st.integers(-12, 20), st.integers(-12, 20))
def test_place_puts_each_patch_pixel_at_its_offset_and_crops_the_rest(ph, pw, top, left):
    """Pixel (i, j) of the patch lands at (top + i, left + j) when that is on the 12 × 15 canvas;
    nothing else is set."""
    patch = (np.arange(ph * pw * 3).reshape(ph, pw, 3) % 250 + 1).astype(np.uint8)
    alpha = (np.arange(ph * pw).reshape(ph, pw) + 1).astype(np.float32)
    canvas, canvas_alpha = place((12, 15), patch, alpha, top, left)
    expected, expected_alpha = np.zeros((12, 15, 3), np.uint8), np.zeros((12, 15), np.float32)
    for i in range(ph):
        for j in range(pw):
            if 0 <= top + i < 12 and 0 <= left + j < 15:
                expected[top + i, left + j], expected_alpha[top + i, left + j] = patch[i, j], alpha[i, j]
    assert np.array_equal(canvas, expected) and np.array_equal(canvas_alpha, expected_alpha)


@pytest.mark.parametrize("degrees", [0, 30, 45, 90, 137, -60])
@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_rotate_patch_keeps_the_whole_patch_centred_on_its_canvas(degrees, scale):
    """The rotated, scaled patch fits its new canvas: its alpha keeps the area (h·w·scale²) within
    interpolation error, and its centre of mass is the canvas centre, within the half pixel by
    which rotating about (w/2, h/2) moves the content (times the scale) and the half pixel the
    canvas's rounded-up size adds."""
    h, w = 10, 30
    patch = np.full((h, w, 3), 200, np.uint8)
    args = (degrees, scale) if scale != 1.0 else (degrees,)  # scale 1 is the default (CutPaste's)
    out, alpha = rotate_patch(patch, np.ones((h, w), np.float32), *args)
    assert out.shape[:2] == alpha.shape
    ys, xs = np.nonzero(alpha)  # the canvas is tight: the patch reaches (nearly) every side
    assert ys.min() <= 1 and xs.min() <= 1 and ys.max() >= alpha.shape[0] - 2 and xs.max() >= alpha.shape[1] - 2
    assert alpha.sum() == pytest.approx(h * w * scale**2, rel=0.04)
    ys, xs = np.mgrid[: alpha.shape[0], : alpha.shape[1]]
    centre = ((ys * alpha).sum() / alpha.sum(), (xs * alpha).sum() / alpha.sum())
    assert centre == pytest.approx(((alpha.shape[0] - 1) / 2, (alpha.shape[1] - 1) / 2), abs=0.5 + 0.75 * scale)


@pytest.mark.parametrize("rotate", [0.0, 45.0])
def test_croppaste_rescales_crops_by_the_ratio_of_the_image_sizes(rotate):
    """A 10 × 12 defect from a 64 px image pasted on 128 px good images (scale 1, no flip, no
    jitter, hard edges) covers 2² times its area, also rotated by up to 45 degrees (where the
    canvas's edge does not cut it: the largest of 8 samples)."""
    source = np.full((64, 64, 3), 90, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:30, 30:42] = True
    source[mask] = (200, 40, 40)
    generator = create("croppaste", flip=False, rotate=rotate, scale=[1.0, 1.0], jitter=0.0, feather=0.0,
                       foreground="texture")
    generator.fit([DefectExample(source, mask, "stain")], [source])
    good = [np.full((128, 128, 3), 90, np.uint8)]
    areas = [int(s.mask.sum()) for s in generator.generate(good, 8, seed=0)]
    assert abs(max(areas) - 4 * 120) <= 0.12 * 4 * 120, areas


def test_croppaste_pastes_a_crop_of_the_requested_type_at_random_angles():
    """Two types, a red and a blue bar: each sample pastes its own type's colour, and with rotate 90
    the bar lies across in some samples and upright in others."""
    source = np.full((64, 64, 3), 90, np.uint8)
    red, blue = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    red[10:13, 10:40] = blue[40:43, 10:40] = True
    source[red], source[blue] = (220, 30, 30), (30, 30, 220)
    generator = create("croppaste", flip=False, rotate=90.0, scale=[1.0, 1.0], jitter=0.0, feather=0.0,
                       foreground="texture")
    generator.fit([DefectExample(source, red, "red"), DefectExample(source, blue, "blue")], [source])
    good = [np.full((64, 64, 3), 90, np.uint8)]
    upright = set()
    for wanted in ("red", "blue"):
        for sample in generator.generate(good, 8, seed=3, defect_type=wanted):
            colour = sample.image[sample.mask].mean(axis=0)
            assert sample.defect_type == wanted and (colour[0] > colour[2]) == (wanted == "red")
            ys, xs = np.nonzero(sample.mask)
            upright.add(bool(np.ptp(ys) > np.ptp(xs)))
    assert upright == {True, False}


def test_cutpaste_draws_the_papers_patch_and_scar_ranges():
    """Li et al. (CVPR 2021) Sec. 3: a patch covers U(2 %, 15 %) of the image with aspect ratio
    exp U(log 0.3, -log 0.3); a scar is U(2, 16) px wide and U(10, 25) px long at 256 px, rotated
    by U(-45, 45) degrees. Over 60 draws each, the draws stay in those ranges and reach both ends."""
    good = [np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)]
    generator = create("cutpaste", foreground="texture")
    areas, ratios = [], []
    for sample in generator.generate(good, 60, seed=0, defect_type="patch"):
        _, _, ph, pw = sample.meta["box"]
        areas.append(ph * pw / 256**2)
        ratios.append(ph / pw)
    assert 0.019 < min(areas) < 0.04 and 0.12 < max(areas) < 0.152
    assert 0.29 < min(ratios) < 0.5 and 2.0 < max(ratios) < 1 / 0.29
    sizes, angles = [], []
    for sample in generator.generate(good, 60, seed=0, defect_type="scar"):
        ys, xs = np.nonzero(sample.mask)
        sizes.append(sample.mask.sum())
        cov = np.cov(np.stack([xs, ys]))
        low, high = np.linalg.eigvalsh(cov)
        if high > 4 * low:  # long enough for an axis: length along the rows before rotating
            angles.append(np.degrees(0.5 * np.arctan2(2 * cov[0, 1], cov[1, 1] - cov[0, 0])))  # from upright
    assert 2 * 10 * 0.8 < min(sizes) < 60 and 250 < max(sizes) < 16 * 25 * 1.1
    assert -46 < min(angles) < -25 and 25 < max(angles) < 46


def test_draem_blends_its_source_by_beta_inside_the_mask_only():
    """DRAEM (Zavrtanik et al., ICCV 2021) Eq. 1: I_a = (1 − β)·I + β·A inside the Perlin mask,
    β ~ U(0.1, 1); with no augmentation ops and another good image as the texture A, each sample's
    pixels are that combination with the β it records (rounded to 4 decimals); 3 ops by default."""
    good = [np.full((48, 48, 3), 40, np.uint8), np.full((48, 48, 3), 240, np.uint8)]
    betas = []
    for sample in create("draem", texture_source="good", ops=0, foreground="texture").generate(good, 12, seed=0):
        texture = good[int(sample.meta["texture"].split(":")[1])]
        beta = sample.meta["beta"]
        betas.append(beta)
        inside = sample.image[sample.mask].astype(float)
        outside = sample.image[~sample.mask]
        assert sample.mask.any() and not sample.meta["ops"]
        base_value = float(outside[0, 0])  # the good image it was made on
        assert base_value in (40.0, 240.0) and (outside == base_value).all()
        assert np.abs(inside - ((1 - beta) * base_value + beta * texture[0, 0, 0])).max() <= 1.0
    assert 0.1 <= min(betas) < 0.4 and 0.7 < max(betas) <= 1.0
    assert len(next(create("draem").generate(good, 1, seed=0)).meta["ops"]) == 3


def test_croppaste_flips_each_crop_with_its_mask():
    """An L-shaped red defect on gray, flipped at random (no rotation, scale or jitter, hard edges):
    every pixel under a sample's mask is the defect's red, whichever flips were drawn."""
    source = np.full((64, 64, 3), 120, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[10:30, 10:14] = mask[26:30, 10:30] = True
    source[mask] = (230, 20, 20)
    generator = create("croppaste", rotate=0.0, scale=[1.0, 1.0], jitter=0.0, feather=0.0, foreground="texture")
    generator.fit([DefectExample(source, mask, "stain")], [source])
    shapes = set()
    for sample in generator.generate([np.full((64, 64, 3), 120, np.uint8)], 12, seed=2):
        pixels = sample.image[sample.mask]
        assert (pixels == (230, 20, 20)).all(), pixels[(pixels != (230, 20, 20)).any(-1)][:3]
        ys, xs = np.nonzero(sample.mask)
        shapes.add(sample.mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].tobytes())
    assert len(shapes) >= 3  # flipped ways (unclipped) do show up


@pytest.mark.parametrize("method, options", [("cutpaste", {"jitter": 0.0}), ("croppaste", {"feather": 0.0, "jitter": 0.0})])
def test_pasting_into_a_given_mask_changes_every_mask_pixel_and_nothing_else(method, options):
    """With a mask given, the patch fills the mask's box: on an image whose pixels all differ, every
    pixel of the mask changes (a patch one row short would leave a row, or black it) to a value the
    source (the image itself for CutPaste, the crop for Crop-Paste) has, and no other pixel does."""
    yy, xx = np.mgrid[:64, :64]
    image = np.stack([yy * 4, xx * 4, (yy + xx) * 2], -1).astype(np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:31, 12:30] = True
    generator, source = create(method, **options), image
    if generator.needs_fit:
        defect = np.zeros((64, 64), bool)
        defect[40:50, 40:56] = True
        generator.fit([DefectExample(255 - image, defect, "stain")], [image])
        source = (255 - image)[defect]
    for sample in generator.generate([image], 4, seed=1, masks=[mask] * 4):
        changed = (sample.image != image).any(-1)
        assert np.array_equal(changed, mask)
        pasted, values = sample.image[mask].astype(int), source.reshape(-1, 3).astype(int)
        assert (pasted >= values.min(0) - 1).all() and (pasted <= values.max(0) + 1).all()
