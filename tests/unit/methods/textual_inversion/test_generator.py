"""textual-inversion: fit -> save -> load -> generate, deterministic, good image kept outside the mask."""

import json

import numpy as np
import torch

from anomalygen.methods.base import AnomalyGenerator, create
from anomalygen.seeding import sample_rng
from anomalygen.types import DefectExample

torch.set_num_threads(1)


def _data():
    rng = np.random.default_rng(0)
    defects = []
    for i, (kind, shape) in enumerate([("crack", (36, 36)), ("hole", (36, 36)), ("crack", (30, 44))]):  # mixed sizes
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        mask = np.zeros(shape, bool)
        mask[8 + i : 20 + i, 10:24] = True
        defects.append(DefectExample(image, mask, kind))
    good = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
    return defects, good


def test_fit_save_load_generate_round_trip(tmp_path):
    defects, good = _data()
    generator = create("textual-inversion", model="tiny", device="cpu", resolution=32, max_steps=3, batch_size=2,
                       num_inference_steps=3, checkpoint_every=0, work_dir=str(tmp_path / "work"))
    before = generator.embeddings
    generator.fit(defects, good)
    assert before is None and generator.defect_types == ["crack", "hole"]
    assert (tmp_path / "work" / "loss.csv").is_file()
    generator.save(tmp_path / "model")
    loaded = AnomalyGenerator.load(tmp_path / "model")
    torch.testing.assert_close(loaded.embeddings.tokens, generator.embeddings.tokens.detach().cpu())
    first = list(loaded.generate(good, 3, seed=5))
    again = list(AnomalyGenerator.load(tmp_path / "model").generate(good, 3, seed=5))
    alone = list(loaded.generate(good, 1, seed=5, start=2))
    for a, b in zip(first, again):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert np.array_equal(first[2].image, alone[0].image)
    assert [s.defect_type for s in first] == ["crack", "hole", "crack"]
    for i, sample in enumerate(first):  # on the good image drawn from (seed, i), as every method; the writer records it
        assert sample.meta["index"] == i and sample.meta["source_index"] == sample_rng(5, i).integers(len(good))
        image = good[sample.meta["source_index"]]
        assert sample.image.shape == image.shape and sample.mask.shape == image.shape[:2] and sample.mask.any()
        assert np.array_equal(sample.image[~sample.mask], image[~sample.mask])
        assert sample.meta["untrained"]
    given = np.zeros((40, 40), bool)
    given[5:15, 5:15] = True
    fixed = list(loaded.generate(good, 2, masks=[given], seed=1, defect_type="hole"))
    assert all(np.array_equal(s.mask, given) and s.defect_type == "hole" for s in fixed)


def test_cli_fit_then_generate_on_demo_data(demo_root, tmp_path):
    from typer.testing import CliRunner

    from anomalygen.cli import app

    runner = CliRunner()
    fitted = runner.invoke(app, ["fit", "--method", "textual-inversion", "--data", str(demo_root), "--category", "nut",
                                 "--out", str(tmp_path / "model"), "--model", "tiny", "--max-steps", "2", "--device", "cpu",
                                 "--set", "resolution=32", "--set", "batch_size=2", "--set", "num_inference_steps=2",
                                 "--set", "checkpoint_every=0", "--set", f"work_dir=\"{tmp_path / 'work'}\""])
    assert fitted.exit_code == 0, fitted.output
    made = runner.invoke(app, ["generate", "--method", "textual-inversion", "--checkpoint", str(tmp_path / "model"),
                               "--data", str(demo_root), "--category", "nut", "--out", str(tmp_path / "out"), "--num", "3",
                               "--max-attempts", "1", "--keep-failing"])  # one draw each (redrawing: test_validity)
    assert made.exit_code == 0, made.output
    assert len(list((tmp_path / "out" / "nut" / "test").glob("*/*.png"))) == 3
    assert len(list((tmp_path / "out" / "nut" / "ground_truth").glob("*/*_mask.png"))) == 3
    entries = [json.loads(line) for line in (tmp_path / "out" / "nut" / "manifest.jsonl").read_text().splitlines()]
    assert all(entry["source"] and entry["source"].endswith(".png") for entry in entries)
