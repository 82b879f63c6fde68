"""``benchmark``: generate + evaluate per method on the demo dataset, then the comparison tables."""

import json

import pytest
import torch

from anomalygen import pipeline
from anomalygen.benchmark import benchmark, markdown_table, method_options
from anomalygen.errors import AnomalygenError
from anomalygen.evaluation.classification import ClassificationConfig
from anomalygen.evaluation.localization import LocalizationConfig
from anomalygen.methods.base import AnomalyGenerator
from anomalygen.methods.croppaste import CropPaste

torch.set_num_threads(1)


def test_markdown_table_layout():
    assert markdown_table([{"a": 0.12345, "b": "x"}, {"a": 1}]) == "| a | b |\n|---|---|\n| 0.123 | x |\n| 1 |  |"


def test_method_options_global_and_per_method():
    settings = {"seed": 3, "anomalydiffusion.model": "tiny", "anomalydiffusion.seed": 4, "draem.opacity": 0.5}
    assert method_options(settings, "anomalydiffusion") == {"seed": 4, "model": "tiny"}
    assert method_options(settings, "cutpaste") == {"seed": 3}


def test_benchmark_two_methods_on_demo_fabric(demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    fits = []
    original_fit = CropPaste.fit
    monkeypatch.setattr(CropPaste, "fit", lambda self, *a: (fits.append(1), original_fit(self, *a))[1])
    result = benchmark(
        demo_root, ["croppaste", "cutpaste"], tmp_path / "bench", category="fabric", num_per_type=4,
        metrics=["localization", "classification"], device="cpu",
        localization=LocalizationConfig(epochs=1, samples_per_epoch=4, resolution=64, base=8, batch_size=4),
        classification=ClassificationConfig(epochs=1, resolution=64, batch_size=8, passes=1, random_init=True),
    )
    types = ["cut", "hole", "stain"]
    for method in ("croppaste", "cutpaste"):
        report = json.loads((tmp_path / "bench" / method / "fabric" / "report.json").read_text())
        assert report["generated_counts"] == {t: 4 for t in types}
        assert report["real_split"]["test_defects"] == {t: 6 for t in types}
        assert sum(map(sum, report["classification"]["confusion_matrix"])) == 18
    markdown = (tmp_path / "bench" / "comparison.md").read_text()
    assert "| category | defect type | croppaste | cutpaste |" in markdown
    assert "U-Net: 1 epochs × 4 samples, 64 px, base 8, batch 4 (papers: 200 × 500, 256 px, base 64)" in markdown
    assert "ResNet-34: 1 epochs, 64 px, random init (--cls-random-init" in markdown
    assert ("paper = every metric at the epoch with the best image_auroc + pixel_auroc + pixel_ap + pixel_au_pro on the "
            "test set, as the official script (row epoch)") in markdown
    tables = result["tables"]
    accuracy = next(rows for title, rows in tables.items() if title.startswith("Downstream classification"))
    assert [row["defect type"] for row in accuracy] == [*types, "mean"]
    loc = next(rows for title, rows in tables.items() if title.startswith("Downstream localisation"))
    trained_on = ["croppaste", "cutpaste", "baseline: good images only", "baseline: real training defects (augmented)"]
    protocols = ["clean", "paper", "paper, per metric"]
    assert [(row["protocol"], row["training data"]) for row in loc] == [(p, m) for p in protocols for m in trained_on]
    assert all(0.0 <= row[key] <= 1.0 for row in loc for key in ("pixel_auroc", "pixel_ap", "pixel_au_pro"))
    assert [row["epoch"] for row in loc if row["protocol"] == "paper"] == [1, 1, 1, 1]
    baselines = result["baselines"]["fabric"]
    assert baselines["good"]["clean"]["pixel_ap"] != baselines["real"]["clean"]["pixel_ap"]
    page = (tmp_path / "bench" / "comparison.html").read_text()
    assert "href='croppaste/fabric/report.html'" in page and "href='cutpaste/fabric/report.html'" in page
    assert page.count("<img") >= 4  # PR curves (pixel, image) and samples of each method
    # A learning method is fitted once per category (not once per defect type) and saved.
    assert len(fits) == 1
    assert (tmp_path / "bench" / "croppaste" / "models" / "fabric" / "generator.json").is_file()
    # Re-running resumes the finished writer runs instead of refusing them.
    again = benchmark(demo_root, ["croppaste"], tmp_path / "bench", category="fabric", num_per_type=4,
                      metrics=["localization"], device="cpu", with_baselines=False,
                      localization=LocalizationConfig(epochs=1, samples_per_epoch=4, resolution=64, base=8, batch_size=4))
    assert again["reports"]["fabric"]["croppaste"]["generated_counts"] == {t: 4 for t in types}
    assert len(fits) == 1  # the saved model is reused: no training on a re-run
    with pytest.raises(AnomalygenError, match="fitted with other options"):
        benchmark(demo_root, ["croppaste"], tmp_path / "bench", category="fabric", num_per_type=4,
                  metrics=["localization"], settings={"croppaste.feather": 5.0})


def test_max_attempts_reaches_every_generate_and_is_checked_first(demo_root, tmp_path, monkeypatch):
    calls = []
    real = pipeline.generate
    monkeypatch.setattr(pipeline, "generate", lambda *a, **k: calls.append(k["max_attempts"]) or real(*a, **k))
    with pytest.raises(AnomalygenError, match=r"^max_attempts 0: give a number from 1 to 100"):
        benchmark(demo_root, ["cutpaste"], tmp_path / "bad", category="fabric", num_per_type=2, max_attempts=0)
    assert not (tmp_path / "bad").exists() and not calls
    benchmark(demo_root, ["cutpaste"], tmp_path / "bench", category="fabric", num_per_type=2, metrics=["localization"],
              device="cpu", max_attempts=3,
              localization=LocalizationConfig(epochs=1, samples_per_epoch=2, resolution=32, base=4, batch_size=2))
    assert calls == [3, 3, 3]  # one writer run per defect type


DIFFUSION_SETTINGS = {
    "anomalydiffusion": {"resolution": 32, "batch_size": 2, "max_steps": 2, "num_inference_steps": 2, "mask_source": "augment"},
    "dualanodiff": {"resolution": 32, "batch_size": 2, "max_steps": 1, "num_inference_steps": 2, "rank": 4, "mask_tries": 1},
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(DIFFUSION_SETTINGS))
def test_benchmark_runs_a_diffusion_method_by_name_with_its_options(method, demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    settings = {f"{method}.{key}": value for key, value in {"model": "tiny", "device": "cpu", **DIFFUSION_SETTINGS[method]}.items()}
    loads = []
    real_load = AnomalyGenerator.load.__func__
    monkeypatch.setattr(AnomalyGenerator, "load", classmethod(lambda cls, *a, **k: loads.append(a) or real_load(cls, *a, **k)))
    reads, real_read = [], pipeline.load_training
    monkeypatch.setattr(pipeline, "load_training", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    result = benchmark(demo_root, [method], tmp_path / "bench", category="nut", num_per_type=2,
                       metrics=["localization"], device="cpu", settings=settings,
                       # one draw per sample: a random tiny model's samples fail the validity checks, and
                       # redrawing them (test_validity's) only repeated the generation
                       max_attempts=1, keep_failing=True,
                       localization=LocalizationConfig(epochs=1, samples_per_epoch=2, resolution=32, base=4, batch_size=2))
    model = json.loads((tmp_path / "bench" / method / "models" / "nut" / "generator.json").read_text())
    assert model["options"]["model"] == "tiny" and model["options"]["max_steps"] == DIFFUSION_SETTINGS[method]["max_steps"]
    report = result["reports"]["nut"][method]
    assert set(report["generated_counts"].values()) == {2}
    assert method in (tmp_path / "bench" / "comparison.md").read_text()
    assert len(loads) == 1  # the fitted model is loaded once for the 3 defect types
    assert len(reads) == 1  # the category's images are read once for the fit and the 3 types
    # ... and generates what a fresh load of it generates for each type
    for defect_type in ("dent", "stain"):
        fresh = pipeline.generate(None, demo_root, tmp_path / "fresh" / defect_type, 2, category="nut", seed=0,
                                  checkpoint=tmp_path / "bench" / method / "models" / "nut", defect_type=defect_type,
                                  max_attempts=1, keep_failing=True)
        ours = tmp_path / "bench" / method / "runs" / defect_type / "nut"
        files = sorted(p.relative_to(fresh.out) for p in fresh.out.rglob("*.png"))
        assert files and files == sorted(p.relative_to(ours) for p in ours.rglob("*.png"))
        assert all((fresh.out / f).read_bytes() == (ours / f).read_bytes() for f in files)
