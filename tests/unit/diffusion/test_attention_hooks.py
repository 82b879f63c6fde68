"""The output hook stage, composing/restoring installs, and reference K/V from rows of the same batch."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import nn

from anomalygen.diffusion.attention import (
    AttentionHook,
    AttentionRecorder,
    HookedAttnProcessor,
    ReferenceKV,
    attention_layers,
    install_hooks,
    remove_hooks,
    select_layers,
)

torch.set_num_threads(1)


class AddToOutput(AttentionHook):
    """Adds ``value`` to the attention output and keeps the shape it saw."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.value, self.shapes = value, []

    def output(self, layer, out):
        self.shapes.append(tuple(out.shape))
        return out + self.value if self.value else out


@pytest.fixture(scope="module")
def unet():
    from anomalygen.diffusion.backbone import load_backbone

    return load_backbone("tiny", device="cpu").unet


def _forward(unet):
    torch.manual_seed(1)
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with torch.no_grad():
        return unet(latents, 10, encoder_hidden_states=context).sample


def test_output_hook_sees_the_projected_output_before_residual_and_rescale():
    """On a spatial input with a residual and rescale 2: the hook sees (B, N, C) and a constant c
    it adds reaches the layer's output as exactly c / 2 (after to_out, before residual/rescale)."""
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4, residual_connection=True, rescale_output_factor=2.0).eval()
    x = torch.randn(2, 8, 3, 4)
    outputs = {}
    for value in (0.0, 3.0):
        hook = AddToOutput(value)
        attn.set_processor(HookedAttnProcessor("layer", [hook, AddToOutput()]))
        with torch.no_grad():
            outputs[value] = attn(x)
        assert hook.shapes == [(2, 12, 8)]
    torch.testing.assert_close(outputs[3.0] - outputs[0.0], torch.full_like(x, 1.5), atol=1e-5, rtol=0)


def test_identity_output_hook_is_bit_identical_to_diffusers_sdpa(unet):
    remove_hooks(unet)
    unet.set_attn_processor(AttnProcessor2_0())
    plain = _forward(unet)
    hook = AddToOutput()
    handle = install_hooks(unet, lambda layer: [hook])
    try:
        hooked = _forward(unet)
    finally:
        remove_hooks(unet, handle)
    assert len(hook.shapes) == len(attention_layers(unet))
    assert torch.equal(hooked, plain)


def test_installs_compose_and_removal_restores_the_exact_processors(unet):
    layers = select_layers(unet, blocks=("up",))
    custom = AttnProcessor()  # a user's processor on one layer
    layers[0].module.set_processor(custom)
    original = {l.name: l.module.processor for l in attention_layers(unet)}
    plain = _forward(unet)
    recorder, shift = AttentionRecorder(), AddToOutput(0.5)
    first = install_hooks(unet, lambda layer: [recorder], layers)
    second = install_hooks(unet, lambda layer: [shift], layers)
    assert all(list(second[l.name].hooks) == [recorder, shift] for l in layers)  # earlier hooks first
    assert all(second[l.name].previous is first[l.name] for l in layers)
    shifted = _forward(unet)
    assert set(recorder.maps) == {l.name for l in layers} and not torch.equal(shifted, plain)
    with pytest.raises(RuntimeError, match="later install_hooks"):
        remove_hooks(unet, first)
    remove_hooks(unet, second)
    assert all(l.module.processor is first[l.name] for l in layers)
    assert all(l.module.processor is original[l.name] for l in attention_layers(unet) if l.name not in first)
    recorder.maps.clear()
    torch.testing.assert_close(_forward(unet), plain)  # the recorder's explicit softmax: close, not bitwise
    assert set(recorder.maps) == {l.name for l in layers}
    remove_hooks(unet, first)
    assert all(l.module.processor is original[l.name] for l in attention_layers(unet))
    assert not any(isinstance(p, HookedAttnProcessor) for p in unet.attn_processors.values())
    assert torch.equal(_forward(unet), plain)
    # without a handle: every install on every layer undone at once, back to the originals
    install_hooks(unet, lambda layer: [AttentionRecorder()], layers)
    install_hooks(unet, lambda layer: [AddToOutput(1.0)])
    remove_hooks(unet)
    assert all(l.module.processor is original[l.name] for l in attention_layers(unet))
    assert "processor" not in layers[1].module._modules  # no stale hooked submodule in the state dict
    layers[0].module.set_processor(AttnProcessor2_0())


def _self_layer():
    torch.manual_seed(0)
    return Attention(query_dim=8, heads=2, dim_head=4).eval()


@pytest.mark.parametrize("as_masks", [False, True])
def test_reference_rows_in_the_same_batch_feed_the_target_rows(as_masks):
    """Batch of two ``[branch, other, reference]`` halves (as under CFG): row 0 attends to row 2's
    K/V source, row 3 to row 5's (a plain call with that context), the other rows are bit-identical
    to the unhooked batch, and the reference's K/V source is recorded."""
    attn = _self_layer()
    x = torch.randn(6, 9, 8)
    with torch.no_grad():
        plain = attn(x)
        expected = torch.cat([attn(x[i : i + 1], encoder_hidden_states=x[i + 2 : i + 3]) for i in (0, 3)])
    hook = ReferenceKV(mix=lambda hidden, reference: reference)
    hook.mode = "inject"
    if as_masks:  # per-sample masks, tiled over the two halves
        hook.targets, hook.reference_rows = torch.tensor([True, False, False]), torch.tensor([False, False, True])
    else:
        hook.targets, hook.reference_rows = [0, 3], [2, 5]
    attn.set_processor(HookedAttnProcessor("layer", [hook]))
    with torch.no_grad():
        got = attn(x)
    torch.testing.assert_close(got[[0, 3]], expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(got[[1, 2, 4, 5]], plain[[1, 2, 4, 5]])
    assert torch.equal(hook.stored, x[[2, 5]])


def test_default_targets_are_the_non_reference_rows_and_a_learnable_mix_trains():
    class Blend(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.tensor(0.5))
            self.proj = nn.Linear(8, 8)

        def forward(self, hidden, reference):
            return (1 - self.weight) * hidden + self.weight * self.proj(reference)

    attn = _self_layer()
    attn.requires_grad_(False)
    mix = Blend()
    hook = ReferenceKV(mix)
    hook.mode, hook.reference_rows = "inject", slice(2, 3)
    assert {n for n, _ in hook.named_parameters()} == {"mix.weight", "mix.proj.weight", "mix.proj.bias"}
    x = torch.randn(3, 9, 8, requires_grad=True)
    attn.set_processor(HookedAttnProcessor("layer", [hook]))
    out = attn(x)
    attn.set_processor(AttnProcessor2_0())
    with torch.no_grad():
        for row in (0, 1):  # both non-reference rows receive the mix with the one reference row
            context = mix(x[row : row + 1], x[2:3])
            torch.testing.assert_close(out[row : row + 1], attn(x[row : row + 1], encoder_hidden_states=context))
    out[0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mix.parameters())
    assert x.grad[2].abs().sum() > 0 and torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
