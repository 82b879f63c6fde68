"""pipeline: paper-split fitting, resumable generation, checkpoints, options, on a tiny demo dataset."""

from __future__ import annotations

import numpy as np
import pytest

from anomalygen import pipeline
from anomalygen.data import load_image
from anomalygen.data.demo import make_demo_dataset
from anomalygen.errors import AnomalygenError
from anomalygen.io import MANIFEST, read_manifest
from anomalygen.methods.base import METHODS, AnomalyGenerator
from anomalygen.seeding import sample_rng
from anomalygen.types import AnomalySample


class FakeGenerator(AnomalyGenerator):
    """Inverts a random square of a good image; ``fail_at`` simulates a kill before that sample."""

    name = "fake"
    fail_at: int | None = None
    fitted_on: list = []

    def fit(self, defects, good):
        FakeGenerator.fitted_on = [(d.defect_type, d.source.name) for d in defects]
        self._defect_types = sorted({d.defect_type for d in defects})

    def generate(self, good, n, *, masks=None, seed=0, start=0, defect_type=None):
        for i in range(start, start + n):
            if FakeGenerator.fail_at == i:
                raise KeyboardInterrupt("simulated kill")
            rng = sample_rng(seed, i)
            k = int(rng.integers(len(good)))
            image = good[k].copy()
            mask = np.zeros(image.shape[:2], bool)
            y, x = rng.integers(0, image.shape[0] - 8, 2)
            mask[y : y + self.options.get("size", 8), x : x + 8] = True
            image[mask] = 255 - image[mask]
            kind = defect_type or self.defect_types[i % len(self.defect_types)]
            yield AnomalySample(image, mask, kind, prompt=None, meta={"source_index": k})


def make_tiny_dataset(root, **kwargs):
    """A one-category ("nut") MVTec-layout dataset: 4 train/good, 3 images per defect type, 64 px."""
    options = dict(n_good=4, n_test_good=1, n_defect=3, size=64, categories=("nut",)) | kwargs
    return make_demo_dataset(root, 0, **options)


@pytest.fixture()
def fake_method(monkeypatch):
    """The fake method; its pairs (an inverted square anywhere) pass the validity checks here, which
    keep only valid pairs by default (the filter itself is test_validity's)."""
    from anomalygen.generation import redraw
    from anomalygen.generation.validity import CHECKS, CheckResult

    monkeypatch.setitem(METHODS, "fake", f"{__name__}:FakeGenerator")
    monkeypatch.setattr(redraw, "judge", lambda *a: {n: CheckResult(n, 1.0, True, "") for n in CHECKS})
    FakeGenerator.fail_at = None
    yield "fake"
    FakeGenerator.fail_at = None


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny")) / "nut"


def tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_fits_on_the_train_third_and_writes(tmp_path, tiny_root, fake_method):
    result = pipeline.generate("fake", tiny_root.parent, tmp_path, 5, category="nut", seed=1)
    assert (result.category, result.method, result.written, result.total) == ("nut", "fake", 5, 5)
    assert FakeGenerator.fitted_on == [("dent", "000.png"), ("scratch", "000.png"), ("stain", "000.png")]
    entries = read_manifest(result.out / MANIFEST)
    assert [e["defect_type"] for e in entries] == ["dent", "scratch", "stain", "dent", "scratch"]
    assert all(e["source"].startswith(str(tiny_root / "train" / "good")) for e in entries)
    assert (result.out / "test" / "stain" / "000002.png").is_file()
    assert (result.out / "ground_truth" / "stain" / "000002_mask.png").is_file()


def test_generate_resumes_after_kill_byte_identical(tmp_path, tiny_root, fake_method):
    pipeline.generate("fake", tiny_root, tmp_path / "whole", 6, seed=2)
    FakeGenerator.fail_at = 4
    with pytest.raises(KeyboardInterrupt):
        pipeline.generate("fake", tiny_root, tmp_path / "killed", 6, seed=2)
    FakeGenerator.fail_at = None
    result = pipeline.generate("fake", tiny_root, tmp_path / "killed", 6, seed=2)
    assert (result.written, result.total) == (2, 6)
    assert tree_bytes(tmp_path / "killed") == tree_bytes(tmp_path / "whole")


def test_other_options_refused_then_overwritten(tmp_path, tiny_root, fake_method):
    pipeline.generate("fake", tiny_root, tmp_path, 2, options={"size": 4})
    with pytest.raises(AnomalygenError, match="different run.*config"):
        pipeline.generate("fake", tiny_root, tmp_path, 2, options={"size": 6})
    result = pipeline.generate("fake", tiny_root, tmp_path, 3, options={"size": 6}, overwrite=True)
    assert result.written == 3
    mask = load_image(result.out / "ground_truth/dent/000000_mask.png")[..., 0]
    assert (mask > 0).sum() == 6 * 8


def test_fit_then_generate_from_checkpoint(tmp_path, tiny_root, fake_method):
    model = pipeline.fit("fake", tiny_root, tmp_path / "model", options={"size": 5})
    direct = pipeline.generate("fake", tiny_root, tmp_path / "direct", 4, options={"size": 5}, seed=7)
    loaded = pipeline.generate(None, tiny_root, tmp_path / "loaded", 4, checkpoint=model, seed=7)
    assert tree_bytes(loaded.out / "test") == tree_bytes(direct.out / "test")
    with pytest.raises(AnomalygenError, match="holds a 'fake' model, not 'cutpaste'"):
        pipeline.generate("cutpaste", tiny_root, tmp_path / "x", 1, checkpoint=model)
    with pytest.raises(AnomalygenError, match="not a saved anomalygen model"):
        pipeline.generate(None, tiny_root, tmp_path / "x", 1, checkpoint=tmp_path)


def test_num_below_what_the_folder_holds_is_refused(tmp_path, tiny_root, fake_method):
    pipeline.generate("fake", tiny_root, tmp_path, 3)
    before = tree_bytes(tmp_path)
    with pytest.raises(AnomalygenError, match=r"nut: holds 3 samples, more than `num` 2; give `num` 3 or more .* `overwrite`"):
        pipeline.generate("fake", tiny_root, tmp_path, 2)
    assert tree_bytes(tmp_path) == before
    assert pipeline.generate("fake", tiny_root, tmp_path, 2, overwrite=True).total == 2


def test_defect_type_option(tmp_path, tiny_root, fake_method):
    result = pipeline.generate("fake", tiny_root, tmp_path, 3, defect_type="stain")
    assert {e["defect_type"] for e in read_manifest(result.out / MANIFEST)} == {"stain"}


def test_parse_settings():
    assert pipeline.parse_settings(["a=3", "b=0.5", "c=true", "d=[1, 2]", "e=brick", "f=", "g=x=y"]) == {
        "a": 3, "b": 0.5, "c": True, "d": [1, 2], "e": "brick", "f": "", "g": "x=y",
    }
    with pytest.raises(AnomalygenError, match="expected key=value"):
        pipeline.parse_settings(["novalue"])


def test_bad_num_and_missing_method(tmp_path, tiny_root):
    for num in (0, -3, 10**6 + 1, 10**20):
        with pytest.raises(AnomalygenError, match=f"^num {num}: give a number of samples from 1 to 1000000"):
            pipeline.generate("fake", tiny_root, tmp_path, num)
    assert not list(tmp_path.iterdir())
    with pytest.raises(AnomalygenError, match="give `method`"):
        pipeline.generate(None, tiny_root, tmp_path, 1)


@pytest.mark.parametrize("method", ["cutpaste", "croppaste", "draem"])
def test_model_free_kill_between_image_and_mask_then_resume(tmp_path, tiny_root, method, monkeypatch):
    from anomalygen.generation import writer

    whole = pipeline.generate(method, tiny_root, tmp_path / "whole", 4, seed=3, keep_failing=True)
    real_save = writer.save_png

    def killed_at_third_mask(path, array):
        if path.name == "000002_mask.png":
            raise KeyboardInterrupt("simulated kill")
        real_save(path, array)

    monkeypatch.setattr(writer, "save_png", killed_at_third_mask)
    with pytest.raises(KeyboardInterrupt):
        pipeline.generate(method, tiny_root, tmp_path / "killed", 4, seed=3, keep_failing=True)
    monkeypatch.setattr(writer, "save_png", real_save)
    assert len(read_manifest(tmp_path / "killed" / "nut" / MANIFEST)) == 2
    resumed = pipeline.generate(method, tiny_root, tmp_path / "killed", 4, seed=3, keep_failing=True)
    assert (resumed.written, resumed.total) == (2, 4)
    assert tree_bytes(resumed.out) == tree_bytes(whole.out)
