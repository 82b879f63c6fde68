"""``anomalygen pretrain``: the written folder loads everywhere, resume equals an uninterrupted run,
the tokenizer knows every name of the data, bad input is one line; the loop's EMA is exact."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from typer.testing import CliRunner

import anomalygen.pretrain.run as run
from anomalygen.cli import app
from anomalygen.data.demo import make_demo_dataset
from anomalygen.diffusion.tiny import clip_words, write_tokenizer_files
from anomalygen.diffusion.train import TrainConfig, latest_checkpoint, train
from anomalygen.pretrain import PretrainConfig, pretrain
from anomalygen.pretrain.data import (COLOURINGS, PretrainImages, colour_variant, colour_variants, load_pretrain_images,
                                      prompt_name)

from tests.helpers.cli_harness import assert_unchanged, assert_user_error, run_cli, snapshot

torch.set_num_threads(1)
TINY = dict(resolution=32, size="tiny", vae_steps=3, max_steps=4, batch_size=2, checkpoint_every=2, sample_every=2,
            device="cpu")
WEIGHTS = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors")


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_good=4, n_test_good=1, n_defect=3, size=64)


@pytest.fixture(scope="module")
def prior(demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prior") / "prior"
    pretrain([demo], out, PretrainConfig(**TINY), say=lambda m: None)
    return out


def test_the_folder_loads_with_load_backbone_and_the_diffusers_pipeline(prior):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from anomalygen.diffusion.backbone import load_backbone

    backbone = load_backbone(str(prior), device="cpu")
    assert not backbone.untrained and backbone.vae_scale_factor == 4 and backbone.native_resolution == 32
    assert backbone.vae.config.scaling_factor != 1.0  # set from the training latents
    pipe = StableDiffusionPipeline.from_pretrained(prior)
    assert pipe.safety_checker is None
    image = pipe("a photo of nut", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    # the UNet saved is the EMA of the training weights, not the last step's weights
    checkpoint = latest_checkpoint(prior / "training" / "unet")
    ema, raw = load_file(str(checkpoint / "ema.safetensors")), load_file(str(checkpoint / "trainable.safetensors"))
    saved = backbone.unet.state_dict()
    key = "conv_in.weight"
    torch.testing.assert_close(saved[key], ema[f"unet.{key}"], atol=0, rtol=0)
    assert not torch.equal(saved[key], raw[f"unet.{key}"])
    for name in ("samples.png", "loss.png", "pretrain.json", "training/unet/validation/step-0000004.png",
                 "training/vae/validation/step-0000002.png", "training/vae/loss.png"):
        assert (prior / name).is_file(), name


def _killing(stage: str, at: int):
    """``train`` that raises ``Killed`` at step ``at`` of the ``stage`` run ("vae" or "unet")."""
    real = run.train

    def fake(modules, loss_fn, config, out_dir, **kwargs):
        def killed(m, step, generator):
            if Path(out_dir).name == stage and step == at:
                raise Killed
            return loss_fn(m, step, generator)

        return real(modules, killed, config, out_dir, **kwargs)

    return fake


def test_kill_and_resume_equals_an_uninterrupted_run(demo, prior, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    for stage, at in (("vae", 2), ("unet", 3)):  # killed in each stage, after a checkpoint and before the next
        with monkeypatch.context() as patch, pytest.raises(Killed):
            patch.setattr(run, "train", _killing(stage, at))
            pretrain([demo], out, PretrainConfig(**TINY), say=lambda m: None)
    torch.manual_seed(99)  # a new process: another global RNG state
    pretrain([demo], out, PretrainConfig(**TINY), say=lambda m: None)
    for name in WEIGHTS:
        assert (out / name).read_bytes() == (prior / name).read_bytes(), name
    # the whole model folder, every file byte for byte (pretrain.json too: no wall time, no path that
    # differs); training/ holds wall times (loss.csv's elapsed_s) and may be deleted
    model = {k: v for k, v in snapshot(out).items() if not k.startswith("training")}
    assert model == {k: v for k, v in snapshot(prior).items() if not k.startswith("training")}
    for stage in ("vae", "unet"):
        rows = [list(csv.reader((root / "training" / stage / "loss.csv").open())) for root in (out, prior)]
        assert [r[:2] for r in rows[0]] == [r[:2] for r in rows[1]], stage


@given(st.lists(st.text("abcdefghijklmnopqrstuvwxyzé", min_size=1, max_size=12), min_size=1, max_size=40))
@settings(max_examples=25, deadline=None)
def test_every_word_is_one_token(words):
    from transformers import CLIPTokenizer
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        write_tokenizer_files(Path(folder), words, single_tokens=True)
        tokenizer = CLIPTokenizer(f"{folder}/vocab.json", f"{folder}/merges.txt")
        split = {w: tokenizer.tokenize(w) for w in words if len(tokenizer.tokenize(w)) != 1}
    assert not split


def test_the_tokenizer_covers_every_category_and_defect_name(demo, prior, tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(prior / "tokenizer")
    words = load_pretrain_images([demo], 32).words
    assert {"fabric", "nut", "cut", "hole", "stain", "dent", "scratch", "photo", "defect"} <= set(words)
    assert [w for w in words if len(tokenizer.tokenize(w)) != 1] == []
    # names a user's folders may have: several words, underscores, accents
    root = tmp_path / "data" / "metal_nut"
    for i in range(2):
        _image(root / "train" / "good" / f"{i}.png", (40, 40))
    for kind in ("scratch_head", "défaut", "blowhole", "contamination"):
        _image(root / "test" / kind / "0.png", (40, 40))
        (root / "ground_truth" / kind).mkdir(parents=True)
        Image.fromarray(np.full((40, 40), 255, np.uint8)).save(root / "ground_truth" / kind / "0_mask.png")
    words = load_pretrain_images([root], 32).words
    folder = write_tokenizer_files(tmp_path / "tok", words, single_tokens=True)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    for name in ("metal_nut", "scratch_head", "défaut", "blowhole", "contamination"):
        assert len(tokenizer.tokenize(prompt_name(name))) == len(clip_words(prompt_name(name))), name


def _image(path: Path, size: tuple[int, int], seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def test_mixed_sizes_are_resized_and_defects_only_on_request(demo, tmp_path):
    root = tmp_path / "mixed"
    # (h, w): (20, 20) is upscaled, (32, 48) is already at the resolution (and held back)
    for i, size in enumerate([(40, 90), (120, 50), (20, 20), (32, 48)]):
        _image(root / "train" / "good" / f"{i}.png", size, i)
    (root / "test").mkdir()
    data = load_pretrain_images([root], 32)
    assert [min(im.shape[:2]) for im in data.images + data.held_back] == [32, 32, 32, 32]
    assert data.images[0].shape == (32, 72, 3) and data.upscaled == 1 and len(data.held_back) == 1
    pixels, ids = data.batch(5, torch.Generator().manual_seed(0))
    assert pixels.shape == (5, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1 and ids == [0] * 5
    plain = load_pretrain_images([demo], 32)
    with_defects = load_pretrain_images([demo], 32, include_defects=True)
    assert plain.prompts == ["a photo of fabric", "a photo of nut"] and len(plain.images) == 2 * (4 - 1)
    # the training third of each of the 3 types of 3 images: 1 per type and category
    assert len(with_defects.images) == len(plain.images) + 2 * 3
    assert "a photo of nut with scratch" in with_defects.prompts


@pytest.mark.parametrize("balanced", [True, False])
def test_each_category_is_drawn_as_often_whatever_its_image_count(tmp_path, balanced):
    """Balanced: a category of 1 training image gets half the crops beside one of 8; else 1 in 9."""
    for i in range(9):
        _image(tmp_path / "data" / "many" / "train" / "good" / f"{i}.png", (32, 32), i)
    for i in range(2):  # one of the two is held back
        _image(tmp_path / "data" / "few" / "train" / "good" / f"{i}.png", (32, 32), 10 + i)
    for name in ("many", "few"):
        (tmp_path / "data" / name / "test").mkdir()
    data = load_pretrain_images([tmp_path / "data"], 32, balanced=balanced)
    assert sorted(data.categories) == ["few", "many"] and len(data.images) == 8 + 1
    few = data.prompts.index("a photo of few")
    ids = [i for _ in range(20) for i in data.batch(100, torch.Generator().manual_seed(_))[1]]
    share = ids.count(few) / len(ids)
    assert (0.45 < share < 0.55) if balanced else (0.08 < share < 0.15), share
    images = [torch.tensor(im).permute(2, 0, 1).float() / 127.5 - 1 for im in data.images]
    # 32 px crops: whole images, as they are or mirrored left to right, about half of them mirrored
    drawn = [(k, flipped) for crop in data.batch(200, torch.Generator().manual_seed(0))[0]
             for k, im in enumerate(images) for flipped in (False, True)
             if torch.equal(crop, im.flip(-1) if flipped else im)]
    assert len(drawn) == 200 and {k for k, _ in drawn} == set(range(len(data.images)))  # every image of each category
    assert 0.35 < sum(flipped for _, flipped in drawn) / 200 < 0.65


def test_a_folder_from_before_balance_resumes_only_with_balance_images(demo, tmp_path):
    out = tmp_path / "prior"
    config = {**TINY, "max_steps": 0, "vae_steps": 1}
    pretrain([demo], out, PretrainConfig(**config, balance="images"), say=lambda m: None)
    settings = json.loads((out / run.SETTINGS).read_text())
    assert settings.pop("balance") == "images"
    (out / run.SETTINGS).write_text(json.dumps(settings))  # as an older version wrote it
    with pytest.raises(run.DataError, match="balance 'images' -> 'categories'"):
        pretrain([demo], out, PretrainConfig(**config), say=lambda m: None)
    pretrain([demo], out, PretrainConfig(**config, balance="images"), say=lambda m: None)


def test_the_autoencoders_attention_is_an_option_and_older_folders_keep_their_sizes(demo, tmp_path):
    def attention(out: Path) -> bool:
        return json.loads((out / "training" / "vae_final" / "config.json").read_text())["mid_block_add_attention"]

    base = ["pretrain", "--data", demo, "--size", "tiny", "--resolution", 32, "--vae-steps", 1, "--batch-size", 2,
            "--max-steps", 0, "--device", "cpu"]
    for flag, expected in ((None, False), ("--vae-attention", True), ("--no-vae-attention", False)):  # tiny: off
        out = tmp_path / str(flag)
        result = CliRunner().invoke(app, [str(a) for a in base + ["--out", out] + ([flag] if flag else [])])
        assert result.exit_code == 0, result.output
        assert attention(out) is expected and json.loads((out / run.SETTINGS).read_text())["vae_attention"] is expected
    out, config = tmp_path / "None", {**TINY, "max_steps": 0, "vae_steps": 2}
    settings = json.loads((out / run.SETTINGS).read_text())
    del settings["vae_attention"]
    (out / run.SETTINGS).write_text(json.dumps(settings))  # as an older version wrote it: the size's (tiny: off)
    with pytest.raises(run.DataError, match="vae_attention False -> True"):
        pretrain([demo], out, PretrainConfig(**config, vae_attention=True), say=lambda m: None)
    pretrain([demo], out, PretrainConfig(**config, vae_attention=False), say=lambda m: None)  # its own value, named
    assert json.loads((out / run.REPORT).read_text())["vae"]["steps"] == 2 and attention(out) is False


def test_bad_input_is_one_line_and_damages_nothing(demo, tmp_path):
    no_good = tmp_path / "nogood" / "cat"
    (no_good / "train" / "good").mkdir(parents=True)
    (no_good / "test" / "cut").mkdir(parents=True)
    corrupt = tmp_path / "corrupt"
    _image(corrupt / "train" / "good" / "0.png", (40, 40))
    (corrupt / "test").mkdir()
    (corrupt / "train" / "good" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    base = ["pretrain", "--size", "tiny", "--resolution", 32, "--max-steps", 1, "--vae-steps", 1, "--device", "cpu"]
    cases = [
        (["--data", no_good, "--out", tmp_path / "o1"], [str(no_good / "train" / "good"), "no images"]),
        (["--data", corrupt, "--out", tmp_path / "o2"], [str(corrupt / "train" / "good" / "1.png"), "unreadable"]),
        (["--data", demo, "--out", tmp_path / "o3", "--resolution", 100], ["--resolution got 100"]),
        (["--data", demo, "--out", a_file], [str(a_file), "not a folder"]),
        (["--data", demo, "--out", foreign], [str(foreign), "not an anomalygen pretrain folder"]),
        (["--data", tmp_path / "missing", "--out", tmp_path / "o4"], [str(tmp_path / "missing")]),
        (["--data", demo, "--out", tmp_path / "o5", "--device", "quantum"], ["--device quantum", "cpu"]),
        (["--data", demo, "--out", tmp_path / "o6", "--device", "cuda:7"], ["--device cuda:7", "cpu"]),
        (["--data", demo, "--out", tmp_path / "o7", "--lr", 0], ["--lr got 0", "> 0 and <= 1"]),
        (["--data", demo, "--out", tmp_path / "o8", "--vae-lr", "nan"], ["--vae-lr got nan", "> 0 and <= 1"]),
        (["--data", demo, "--out", tmp_path / "o9", "--vae-colour-augment", 1.5], ["--vae-colour-augment got 1.5", ">= 0 and <= 1"]),
        (["--data", demo, "--out", tmp_path / "o10", "--vae-share", 1], ["--vae-share got 1", "> 0 and < 1"]),
        (["--data", demo, "--out", tmp_path / "o11", "--balance", "prompts"], ["--balance got 'prompts'", "categories, images"]),
        (["--data", demo, "--out", tmp_path / "o12", "--vae-defect-weight", 1], ["--vae-defect-weight got 1", "defect images"]),
        (["--data", demo, "--out", tmp_path / "o13", "--include-defects", "--unet-defect-weight", -1],
         ["--unet-defect-weight got -1", ">= 0 and <= 1000"]),
    ]
    for args, fragments in cases:  # in this process (typer's runner): a fresh interpreter costs seconds each
        result = CliRunner().invoke(app, [str(a) for a in base + args])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert all(f in lines[0] for f in fragments), (fragments, lines[0])
    assert_unchanged(before, tmp_path)
    denied = tmp_path / "denied"
    assert_user_error(run_cli(*base, "--data", demo, "--out", denied, fault=f"deny:EACCES:{denied}"),
                      str(denied), "permission denied")


def test_changed_settings_do_not_resume_into_a_folder(demo, prior):
    before = snapshot(prior)
    with pytest.raises(run.DataError, match="resolution 32 -> 64"):
        pretrain([demo], prior, PretrainConfig(**{**TINY, "resolution": 64}), say=lambda m: None)
    assert_unchanged(before, prior)


def test_train_ema_is_diffusers_ema_of_the_weights(tmp_path):
    """``ema_decay``: the checkpoint's EMA is s_1 = w_1, s_n = d_n s_{n-1} + (1 - d_n) w_n with
    d_n = min(decay, n / (n + 9)) (EMAModel without warm-up), w_n the weights after step n."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    modules = {"m": nn.Linear(3, 1)}
    seen = []

    def loss_fn(m, step, generator):
        seen.append(m["m"].weight.detach().clone())
        return (m["m"](torch.randn(8, 3, generator=generator)) - 1).pow(2).mean()

    train(modules, loss_fn, TrainConfig(max_steps=6, lr=0.1, ema_decay=0.5, device="cpu", checkpoint_every=0), tmp_path)
    weights = seen[1:] + [modules["m"].weight.detach()]
    shadow = weights[0]
    for n, w in enumerate(weights[1:], start=2):
        decay = min(0.5, n / (n + 9))
        shadow = decay * shadow + (1 - decay) * w
    ema = load_file(str(latest_checkpoint(tmp_path) / "ema.safetensors"))["m.weight"]
    torch.testing.assert_close(ema, shadow)
    assert not torch.allclose(ema, weights[-1])


def test_a_spent_time_budget_still_writes_a_loadable_model_and_a_rerun_goes_on(demo, tmp_path):
    from anomalygen.diffusion.backbone import load_backbone

    out = tmp_path / "prior"
    report = pretrain([demo], out, PretrainConfig(**TINY, time_budget_s=1e-3), say=lambda m: None)
    assert report["vae"]["stopped_by"] == report["unet"]["stopped_by"] == "time_budget"
    assert report["vae"]["steps"] == report["unet"]["steps"] == 0
    load_backbone(str(out), device="cpu")
    vae = (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    report = pretrain([demo], out, PretrainConfig(**TINY), say=lambda m: None)
    assert report["unet"]["steps"] == TINY["max_steps"] and report["vae"]["steps"] == 0  # the autoencoder stays fixed
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == vae


def test_the_autoencoder_alone_can_be_extended_until_the_unet_begins(demo, prior, tmp_path):
    """``max_steps=0`` trains the autoencoder only; a re-run with more ``vae_steps`` trains it on from
    its checkpoint (equal to one run of that length); once the UNet stage has begun it is kept, and
    a raised ``vae_steps`` is said, not silently dropped."""
    out, said = tmp_path / "prior", []
    report = pretrain([demo], out, PretrainConfig(**{**TINY, "vae_steps": 2, "max_steps": 0}), say=said.append)
    assert report["vae"]["steps"] == 2 and "unet" not in report and not (out / "model_index.json").exists()
    assert any("autoencoder only" in line for line in said)
    assert latest_checkpoint(out / "training" / "unet") is None
    report = pretrain([demo], out, PretrainConfig(**{**TINY, "max_steps": 0}), say=said.append)  # 2 -> 3 steps
    assert report["vae"]["steps"] == TINY["vae_steps"] and np.isfinite(report["vae"]["last_loss"])
    assert (out / "training" / "vae_final" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (prior / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()  # as the fixture's uninterrupted 3 steps
    said.clear()
    report = pretrain([demo], out, PretrainConfig(**TINY), say=said.append)
    assert not [line for line in said if "[1/2] autoencoder" in line], said  # trained as long as asked: not run again
    for name in WEIGHTS:  # and the UNet trained on it as the fixture's
        assert (out / name).read_bytes() == (prior / name).read_bytes(), name
    said.clear()
    report = pretrain([demo], out, PretrainConfig(**{**TINY, "vae_steps": 5}), say=said.append)
    assert report["vae"]["steps"] == TINY["vae_steps"] and np.isfinite(report["unet"]["last_loss"])
    assert (out / WEIGHTS[1]).read_bytes() == (prior / WEIGHTS[1]).read_bytes()
    assert [line for line in said if "kept at its 3 steps (not `vae_steps` 5)" in line], said


def test_cli_max_steps_zero_says_no_model_yet_and_negative_is_refused(demo, tmp_path):
    base = ["pretrain", "--data", demo, "--size", "tiny", "--resolution", 32, "--vae-steps", 1, "--batch-size", 2,
            "--device", "cpu"]
    result = CliRunner().invoke(app, [str(a) for a in base + ["--out", tmp_path / "p", "--max-steps", 0]])
    assert result.exit_code == 0 and "autoencoder 1 steps" in result.output and "no model yet" in result.output, result.output
    result = CliRunner().invoke(app, [str(a) for a in base + ["--out", tmp_path / "q", "--max-steps", -1]])
    assert result.exit_code == 2 and "--max-steps got -1" in result.stderr and not (tmp_path / "q").exists(), result.output


def test_cli_learning_rates_and_vae_share_reach_both_stages(demo, tmp_path, monkeypatch):
    seen, budgets = [], []
    real_train = run.train

    def train(modules, loss_fn, config, *args, **kwargs):
        seen.append((*modules, config.lr))
        budgets.append(config.time_budget_s)
        return real_train(modules, loss_fn, config, *args, **kwargs)

    monkeypatch.setattr(run, "train", train)
    args = ["pretrain", "--data", demo, "--out", tmp_path / "p", "--size", "tiny", "--resolution", 32, "--max-steps", 1,
            "--vae-steps", 1, "--batch-size", 2, "--device", "cpu", "--lr", 0.0123, "--vae-lr", 0.0456,
            "--time-budget", 10, "--vae-share", 0.4]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert seen == [("vae", 0.0456), ("unet", 0.0123)]
    assert 200 < budgets[0] <= 240 and 400 < budgets[1] <= 600  # 0.4 x 10 min for the autoencoder, the rest after it
    settings = json.loads((tmp_path / "p" / run.SETTINGS).read_text())
    assert (settings["unet_lr"], settings["vae_lr"]) == (0.0123, 0.0456)


def _variant_of(image: torch.Tensor, original: torch.Tensor) -> int | None:
    """Which colouring (0 = the original, 1..11) of ``original`` ``image`` is; None if none."""
    for v in range(COLOURINGS):
        if torch.equal(image, colour_variant(original, v)):
            return v
    return None


@settings(max_examples=25, deadline=None)
@given(p=st.sampled_from([0.0, 0.3, 1.0]), seed=st.integers(0, 2**31 - 1))
def test_colour_variants_are_recolourings_of_their_own_image_at_rate_p(p, seed):
    pixels = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    out = colour_variants(pixels, torch.Generator().manual_seed(seed), p)
    variants = [_variant_of(out[i : i + 1], pixels[i : i + 1]) for i in range(len(pixels))]
    assert None not in variants  # every output image is a recolouring of the input image at its index
    recoloured = sum(v != 0 for v in variants)
    assert {0.0: recoloured == 0, 1.0: recoloured == 64, 0.3: 8 <= recoloured <= 32}[p], (p, recoloured)
    assert torch.equal(out, colour_variants(pixels, torch.Generator().manual_seed(seed), p))  # drawn from the generator


def test_colour_variants_reach_every_colouring_and_inversion_gives_the_complement():
    pixels = torch.rand(600, 3, 2, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = colour_variants(pixels, torch.Generator().manual_seed(1), 1.0)
    assert {_variant_of(out[i : i + 1], pixels[i : i + 1]) for i in range(len(pixels))} == set(range(1, 12))
    yellow = torch.tensor([0.8, 0.75, 0.2]).view(1, 3, 1, 1) * 2 - 1  # a hazelnut-yellow pixel in [-1, 1]
    blue = (colour_variant(yellow, 6) + 1) / 2  # the original channel order, inverted
    torch.testing.assert_close(blue.flatten(), torch.tensor([0.2, 0.25, 0.8]))


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_the_autoencoder_trains_on_recoloured_crops_and_reports_them(demo, tmp_path, monkeypatch, share):
    """Every crop the autoencoder trains on is the one ``batch`` drew (share 0) or another colouring of it (share 1)."""
    drawn, encoded = [], []
    real_crops, real_encode = run.PretrainImages.crops, run.AutoencoderKL.encode

    def crops(self, *args, **kwargs):
        pixels, ids, masks = real_crops(self, *args, **kwargs)
        drawn.append(pixels)
        return pixels, ids, masks

    def encode(self, x, *args, **kwargs):
        if torch.is_grad_enabled() and self.training:
            encoded.append(x.detach().clone())
        return real_encode(self, x, *args, **kwargs)

    monkeypatch.setattr(run.PretrainImages, "crops", crops)
    monkeypatch.setattr(run.AutoencoderKL, "encode", encode)
    report = pretrain([demo], tmp_path / "p", PretrainConfig(**{**TINY, "vae_steps": 2, "max_steps": 1, "batch_size": 4},
                                                            vae_colour_augment=share), say=lambda m: None)
    assert len(encoded) == 2
    for pixels, original in zip(encoded, drawn):
        variants = [_variant_of(pixels[i : i + 1], original[i : i + 1]) for i in range(len(pixels))]
        assert (all(v == 0 for v in variants) if share == 0 else all(v not in (0, None) for v in variants)), variants
    assert report["vae"]["psnr_recoloured_db"] < 60 and np.isfinite(report["vae"]["psnr_recoloured_db"])


def test_vae_psnr_curve_script_ends_at_the_reported_psnr(prior, tmp_path, monkeypatch, capsys):
    import runpy

    script = runpy.run_path(str(Path(__file__).resolve().parents[3] / "benchmarks" / "vae_psnr_curve.py"))
    monkeypatch.setattr("sys.argv", ["vae_psnr_curve.py", str(prior)])
    script["main"]()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    report = json.loads((prior / run.REPORT).read_text())["vae"]
    assert [row.split(" | ")[0] for row in rows] == ["| 2", "| 3"]  # checkpoint_every 2, then the last step
    assert rows[-1] == f"| 3 | {report['psnr_db']} dB | {report['psnr_recoloured_db']} dB |"
    monkeypatch.setattr("sys.argv", ["vae_psnr_curve.py", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        script["main"]()
    assert exit_.value.code == 2 and str(tmp_path) in capsys.readouterr().err


def test_prior_corners_script_finds_the_faulty_corner_and_reads_a_prior(prior, tmp_path, monkeypatch, capsys):
    import runpy
    from types import SimpleNamespace

    script = runpy.run_path(str(Path(__file__).resolve().parents[3] / "benchmarks" / "prior_corners.py"))
    pixels = torch.zeros(2, 3, 32, 32)

    def blotted(x, sample_posterior):  # wrong by 0.5 in the bottom-left 4 x 4 only
        out = x.clone()
        out[..., -4:, :4] += 0.5
        return SimpleNamespace(sample=out)

    errors = script["corner_errors"](blotted, pixels)
    assert errors == pytest.approx({"whole": 0.5 * 16 / 1024, "top-left": 0, "top-right": 0, "bottom-left": 0.5,
                                    "bottom-right": 0})
    monkeypatch.setattr("sys.argv", ["prior_corners.py", str(prior), "--samples", "1"])
    script["main"]()
    out = capsys.readouterr().out
    assert "| flat gray |" in out and "| a photo of " in out, out
    monkeypatch.setattr("sys.argv", ["prior_corners.py", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        script["main"]()
    assert exit_.value.code == 2 and str(tmp_path) in capsys.readouterr().err


def test_the_autoencoder_loss_is_l1_plus_kl_weight_times_the_kl_per_pixel(prior):
    """LDM's objective: L1 of a posterior sample's reconstruction + w · KL(q(z|x) ‖ N(0, I)) / pixels,
    the KL from its closed form, never subtracted."""
    vae = AutoencoderKL.from_pretrained(prior / "vae")
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        loss = {w: float(run.autoencoder_loss(vae, pixels, torch.Generator().manual_seed(1), w)) for w in (0.0, 100.0)}
        posterior = vae.encode(pixels).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(1))
        l1 = float((vae.decode(posterior.mean + posterior.std * noise).sample - pixels).abs().mean())
        kl = 0.5 * (posterior.mean**2 + posterior.var - 1 - posterior.logvar).flatten(1).sum(1).mean()
    assert loss[0.0] == pytest.approx(l1, rel=1e-5)
    assert float(kl) > 0 and loss[100.0] - loss[0.0] == pytest.approx(100 * float(kl) / (3 * 32 * 32), rel=1e-4)


class _Offsets:
    """An "autoencoder" whose reconstruction is off by 0.5 on the pixels of ``where`` and 0.1 elsewhere, with no KL."""

    def __init__(self, where: torch.Tensor):
        self.where = where

    def encode(self, pixels):
        dist = type("Posterior", (), {"sample": lambda _, generator: pixels, "kl": lambda _: torch.zeros(len(pixels))})
        return type("Encoded", (), {"latent_dist": dist()})

    def decode(self, z):
        return type("Decoded", (), {"sample": z + torch.where(self.where[:, None], 0.5, 0.1)})


def test_the_defect_weight_adds_lambda_times_the_l1_over_the_defect_pixels_only():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 3:6] = True  # 6 defect pixels in one image of two
    pixels = torch.full((2, 3, 8, 8), -0.3)  # not 0: the error is recon - pixels, not recon + pixels

    def loss(where, weight, given=masks):
        return float(run.autoencoder_loss(_Offsets(where), pixels, None, 1e-6, given, weight))

    base = 0.1 + 0.4 * 6 / 128
    assert loss(masks, 0.0) == pytest.approx(base) and loss(masks, 3.0) == pytest.approx(base + 3 * 0.5)
    assert loss(~masks, 3.0) == pytest.approx(0.5 - 0.4 * 6 / 128 + 3 * 0.1)  # the error on the masked pixels, not the rest
    assert loss(masks, 3.0, torch.zeros_like(masks)) == pytest.approx(base) and loss(masks, 3.0, None) == pytest.approx(base)


def test_the_unet_defect_weight_adds_lambda_times_the_loss_on_the_latents_a_defect_touches():
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 5, 6] = True  # one pixel: latent (1, 1) of a 4 x 4 grid
    noise = torch.full((2, 4, 4, 4), 0.25)  # not 0: the error is pred - noise, not pred + noise
    pred = noise.clone()
    pred[0, :, 1, 1], pred[1, :, 2, 2] = 3.25, 1.25  # row 1's error is off every defect
    base = (9 * 4 + 1 * 4) / pred.numel()
    assert float(run.denoising_loss(pred, noise)) == pytest.approx(base)
    assert float(run.denoising_loss(pred, noise, masks, 2.0)) == pytest.approx(base + 2 * 9)
    masks[0, 5, 6], masks[0, 15, 15] = False, True  # latent (3, 3): no error there
    assert float(run.denoising_loss(pred, noise, masks, 2.0)) == pytest.approx(base)


def test_crops_carry_each_defect_mask_cropped_and_flipped_with_its_image():
    rng = np.random.default_rng(0)
    defect = rng.integers(0, 200, (8, 13, 3), dtype=np.uint8)
    mask = np.zeros((8, 13), bool)
    mask[1:5, 2:4], mask[6, 9:12] = True, True
    defect[mask] = 255  # the only white pixels
    images = PretrainImages(8, categories=["c"])
    images.add(rng.integers(0, 200, (8, 10, 3), dtype=np.uint8), "good")
    images.add(defect, "defect", mask=mask)
    pixels, ids, masks = images.crops(64, torch.Generator().manual_seed(0))
    white = (pixels == 1).all(1)
    assert set(ids) == {0, 1} and masks.shape == (64, 8, 8)
    assert torch.equal(masks, white) and masks[torch.tensor(ids) == 1].any(dim=(1, 2)).any()
    again, again_ids = images.batch(64, torch.Generator().manual_seed(0))
    assert torch.equal(again, pixels) and again_ids == ids  # the same draws with or without the masks


def test_defect_masks_are_loaded_with_their_images_and_reach_both_losses(demo, tmp_path, monkeypatch):
    data = load_pretrain_images([demo], 32, include_defects=True)
    defects = [m for m in data.masks if m is not None]
    assert len(defects) == 6 and all(m.shape == im.shape[:2] and m.any() for m, im in zip(data.masks, data.images) if m is not None)
    assert [m is None for m in data.masks] == ["with" not in data.prompts[i] for i in data.prompt_ids]
    drawn, seen = [], {"vae": [], "unet": []}
    real_crops, real_vae, real_unet = run.PretrainImages.crops, run.autoencoder_loss, run.denoising_loss

    def crops(self, *args, **kwargs):
        out = real_crops(self, *args, **kwargs)
        drawn.append(out[2])
        return out

    monkeypatch.setattr(run.PretrainImages, "crops", crops)
    monkeypatch.setattr(run, "autoencoder_loss", lambda *a: seen["vae"].append(a[4:]) or real_vae(*a))
    monkeypatch.setattr(run, "denoising_loss", lambda *a: seen["unet"].append(a[2:]) or real_unet(*a))
    pretrain([demo], tmp_path / "p", PretrainConfig(**{**TINY, "vae_steps": 2, "max_steps": 2, "batch_size": 8}, include_defects=True,
                                                    vae_defect_weight=3.0, unet_defect_weight=5.0), say=lambda m: None)
    assert [w for _, w in seen["vae"]] == [3.0, 3.0] and [w for _, w in seen["unet"]] == [5.0, 5.0]
    received = [m for m, _ in seen["vae"] + seen["unet"]]
    assert all(any(r is d for d in drawn) for r in received) and any(bool(r.any()) for r in received)


def test_the_latent_scale_gives_unit_std_on_the_training_crops(prior):
    settings, images = run.read_run(prior)
    vae = AutoencoderKL.from_pretrained(prior / "vae")
    with torch.no_grad():  # the crops and draws the run took (4 × its batch size, its seed)
        pixels, _ = images.batch(4 * settings["batch_size"], torch.Generator().manual_seed(settings["seed"]))
        latents = vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(settings["seed"]))
    assert abs(float(latents.std()) - 1) > 0.05  # the scale has something to correct
    assert float((latents * vae.config.scaling_factor).std()) == pytest.approx(1, abs=1e-3)


class _Decodes(nn.Module):
    """An "autoencoder" that returns one fixed image whatever it is given (as one trained on a
    single part's colours does)."""

    def __init__(self, image: torch.Tensor):
        super().__init__()
        self.image, self.device = image, torch.device("cpu")

    def forward(self, pixels, sample_posterior=False):
        return type("Output", (), {"sample": self.image.expand_as(pixels)})


def test_held_back_psnr_is_on_the_0_1_scale_and_recoloured_means_the_11_other_colourings():
    image = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    images = PretrainImages(8, held_back=[image])
    held = images.held_back_batch()
    psnr, recoloured = run.held_back_psnr(_Decodes(held), images)
    assert psnr == 100.0  # exact: the clamp of a zero error
    expected = [10 * np.log10(1 / float((((held - colour_variant(held, c)) / 2) ** 2).mean())) for c in range(1, COLOURINGS)]
    assert recoloured == pytest.approx(np.mean(expected), abs=0.01) and recoloured < 20


def test_the_unet_sees_every_timestep_range_and_a_tenth_of_its_prompts_dropped(demo, tmp_path, monkeypatch):
    """The ε-loss is drawn over all T timesteps; each prompt's context is replaced by the empty
    prompt's with probability ``uncond_prob`` (0.1), for classifier-free guidance; the final grid
    holds two samples per prompt."""
    seen, grids, real_forward, real_grid = [], [], UNet2DConditionModel.forward, run.save_grid

    def forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        if torch.is_grad_enabled():  # training, not sampling
            seen.append((timestep.clone(), encoder_hidden_states.detach().clone()))
        return real_forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    monkeypatch.setattr(run, "save_grid", lambda images, path: (grids.append(len(images)), real_grid(images, path)))
    out = tmp_path / "prior"
    pretrain([demo], out, PretrainConfig(**{**TINY, "max_steps": 40, "batch_size": 8, "checkpoint_every": 40,
                                            "sample_every": 40}), say=lambda m: None)
    tokenizer, encoder = CLIPTokenizer.from_pretrained(out / "tokenizer"), CLIPTextModel.from_pretrained(out / "text_encoder")
    prompts = json.loads((out / "pretrain.json").read_text())["prompts"]
    with torch.no_grad():
        ids = tokenizer(prompts + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        states = encoder(ids)[0]
    timesteps = torch.cat([t for t, _ in seen])
    contexts = torch.cat([c for _, c in seen])
    which = [next(k for k in range(len(states)) if torch.allclose(c, states[k], atol=1e-5)) for c in contexts]
    assert len(which) == 40 * 8 and len(prompts) == 2
    assert 0.05 < which.count(len(prompts)) / len(which) < 0.16  # the empty prompt
    assert all(0.3 < which.count(k) / len(which) < 0.6 for k in range(len(prompts)))
    assert int(timesteps.min()) < 100 and int(timesteps.max()) > 900 and 400 < float(timesteps.float().mean()) < 600
    assert grids == [2 * len(prompts)]
