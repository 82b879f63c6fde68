"""The tiny preset loads offline; a missing model says what to download and where to point."""

import pytest
import torch

from anomalygen.diffusion.backbone import DEFAULT_MODEL, MODEL_ENV, default_model, load_backbone
from anomalygen.diffusion.conditioning import PromptEncoder
from anomalygen.diffusion.tiny import tiny_tokenizer
from anomalygen.errors import ModelNotFoundError

torch.set_num_threads(1)


def test_tiny_tokenizer_spells_prompt_words():
    tokenizer = tiny_tokenizer()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a photo of sks crack").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "sks</w>", "crack</w>", "<|endoftext|>"]


def test_tiny_tokenizer_leaves_no_folder_behind(tmp_path, monkeypatch):
    """Each process used to leave a /tmp/anomalygen-tiny-tokenizer-* folder (hundreds per test run);
    the tokenizer, saved and loaded again, still spells the words once its files are gone."""
    import tempfile

    from anomalygen.diffusion import tiny
    from transformers import CLIPTokenizer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for cached in [f for f in vars(tiny).values() if hasattr(f, "cache_clear")]:  # as in a fresh process
        cached.cache_clear()
    tokenizer = tiny_tokenizer()
    tiny_tokenizer()
    assert list((tmp_path / "tmp").iterdir()) == []
    tokenizer.save_pretrained(tmp_path / "saved")
    again = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    assert again("a photo of sks crack").input_ids == tokenizer("a photo of sks crack").input_ids
    assert len(again("a photo of sks crack").input_ids) == 7


def test_tiny_backbone_is_labelled_untrained():
    backbone = load_backbone("tiny", device="cpu", dtype="bf16")
    assert backbone.untrained and "UNTRAINED" in backbone.label
    assert backbone.unet.dtype == torch.bfloat16 and backbone.vae_scale_factor == 2
    assert not any(p.requires_grad for p in backbone.unet.parameters())


def test_placeholder_vectors_reach_the_text_encoder():
    backbone = load_backbone("tiny", device="cpu")
    encoder = PromptEncoder(backbone.text_encoder, backbone.tokenizer, {"<defect>": 2})
    vectors = torch.randn(2, 2, encoder.embedding_dim, requires_grad=True)
    encoded = encoder(["a photo of <defect>", "<defect> tile"], {"<defect>": vectors})
    assert encoded.positions == {"<defect>": [[4, 5], [1, 2]]}
    encoded.hidden_states[:, 1:].pow(2).sum().backward()
    assert vectors.grad.abs().sum() > 0
    other = encoder(["a photo of <defect>"], {"<defect>": vectors[1].detach()})
    assert not torch.allclose(other.hidden_states, encoded.hidden_states[:1].detach())
    with pytest.raises(ValueError, match="<defect>"):
        encoder(["a photo of <defect>"])


def test_offline_error_names_download_and_how_to_point(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv(MODEL_ENV, raising=False)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert default_model() == DEFAULT_MODEL
    with pytest.raises(ModelNotFoundError) as error:
        load_backbone()
    message = str(error.value)
    assert f"huggingface-cli download {DEFAULT_MODEL} --local-dir DIR" in message
    assert "`model` DIR" in message and f"{MODEL_ENV}=DIR" in message
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="not a diffusers model folder"):
        load_backbone()


def test_prompt_encoders_keep_their_placeholders_to_themselves():
    backbone = load_backbone("tiny", device="cpu")
    vocab = dict(backbone.tokenizer.get_vocab())
    first = PromptEncoder(backbone.text_encoder, backbone.tokenizer, {"<crack>": 2})
    second = PromptEncoder(backbone.text_encoder, backbone.tokenizer, {"<hole>": 1})
    assert backbone.tokenizer.get_vocab() == vocab  # the shared tokenizer is unchanged
    assert first.tokenizer.convert_ids_to_tokens(first.tokenize(["<crack>"])[0, 1:3].tolist()) == ["<crack>#0", "<crack>#1"]
    assert second.tokenizer.convert_ids_to_tokens(second.tokenize(["<hole>"])[0, 1:2].tolist()) == ["<hole>#0"]
    assert "<crack>#0" not in second.tokenizer.get_vocab() and "<hole>#0" not in first.tokenizer.get_vocab()
    assert second.tokenize(["<crack>"]).max() < len(vocab)  # spelled with the base vocabulary, not the other's token


def test_vq_autoencoder_encodes_unquantised_and_decodes_unscaled_then_quantised():
    from diffusers import VQModel

    from anomalygen.diffusion.backbone import build_backbone
    from anomalygen.diffusion.sampling import decode_latents, encode_images
    from anomalygen.diffusion.tiny import tiny_configs

    tokenizer = tiny_tokenizer()
    configs = tiny_configs(tokenizer)
    configs["vae"] = {"_class_name": "VQModel", "block_out_channels": [8, 16], "latent_channels": 4, "norm_num_groups": 8,
                      "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                      "num_vq_embeddings": 16, "scaling_factor": 0.5}
    backbone = build_backbone(configs, tokenizer, name="vq", device="cpu")
    vq = backbone.vae
    assert isinstance(vq, VQModel)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        raw = vq.encode(images * 2 - 1).latents
        latents = encode_images(backbone, images)
        torch.testing.assert_close(latents, raw * 0.5)
        decoded = decode_latents(backbone, latents)
        expected = ((vq.decode(raw).sample + 1) / 2).clamp(0, 1)  # LDM pipeline: decode(z / s), quantised
        unquantised = ((vq.decode(raw, force_not_quantize=True).sample + 1) / 2).clamp(0, 1)
        unscaled = ((vq.decode(latents).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(decoded, expected)
    assert (decoded - unquantised).abs().max() > 1e-3 and (decoded - unscaled).abs().max() > 1e-3  # both matter here
