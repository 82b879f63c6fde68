"""LoRA adapters on the tiny UNet: per-row routing, joint training, the diffusers file round trip."""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import Attention

from anomalygen.diffusion.attention import AttentionRecorder, install_hooks, remove_hooks
from anomalygen.diffusion.backbone import load_backbone
from anomalygen.diffusion.lora import (
    BASE,
    WEIGHT_NAME,
    activate_all,
    add_adapters,
    load_adapter,
    lora_layers,
    route,
    save_adapter,
    trainable_parameters,
)

torch.set_num_threads(1)
NAMES = ("first", "second")


def _perturb(unet, seed=0):
    """peft starts B at 0 (adapter = base); give every adapter distinct non-zero weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in NAMES:
            for p in trainable_parameters(unet, name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def backbone():
    backbone = load_backbone("tiny")
    add_adapters(backbone.unet, NAMES, rank=4, alpha=8)
    _perturb(backbone.unet)
    return backbone


@pytest.fixture
def unet(backbone):
    yield backbone.unet
    activate_all(backbone.unet)  # a test may have called set_adapter


def _inputs(batch=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=generator), torch.tensor([10, 500, 999, 250][:batch]),
            torch.randn(batch, 77, 32, generator=generator))


def _single(unet, name, x, t, ctx):
    """Reference: diffusers' own single-adapter forward (no routing code involved)."""
    unet.set_adapter(name)
    with torch.no_grad():
        return unet(x, t, ctx).sample


def test_adapters_on_every_attention_projection_all_trainable(unet):
    layers = lora_layers(unet)
    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    assert len(attention) == 14 and len(layers) == 4 * len(attention)  # q, k, v, out of each
    for name in NAMES:
        params = trainable_parameters(unet, name)
        assert len(params) == 2 * len(layers) and all(p.requires_grad for p in params)
    base = [p for n, p in unet.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base)


def test_fact_set_adapter_freezes_the_others(unet):
    """Library fact worked around by add_adapters: set_adapter turns the other adapter's requires_grad off."""
    unet.set_adapter("first")
    assert not any(p.requires_grad for p in trainable_parameters(unet, "second"))
    assert all(p.requires_grad for p in trainable_parameters(unet, "first"))


def test_fact_unet_drops_adapter_names(unet):
    """Library fact worked around by route: diffusers' UNet forward does not route by ``adapter_names``."""
    x, t, ctx = _inputs(2)
    unet.set_adapter(["first", "second"])
    with torch.no_grad():
        both = unet(x, t, ctx).sample
        try:
            passed = unet(x, t, ctx, cross_attention_kwargs={"adapter_names": ["first", "second"]}).sample
        except TypeError:
            passed = both  # rejected outright: equally not routed
    torch.testing.assert_close(passed, both)
    assert not torch.allclose(passed[0], _single(unet, "first", x, t, ctx)[0], atol=1e-4)


def test_route_reproduces_each_single_adapter_row_by_row(unet):
    x, t, ctx = _inputs(4)
    rows = ["second", "first", BASE, "second"]
    with route(unet, rows), torch.no_grad():
        routed = unet(x, t, ctx).sample
    references = {name: _single(unet, name, x, t, ctx) for name in NAMES}
    unet.disable_adapters()
    with torch.no_grad():
        references[BASE] = unet(x, t, ctx).sample
    unet.enable_adapters()
    assert not torch.allclose(references["first"], references["second"], atol=1e-3)  # adapters really differ
    for i, name in enumerate(rows):
        torch.testing.assert_close(routed[i], references[name][i], atol=1e-5, rtol=1e-5)


def test_route_through_the_cores_hooked_processors(unet):
    """The attention hooks' processor calls to_q/k/v/out on the whole batch too, so routing still applies."""
    x, t, ctx = _inputs(2)
    rows = ["second", "first"]
    with route(unet, rows), torch.no_grad():
        plain = unet(x, t, ctx).sample
        install_hooks(unet, lambda layer: [AttentionRecorder()])
        try:
            hooked = unet(x, t, ctx).sample
        finally:
            remove_hooks(unet)
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hooked[0], _single(unet, "first", x, t, ctx)[0], atol=1e-4)


def test_route_restores_and_checks_names(unet):
    x, t, ctx = _inputs(2)
    with torch.no_grad():
        before = unet(x, t, ctx).sample
        with route(unet, ["first", "first"]):
            pass
        torch.testing.assert_close(unet(x, t, ctx).sample, before)
    with pytest.raises(ValueError, match="thirds"):
        with route(unet, ["first", "thirds"]):
            pass
    with pytest.raises(ValueError, match="Length of `adapter_names`"), route(unet, ["first"] * 3):
        unet(x, t, ctx)


@pytest.mark.parametrize("rows, used", [(["first", "second", "second", "first"], NAMES), (["second", BASE, "second", BASE], ("second",))])
def test_one_backward_step_trains_the_routed_adapters_only(unet, rows, used):
    unet.train()
    unet.zero_grad(set_to_none=True)
    x, t, ctx = _inputs(4)
    with route(unet, rows):
        unet(x, t, ctx).sample.square().mean().backward()
    unet.eval()
    for name in NAMES:
        grads = [p.grad for p in trainable_parameters(unet, name)]
        if name in used:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), name
        else:
            assert all(g is None or not g.any() for g in grads), name
    unet.zero_grad(set_to_none=True)


def test_routed_gradients_equal_single_adapter_gradients_of_its_rows(unet):
    """Rows are independent in the UNet, so adapter a's gradient from a routed batch is its gradient,
    with a alone active, of the loss terms of the rows routed to a."""
    x, t, ctx = _inputs(4)
    rows = ["first", "second", "second", "first"]

    def grads(name, rows_used=None):
        unet.train()
        unet.zero_grad(set_to_none=True)
        if rows_used is None:
            with route(unet, rows):
                out = unet(x, t, ctx).sample
        else:
            unet.set_adapter(name)
            out = unet(x, t, ctx).sample[rows_used]
        out.square().sum().backward()
        unet.eval()
        result = [p.grad.clone() for p in trainable_parameters(unet, name)]
        unet.zero_grad(set_to_none=True)
        return result

    routed = {name: grads(name) for name in NAMES}
    for name in NAMES:
        alone = grads(name, [i for i, row in enumerate(rows) if row == name])
        for g_routed, g_alone in zip(routed[name], alone):
            torch.testing.assert_close(g_routed, g_alone, atol=1e-6 * g_alone.abs().max().item(), rtol=1e-4)


def test_saved_adapter_loads_into_plain_diffusers_pipeline(backbone, unet, tmp_path):
    save_adapter(unet, "second", tmp_path)
    assert (tmp_path / WEIGHT_NAME).is_file()
    plain = load_backbone("tiny")  # same seed: the same base weights
    pipe = StableDiffusionPipeline(
        vae=plain.vae, text_encoder=plain.text_encoder, tokenizer=plain.tokenizer, unet=plain.unet,
        scheduler=DDIMScheduler.from_config(plain.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.load_lora_weights(tmp_path)
    x, t, ctx = _inputs(2)
    with torch.no_grad():
        theirs = pipe.unet(x, t, ctx).sample
    torch.testing.assert_close(theirs, _single(unet, "second", x, t, ctx), atol=1e-5, rtol=1e-5)


def test_save_then_our_load_under_a_new_name(unet, tmp_path):
    save_adapter(unet, "first", tmp_path)
    fresh = load_backbone("tiny").unet
    add_adapters(fresh, ["second"], rank=4, alpha=8)
    load_adapter(fresh, tmp_path, "loaded")
    for name in ("second", "loaded"):  # as after add_adapters: every adapter active and trainable
        assert all(p.requires_grad for p in trainable_parameters(fresh, name)), name
    assert all(layer.active_adapters == ["second", "loaded"] for layer in lora_layers(fresh))
    x, t, ctx = _inputs(2)
    with route(fresh, ["loaded", "loaded"]), torch.no_grad():
        ours = fresh(x, t, ctx).sample
    torch.testing.assert_close(ours, _single(unet, "first", x, t, ctx), atol=1e-5, rtol=1e-5)
