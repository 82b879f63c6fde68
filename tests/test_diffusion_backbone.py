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
    assert "--model DIR" in message and f"{MODEL_ENV}=DIR" in message
    monkeypatch.setenv(MODEL_ENV, str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="not a diffusers model folder"):
        load_backbone()
