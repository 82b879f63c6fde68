"""AnomalyXFusion (Hu et al. 2024) on the tiny (random-init) preset: MIF embeddings (Eqs. 1-5), DDF
(Eq. 14), the ablation switches, captions (MVTec Caption format), blended sampling (Eq. 16),
save / load, the CLI on MVTec AD and LOCO layouts; and the core pieces it added (pooled text
embedding, CLIP image encoder, per-step conditioning hook)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from anomalygen.data.captions import caption_for, default_caption, image_index, load_captions
from anomalygen.errors import AnomalygenError, DataError
from anomalygen.methods.anomalyxfusion import AnomalyXFusion
from anomalygen.methods.anomalyxfusion.ddf import DDF
from anomalygen.methods.anomalyxfusion.mif import Aggregator, MaskEncoder, load_mask_encoder
from anomalygen.methods.base import AnomalyGenerator
from anomalygen.types import DefectExample

from tests.helpers.cli_harness import assert_user_error, run_cli

torch.set_num_threads(1)

FAST = dict(model="tiny", device="cpu", resolution=32, batch_size=2, max_steps=2, num_inference_steps=3,
            generate_batch_size=2, checkpoint_every=0, tokens=2, mask_embedding=16)
ENV = {"OMP_NUM_THREADS": "1"}


def _write_image(path: Path, array: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), array)


def toy_data(folder: Path | None = None, seed: int = 0):
    """Four defects (crack, hole in turn), optionally written as ``folder/widget/test/<type>/<i>.png``
    (IDs not zero-padded: 10 sorts after 9 only numerically), and three good images."""
    rng = np.random.default_rng(seed)
    defects = []
    for i in range(4):
        image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        mask = np.zeros((40, 48), bool)
        mask[10 + i:20 + i, 12:30] = True
        defect_type = ["crack", "hole"][i % 2]
        source = None
        if folder is not None:
            source = folder / "widget" / "test" / defect_type / f"{9 + i // 2}.png"
            _write_image(source, image)
        defects.append(DefectExample(image, mask, defect_type, source))
    good = [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(3)]
    return defects, good


@pytest.fixture(scope="module")
def fitted():
    defects, good = toy_data()
    generator = AnomalyXFusion(**FAST)
    initial = {}

    original = AnomalyXFusion._build

    def record(self, textures):  # the freshly built weights, to see what training moved
        original(self, textures)
        initial.update({f"{n}.{k}": v.detach().clone() for n, m in self.modules().items() for k, v in m.state_dict().items()})

    AnomalyXFusion._build = record
    try:
        generator.fit(defects, good)
    finally:
        AnomalyXFusion._build = original
    return generator, good, initial


def _batch(generator, n=2):
    masks = torch.zeros(n, 1, 32, 32)
    masks[0, :, 4:12, 4:12] = 1
    masks[-1, :, 16:30, 10:28] = 1
    states, semantic = generator.encode_text(["widget with crack", "widget with a large hole"][:n])
    return states, semantic, masks, torch.tensor([0, 1][:n])


# ----------------------------------------------------------------- MIF / DDF
def test_each_embedding_has_the_papers_shape_and_e_sem_is_unit_norm(fitted):
    generator, _, _ = fitted
    k, d = FAST["tokens"], 32
    states, semantic, masks, types = _batch(generator)
    mif = generator.mif
    assert states.shape == (2, 77, d)
    assert semantic.shape == (2, k, d)  # Eq. 1: repeated k times
    assert torch.allclose(semantic.norm(dim=-1), torch.ones(2, k), atol=1e-5)  # L2-normalised
    assert mif.location(masks).shape == (2, k, d)  # Eq. 2
    assert mif.textures.shape == (2, k, d)  # Eq. 3: k tokens per type
    e_mul = mif.embeddings(semantic, masks, types)
    assert e_mul.shape == (2, 3 * k, d)  # Eq. 4
    assert torch.equal(e_mul[:, :k], semantic) and torch.equal(e_mul[:, 2 * k:], mif.textures[types])
    e_x = mif(semantic, masks, types)
    assert e_x.shape == (2, 3 * k, d)  # Eq. 5
    assert generator.ddf(e_x, torch.tensor([10, 900])).shape == (2, 3 * k, d)  # Eq. 14
    assert generator.step_context(generator.modules(), states, e_x, torch.tensor(5)).shape == (2, 77, d)  # template
    generator.opt["placement"] = "caption"
    try:
        assert generator.step_context(generator.modules(), states, e_x, torch.tensor(5)).shape == (2, 77 + 3 * k, d)
    finally:
        generator.opt["placement"] = "template"


def test_location_embedding_reads_the_mask(fitted):
    generator, _, _ = fitted
    _, _, masks, _ = _batch(generator)
    with torch.no_grad():
        location = generator.mif.location(masks)
    assert (location[0] - location[1]).abs().max() > 1e-4


def test_textural_tokens_start_from_the_clip_embedding_of_image_times_mask(monkeypatch):
    import anomalygen.methods.anomalyxfusion.generator as module
    import anomalygen.methods.kit.method as kit

    calls = []
    original = module.image_embeds
    monkeypatch.setattr(module, "image_embeds", lambda encoder, images: calls.append(images.clone()) or original(encoder, images))
    monkeypatch.setattr(kit, "train", lambda modules, loss_fn, config, out: [loss_fn(modules, s, torch.Generator()) for s in range(3)]
                        and type("R", (), {"losses": []})())
    defects, good = toy_data()
    generator = AnomalyXFusion(**FAST)
    generator.fit(defects, good)
    assert len(calls) == 1 and calls[0].shape[0] == 4  # once per training image, not at every step (3 steps ran)
    outside = calls[0][0].sum(0) == 0
    assert outside.float().mean() > 0.5  # the image × mask: black outside the defect
    features = original(generator.image_encoder, calls[0])
    crack = features[[0, 2]].mean(0)
    assert torch.allclose(generator.mif.textures.detach()[0], crack.expand(FAST["tokens"], -1), atol=1e-5)


def test_aggregator_is_residual():
    """Eq. 5: with the MLP's output layer zeroed e_X is e_mul exactly; otherwise it is added to it."""
    torch.manual_seed(0)
    aggregator, tokens = Aggregator(32, 1), torch.randn(2, 6, 32)
    moved = aggregator(tokens)
    assert (moved - tokens).abs().max() > 1e-3
    torch.nn.init.zeros_(aggregator.mlp[-1].weight)
    torch.nn.init.zeros_(aggregator.mlp[-1].bias)
    assert torch.equal(aggregator(tokens), tokens)


def test_e_t_changes_with_the_timestep():
    torch.manual_seed(0)
    ddf, tokens = DDF(32), torch.randn(2, 6, 32)
    early, late = ddf(tokens, torch.tensor([10, 10])), ddf(tokens, torch.tensor([900, 900]))
    assert (early - late).abs().max() > 1e-3
    assert torch.equal(ddf(tokens, torch.tensor(10)), early)  # a scalar timestep serves the whole batch
    assert (ddf(tokens + 1, torch.tensor(10)) - early).abs().max() > 1e-3  # and e_X still matters


@pytest.mark.parametrize("mif, ddf, trained", [
    (True, True, {"mif.location", "mif.textures", "mif.aggregator", "ddf"}),
    (True, False, {"mif.location", "mif.textures", "mif.aggregator"}),
    (False, True, {"ddf"}),
    (False, False, set()),
])
def test_ablations_switch_the_trainable_set(mif, ddf, trained, monkeypatch):
    import anomalygen.methods.kit.method as kit

    seen = []
    monkeypatch.setattr(kit, "train", lambda modules, loss_fn, config, out: seen.append(
        {f"{n}.{p}" for n, m in modules.items() for p, q in m.named_parameters() if q.requires_grad}) or type("R", (), {"losses": []})())
    defects, good = toy_data()
    generator = AnomalyXFusion(**FAST, mif=mif, ddf=ddf)
    generator.fit(defects, good)
    names = seen[0] if seen else set()
    assert {"ddf" if n.startswith("ddf.") else ".".join(n.split(".")[:2]) for n in names} == trained
    assert any(".mask_encoder." in n for n in names) == mif  # trained from scratch by default
    frozen = [generator.backbone.unet, generator.backbone.text_encoder, generator.backbone.vae]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())


def test_training_feeds_each_rows_timestep_to_ddf(monkeypatch):
    """Eq. 14 in training: the UNet row at timestep t is conditioned on e_t = DDF(e_X, t) of that t."""
    import anomalygen.methods.kit.method as kit

    losses = []
    monkeypatch.setattr(kit, "train", lambda modules, loss_fn, config, out: losses.append((modules, loss_fn))
                        or type("R", (), {"losses": []})())
    defects, good = toy_data()
    generator = AnomalyXFusion(**{**FAST, "batch_size": 4})
    generator.fit(defects, good)
    modules, loss_fn = losses[0]
    seen = {}
    generator.backbone.unet.register_forward_pre_hook(lambda m, args: seen.update(unet=args[1].tolist()))
    modules["ddf"].register_forward_pre_hook(lambda m, args: seen.update(ddf=args[1].tolist()))
    assert torch.isfinite(loss_fn(modules, 0, torch.Generator().manual_seed(0)))
    assert seen["ddf"] == seen["unet"] and len(set(seen["unet"])) > 1


def test_a_pretrained_istr_mask_encoder_is_fine_tuned_or_frozen_and_bad_files_are_one_line(tmp_path, monkeypatch):
    import anomalygen.methods.kit.method as kit

    torch.manual_seed(1)
    istr = MaskEncoder(24)
    save_file({f"mask_encoding.{k}": v.contiguous() for k, v in istr.state_dict().items()}, str(tmp_path / "istr.safetensors"))
    loaded = load_mask_encoder(tmp_path / "istr.safetensors")
    assert loaded.embedding == 24 and not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(v, istr.state_dict()[k]) for k, v in loaded.state_dict().items())
    seen = []
    monkeypatch.setattr(kit, "train", lambda modules, loss_fn, config, out: seen.append(
        {f"{n}.{p}" for n, m in modules.items() for p, q in m.named_parameters() if q.requires_grad}) or type("R", (), {"losses": []})())
    defects, good = toy_data()
    generator = AnomalyXFusion(**FAST, mask_encoder=str(tmp_path / "istr.safetensors"))
    generator.fit(defects, good)  # the paper fine-tunes the pretrained encoder (default)
    assert any(".mask_encoder.encoder.0." in n for n in seen[0]) and any("location.fc" in n for n in seen[0])
    frozen = AnomalyXFusion(**FAST, mask_encoder=str(tmp_path / "istr.safetensors"), mask_encoder_finetune=False)
    frozen.fit(defects, good)  # ours: frozen
    assert seen[1] and not any(".mask_encoder." in n for n in seen[1]) and any("location.fc" in n for n in seen[1])
    assert not any(p.requires_grad for p in generator.pretrained_mask_encoder.parameters())  # the loaded copy is untouched
    assert generator.config()["mask_embedding"] == 24 and "mask_encoder" not in generator.config()
    (tmp_path / "bad.safetensors").write_bytes(b"not weights")
    save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    save_file({**{k: v.contiguous() for k, v in istr.state_dict().items()}, "encoder.0.weight": torch.zeros(16, 3, 4, 4)},
              str(tmp_path / "shape.safetensors"))
    for name, fragment in (("bad", "safetensors"), ("other", "ISTR"), ("missing", "not found"), ("shape", "size mismatch")):
        with pytest.raises(DataError, match=fragment) as error:
            AnomalyXFusion(mask_encoder=str(tmp_path / f"{name}.safetensors"))
        assert f"{name}.safetensors" in str(error.value) and "\n" not in str(error.value)


def _loss_fn(monkeypatch, **options):
    """The training loss of a generator built on toy_data with ``options`` (training itself skipped)."""
    import anomalygen.methods.kit.method as kit

    losses = []
    monkeypatch.setattr(kit, "train", lambda modules, loss_fn, config, out: losses.append((modules, loss_fn))
                        or type("R", (), {"losses": []})())
    defects, good = toy_data()
    generator = AnomalyXFusion(**{**FAST, "batch_size": 4}, **options)
    generator.fit(defects, good)
    return generator, defects, *losses[0]


def test_the_loss_is_the_authors_masked_eps_mse_by_default_and_plain_as_an_option(monkeypatch):
    """eps = 0 from the UNet: the loss is the mean over the latent of (noise x mask)^2, the mask resized
    to the latent and binarised at 0.5 (the authors' p_losses); "plain" is the mean of noise^2."""
    assert AnomalyXFusion().opt["loss"] == "masked"
    for loss in ("masked", "plain"):
        generator, defects, modules, loss_fn = _loss_fn(monkeypatch, loss=loss, mif=False)  # DDF(e_sem): no image encoder
        handle = generator.backbone.unet.register_forward_hook(lambda m, i, out: type(out)(sample=torch.zeros_like(out.sample)))
        try:
            value = loss_fn(modules, 0, torch.Generator().manual_seed(0))
        finally:
            handle.remove()
        g = torch.Generator().manual_seed(0)  # the draws of loss_fn, in its order
        picks = torch.randint(0, 4, (4,), generator=g)
        torch.randint(0, 1000, (4,), generator=g)
        noise = torch.randn((4, 4, 16, 16), generator=g)
        masks = torch.stack([torch.from_numpy(defects[i].mask).float()[None] for i in picks])  # 40 x 48 -> 32 -> 16
        masks = torch.nn.functional.interpolate(torch.nn.functional.interpolate(masks, size=(32, 32)), size=(16, 16), mode="bilinear")
        expected = (noise * (masks >= 0.5)).pow(2).mean() if loss == "masked" else noise.pow(2).mean()
        torch.testing.assert_close(value, expected)
    assert 0.05 < float((masks >= 0.5).float().mean()) < 0.3  # the masked loss sees a small part of the latent


def test_e_t_stands_for_the_templates_star_and_the_caption_reaches_only_e_sem(fitted):
    """The authors' placement (default): the prompt "a photo of a *" with e_t's tokens at the text
    encoder's input; CLIP's causal attention leaves the states before them unchanged."""
    generator, _, _ = fitted
    assert generator.opt["placement"] == "template" and generator.opt["template"] == "a photo of a *"
    states, semantic, masks, types = _batch(generator)
    e_x = generator.x_embedding(generator.modules(), semantic, masks, types)
    t = torch.tensor(5)
    context = generator.step_context(generator.modules(), torch.full_like(states, float("nan")), e_x, t)
    assert torch.isfinite(context).all()  # the caption's token states are not used
    encoded = generator.template_encoder(e_x.shape[1])(["a photo of a <x-embedding>"] * 2, {"<x-embedding>": generator.ddf(e_x, t)})
    torch.testing.assert_close(context, encoded.hidden_states)
    first = encoded.positions["<x-embedding>"][0]
    assert first == list(range(first[0], first[0] + e_x.shape[1])) and first[0] >= 5  # after <start> a photo of a
    other = generator.step_context(generator.modules(), states, e_x + 1, t)
    assert torch.equal(other[:, :first[0]], context[:, :first[0]])  # the template's words before *
    assert (other[:, first[0]:] - context[:, first[0]:]).abs().amax(dim=-1).min() > 0  # e_t and after


def test_fit_trains_mif_and_ddf(fitted):
    generator, _, initial = fitted
    assert len(generator.loss_log) == 2 and all(np.isfinite(generator.loss_log))
    state = {f"{n}.{k}": v for n, m in generator.modules().items() for k, v in m.state_dict().items()}
    moved = {k for k, v in state.items() if not torch.equal(v, initial[k])}
    for part in ("mif.textures", "mif.location.fc", "mif.location.mask_encoder.encoder.0", "mif.aggregator", "ddf.f", "ddf.time_embedding"):
        assert any(k.startswith(part) for k in moved), part
    assert not any("running_mean" in k for k in moved)  # BatchNorm stays on its running statistics


# ----------------------------------------------------------------- captions
def test_captions_follow_numeric_id_order(tmp_path):
    folder = tmp_path / "test" / "crack"
    for i in range(1, 13):  # 1.png ... 12.png: by name "10" < "2", by ID 2 < 10
        _write_image(folder / f"{i}.png", np.zeros((4, 4, 3), np.uint8))
    (folder / ".DS_Store").write_bytes(b"")
    assert [image_index(folder / f"{i}.png") for i in (1, 2, 9, 10, 12)] == [0, 1, 8, 9, 11]
    captions = {"widget": {"crack": [f"caption {i}" for i in range(1, 13)]}}
    assert caption_for(captions, "c.json", "widget", "crack", folder / "10.png") == "caption 10"
    with pytest.raises(DataError, match="c.json: widget/crack has 11 captions"):
        caption_for({"widget": {"crack": captions["widget"]["crack"][:11]}}, "c.json", "widget", "crack", folder / "12.png")
    with pytest.raises(DataError, match="no captions for category 'gadget'"):
        caption_for(captions, "c.json", "gadget", "crack", folder / "1.png")
    assert default_caption("metal_nut", "color_defect") == "metal nut with color defect"


@pytest.mark.parametrize("content, fragment", [
    ("{", "not a readable JSON"), ("[]", "not a captions file"), ('{"a": []}', "category 'a'"),
    ('{"a": {"crack": ["ok", 3]}}', "a/crack"), ('{"a": {"crack": "one"}}', "a/crack"),
])
def test_bad_caption_files_are_one_line_naming_the_file(tmp_path, content, fragment):
    path = tmp_path / "captions.json"
    path.write_text(content)
    with pytest.raises(DataError, match=fragment) as error:
        AnomalyXFusion(captions=str(path))
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_fit_gives_each_training_image_its_own_caption(tmp_path, monkeypatch):
    import anomalygen.methods.kit.method as kit

    defects, good = toy_data(tmp_path)  # crack: 9.png, 10.png (the 9th and 10th image of 0..10)
    for defect_type in ("crack", "hole"):
        for i in range(11):
            if not (tmp_path / "widget" / "test" / defect_type / f"{i}.png").exists():
                _write_image(tmp_path / "widget" / "test" / defect_type / f"{i}.png", np.zeros((4, 4, 3), np.uint8))
    captions = {"widget": {t: [f"{t} caption {i}" for i in range(11)] for t in ("crack", "hole")}}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    prompts = []
    monkeypatch.setattr(kit, "train", lambda *a, **k: type("R", (), {"losses": []})())
    generator = AnomalyXFusion(**FAST, captions=str(tmp_path / "captions.json"))
    original = generator.encode_text
    generator.encode_text = lambda texts: prompts.append(list(texts)) or original(texts)
    generator.fit(defects, good)
    assert generator.category == "widget"
    assert generator.captions == {"crack": ["crack caption 9", "crack caption 10"], "hole": ["hole caption 9", "hole caption 10"]}
    samples = list(generator.generate(good, 4, seed=0))
    assert {s.prompt for s in samples if s.defect_type == "crack"} <= set(generator.captions["crack"])
    assert prompts[-1] == [s.prompt for s in samples[2:]]  # the captions condition the generation batch


# ----------------------------------------------------------------- generation
def test_blended_sampling_keeps_the_good_latent_outside_the_mask_with_a_per_step_e_t(fitted, monkeypatch):
    import anomalygen.diffusion.sampling as sampling
    from anomalygen.diffusion.sampling import encode_images, latent_mask, to_tensor

    generator, good, _ = fitted
    captured, steps = [], []
    original = sampling.decode_latents
    monkeypatch.setattr(sampling, "decode_latents", lambda backbone, latents, *a: captured.append(latents) or original(backbone, latents, *a))
    forward = generator.ddf.forward
    monkeypatch.setattr(generator.ddf, "forward", lambda tokens, t: steps.append(int(t.reshape(-1)[0])) or forward(tokens, t))
    mask = np.zeros((40, 48), bool)
    mask[8:24, 10:30] = True
    sample = next(iter(generator.generate(good[:1], 1, masks=[mask])))
    known = encode_images(generator.backbone, to_tensor([good[0]], (32, 32)))
    m = latent_mask(torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=(32, 32)), (16, 16))
    assert torch.equal(captured[0] * (1 - m), known * (1 - m))  # Eq. 16's last step: the clean good latent
    assert (captured[0] - known).mul(m).abs().max() > 0.1
    assert np.array_equal(sample.image[~mask], good[0][~mask])  # final paste
    assert sample.meta["mask_source"] == "given" and np.array_equal(sample.mask, mask)
    assert len(set(steps[1:])) == FAST["num_inference_steps"]  # e_t recomputed at every step (after the batch-size probe)


def test_guidance_and_the_text_only_ablation_generate(monkeypatch):
    import anomalygen.methods.kit.method as kit

    monkeypatch.setattr(kit, "train", lambda *a, **k: type("R", (), {"losses": []})())
    defects, good = toy_data()
    for options in (dict(guidance_scale=3.0), dict(mif=False, ddf=False, mask_augment=False)):
        generator = AnomalyXFusion(**FAST, **options)
        generator.fit(defects, good)
        samples = list(generator.generate(good, 2, seed=0, defect_type="hole"))
        assert [s.defect_type for s in samples] == ["hole", "hole"] and samples[0].image.shape == (40, 48, 3)
    assert samples[0].meta["modules"] == "text only" and samples[0].meta["mask_source"] == "training"
    assert any(np.array_equal(samples[0].mask, m) for m in generator.training_masks["hole"])


def test_save_load_generates_the_same(fitted, tmp_path):
    from safetensors.torch import load_file

    generator, good, _ = fitted
    generator.save(tmp_path / "model")
    loaded = AnomalyGenerator.load(tmp_path / "model")
    pairs = list(zip(generator.generate(good, 2, seed=3), loaded.generate(good, 2, seed=3)))
    for a, b in pairs:
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.prompt == b.prompt
    alone = next(iter(loaded.generate(good, 1, seed=3, start=1)))  # sample i depends on (seed, i) only, not its batch
    assert np.abs(alone.image.astype(int) - pairs[1][1].image).max() <= 1 and np.array_equal(alone.mask, pairs[1][1].mask)
    keys = load_file(str(tmp_path / "model" / "anomalyxfusion.safetensors"))
    assert any(k.startswith("mif.textures") for k in keys) and any(k.startswith("ddf.") for k in keys)
    with pytest.raises(AnomalygenError, match="tokens"):
        AnomalyXFusion(tokens=0)
    with pytest.raises(AnomalygenError, match="mif=true"):
        AnomalyXFusion(mif=False, mask_encoder="istr.safetensors")


# ----------------------------------------------------------------- CLI, MVTec AD and LOCO layouts
@pytest.fixture(scope="module")
def loco_root(tmp_path_factory) -> Path:
    """A tiny MVTec LOCO category ``nut``: logical / structural types, ``ground_truth/<type>/NNN/000.png``."""
    from anomalygen.data.demo import make_demo_dataset

    root = make_demo_dataset(tmp_path_factory.mktemp("loco"), n_good=3, n_test_good=1, n_defect=3, size=64, categories=("nut",))
    category = root / "nut"
    for old, new in (("dent", "logical_anomalies"), ("scratch", "structural_anomalies"), ("stain", None)):
        if new is None:
            shutil.rmtree(category / "test" / old), shutil.rmtree(category / "ground_truth" / old)
            continue
        (category / "test" / old).rename(category / "test" / new)
        for mask in sorted((category / "ground_truth" / old).glob("*_mask.png")):
            target = category / "ground_truth" / new / mask.name.replace("_mask.png", "") / "000.png"
            target.parent.mkdir(parents=True)
            mask.rename(target)
        (category / "ground_truth" / old).rmdir()
    return root


def test_cli_fit_save_load_generate_on_loco_with_and_without_captions(loco_root, tmp_path):
    from typer.testing import CliRunner

    from anomalygen.cli import app
    from anomalygen.data import load_category

    assert load_category(loco_root, "nut").layout == "loco"
    captions = {"nut": {t: [f"{t.split('_')[0]} nut {i}" for i in range(3)] for t in ("logical_anomalies", "structural_anomalies")}}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    settings = ["--set", "resolution=32", "--set", "batch_size=2", "--set", "num_inference_steps=2", "--set", "tokens=2",
                "--set", "mask_embedding=16", "--set", "checkpoint_every=0"]
    common = ["--data", str(loco_root), "--category", "nut", "--model", "tiny", "--device", "cpu", "--max-steps", "1"]
    fitted = run_cli("fit", "--method", "anomalyxfusion", *common, "--out", tmp_path / "model", *settings,
                     "--set", f"captions={tmp_path / 'captions.json'}", env=ENV)
    assert fitted.returncode == 0, fitted.output
    meta = json.loads((tmp_path / "model" / "anomalyxfusion.json").read_text())
    assert meta["captions"] == {"logical_anomalies": ["logical nut 0"], "structural_anomalies": ["structural nut 0"]}  # paper split: 1 of 3
    generated = run_cli("generate", "--checkpoint", tmp_path / "model", "--data", loco_root, "--category", "nut", "--num", "2",
                        "--out", tmp_path / "out", "--max-attempts", "1", "--keep-failing", env=ENV)  # one draw each (redrawing: test_validity)
    assert generated.returncode == 0, generated.output
    manifest = [json.loads(line) for line in (tmp_path / "out" / "nut" / "manifest.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in manifest] == ["logical nut 0", "structural nut 0"]
    result = CliRunner().invoke(app, ["generate", "--method", "anomalyxfusion", "--data", str(loco_root), "--category", "nut",
                                      "--num", "2", "--max-attempts", "1", "--keep-failing", "--out", str(tmp_path / "plain"), *settings, "--set", "model=tiny",
                                      "--set", "device=cpu", "--set", "max_steps=1"])  # no captions: "{category} with {type}"
    assert result.exit_code == 0, result.output
    manifest = [json.loads(line) for line in (tmp_path / "plain" / "nut" / "manifest.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in manifest] == ["nut with logical anomalies", "nut with structural anomalies"]


def test_cli_refuses_a_captions_file_without_the_category_in_one_line(demo_root, tmp_path):
    (tmp_path / "captions.json").write_text(json.dumps({"bottle": {"crack": ["a crack"]}}))
    result = run_cli("fit", "--method", "anomalyxfusion", "--data", demo_root, "--category", "nut", "--model", "tiny",
                     "--device", "cpu", "--out", tmp_path / "model", "--set", f"captions={tmp_path / 'captions.json'}", env=ENV)
    assert_user_error(result, str(tmp_path / "captions.json"), "nut")


# ----------------------------------------------------------------- the core pieces
def test_pooled_text_embedding_is_clips_end_token_state(fitted):
    generator, _, _ = fitted
    encoded = generator.prompts(["widget with crack", "hole"])
    ids = generator.prompts.tokenize(["widget with crack", "hole"])
    with torch.no_grad():
        expected = generator.backbone.text_encoder(ids).pooler_output
    assert encoded.pooled.shape == (2, 32) and torch.allclose(encoded.pooled, expected)


def test_image_encoder_loads_from_a_diffusers_folder_or_itself(tmp_path):
    from anomalygen.diffusion.image_encoder import image_embeds, load_image_encoder

    tiny = load_image_encoder("tiny")
    tiny.save_pretrained(tmp_path / "pipeline" / "image_encoder")
    for source in (tmp_path / "pipeline", tmp_path / "pipeline" / "image_encoder"):
        loaded = load_image_encoder(str(source))
        assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), tiny.parameters()))
    assert load_image_encoder(None, model=str(tmp_path / "pipeline")).config.projection_dim == 32
    assert image_embeds(tiny, torch.rand(3, 3, 40, 48)).shape == (3, 32)
    from anomalygen.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="no such folder"):
        load_image_encoder(str(tmp_path / "absent"))


def test_sample_latents_conditioning_hook_gets_every_timestep(fitted):
    from anomalygen.diffusion.sampling import sample_generators, sample_latents

    generator, _, _ = fitted
    backbone = generator.backbone
    seen, contexts = [], []
    states = torch.randn(1, 77, 32)

    def conditioning(t):
        seen.append(int(t))
        return states * (1 + int(t) / 1000)

    sample_latents(backbone, states, sample_generators(0, [0]), latent_size=(16, 16), num_inference_steps=4,
                   conditioning=conditioning, callback=lambda state: contexts.append(state.encoder_hidden_states))
    assert len(seen) == 4 and seen == sorted(seen, reverse=True) and len(set(seen)) == 4
    assert all(torch.equal(c, states * (1 + t / 1000)) for c, t in zip(contexts, seen))


@pytest.mark.shared
def test_the_shared_mvtec_caption_files_load_and_caption_the_grid_subset(shared_data):
    from anomalygen.pipeline import load_training

    ad, loco = (load_captions(shared_data / "mvtec_caption" / f"{name}.json") for name in ("mvtec_ad", "mvtec_loco"))
    assert sum(len(c) for types in ad.values() for c in types.values()) == 1258 and len(ad) == 15
    assert sum(len(c) for types in loco.values() for c in types.values()) == 993
    assert all(set(types) == {"logical_anomalies", "structural_anomalies"} for types in loco.values())
    _, defects, _ = load_training(shared_data / "mvtec_ad_grid_subset")
    generator = AnomalyXFusion(**FAST, captions=str(shared_data / "mvtec_caption" / "mvtec_ad.json"), category="grid")
    generator._setup(defects)
    for defect_type, captions in generator.captions.items():
        indices = [image_index(d.source) for d in defects if d.defect_type == defect_type]
        assert captions == [ad["grid"][defect_type][i] for i in indices]
