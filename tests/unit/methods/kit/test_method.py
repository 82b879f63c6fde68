"""``methods.kit.method.DiffusionMethod``: the lifecycle's own state, on textual inversion (the smallest method)."""

import torch

from anomalygen.methods.base import create

torch.set_num_threads(1)


def _method():
    return create("textual-inversion", model="tiny", device="cpu", resolution=32, max_steps=1, checkpoint_every=0)


def test_compile_unet_reaches_the_backbone_whether_it_is_loaded_before_or_after():
    """``pipeline.generate(compile=True)`` asks before generation; the backbone is loaded lazily, on first use."""
    early = _method()
    early.compile_unet()
    assert early.backbone.compile is True
    late = _method()
    assert late.backbone.compile is False
    late.compile_unet()
    assert late.backbone.compile is True


def test_draw_noised_draws_rows_then_timesteps_then_noise_whole_and_keeps_the_share():
    """Every process draws the whole batch (rows, t, ε in that order) and keeps its ``share``: with
    two processes, rank 0's rows are the first half of the one-process draw (DDP = one process)."""
    method = _method()  # batch_size 4
    latents = torch.arange(5 * 4 * 2 * 2, dtype=torch.float32).reshape(5, 4, 2, 2)
    for share in (slice(None), slice(0, 2), slice(2, 4)):
        picks, timesteps, noise, noised = method.draw_noised(latents, torch.Generator().manual_seed(3), share)
        g = torch.Generator().manual_seed(3)
        expected_picks = torch.randint(0, 5, (4,), generator=g)[share]
        expected_t = torch.randint(0, method.backbone.num_train_timesteps, (4,), generator=g)[share]
        expected_noise = torch.randn((4, 4, 2, 2), generator=g)[share]
        assert torch.equal(picks, expected_picks) and torch.equal(timesteps, expected_t)
        assert torch.equal(noise, expected_noise)
        alpha = method.backbone.noise_scheduler().alphas_cumprod[expected_t].view(-1, 1, 1, 1)
        torch.testing.assert_close(noised, alpha.sqrt() * latents[expected_picks] + (1 - alpha).sqrt() * expected_noise)


def test_a_file_missing_from_a_model_folder_is_one_error_naming_it(tmp_path):
    import pytest

    from anomalygen.errors import DataError

    with pytest.raises(DataError) as error:
        _method().read_meta(tmp_path)
    assert str(error.value) == f"{tmp_path / 'textual-inversion.json'}: missing: not a fitted textual-inversion model folder"


def test_a_sample_costs_two_unet_rows_a_step_under_classifier_free_guidance_and_one_without():
    """The rows ``generation_batch`` sizes a GPU chunk by (too many: half the batch a GPU could take;
    too few: out of memory); guidance_scale 1 is no guidance (one conditional pass)."""
    rows = {g: create("textual-inversion", model="tiny", guidance_scale=g).sampling_rows() for g in (1.0, 1.5, 2.5)}
    assert rows == {1.0: 1, 1.5: 2, 2.5: 2}
