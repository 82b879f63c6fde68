"""Two processes (torchrun, gloo, CPU) train like one on the concatenated batch, for every method
on the core trainer: the losses call the DDP-wrapped modules (gradients are all-reduced) and each
rank computes the loss on its share of one global batch (tests/helpers/ddp_fit.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from anomalygen.cli import app
from anomalygen.data.demo import make_demo_dataset
from anomalygen.methods.base import create

from tests.helpers.ddp_fit import CLI_FIT, METHODS, ROWS_PER_SAMPLE, fit_all, toy_data

torch.set_num_threads(1)
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None or not torch.distributed.is_available(), reason="needs torchrun and torch.distributed")
def test_two_processes_equal_one_on_the_whole_batch(tmp_path):
    root = Path(__file__).parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": ""}
    data = make_demo_dataset(tmp_path / "data", n_good=2, n_test_good=0, n_defect=3, size=64, categories=("fabric",))
    run = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", str(root / "tests" / "helpers" / "ddp_fit.py"), str(tmp_path), str(data)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "terminate called" not in run.stderr, run.stderr[-3000:]
    # the command line's fit: one process saved (the other's lock would have refused it), what one process on the whole batch saves
    assert run.stderr.count("model saved in") == 1 and "error" not in run.stderr, run.stderr[-3000:]
    single = CliRunner().invoke(app, [*CLI_FIT, "--data", str(data), "--out", str(tmp_path / "cli-single")])
    assert single.exit_code == 0, single.output
    two, one = (load_file(str(tmp_path / folder / "embeddings.safetensors"))["vectors"] for folder in ("cli-fit", "cli-single"))
    torch.testing.assert_close(two, one, rtol=0, atol=1e-5)
    fit_all(tmp_path, "single")
    for method in METHODS:
        rank0, rank1, single, initial = (load_file(str(tmp_path / f"{method}-{tag}.safetensors"))
                                         for tag in ("rank0", "rank1", "single", "initial"))
        assert rank0.keys() == rank1.keys() == single.keys() == initial.keys()
        rows = {tag: set(json.loads((tmp_path / f"{method}-{tag}.json").read_text())["unet_rows"]) for tag in ("rank0", "rank1", "single")}
        batch = METHODS[method]["batch_size"] * ROWS_PER_SAMPLE.get(method, 1)
        assert rows == {"rank0": {batch // 2}, "rank1": {batch // 2}, "single": {batch}}, f"{method}: each rank must compute its share only"
        for key in single:
            torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=1e-7, msg=f"{method} {key}: ranks diverged")
        # training moved (nearly) every parameter by far more than the tolerance
        moved = sum(int(((single[k] - initial[k]).abs() > 1e-3).sum()) for k in single)
        assert moved > 0.9 * sum(v.numel() for v in single.values())
        for key in [k for k in single if "tokens" in k or "vectors" in k or (".heads." in k and k.endswith("bias"))]:
            # 1e-4 of moves of ~0.3: the summation order's float noise, through Adam, reached 2e-5 on
            # AnomalyDiffusion's head biases with the packages of 2026-12-07 (a rank on its half alone: ~1e-2)
            torch.testing.assert_close(rank0[key], single[key], rtol=0, atol=1e-4,
                                       msg=f"{method} {key}: 2 processes differ from 1 process on the whole batch")
        # Adam's first steps are ~lr·sign(g): where a gradient is ~0, float noise in it (the summation
        # order depends on the batch size; the gradients agree to 2e-5 relative, see below) flips a
        # whole step. A few such elements are expected (CAGen: 5.7 % on 2026-12-07's machine and packages),
        # a rank training on its half alone moves most.
        off = sum(int(((rank0[k] - single[k]).abs() > 1e-5).sum()) for k in single)
        assert off < 0.1 * sum(v.numel() for v in single.values()), f"{method}: {off} elements differ from one process"


def test_masked_loss_of_a_batch_is_the_mean_of_its_parts():
    """Eq. 5 per sample (each normalisation), averaged: the mean of two half-batch losses (what DDP
    averages) is the whole batch's loss, also with masks of very different areas."""
    from anomalygen.methods.anomalydiffusion.loss import masked_diffusion_loss

    torch.manual_seed(0)
    eps_pred, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    weight = torch.zeros(4, 1, 8, 8)
    for i, side in enumerate([1, 2, 5, 8]):
        weight[i, :, :side, :side] = 1
    for normalise in ("mask_area", "latent_size", "sum"):
        whole = masked_diffusion_loss(eps_pred, eps, weight, normalise)
        halves = [masked_diffusion_loss(eps_pred[s], eps[s], weight[s], normalise) for s in (slice(0, 2), slice(2, 4))]
        assert whole.item() == pytest.approx(sum(halves).item() / 2, rel=1e-6)
    per_sample = [((eps_pred[i] - eps[i]) ** 2 * weight[i]).sum() / (4 * weight[i].sum()) for i in range(4)]
    assert masked_diffusion_loss(eps_pred, eps, weight, "mask_area").item() == pytest.approx(sum(per_sample).item() / 4, rel=1e-6)
    official = ((eps_pred * weight - eps * weight) ** 2).mean([1, 2, 3]).mean()  # ddpm.py p_losses
    assert masked_diffusion_loss(eps_pred, eps, weight).item() == pytest.approx(official.item(), rel=1e-6)


def test_anomalydiffusion_share_losses_average_to_the_whole_batch(monkeypatch):
    """The same global batch split in two shares (what two ranks compute): mean loss and mean
    gradient of the shares equal those of the whole batch."""
    from anomalygen.methods.anomalydiffusion import generator as module

    defects, _ = toy_data()
    generator = create("anomalydiffusion", **METHODS["anomalydiffusion"])
    generator._build(["crack", "hole"])
    tokens = generator.anomaly_tokens.tokens
    results = []
    for share in (slice(0, 4), slice(0, 2), slice(2, 4)):
        monkeypatch.setattr(module, "batch_share", lambda batch, share=share: share)
        tokens.grad = None
        loss = generator.training_loss(defects, [0, 1, 0, 1], np.random.default_rng(3), torch.Generator().manual_seed(3))
        loss.backward()
        results.append((loss.item(), tokens.grad.clone()))
    (whole, grad), (a, grad_a), (b, grad_b) = results
    assert a != pytest.approx(b, rel=1e-3)  # the shares differ: the test can tell them apart
    assert whole == pytest.approx((a + b) / 2, rel=1e-5)
    torch.testing.assert_close((grad_a + grad_b) / 2, grad, rtol=1e-4, atol=1e-9)


def test_masked_loss_norm_option_reaches_the_loss():
    """``masked_loss_norm="latent_size"`` (official code) divides by the latent size, larger than any
    mask area (``"mask_area"``): the same batch gives a smaller loss, by the mean mask fraction."""
    defects, _ = toy_data()
    losses = []
    for normalise in ("mask_area", "latent_size"):
        generator = create("anomalydiffusion", **METHODS["anomalydiffusion"], masked_loss_norm=normalise, mask_source="augment")
        generator._build(["crack", "hole"])
        with torch.no_grad():
            losses.append(generator.training_loss(defects, [0, 1, 0, 1], np.random.default_rng(3), torch.Generator().manual_seed(3)).item())
    assert losses[1] < 0.5 * losses[0]
    with pytest.raises(Exception, match="masked_loss_norm"):
        create("anomalydiffusion", masked_loss_norm="pixels")


def test_batch_share_splits_the_global_batch_by_rank(monkeypatch):
    from anomalygen.diffusion.train import batch_share
    from anomalygen.errors import AnomalygenError

    assert batch_share(6) == slice(0, 6)  # one process: the whole batch
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    shares = []
    for rank in range(3):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        shares.append(list(range(6))[batch_share(6)])
    assert shares == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(AnomalygenError, match="batch_size 4 does not split over 3 processes"):
        batch_share(4)
