"""The fast path: bf16 by default on CUDA only, the sampling batch chosen from memory, nothing
changed on the CPU; the GPU half is skipped without CUDA."""

import pytest
import torch

from anomalygen.diffusion import fast
from anomalygen.diffusion.backbone import load_backbone, resolve_dtype, resolve_precision
from anomalygen.methods.base import create, get_method

DIFFUSION = ("anomalydiffusion", "anomalyxfusion", "cagen", "dualanodiff", "textual-inversion")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_auto_precision_is_bf16_on_cuda_and_fp32_elsewhere():
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cuda")) == "fp16"
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto") == torch.float32
    assert load_backbone("tiny", device="cpu", dtype="auto").unet.dtype == torch.float32


@pytest.mark.parametrize("method", DIFFUSION)
def test_every_diffusion_method_defaults_to_the_fast_path(method):
    defaults = get_method(method).OPTIONS.defaults()
    assert defaults["mixed_precision"] == "auto"
    assert defaults["generate_batch_size"] == 0


def test_training_loop_runs_fp32_on_the_cpu_by_default(tmp_path):
    from anomalygen.diffusion.train import TrainConfig, train

    seen = []
    weight = torch.nn.Linear(2, 1)

    def loss_fn(modules, step, generator):
        out = modules["w"](torch.ones(1, 2))
        seen.append(out.dtype)
        return out.pow(2).mean()

    train({"w": weight}, loss_fn, TrainConfig(max_steps=2, checkpoint_every=0, device="cpu"), tmp_path)
    assert TrainConfig().mixed_precision == "auto" and seen == [torch.float32, torch.float32]


def test_batch_from_memory():
    gib = 2**30
    assert fast.batch_from_memory(80 * gib, 4 * gib, 1 * gib) == 52  # 0.7 * 80 - 4
    assert fast.batch_from_memory(80 * gib, 4 * gib, gib // 100) == fast.MAX_BATCH
    assert fast.batch_from_memory(8 * gib, 6 * gib, 1 * gib) == 1  # never below one


def test_the_cpu_path_is_unchanged():
    backbone = load_backbone("tiny", device="cpu")
    backbone.compile = True
    assert fast.sampling_batch(backbone, 3, 8, 32) == 3
    assert fast.sampling_batch(backbone, 0, 8, 32) == 8
    fast.prepare_for_sampling(backbone)
    assert not backbone.prepared and backbone.compile_started is None
    weight = next(p for p in backbone.unet.parameters() if p.dim() == 4)
    assert weight.is_contiguous()  # not channels_last


def test_cpu_sampling_batch_reaches_the_methods():
    generator = create("cagen", model="tiny", device="cpu", resolution=32)
    assert generator.opt["generate_batch_size"] == 0
    assert fast.sampling_batch(generator.backbone, generator.opt["generate_batch_size"], 8, 32) == 8
    assert not generator.backbone.compile
    generator.compile_unet()  # pipeline.generate's compile, on a loaded backbone and on one loaded later
    assert generator.backbone.compile
    later = create("cagen", model="tiny", device="cpu", resolution=32)
    later.compile_unet()
    assert later.backbone.compile


CPU_BATCH = {"anomalydiffusion": 8, "anomalyxfusion": 4, "cagen": 8, "dualanodiff": 4, "textual-inversion": 4}


@pytest.mark.parametrize("method", DIFFUSION)
def test_generation_batch_is_the_requested_or_the_cpu_default(method):
    """The batch generate() samples in, which --processes deals as its block (sharding relies on it)."""
    options = dict(model="tiny", device="cpu", resolution=32)
    assert create(method, **options, generate_batch_size=3).generation_batch() == 3
    assert create(method, **options).generation_batch() == CPU_BATCH[method]


def test_textual_inversion_samples_in_the_batch_the_fast_path_chooses(monkeypatch):
    import numpy as np

    from anomalygen.methods.kit import method as kit
    from anomalygen.methods.textual_inversion import generator as textual_inversion
    from anomalygen.types import DefectExample

    mask = np.zeros((32, 32), bool)
    mask[8:20, 8:20] = True
    good = [np.full((32, 32, 3), 128, np.uint8)]
    generator = create("textual-inversion", model="tiny", device="cpu", resolution=32, max_steps=1, batch_size=4,
                       num_inference_steps=1, checkpoint_every=0)
    generator.fit([DefectExample(good[0], mask, "crack")], good)
    asked, sizes = [], []
    monkeypatch.setattr(kit, "sampling_batch", lambda backbone, *a: asked.append(a) or 3)
    monkeypatch.setattr(textual_inversion, "blended_generate",
                        lambda backbone, context, images, *a, **k: sizes.append(len(images)) or images)
    assert len(list(generator.generate(good, 7))) == 7
    assert asked == [(0, 4, 32, 1)] and sizes == [3, 3, 1]  # (requested, CPU default, px, rows)


@cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_backbone_is_prepared_and_the_batch_fits(compiled):
    backbone = load_backbone("tiny", device="cuda", dtype="auto")
    backbone.compile = compiled
    assert backbone.unet.dtype == torch.bfloat16
    batch = fast.sampling_batch(backbone, 0, 8, 64, rows_per_sample=2)
    assert backbone.prepared and 1 <= batch <= fast.MAX_BATCH
    weight = next(p for p in backbone.unet.parameters() if p.dim() == 4)
    # channels_last only under compile: in eager it is slower (RESULTS.md)
    assert weight.is_contiguous(memory_format=torch.channels_last) == compiled
    assert (backbone.compile_started is not None) == compiled
