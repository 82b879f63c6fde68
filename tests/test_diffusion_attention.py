"""Each attention hook against attention computed by hand on small tensors."""

import pytest
import torch
from diffusers.models.attention_processor import Attention

from anomalygen.diffusion.attention import (
    AttentionRecorder,
    HookedAttnProcessor,
    JointAttention,
    LogitReweight,
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


def test_logit_reweight_multiplies_chosen_token_logits_per_pixel():
    attn = _layer(cross=True)
    x, ctx = torch.randn(2, 16, 8), torch.randn(2, 5, 6)
    weights = 1 + torch.rand(2, 1, 4, 4)  # latent map, same resolution as the 16 tokens
    hook = LogitReweight()
    hook.weights, hook.positions = weights, [[1, 2], [3]]
    got = _run(attn, [hook], x, ctx)

    def reweight(logits):
        factor = torch.ones(2, 1, 16, 5)
        factor[0, 0, :, [1, 2]] = weights[0].flatten()[:, None]
        factor[1, 0, :, 3] = weights[1].flatten()
        return logits * factor

    with torch.no_grad():
        expected, _ = _by_hand(attn, x, ctx, reweight)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # a map at twice the layer's resolution is area-averaged down to it
    hook.weights = weights.repeat_interleave(2, -1).repeat_interleave(2, -2)
    torch.testing.assert_close(_run(attn, [hook], x, ctx), expected, atol=1e-6, rtol=1e-5)


def test_joint_attention_attends_over_the_group():
    attn = _layer(cross=False)
    x = torch.randn(4, 9, 8)
    got = _run(attn, [JointAttention(2)], x)
    with torch.no_grad():
        expected = torch.cat([_by_hand(attn, x[i : i + 1], torch.cat([x[i - i % 2], x[i - i % 2 + 1]])[None])[0] for i in range(4)])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_reference_kv_gated_mix_on_target_rows():
    attn = _layer(cross=False)
    hook = ReferenceKV(dim=8, gate_init=0.3)
    torch.nn.init.normal_(hook.mlp[2].weight)
    reference, x = torch.randn(2, 9, 8), torch.randn(2, 9, 8)
    hook.mode = "record"
    _run(attn, [hook], reference)
    hook.mode, hook.targets = "inject", torch.tensor([True, False])
    got = _run(attn, [hook], x)
    with torch.no_grad():
        mixed = 0.7 * x[0] + 0.3 * (reference[0] + hook.mlp(reference[0]))
        expected = torch.cat([_by_hand(attn, x[:1], mixed[None])[0], _by_hand(attn, x[1:], x[1:])[0]])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert {n for n, p in hook.named_parameters()} >= {"gate", "mlp.0.weight"}


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
