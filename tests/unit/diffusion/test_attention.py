"""Each attention hook against attention computed by hand on small tensors."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from diffusers.models.attention_processor import Attention

import anomalygen.diffusion
from anomalygen.diffusion.attention import (
    AttentionRecorder,
    HookedAttnProcessor,
    AttentionReweight,
    ReferenceKV,
    install_hooks,
    remove_hooks,
    select_layers,
)

torch.set_num_threads(1)


def _layer(cross: bool):
    torch.manual_seed(0)
    return Attention(query_dim=8, cross_attention_dim=6 if cross else None, heads=2, dim_head=4).eval()


def _by_hand(attn, x, ctx, logit_fn=lambda l: l):
    """softmax(Q Kᵀ / √d) V per head, then the output projection."""
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    b, n, _ = q.shape
    q, k, v = (t.view(t.shape[0], t.shape[1], 2, 4).transpose(1, 2) for t in (q, k, v))
    probs = logit_fn(q @ k.transpose(-1, -2) / 2.0).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(b, n, 8)
    return attn.to_out[0](out), probs


def _run(attn, hooks, x, ctx=None):
    attn.set_processor(HookedAttnProcessor("layer", hooks))
    with torch.no_grad():
        return attn(x, encoder_hidden_states=ctx)


def test_no_hooks_equals_diffusers_sdpa():
    attn = _layer(cross=True)
    x, ctx = torch.randn(2, 16, 8), torch.randn(2, 5, 6)
    with torch.no_grad():
        reference = attn(x, encoder_hidden_states=ctx)
    torch.testing.assert_close(_run(attn, [], x, ctx), reference, atol=1e-6, rtol=1e-5)


def _factor(weights, positions, pixels=16, tokens=5):
    """(B, 1, N, S): the weight map on the chosen token columns, 1 elsewhere."""
    factor = torch.ones(len(positions), 1, pixels, tokens)
    for row, cols in enumerate(positions):
        factor[row, 0, :, cols] = weights[row].flatten()[:, None]
    return factor


@pytest.mark.parametrize("stage", ["logits", "log_logits", "probabilities", "renormalised"])
def test_reweight_each_stage_equals_the_hand_computation(stage):
    attn = _layer(cross=True)
    x, ctx = torch.randn(2, 16, 8), torch.randn(2, 5, 6)
    weights = 1 + torch.rand(2, 1, 4, 4)  # latent map, same resolution as the 16 tokens
    hook = AttentionReweight("probabilities", renormalise=True) if stage == "renormalised" else AttentionReweight(stage)
    hook.weights, hook.positions = weights, [[1, 2], [3]]
    recorder = AttentionRecorder()
    got = _run(attn, [hook, recorder], x, ctx)
    factor = _factor(weights, hook.positions)
    with torch.no_grad():
        if stage in ("logits", "log_logits"):
            change = (lambda l: l * factor) if stage == "logits" else (lambda l: l + factor.log())
            expected, probs = _by_hand(attn, x, ctx, change)
        else:
            _, plain = _by_hand(attn, x, ctx)
            probs = plain * factor
            if stage == "renormalised":
                probs = probs / probs.sum(-1, keepdim=True)
            q = probs @ attn.to_v(ctx).view(2, 5, 2, 4).transpose(1, 2)
            expected = attn.to_out[0](q.transpose(1, 2).reshape(2, 16, 8))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(recorder.maps["layer"], probs.mean(1), atol=1e-6, rtol=1e-5)  # recorder sees the change
    # a map at twice the layer's resolution is area-averaged down to it
    hook.weights = weights.repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(_run(attn, [hook], x, ctx), expected, atol=1e-6, rtol=1e-5)


def test_reweight_follows_a_new_map_or_new_positions_set_between_steps():
    """The factor is made once per map and reused by the layers (no device sync per layer); a map or
    positions assigned by a sampling callback must replace it."""
    attn = _layer(cross=True)
    x, ctx = torch.randn(2, 16, 8), torch.randn(2, 5, 6)
    first, second = 1 + torch.rand(2, 1, 4, 4), 2 + torch.rand(2, 1, 4, 4)

    def expected(weights, positions):
        factor = _factor(weights, positions)
        with torch.no_grad():
            return _by_hand(attn, x, ctx, lambda l: l * factor)[0]

    hook = AttentionReweight("logits")
    hook.weights, hook.positions = first, [[1, 2], [3]]
    torch.testing.assert_close(_run(attn, [hook], x, ctx), expected(first, [[1, 2], [3]]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_run(attn, [hook], x, ctx), expected(first, [[1, 2], [3]]), atol=1e-6, rtol=1e-5)
    hook.weights = second
    torch.testing.assert_close(_run(attn, [hook], x, ctx), expected(second, [[1, 2], [3]]), atol=1e-6, rtol=1e-5)
    hook.positions = [[4], [0, 1]]
    torch.testing.assert_close(_run(attn, [hook], x, ctx), expected(second, [[4], [0, 1]]), atol=1e-6, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(1.0, 3.0))
def test_log_logits_equal_renormalised_probabilities(seed, high):
    torch.manual_seed(seed)
    attn = _layer(cross=True)
    x, ctx = torch.randn(1, 16, 8), torch.randn(1, 5, 6)
    weights = 1 + (high - 1) * torch.rand(1, 1, 4, 4)
    maps = []
    for hook in (AttentionReweight("log_logits"), AttentionReweight("probabilities", renormalise=True)):
        hook.weights, hook.positions = weights, [[0, 4]]
        recorder = AttentionRecorder()
        _run(attn, [hook, recorder], x, ctx)
        maps.append(recorder.maps["layer"])
    torch.testing.assert_close(maps[0], maps[1], atol=1e-6, rtol=1e-5)


def _signed_layer():
    """One head, q = x and k = context (identity projections): the logit of pixel p and token s
    is x_p·c_s / 2, so the sign of each token's logits is set by hand."""
    attn = Attention(query_dim=4, cross_attention_dim=4, heads=1, dim_head=4).eval()
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(4))
        attn.to_k.weight.copy_(torch.eye(4))
    return attn


def test_direction_boosting_stages_raise_the_chosen_tokens_attention_by_w():
    """Mass on the chosen tokens: ``probabilities`` multiplies it by W exactly, ``log_logits``
    gives pW / (1 + p(W − 1)) >= p; both raise it whatever the logits' sign. ``logits`` (the
    caveat) lowers it where the chosen token's logits are negative and raises it where positive."""
    attn = _signed_layer()
    torch.manual_seed(0)
    x = torch.rand(1, 16, 4) + 0.5  # positive features at every pixel
    ctx = torch.stack([torch.ones(4), -torch.ones(4), torch.ones(4) * 0.5, torch.zeros(4), 2 * torch.ones(4)])[None]
    weights = torch.full((1, 1, 4, 4), 1.5)
    weights[..., :2, :] = 1.0  # top half: no boost
    boosted = (weights.flatten() > 1)

    def mass(stage, positions, w=weights):
        hook, recorder = AttentionReweight(stage), AttentionRecorder()
        hook.weights, hook.positions = w, [positions]
        _run(attn, [hook, recorder], x, ctx)
        return recorder.maps["layer"][0][:, positions].sum(-1)

    w = weights.flatten()
    for positions in ([1], [0, 2]):  # token 1: negative logits; tokens 0, 2: positive logits
        before = mass("logits", positions, None)
        torch.testing.assert_close(mass("probabilities", positions), w * before, atol=1e-6, rtol=1e-5)
        after = mass("log_logits", positions)
        torch.testing.assert_close(after, w * before / (1 + before * (w - 1)), atol=1e-6, rtol=1e-5)
        assert torch.all(after[boosted] > before[boosted]) and torch.equal(after[~boosted], before[~boosted])
        scaled = mass("logits", positions)
        if positions == [1]:
            assert torch.all(scaled[boosted] < before[boosted])  # documented caveat: W > 1 lowers it
        else:
            assert torch.all(scaled[boosted] > before[boosted])


def test_reweight_changes_only_the_given_rows_under_cfg():
    """A ``[uncond; cond]`` batch with ``rows = slice(B, 2B)``: the unconditional half's attention
    equals the unhooked run exactly, the conditional half is reweighted as for a batch of B; the
    B maps are never tiled over 2B rows."""
    attn = _layer(cross=True)
    x, ctx = torch.randn(4, 16, 8), torch.randn(4, 5, 6)
    weights = 1 + torch.rand(2, 1, 4, 4)
    plain = AttentionRecorder()
    _run(attn, [plain], x, ctx)
    for stage in AttentionReweight.STAGES:
        hook, recorder = AttentionReweight(stage), AttentionRecorder()
        hook.weights, hook.positions, hook.rows = weights, [[1, 2], [3]], slice(2, 4)
        _run(attn, [hook, recorder], x, ctx)
        assert torch.equal(recorder.maps["layer"][:2], plain.maps["layer"][:2])
        alone, cond_only = AttentionRecorder(), AttentionReweight(stage)
        cond_only.weights, cond_only.positions = weights, [[1, 2], [3]]
        _run(attn, [cond_only, alone], x[2:], ctx[2:])
        torch.testing.assert_close(recorder.maps["layer"][2:], alone.maps["layer"], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(recorder.maps["layer"][2:], plain.maps["layer"][2:])
        hook.rows = None
        with pytest.raises(ValueError, match="2 weight maps for 4"):
            _run(attn, [hook], x, ctx)


def test_diffusion_core_never_imports_methods():
    core = Path(anomalygen.diffusion.__file__).parent
    offenders = [p.name for p in core.rglob("*.py") if "anomalygen.methods" in p.read_text()]
    assert offenders == []


class GatedMix(torch.nn.Module):
    """A learnable mix ``(1 - a)·h + a·(r + MLP(r))``, as a method would plug into ``ReferenceKV``."""

    def __init__(self, dim: int, gate_init: float) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.GELU(), torch.nn.Linear(dim, dim))
        self.gate = torch.nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, hidden, reference):
        return (1 - self.gate) * hidden + self.gate * (reference + self.mlp(reference))


def test_reference_kv_gated_mix_on_target_rows():
    attn = _layer(cross=False)
    hook = ReferenceKV(GatedMix(dim=8, gate_init=0.3))
    torch.nn.init.normal_(hook.mix.mlp[2].weight)
    reference, x = torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    hook.mode = "record"
    _run(attn, [hook], reference)
    hook.mode, hook.targets = "inject", torch.tensor([True, False])
    got = _run(attn, [hook], x)
    with torch.no_grad():
        mixed = 0.7 * x[0] + 0.3 * (reference[0] + hook.mix.mlp(reference[0]))
        expected = torch.cat([_by_hand(attn, x[:1], mixed[None])[0], _by_hand(attn, x[1:], x[1:])[0]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert {n for n, p in hook.named_parameters()} >= {"mix.gate", "mix.mlp.0.weight"}


def test_recorder_keeps_head_mean_probabilities():
    attn = _layer(cross=True)
    x, ctx = torch.randn(1, 16, 8), torch.randn(1, 5, 6)
    recorder = AttentionRecorder()
    _run(attn, [recorder], x, ctx)
    with torch.no_grad():
        _, probs = _by_hand(attn, x, ctx)
    torch.testing.assert_close(recorder.maps["layer"], probs.mean(1), atol=1e-6, rtol=1e-5)


def test_install_on_selected_layers_and_remove(tiny_backbone):
    unet = tiny_backbone.unet
    layers = select_layers(unet, kinds=["cross"], blocks=["up"], levels=[0])
    assert layers and all(l.kind == "cross" and l.block == "up" and l.level == 0 for l in layers)
    recorder = AttentionRecorder()
    install_hooks(unet, lambda layer: [recorder], layers)
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 7, 32))
        assert set(recorder.maps) == {l.name for l in layers}
        assert all(m.shape == (1, 64, 7) for m in recorder.maps.values())
    finally:
        remove_hooks(unet)
    assert not any(isinstance(p, HookedAttnProcessor) for p in unet.attn_processors.values())


@pytest.fixture(scope="module")
def tiny_backbone():
    from anomalygen.diffusion.backbone import load_backbone

    return load_backbone("tiny", device="cpu")
