"""Spatial encoder E (AnomalyDiffusion §3.2): its tokens start on the text encoder's embedding scale,
and the resnet50 preset takes torchvision's ImageNet weights from the torch hub cache (recorded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.ops.misc import FrozenBatchNorm2d
from transformers import CLIPTextConfig, CLIPTextModel

from anomalygen.errors import DataError
from anomalygen.methods.anomalydiffusion import AnomalyDiffusion
from anomalygen.methods.anomalydiffusion.mask_model import MaskStats
from anomalygen.methods.anomalydiffusion.spatial_encoder import SpatialEncoder
from anomalygen.types import DefectExample

torch.set_num_threads(1)
FILE = ResNet50_Weights.DEFAULT.url.rsplit("/", 1)[-1]  # resnet50-11ad3fa6.pth


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache (``<hub>/checkpoints`` is where torchvision keeps weights). Set as
    ``set_dir`` does and undone after the test: restoring with ``set_dir(get_dir())`` would pin the
    hub folder for later tests, which then no longer follow ``$TORCH_HOME``."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture
def imagenet(hub):
    """A random torchvision ResNet-50 saved where its ImageNet weights would be cached."""
    torch.manual_seed(1)
    state = resnet50().state_dict()
    torch.save(state, hub / FILE)
    return state


def masks(size: int) -> torch.Tensor:
    m = torch.zeros(3, 1, size, size)
    m[0, :, size // 8:size // 2, size // 8:size // 3] = 1
    m[1, :, size // 3:, size // 4:size // 2] = 1
    m[2, :, 1:3, :] = 1  # a thin scratch
    return m


def assert_within(tokens: torch.Tensor, table: torch.Tensor) -> None:
    norms, reference = tokens.norm(dim=-1), table.norm(dim=-1)
    assert reference.min() <= norms.min() and norms.max() <= reference.max(), (
        f"spatial token norms {norms.min():.3g}..{norms.max():.3g}, text-encoder input embeddings "
        f"{reference.min():.3g}..{reference.max():.3g}")


def test_spatial_tokens_start_on_the_tiny_text_encoders_scale():
    generator = AnomalyDiffusion(model="tiny", device="cpu", resolution=32)
    generator._build(["crack"])
    with torch.no_grad():
        tokens = generator.spatial_encoder(masks(32))
    assert tokens.shape == (3, 4, 32)
    assert_within(tokens, generator.backbone.text_encoder.get_input_embeddings().weight)
    init = generator.prompts.word_embedding(generator.opt["init_word"])
    torch.testing.assert_close(tokens, init.expand_as(tokens))  # every token is e_a's init word at step 0


def test_resnet50_tokens_start_on_a_768d_clip_embedding_scale(hub):
    config = CLIPTextConfig(hidden_size=768, intermediate_size=64, num_hidden_layers=1, num_attention_heads=12)
    table = CLIPTextModel(config).get_input_embeddings().weight.detach()  # CLIP's vocabulary, random init
    torch.manual_seed(0)
    encoder = SpatialEncoder.from_preset("resnet50", 4, table[320])
    assert encoder.source == "random init"
    with torch.no_grad():
        tokens = encoder(masks(64))
    assert_within(tokens, table)


def test_resnet50_takes_the_cached_imagenet_weights_with_frozen_batchnorm(imagenet, hub):
    encoder = SpatialEncoder.from_preset("resnet50", 2, torch.zeros(8))
    assert encoder.source == f"imagenet: {FILE}"
    body = encoder.backbone.body
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer4.2.conv3.weight", "bn1.running_var", "layer3.5.bn2.bias"):
        assert torch.equal(body.state_dict()[name], imagenet[name]), name
    assert isinstance(body.bn1, FrozenBatchNorm2d) and not any(isinstance(m, torch.nn.GroupNorm) for m in body.modules())
    (hub / FILE).unlink()
    random = SpatialEncoder.from_preset("resnet50", 2, torch.zeros(8))
    assert random.source == "random init" and isinstance(random.backbone.body.bn1, torch.nn.GroupNorm)
    assert not torch.equal(random.backbone.body.conv1.weight, imagenet["conv1.weight"])


def test_a_weight_file_needing_pickle_code_is_refused(hub):
    torch.save({"conv1.weight": torch.zeros(1), "trap": DataError(None, "x")}, hub / FILE)
    with pytest.raises(DataError, match="pickle") as error:
        SpatialEncoder.from_preset("resnet50", 2, torch.zeros(8))
    assert FILE in str(error.value) and "\n" not in str(error.value)
    torch.save({"conv1.weight": torch.zeros(1)}, hub / FILE)
    with pytest.raises(DataError, match="not a torchvision ResNet-50"):
        SpatialEncoder.from_preset("resnet50", 2, torch.zeros(8))


@pytest.mark.parametrize("cached", [True, False])
def test_saved_model_records_the_encoder_and_load_rebuilds_it(cached, hub, tmp_path, request):
    if cached:
        request.getfixturevalue("imagenet")
    options = dict(model="tiny", device="cpu", resolution=32, spatial_encoder="resnet50", num_spatial_tokens=2)
    generator = AnomalyDiffusion(**options)
    generator._build(["crack"])
    with torch.no_grad():
        generator.spatial_encoder.heads[0].weight.normal_()  # as if trained
    mask = np.zeros((32, 32), bool)
    mask[8:20, 6:24] = True
    generator.training_masks, generator.mask_stats = {"crack": [mask]}, {"crack": MaskStats.from_masks([mask])}
    generator.save_state(tmp_path)
    record = json.loads((tmp_path / "anomalydiffusion.json").read_text())["spatial_encoder"]
    bound = record.pop("bound")
    assert record == {"preset": "resnet50", "source": f"imagenet: {FILE}" if cached else "random init", "equalized": True}
    assert bound == pytest.approx(float(generator.prompts.text_encoder.get_input_embeddings().weight.norm(dim=-1).mean()))
    for path in hub.iterdir():
        path.unlink()  # loading needs no weight file: the architecture comes from the record
    loaded = AnomalyDiffusion(**{**options, "spatial_encoder": "tiny"})
    loaded.load_state(tmp_path)
    assert loaded.spatial_encoder.source == record["source"]
    assert (loaded.spatial_encoder.gain, loaded.spatial_encoder.bound) == (generator.spatial_encoder.gain, bound)
    assert isinstance(loaded.spatial_encoder.backbone.body.bn1, FrozenBatchNorm2d if cached else torch.nn.GroupNorm)
    saved, restored = generator.spatial_encoder.state_dict(), loaded.spatial_encoder.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)


def test_spatial_encoder_lr_gives_E_its_own_adam_step():
    """Adam's first step moves each parameter by ~lr·sign(g): E by at most ``spatial_encoder_lr``,
    e_a by the method's lr (5e-3 × batch)."""
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32), bool)
    mask[8:20, 6:24] = True
    defects = [DefectExample(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), mask, "crack")]
    generator = AnomalyDiffusion(model="tiny", device="cpu", resolution=32, batch_size=2, max_steps=1, checkpoint_every=0,
                                 mask_source="augment", spatial_encoder_lr=1e-6)
    generator._build(["crack"])
    before = {k: v.clone() for k, v in generator.spatial_encoder.state_dict().items()}
    tokens = generator.anomaly_tokens.tokens.detach().clone()
    generator.fit(defects, [])
    moved = max((generator.spatial_encoder.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert 0 < moved <= 1.01e-6
    assert (generator.anomaly_tokens.tokens - tokens).abs().max().item() == pytest.approx(0.01, rel=0.01)
    with pytest.raises(Exception, match="spatial_encoder_lr"):
        AnomalyDiffusion(spatial_encoder_lr=0)
