"""anomalygen.integrations.anomalib (issue 17, part 2) and ``generate --with-good``.

The anomalib tests skip when anomalib is absent (``pip install 'anomalygen[anomalib]'``). No
weights can be downloaded here: Draem trains from scratch; Supersimplenet and Glass get a timm
backbone with ``pretrained=False`` (resnet18, for speed); everything runs on CPU at 64 px (128 px
for Supersimplenet, whose feature-space Perlin masks need feature maps of at least 16 x 16).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalygen import pipeline
from anomalygen.data import load_category, load_image, paper_split
from anomalygen.data.demo import make_demo_dataset
from anomalygen.errors import AnomalygenError, DataError
from anomalygen.io import MANIFEST, read_manifest

from tests.helpers.cli_harness import run_cli

SRC = Path(__file__).resolve().parents[2] / "src"
CATEGORY = "fabric"
NUM = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A 64 px demo category: 8 train/good, 4 test/good, 6 defects per type (2 train the generator)."""
    return make_demo_dataset(tmp_path_factory.mktemp("data"), 0, n_good=8, n_test_good=4, n_defect=6, size=64,
                             categories=(CATEGORY,))


@pytest.fixture(scope="module")
def out(data, tmp_path_factory) -> Path:
    """``generate --method croppaste --num 6 --with-good`` (through the CLI)."""
    root = tmp_path_factory.mktemp("out")
    _cli("generate", "--data", data, "--category", CATEGORY, "--method", "croppaste", "--num", NUM,
         "--out", root, "--with-good")
    return root


@pytest.fixture(scope="module")
def ai():
    pytest.importorskip("anomalib")
    from anomalygen.integrations import anomalib

    return anomalib


def _cli(*args) -> None:
    result = run_cli(*args)  # in this process (tests/helpers/cli_harness.py): a fresh interpreter would only add its imports
    assert result.returncode == 0, result.stderr


def _engine(root: Path):
    """anomalib's Engine for 2 CPU steps, writing no checkpoint (``save_top_k=0``: the tests use the
    model in memory; a checkpoint is hundreds of MB and seconds to write)."""
    from anomalib.callbacks import ModelCheckpoint
    from anomalib.engine import Engine

    return Engine(max_steps=2, accelerator="cpu", devices=1, logger=False, default_root_dir=root,
                  enable_progress_bar=False, callbacks=[ModelCheckpoint(dirpath=root, save_top_k=0)])


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})


# --- the optional dependency ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def fresh_imports() -> list[str]:
    """One fresh interpreter: is anomalib imported by anomalygen's modules? then, with anomalib made
    unimportable, what importing the integration says."""
    code = ("import sys, anomalygen, anomalygen.cli, anomalygen.pipeline, anomalygen.integrations, "
            "anomalygen.evaluation.run, anomalygen.methods.croppaste; print('anomalib' in sys.modules)\n"
            "sys.modules['anomalib'] = None\n"
            "from anomalygen.errors import AnomalygenError\n"
            "try:\n    import anomalygen.integrations.anomalib\nexcept AnomalygenError as e:\n    print(e)")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_importing_anomalygen_never_imports_anomalib(fresh_imports):
    assert fresh_imports[0] == "False"
    importers = [p for p in (SRC / "anomalygen").rglob("*.py")
                 if any(line.lstrip().startswith(("import anomalib", "from anomalib")) for line in p.read_text().splitlines())]
    assert importers == [SRC / "anomalygen" / "integrations" / "anomalib.py"]


def test_missing_anomalib_is_one_line_naming_the_extra(fresh_imports):
    assert len(fresh_imports) == 2 and "install anomalygen[anomalib]" in fresh_imports[1]


# --- generate --with-good --------------------------------------------------------------------------

def test_with_good_copies_the_real_goods_and_resumes(data, out):
    root = out / CATEGORY
    for split in ("train", "test"):
        real = sorted((data / CATEGORY / split / "good").iterdir())
        copies = sorted((root / split / "good").iterdir())
        assert [p.name for p in copies] == [p.name for p in real]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(real, copies))
    # a killed copy: one file missing, one torn, a stale file and an atomic write's leftover
    (root / "train/good/000.png").unlink()
    (root / "test/good/001.png").write_bytes(b"torn")
    (root / "train/good/999.png").write_bytes(b"stale")
    (root / "train/good/.002.png.x.partial").write_bytes(b"partial")
    _cli("generate", "--data", data, "--category", CATEGORY, "--method", "croppaste", "--num", NUM,
         "--out", out, "--with-good")
    for split in ("train", "test"):
        real = sorted((data / CATEGORY / split / "good").iterdir())
        assert [p.read_bytes() for p in sorted((root / split / "good").iterdir())] == [p.read_bytes() for p in real]
    assert len(read_manifest(root / MANIFEST)) == NUM


def test_with_good_output_is_an_mvtecad_dataset(ai, data, out):
    from anomalib.data import MVTecAD

    datamodule = MVTecAD(root=out, category=CATEGORY)
    datamodule.prepare_data()  # would download MVTec AD if OUT/<category> were not found
    datamodule.setup()
    train = datamodule.train_data.samples
    assert len(train) == 8 and (train.label_index == 0).all()
    test = datamodule.test_data.samples
    assert (test.label_index == 0).sum() == 4 and (test.label_index == 1).sum() == NUM
    for row in test[test.label_index == 1].itertuples():
        assert Path(row.mask_path).name == Path(row.image_path).stem + "_mask.png"


def test_overwrite_removes_the_copied_goods(data, tmp_path):
    pipeline.generate("croppaste", data, tmp_path, 2, category=CATEGORY, with_good=True)
    pipeline.generate("cutpaste", data, tmp_path, 2, category=CATEGORY, overwrite=True)
    assert not (tmp_path / CATEGORY / "train").exists() and not (tmp_path / CATEGORY / "test/good").exists()


# --- 1. Folder datamodule: real goods for training, generated defects for testing ---------------------

def test_folder_datamodule_tests_on_generated_defects(ai, data, out):
    datamodule = ai.folder_datamodule(out, data, CATEGORY, num_workers=0, val_split_mode="none")
    datamodule.setup()
    train = datamodule.train_data.samples
    assert sorted(train.image_path) == sorted(str(p) for p in (data / CATEGORY / "train/good").iterdir())
    test = datamodule.test_data.samples
    good = test[test.label_index == 0]
    assert sorted(good.image_path) == sorted(str(p) for p in (data / CATEGORY / "test/good").iterdir())
    defects = test[test.label_index == 1]
    expected = {str(out / CATEGORY / e["image"]): str(out / CATEGORY / e["mask"]) for e in read_manifest(out / CATEGORY / MANIFEST)}
    assert dict(zip(defects.image_path, defects.mask_path)) == expected


def test_folder_datamodule_refuses_a_folder_shared_with_other_images(ai, data, out, tmp_path):
    import shutil

    real = shutil.copytree(data / CATEGORY, tmp_path / CATEGORY)
    (real / "train/good/extra.txt").write_text("not an image")
    ai.folder_datamodule(out, real)  # other files are fine
    with pytest.raises(DataError, match="test/good"):
        ai._whole_folders(load_category(real).test_good[:2], "test/good")


# --- 2. generated pairs in the training split -----------------------------------------------------------

def test_training_datamodule_puts_generated_pairs_in_training(ai, data, out):
    datamodule = ai.training_datamodule(out, data, CATEGORY, num_workers=0, train_batch_size=64, val_split_mode="none")
    datamodule.setup()
    train = datamodule.train_data.samples
    entries = read_manifest(out / CATEGORY / MANIFEST)
    anomalous = train[train.label_index == 1]
    assert dict(zip(anomalous.image_path, anomalous.mask_path)) == {
        str(out / CATEGORY / e["image"]): str(out / CATEGORY / e["mask"]) for e in entries}
    assert sorted(train[train.label_index == 0].image_path) == sorted(str(p) for p in (data / CATEGORY / "train/good").iterdir())
    # the real test split: test/good + the paper split's test two thirds, never the generator's training third
    real = load_category(data, CATEGORY)
    generator_train, real_test = paper_split(real.defects)
    test = datamodule.test_data.samples
    assert sorted(test[test.label_index == 1].image_path) == sorted(str(r.path) for rs in real_test.values() for r in rs)
    assert not set(test.image_path) & {str(r.path) for rs in generator_train.values() for r in rs}
    assert (test.label_index == 0).sum() == 4
    real_only = ai.training_datamodule(None, data, CATEGORY, num_workers=0, val_split_mode="none")
    real_only.setup()
    assert sorted(real_only.train_data.samples.image_path) == sorted(train[train.label_index == 0].image_path)
    assert real_only.train_data.samples.label_index.eq(0).all()
    batch = next(iter(datamodule.train_dataloader()))
    for path, label, mask in zip(batch.image_path, batch.gt_label, batch.gt_mask):
        if label:
            entry = next(e for e in entries if str(out / CATEGORY / e["image"]) == path)
            assert torch.equal(mask.bool(), torch.from_numpy(load_image(out / CATEGORY / entry["mask"])[..., 0] > 127))
        else:
            assert not mask.any()


def test_supervised_supersimplenet_trains_on_generated_pairs(ai, data, out, tmp_path, monkeypatch):
    import timm
    from anomalib.models import Supersimplenet

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: create(*a, **{**k, "pretrained": False}))  # offline
    model = Supersimplenet(backbone="resnet18", supervised=True, visualizer=False,
                           pre_processor=Supersimplenet.configure_pre_processor(image_size=(128, 128)))
    labels = []
    step = model.training_step
    monkeypatch.setattr(model, "training_step", lambda batch, *a, **k: labels.append(batch.gt_label) or step(batch, *a, **k))
    datamodule = ai.training_datamodule(out, data, CATEGORY, num_workers=0, train_batch_size=7, eval_batch_size=8, seed=0)
    engine = _engine(tmp_path)
    engine.fit(model, datamodule=datamodule)
    assert sum(int(label.sum()) for label in labels) > 0  # generated (anomalous) images reached the training step
    assert np.isfinite(engine.test(model, datamodule=datamodule)[0]["pixel_AUROC"])


# --- 3. the augmenter ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def goods(data) -> torch.Tensor:
    paths = sorted((data / CATEGORY / "train/good").iterdir())[:4]
    return torch.stack([torch.from_numpy(load_image(p)).permute(2, 0, 1).float() / 255 for p in paths])


def test_method_augmenter_puts_the_methods_defect_on_the_training_image(ai, data, goods):
    augmenter = ai.AnomalygenAugmenter("croppaste", data, category=CATEGORY, probability=1.0, seed=3)
    images, masks = augmenter(goods)
    assert images.shape == goods.shape and masks.shape == (4, 1, 64, 64) and masks.dtype == goods.dtype
    for k, (good, image, mask) in enumerate(zip(goods, images, masks)):
        rgb = (good * 255).round().byte().permute(1, 2, 0).numpy()
        sample = next(iter(augmenter.generator.generate([rgb], 1, seed=3, start=k)))
        assert torch.equal(mask[0].bool(), torch.from_numpy(sample.mask))
        assert torch.allclose(image, torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255, atol=1e-6)
        assert torch.equal(image[:, ~mask[0].bool()], good[:, ~mask[0].bool()])  # outside the mask: untouched
        assert (image - good).abs()[:, mask[0].bool()].mean() > 0.02  # inside: a visible defect
    assert augmenter.drawn == 4


def test_augmenter_probability_and_reproducibility(ai, data, goods):
    none = ai.AnomalygenAugmenter("cutpaste", data, category=CATEGORY, probability=0.0)
    images, masks = none(goods)
    assert torch.equal(images, goods) and not masks.any()
    a = ai.AnomalygenAugmenter("cutpaste", data, category=CATEGORY, probability=0.5, seed=1)
    b = ai.AnomalygenAugmenter("cutpaste", data, category=CATEGORY, probability=0.5, seed=1)
    batches = [torch.cat([goods] * 5)] * 2
    first = [a(x) for x in batches]
    second = [b(x) for x in batches]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(first, second))
    hit = torch.cat([m.flatten(1).any(1) for _, m in first]).float().mean().item()
    assert 0.25 < hit < 0.75  # 40 draws at p = 0.5
    single, mask = a(goods[0])
    assert single.shape == goods[0].shape and mask.shape == (1, 64, 64)


def test_pool_augmenter_pastes_pairs_of_a_generated_folder(ai, out, goods):
    augmenter = ai.AnomalygenAugmenter(out, category=CATEGORY, probability=1.0)
    assert len(augmenter.pool) == NUM
    images, masks = augmenter(torch.cat([goods, goods]))
    for good, image, mask in zip(torch.cat([goods, goods]), images, masks):
        m = mask[0].bool()
        matches = [i for i, (_, pool_mask) in enumerate(augmenter.pool) if np.array_equal(pool_mask, m.numpy())]
        assert matches
        picture = torch.from_numpy(augmenter.pool[matches[0]][0]).permute(2, 0, 1).float() / 255
        assert torch.allclose(image[:, m], picture[:, m], atol=1e-6)
        assert torch.equal(image[:, ~m], good[:, ~m])
    # a smaller training size: pairs are resized to it
    small, small_masks = augmenter(torch.nn.functional.interpolate(goods, size=32))
    assert small.shape == (4, 3, 32, 32) and small_masks.shape == (4, 1, 32, 32) and small_masks.flatten(1).any(1).all()


def test_augmenter_from_a_fitted_model_folder(ai, data, tmp_path, goods):
    pipeline.fit("croppaste", data, tmp_path / "model", category=CATEGORY)
    augmenter = ai.AnomalygenAugmenter(tmp_path / "model", probability=1.0)
    assert augmenter.generator.name == "croppaste" and augmenter.generator.defect_types
    assert augmenter(goods)[1].flatten(1).any(1).all()


def test_augmenter_user_errors(ai, tmp_path):
    with pytest.raises(AnomalygenError, match="neither a generated folder"):
        ai.AnomalygenAugmenter(tmp_path / "nothing")
    with pytest.raises(AnomalygenError, match="give data="):
        ai.AnomalygenAugmenter("croppaste")
    with pytest.raises(AnomalygenError, match="probability 2"):
        ai.AnomalygenAugmenter("croppaste", probability=2)


def test_use_augmenter_swaps_the_perlin_generator(ai, data, out, tmp_path, monkeypatch):
    import timm
    from anomalib.models import Dsr, Glass, Supersimplenet

    dsr = Dsr(visualizer=False)  # its training needs anomalib's pretrained VQ weights (a download): swap only
    augmenter = ai.use_anomalygen_augmenter(dsr, out, category=CATEGORY)
    assert dsr.perlin_generator is augmenter and augmenter.probability == 0.5 and augmenter.pool

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: create(*a, **{**k, "pretrained": False}))
    glass = Glass(backbone="resnet18", pre_trained=False, input_shape=(64, 64), visualizer=False)
    augmenter = ai.use_anomalygen_augmenter(glass, "cutpaste", data, category=CATEGORY)
    assert glass.model.augmentor is augmenter and augmenter.probability == 1.0  # GLASS's own probability
    with pytest.raises(AnomalygenError, match="Supersimplenet.*training_datamodule"):
        ai.use_anomalygen_augmenter(Supersimplenet(backbone="resnet18", visualizer=False), "cutpaste", data)


# --- end to end: anomalib Draem trained on generated defects; metrics agree with anomalygen's ----------

@pytest.mark.slow
def test_draem_trains_on_generated_defects_and_metrics_agree(ai, data, out, tmp_path):
    from anomalib.models import Draem

    from anomalygen.evaluation.metrics import localization_metrics

    (tmp_path / "textures").mkdir()  # an existing dtd_dir: anomalib downloads DTD otherwise
    model = Draem(dtd_dir=tmp_path / "textures", visualizer=False,
                  pre_processor=Draem.configure_pre_processor(image_size=(64, 64)))
    augmenter = ai.use_anomalygen_augmenter(model, "croppaste", data, category=CATEGORY)
    assert model.augmenter is augmenter and augmenter.probability == 0.5
    datamodule = ai.folder_datamodule(out, data, CATEGORY, num_workers=0, train_batch_size=4, eval_batch_size=16,
                                      val_split_mode="same_as_test")
    engine = _engine(tmp_path)
    engine.fit(model, datamodule=datamodule)
    assert augmenter.drawn == 8  # 2 steps x batch 4
    theirs = engine.test(model, datamodule=datamodule)[0]
    batches = engine.predict(model, dataloaders=datamodule.test_dataloader())
    paths = [p for b in batches for p in b.image_path]
    maps = torch.cat([b.anomaly_map for b in batches]).numpy()
    scores = torch.cat([b.pred_score for b in batches]).numpy()
    # ground truth as anomalygen's evaluation reads it (64 px: no resizing)
    truth = {str(p): np.zeros((64, 64), bool) for p in (data / CATEGORY / "test/good").iterdir()}
    for entry in read_manifest(out / CATEGORY / MANIFEST):
        truth[str(out / CATEGORY / entry["image"])] = load_image(out / CATEGORY / entry["mask"])[..., 0] > 127
    assert sorted(paths) == sorted(truth)
    ours = localization_metrics(np.stack([truth[p] for p in paths]), maps, scores)
    # anomalib sums in float32: its AUROC is off float64's by up to ~1e-7 (CI saw 1.06e-7), ours is float64
    assert ours["pixel_auroc"] == pytest.approx(theirs["pixel_AUROC"], abs=1e-6)
    assert ours["image_auroc"] == pytest.approx(theirs["image_AUROC"], abs=1e-6)
