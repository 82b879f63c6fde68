"""The real base-model architectures, not only the tiny preset.

Layout loading: small-dimension components of the real classes saved as a diffusers folder in
each layout (Stable Diffusion; CompVis LDM text-to-image with ``vqvae/`` + ``bert/`` + BERT
tokenizer) load by path; a folder of another layout is reported as such. Full shape: randomly
initialised backbones built from the published SD 1.5 and ``CompVis/ldm-text2im-large-256``
configs (``anomalygen.diffusion.architectures``, nothing downloaded) run fit (1 step) + generate (1 sample, 1 step) on
CPU: SD 1.5 every method (textual inversion, AnomalyDiffusion, DualAnoDiff, CAGen, AnomalyXFusion), LDM the two
methods published on it (textual inversion, AnomalyDiffusion): 768-d CLIP / 1280-d LDMBert context, f8 autoencoders,
4-channel latents. The other methods run on the LDM layout at small width (``small_configs``), where a width taken
from SD 1.5 instead of the model would fail just the same (32 ≠ 768).
"""

from __future__ import annotations

import fcntl
import gc
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, VQModel
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
from transformers import BertTokenizer, CLIPTextModel

from anomalygen.diffusion.architectures import SD15_IMAGE_ENCODER, bert_tokenizer, random_backbone
from anomalygen.diffusion.backbone import build_backbone, load_backbone
from anomalygen.diffusion.conditioning import PromptEncoder
from anomalygen.diffusion.image_encoder import build_image_encoder
from anomalygen.diffusion.tiny import SCALED_LINEAR_SCHEDULE, tiny_tokenizer
from anomalygen.errors import AnomalygenError, DataError, ModelNotFoundError
from anomalygen.methods.base import create
from anomalygen.types import DefectExample

LDM_INDEX = {"_class_name": "LDMTextToImagePipeline", "bert": ["latent_diffusion", "LDMBertModel"],
             "scheduler": ["diffusers", "DDIMScheduler"], "tokenizer": ["transformers", "BertTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vqvae": ["diffusers", "AutoencoderKL"]}
SD_INDEX = {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


def small_configs(layout: str, vae_class: str = "AutoencoderKL") -> dict:
    """The real classes at small width: an f8 autoencoder (4 levels), a 2-level UNet, a 2-layer text encoder."""
    dim = 32
    text = ({"architectures": ["LDMBertModel"], "vocab_size": 128, "d_model": dim, "encoder_layers": 2, "encoder_ffn_dim": 64,
             "encoder_attention_heads": 2, "head_dim": 16, "max_position_embeddings": 77}
            if layout == "ldm" else
            {"architectures": ["CLIPTextModel"], "vocab_size": 1024, "hidden_size": dim, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77})
    unet = {"sample_size": 32 if layout == "ldm" else 64, "block_out_channels": [32, 64], "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D"] * 2, "up_block_types": ["CrossAttnUpBlock2D"] * 2,
            "cross_attention_dim": dim, "attention_head_dim": 8, "norm_num_groups": 8}
    vae = {"_class_name": vae_class, "block_out_channels": [8, 16, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4, "norm_num_groups": 8, "layers_per_block": 1}
    if vae_class == "VQModel":
        vae.update(num_vq_embeddings=16, scaling_factor=0.5)
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": SCALED_LINEAR_SCHEDULE}


def write_model(folder: Path, layout: str, vae_class: str = "AutoencoderKL") -> Path:
    """A diffusers folder of ``layout`` ("sd" or "ldm") with small random components, as `save_pretrained` writes it."""
    tokenizer = bert_tokenizer() if layout == "ldm" else tiny_tokenizer()
    backbone = build_backbone(small_configs(layout, vae_class), tokenizer, name="small")
    names = {"vae": "vqvae", "text_encoder": "bert"} if layout == "ldm" else {}
    for slot in ("unet", "vae", "text_encoder"):
        getattr(backbone, slot).save_pretrained(folder / names.get(slot, slot))
    tokenizer.save_pretrained(folder / "tokenizer")
    DDIMScheduler.from_config(SCALED_LINEAR_SCHEDULE).save_pretrained(folder / "scheduler")
    index = dict(LDM_INDEX, vqvae=["diffusers", vae_class]) if layout == "ldm" else SD_INDEX
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def ldm_folder(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("ldm"), "ldm")


@pytest.mark.parametrize("vae_class", ["AutoencoderKL", "VQModel"])
def test_ldm_layout_folder_loads(tmp_path, vae_class):
    folder = write_model(tmp_path, "ldm", vae_class)
    backbone = load_backbone(str(folder), device="cpu")
    assert type(backbone.vae).__name__ == vae_class and isinstance(backbone.text_encoder, LDMBertModel)
    assert isinstance(backbone.tokenizer, BertTokenizer) and not backbone.untrained
    assert backbone.vae_scale_factor == 8 and backbone.native_resolution == 256
    saved = (AutoencoderKL if vae_class == "AutoencoderKL" else VQModel).from_pretrained(folder / "vqvae")
    torch.testing.assert_close(backbone.vae.decoder.conv_out.weight, saved.decoder.conv_out.weight)


def test_wrong_layout_is_reported_as_such_not_as_missing(tmp_path, ldm_folder):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "model_index.json").write_text(json.dumps({**{k: v for k, v in LDM_INDEX.items() if k != "bert"},
                                                         "text_encoder": ["transformers", "CLIPTextModel"]}))
    with pytest.raises(DataError) as error:
        load_backbone(str(mixed))
    message = str(error.value)
    assert message.startswith(f"{mixed}: has ") and "text_encoder/" in message and "vqvae/" in message
    assert "expected vae/ + text_encoder/ (Stable Diffusion) or vqvae/ + bert/ (LDM" in message
    assert "download" not in message.lower()
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model_index.json").write_text(json.dumps(dict(LDM_INDEX, vqvae=["diffusers", "UNet2DModel"])))
    with pytest.raises(DataError, match=r"vqvae/ is a UNet2DModel; expected AutoencoderKL or VQModel"):
        load_backbone(str(odd))
    (ldm_folder.parent / "no_weights").mkdir(exist_ok=True)
    configs_only = ldm_folder.parent / "no_weights"
    for path in ldm_folder.rglob("*.json"):
        (configs_only / path.relative_to(ldm_folder)).parent.mkdir(parents=True, exist_ok=True)
        (configs_only / path.relative_to(ldm_folder)).write_text(path.read_text())
    with pytest.raises(ModelNotFoundError, match=r"could not be loaded .*lacks weights.*--local-dir"):  # right layout, no weights
        load_backbone(str(configs_only))


def test_bert_prompt_encoder_pads_to_77_with_cls_sep(ldm_folder):
    backbone = load_backbone(str(ldm_folder), device="cpu")
    encoder = PromptEncoder(backbone.text_encoder, backbone.tokenizer, {"<defect>": 2})
    ids = encoder.tokenize(["a photo of <defect>"])[0]
    tokens = encoder.tokenizer.convert_ids_to_tokens(ids.tolist())
    assert len(tokens) == 77 and tokens[:7] == ["[CLS]", "a", "photo", "of", "<defect>#0", "<defect>#1", "[SEP]"]
    assert set(tokens[7:]) == {"[PAD]"}
    vectors = torch.randn(2, encoder.embedding_dim, requires_grad=True)
    encoded = encoder(["a photo of <defect>"], {"<defect>": vectors})
    assert encoded.hidden_states.shape == (1, 77, 32) and encoded.positions == {"<defect>": [[4, 5]]}
    encoded.hidden_states.sum().backward()
    assert vectors.grad.abs().sum() > 0


def test_resolution_defaults_to_native_and_warns_below_it_on_sd(tmp_path, ldm_folder):
    sd = write_model(tmp_path, "sd")
    generator = create("textual-inversion", model=str(sd), device="cpu")
    assert generator.backbone is not None and generator.opt["resolution"] == 512
    with pytest.warns(UserWarning, match=r"resolution 256 is below the 512 px"):
        create("textual-inversion", model=str(sd), device="cpu", resolution=256).backbone
    anomalydiffusion = create("anomalydiffusion", model=str(ldm_folder), device="cpu")
    assert anomalydiffusion.backbone is not None and anomalydiffusion.opt["resolution"] == 256
    assert create("anomalydiffusion", model="tiny", device="cpu").backbone.native_resolution == 32


# ---------------------------------------------------------------- full shape, random weights
@pytest.fixture
def one_model_at_a_time():
    """Full-shape backbones take 4-7 GB: under pytest-xdist, one worker builds one at a time."""
    with open(Path(tempfile.gettempdir()) / "anomalygen-real-architectures.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
        gc.collect()


@contextmanager
def cheap_random_fills():
    """``Tensor.uniform_`` / ``normal_`` (what every initialiser of torch, diffusers and transformers ends in) copy
    from a fixed random pool instead of drawing: the SD 1.5 parts and the CLIP ViT-L/14 image encoder build in
    3.3 s instead of 9.3 s on one core. The weights keep the initialisers' ranges and scales; only their
    randomness is cheaper (the pool's length is prime, so no two rows of a weight repeat each other)."""
    pools = {"uniform_": torch.rand(1_000_003), "normal_": torch.randn(1_000_003)}
    starts = itertools.count(0, 7919)
    originals = {name: getattr(torch.Tensor, name) for name in pools}

    def filler(name):
        names = ("from", "to") if name == "uniform_" else ("mean", "std")

        def fill(tensor, *args, generator=None, **kwargs):  # uniform_(from=0, to=1) / normal_(mean=0, std=1)
            given = {**dict(zip(names, args)), **kwargs}
            first, second = given.get(names[0], 0.0), given.get(names[1], 1.0)
            if not tensor.is_contiguous() or tensor.device.type != "cpu":
                return originals[name](tensor, first, second, generator=generator)
            flat, pool = tensor.detach().view(-1), pools[name]
            done, start = 0, next(starts) % len(pool)
            while done < flat.numel():
                piece = pool[start:start + flat.numel() - done]
                flat[done:done + len(piece)].copy_(piece)
                done, start = done + len(piece), 0
            flat.mul_(second - first if name == "uniform_" else second).add_(first)
            return tensor
        return fill

    with pytest.MonkeyPatch.context() as patch:
        for name in pools:
            patch.setattr(torch.Tensor, name, filler(name))
        yield


def _data(size: int = 64):
    rng = np.random.default_rng(0)
    mask = np.zeros((size, size), bool)
    mask[20:40, 16:44] = True
    defects = [DefectExample(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mask, "crack")]
    return defects, [rng.integers(0, 256, (size, size, 3), dtype=np.uint8)]


def _fit_generate_each(methods: dict[str, dict], common: dict, seen: list, width: int, tokens: dict[str, int]) -> None:
    """Fit + generate each method; every UNet call saw 4-channel 8 x 8 latents and a (tokens, width) context."""
    defects, good = _data()
    for method, options in methods.items():
        seen.clear()
        generator = create(method, **{**common, **options})
        generator.fit(defects, good)
        sample = next(iter(generator.generate(good, 1, seed=0)))
        assert sample.image.shape == good[0].shape and sample.image.dtype == np.uint8
        assert sample.mask.any() or method == "dualanodiff"  # its mask is segmented from a random model's output
        assert seen and all(latent == (4, 8, 8) and context == (tokens.get(method, 77), width) for latent, context in seen), \
            (method, seen[:3])


def _record_unet_calls(unet) -> list:
    seen = []
    unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((tuple(args[0].shape[1:]), tuple(kwargs["encoder_hidden_states"].shape[1:]))),
        with_kwargs=True)
    return seen


def test_every_sd_method_runs_on_the_ldm_layout_at_small_width(ldm_folder, monkeypatch):
    """DualAnoDiff (LoRA on LDMBert's q/k/v/out projections) and CAGen (a ControlNet from a 1280-d context UNet,
    here 32-d) on the LDM layout; AnomalyXFusion without a CLIP semantic encoder refuses it in one line."""
    backbone = load_backbone(str(ldm_folder), device="cpu")
    seen = _record_unet_calls(backbone.unet)
    monkeypatch.setattr("anomalygen.methods.kit.method.load_backbone", lambda *args, **kwargs: backbone)
    common = dict(model=str(ldm_folder), device="cpu", resolution=64, batch_size=1, max_steps=1, num_inference_steps=1,
                  checkpoint_every=0, generate_batch_size=1)
    _fit_generate_each({"cagen": dict(mask_source="augment"), "dualanodiff": dict(rank=2, mask_tries=1)}, common, seen, 32, {})

    def no_image_encoder(*args, **kwargs):
        raise AssertionError("the 1.7 GB image encoder is loaded before the text encoder is found unusable")

    monkeypatch.setattr("anomalygen.methods.anomalyxfusion.generator.load_image_encoder", no_image_encoder)
    with pytest.raises(AnomalygenError, match=r"^anomalyxfusion: e_sem needs a CLIP text encoder whose pooled embedding is 32-d"):
        create("anomalyxfusion", **common).fit(*_data())


def test_anomalyxfusion_runs_on_the_ldm_layout_with_a_clip_semantic_encoder(ldm_folder, tmp_path, monkeypatch):
    """The authors' base: LDM (BERT text encoder), e_sem from a separate CLIP text model projected to
    the UNet's width by a trained linear layer (their Linear(512, 1280)); here 24-d -> 32-d."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, max_position_embeddings=77, projection_dim=24)
                                ).save_pretrained(tmp_path / "clip")
    tiny_tokenizer().save_pretrained(tmp_path / "clip")
    backbone = load_backbone(str(ldm_folder), device="cpu")
    seen = _record_unet_calls(backbone.unet)
    monkeypatch.setattr("anomalygen.methods.kit.method.load_backbone", lambda *args, **kwargs: backbone)
    generator = create("anomalyxfusion", model=str(ldm_folder), device="cpu", resolution=32, batch_size=1, max_steps=1,
                       num_inference_steps=1, checkpoint_every=0, generate_batch_size=1, tokens=2, mif=False,
                       semantic_encoder=str(tmp_path / "clip"))  # DDF alone: e = DDF(projected e_sem, t)
    generator.fit(*_data())
    assert isinstance(generator.backbone.text_encoder, LDMBertModel) and generator.semantic_width == 24
    assert generator.projection.weight.shape == (32, 24) and "semantic" in generator.modules()
    sample = next(iter(generator.generate(_data()[1], 1, seed=0)))
    assert sample.image.shape == (64, 64, 3) and all(context == (77, 32) for _, context in seen)  # e_t inside the template
    assert seen and all(latent == (4, 4, 4) for latent, _ in seen)
    generator.save(tmp_path / "model")
    from anomalygen.methods.base import AnomalyGenerator

    loaded = AnomalyGenerator.load(tmp_path / "model")
    torch.testing.assert_close(loaded.projection.weight, generator.projection.weight)


@pytest.mark.slow
@pytest.mark.xdist_group("real-architectures")  # one worker builds them in turn, the other goes on (conftest's order)
@pytest.mark.parametrize("arch", ["sd15", "ldm"])
def test_full_shape_fit_and_generate(arch, monkeypatch, one_model_at_a_time):
    with cheap_random_fills():
        backbone = random_backbone(arch, device="cpu")
    assert backbone.untrained and backbone.name == f"{arch}-architecture-random"
    width = 768 if arch == "sd15" else 1280
    assert isinstance(backbone.text_encoder, CLIPTextModel if arch == "sd15" else LDMBertModel)
    assert isinstance(backbone.vae, AutoencoderKL) and backbone.vae_scale_factor == 8 and backbone.latent_channels == 4
    assert backbone.native_resolution == (512 if arch == "sd15" else 256)
    assert sum(p.numel() for p in backbone.unet.parameters()) > 850e6
    assert backbone.text_encoder.get_input_embeddings().num_embeddings == (49408 if arch == "sd15" else 30522)  # published vocab
    seen = _record_unet_calls(backbone.unet)
    monkeypatch.setattr("anomalygen.methods.kit.method.load_backbone", lambda *args, **kwargs: backbone)
    common = dict(model=arch, device="cpu", resolution=64, batch_size=1, max_steps=1, num_inference_steps=1, checkpoint_every=0)
    runs = {
        "textual-inversion": {},
        # augmented masks: the learned-mask branch doubles the LDMBert backward passes (tested on tiny)
        "anomalydiffusion": dict(spatial_encoder="resnet50", mask_source="augment", generate_batch_size=1),
    }
    if arch == "sd15":  # the methods published on SD 1.5 (on LDM at small width above)
        runs.update({
            # a full-size ControlNet from the UNet, its mask encoder downsampling by 8 (before DualAnoDiff,
            # whose LoRA layers stay on this shared UNet)
            "cagen": dict(generate_batch_size=1, mask_source="augment"),
            # its CLIP text encoder gives e_sem: MIF on a full-size CLIP ViT-L/14 image encoder, DDF
            "anomalyxfusion": dict(generate_batch_size=1),
            # both branches + background rows, SAIM on every attention width, LoRA on the real text encoder
            "dualanodiff": dict(rank=4, mask_tries=1, generate_batch_size=1),
        })
        with cheap_random_fills():
            encoder = build_image_encoder(SD15_IMAGE_ENCODER).requires_grad_(False).eval()
        monkeypatch.setattr("anomalygen.methods.anomalyxfusion.generator.load_image_encoder", lambda *args, **kwargs: encoder)
    _fit_generate_each(runs, common, seen, width, {})  # AnomalyXFusion's e_t inside the 77 positions of its template


@pytest.mark.slow
def test_hub_id_loads_the_ldm_layout_from_the_offline_cache(tmp_path, ldm_folder):
    """``CompVis/ldm-text2im-large-256`` as a hub id, read from a populated hub cache with the network off."""
    repo = tmp_path / "hub" / "models--CompVis--ldm-text2im-large-256"
    commit = "0123456789abcdef0123456789abcdef01234567"  # a snapshot is named by its 40-hex commit
    shutil.copytree(ldm_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("from anomalygen.diffusion.backbone import LDM_MODEL, load_backbone; b = load_backbone(LDM_MODEL, device='cpu'); "
            "print(type(b.vae).__name__, type(b.text_encoder).__name__, type(b.tokenizer).__name__, b.native_resolution)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.stdout.split() == ["AutoencoderKL", "LDMBertModel", "BertTokenizer", "256"], result.stderr[-2000:]
