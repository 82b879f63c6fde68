"""CAGen (Jiang et al., ICASSP 2024) on the tiny (random-init) preset: the ControlNet reaches the
UNet (Eq. 1), fusion with the normal latent (Eqs. 2-5), location masks, save / load, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anomalygen.errors import AnomalygenError
from anomalygen.methods.base import AnomalyGenerator
from anomalygen.methods.cagen import CAGen
from anomalygen.methods.cagen.control import build_controlnet, control_image, controlled_eps
from anomalygen.types import DefectExample

torch.set_num_threads(1)

FAST = dict(model="tiny", device="cpu", resolution=32, batch_size=2, max_steps=2, num_inference_steps=3,
            generate_batch_size=2)


def toy_data(seed=0):
    rng = np.random.default_rng(seed)
    defects = []
    for i in range(5):
        image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        mask = np.zeros((40, 48), bool)
        mask[10 + i:20 + i, 12:30] = True
        defects.append(DefectExample(image, mask, ["crack", "hole"][i % 2]))
    good = [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    return defects, good


@pytest.fixture(scope="module")
def fitted():
    defects, good = toy_data()
    generator = CAGen(**FAST, max_per_type=2)
    generator.fit(defects, good)
    return generator, good


def _inputs(backbone, masks):
    torch.manual_seed(0)
    return torch.randn(len(masks), 4, 16, 16), torch.tensor([400]), torch.randn(len(masks), 77, 32), control_image(masks, 32)


def test_a_fresh_controlnet_leaves_the_unet_unchanged_and_a_trained_one_reads_the_mask(fitted):
    """Eq. 1 through the zero convolutions: nothing at initialisation, the mask once they are not zero."""
    generator, _ = fitted
    backbone = generator.backbone
    a, b = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    a[4:12, 4:12], b[20:30, 18:30] = True, True
    latents, t, context, control = _inputs(backbone, [a])
    with torch.no_grad():
        plain = backbone.unet(latents, t, encoder_hidden_states=context).sample
        fresh = build_controlnet(backbone.unet, backbone.vae_scale_factor)
        assert torch.equal(controlled_eps(backbone.unet, fresh, latents, t, context, control), plain)  # zero convolutions
        for name, param in fresh.named_parameters():  # as if trained: non-zero output convolutions
            if "controlnet_down_blocks" in name or "controlnet_mid_block" in name or "cond_embedding.conv_out" in name:
                param.normal_(0, 0.05)
        steered = controlled_eps(backbone.unet, fresh, latents, t, context, control)
        other = controlled_eps(backbone.unet, fresh, latents, t, context, control_image([b], 32))
    assert (steered - plain).abs().max() > 1e-3  # the residuals reach the UNet
    assert (steered - other).abs().max() > 1e-3  # and depend on the mask


def test_control_is_tiled_over_the_cfg_batch(fitted):
    generator, _ = fitted
    backbone = generator.backbone
    mask = np.zeros((32, 32), bool)
    mask[4:20, 4:20] = True
    latents, t, context, control = _inputs(backbone, [mask])
    with torch.no_grad():
        one = controlled_eps(backbone.unet, generator.controlnet, latents, t, context, control)
        two = controlled_eps(backbone.unet, generator.controlnet, latents.repeat(2, 1, 1, 1), t, context.repeat(2, 1, 1), control)
    assert torch.allclose(two[1:], one, atol=1e-5)


def test_fit_trains_only_the_controlnet_on_at_most_max_per_type_defects(fitted):
    generator, _ = fitted
    assert generator.defect_types == ["crack", "hole"]
    assert [len(generator.training_masks[t]) for t in ("crack", "hole")] == [2, 2]  # 3 cracks given, 2 kept
    assert len(generator.loss_log) == 2 and all(np.isfinite(generator.loss_log))
    fresh = build_controlnet(generator.backbone.unet, generator.backbone.vae_scale_factor)
    moved = [n for n, p in generator.controlnet.named_parameters() if not torch.equal(p, dict(fresh.named_parameters())[n])]
    assert any("controlnet_down_blocks" in n for n in moved)  # the zero convolutions trained
    assert not any(p.requires_grad for p in generator.backbone.unet.parameters())


def test_training_defects_are_drawn_at_random_per_type_by_default():
    """The paper trains on three images drawn at random per type; "first" (ours) keeps the old pick."""
    examples = list(range(9))  # stand-ins for one type's nine defects, in order
    picks = [CAGen(**FAST, seed=s)._pick(0, examples) for s in range(4)]
    assert all(len(p) == 3 and p == sorted(set(p)) for p in picks)
    assert len({tuple(p) for p in picks}) > 1 and any(p != [0, 1, 2] for p in picks)  # seeded draws
    assert CAGen(**FAST, seed=1)._pick(0, examples) == CAGen(**FAST, seed=1)._pick(0, examples)
    assert CAGen(**FAST, training_pick="first")._pick(0, examples) == [0, 1, 2]


def test_steps_follow_the_papers_epochs(monkeypatch):
    import anomalygen.methods.kit.method as module

    steps = []
    monkeypatch.setattr(module, "train", lambda modules, loss_fn, config, out: steps.append(config.max_steps) or
                        type("R", (), {"losses": []})())
    defects, good = toy_data()
    CAGen(**{k: v for k, v in FAST.items() if k != "max_steps"}, epochs=10).fit(defects, good)
    assert steps == [25]  # 10 epochs × 5 images (≤ 3 per type) / batch 2, rounded up


def test_fusion_keeps_the_normal_latent_outside_the_mask_exactly(fitted, monkeypatch):
    import anomalygen.diffusion.sampling as module
    from anomalygen.diffusion.sampling import encode_images, latent_mask, to_tensor

    generator, good = fitted
    captured = []
    original = module.decode_latents
    monkeypatch.setattr(module, "decode_latents", lambda backbone, latents, *rest: (captured.append(latents),
                                                                                      original(backbone, latents, *rest))[1])
    mask = np.zeros((40, 48), bool)
    mask[8:24, 10:30] = True
    sample = next(iter(generator.generate(good[:1], 1, masks=[mask])))
    latents = captured[0]
    known = encode_images(generator.backbone, to_tensor([good[sample.meta["source_index"]]], (32, 32)))
    m = latent_mask(torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=(32, 32)), (16, 16))
    assert torch.equal(latents * (1 - m), known * (1 - m))
    assert (latents - known).mul(m).abs().max() > 0.1
    assert np.array_equal(sample.mask, mask) and sample.meta["mask_source"] == "given"


def test_perlin_location_mask_lies_on_the_object(demo_root):
    from anomalygen.data import load_category, load_goods
    from anomalygen.masks import foreground_mask

    goods = load_goods(load_category(demo_root, "nut").train_good)[:4]
    generator = CAGen(**FAST)
    generator.foreground_mode = "object"
    generator.training_masks = {}
    for i, good in enumerate(goods):
        mask = generator.location_mask(good, "dent", np.random.default_rng(i))
        foreground = foreground_mask(good, "object")
        assert mask.any() and not (mask & ~foreground).any() and not foreground.all()
    generator.foreground_mode = "texture"
    assert generator.location_mask(goods[0], "dent", np.random.default_rng(0)).sum() > 0


def test_prompt_template_and_options():
    generator = CAGen(category="metal_nut")
    assert generator.prompt("broken_large") == "broken large metal nut"
    assert CAGen(prompt="a photo of {category} with {defect}", category="bottle").prompt("crack") == "a photo of bottle with crack"
    for bad, fragment in [({"prompt": "no slot"}, "prompt"), ({"fusion": "middle"}, "fusion"), ({"max_per_type": 0}, "max_per_type")]:
        with pytest.raises(AnomalygenError, match=fragment):
            CAGen(**bad)
    with pytest.raises(AnomalygenError, match="fit"):
        list(CAGen(**FAST).generate([np.zeros((8, 8, 3), np.uint8)], 1))


def test_save_load_generates_the_same_and_the_controlnet_loads_in_plain_diffusers(fitted, tmp_path):
    from diffusers import ControlNetModel

    generator, good = fitted
    generator.save(tmp_path / "model")
    loaded = AnomalyGenerator.load(tmp_path / "model")
    for a, b in zip(generator.generate(good, 2, seed=3), loaded.generate(good, 2, seed=3)):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    plain = ControlNetModel.from_pretrained(tmp_path / "model" / "controlnet")
    ours = dict(generator.controlnet.named_parameters())
    assert all(torch.equal(p, ours[n]) for n, p in plain.named_parameters())
    assert json.loads((tmp_path / "model" / "generator.json").read_text())["method"] == "cagen"


def test_cli_fit_generate_round_trip(demo_root, tmp_path):
    from typer.testing import CliRunner

    from anomalygen.cli import app

    runner = CliRunner()
    settings = ["--set", "resolution=32", "--set", "batch_size=2", "--set", "num_inference_steps=2"]
    fitted = runner.invoke(app, ["fit", "--method", "cagen", "--data", str(demo_root), "--category", "nut",
                                 "--out", str(tmp_path / "model"), "--model", "tiny", "--max-steps", "1",
                                 "--device", "cpu", *settings])
    assert fitted.exit_code == 0, fitted.output
    assert json.loads((tmp_path / "model" / "cagen.json").read_text())["category"] == "nut"
    command = ["generate", "--checkpoint", str(tmp_path / "model"), "--data", str(demo_root), "--category", "nut",
               "--num", "3", "--seed", "1", "--out", str(tmp_path / "out"), "--max-attempts", "1", "--keep-failing"]  # redrawing: test_validity
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    manifest = [json.loads(line) for line in (tmp_path / "out" / "nut" / "manifest.jsonl").read_text().splitlines()]
    assert [m["defect_type"] for m in manifest] == ["dent", "scratch", "stain"]
    assert all(m["prompt"].endswith(" nut") and m["source"] for m in manifest)


def test_captions_are_the_prompts_of_their_own_images(demo_root, tmp_path, monkeypatch):
    from anomalygen import pipeline
    from anomalygen.errors import DataError

    types = sorted(p.name for p in (demo_root / "nut" / "test").iterdir() if p.name != "good")
    captions = {"nut": {t: [f"{t} caption {i}" for i in range(9)] for t in types}}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(captions))
    seen = []
    original = CAGen._contexts
    monkeypatch.setattr(CAGen, "_contexts", lambda self, prompts: seen.append(list(prompts)) or original(self, prompts))
    options = {**FAST, "captions": str(path), "max_per_type": 2, "training_pick": "first"}
    model = pipeline.fit("cagen", demo_root / "nut", tmp_path / "model", options=options)
    # the paper split's training third: images 000-002 of each type; max_per_type 2 -> captions 0 and 1
    assert seen[0] == [f"{t} caption {i}" for t in types for i in (0, 1)]
    loaded = AnomalyGenerator.load(model)
    assert loaded.captions == {t: [f"{t} caption 0", f"{t} caption 1"] for t in types}
    assert "captions" not in json.loads((model / "generator.json").read_text())["options"]
    samples = list(loaded.generate([np.zeros((40, 48, 3), np.uint8)], 4, seed=0, defect_type=types[0]))
    assert [s.prompt for s in samples] == [f"{types[0]} caption {i % 2}" for i in range(4)]
    with pytest.raises(DataError, match="captions file not found"):
        CAGen(**FAST, captions=str(tmp_path / "missing.json"))
