"""AnomalyDiffusion building blocks that need no diffusion model (Hu et al., AAAI 2024)."""

import numpy as np
import pytest
import torch

from anomalygen.diffusion.tokens import TypeTokens
from anomalygen.methods.anomalydiffusion.aar import dilate, dilation_radius, latent_weights
from anomalygen.methods.anomalydiffusion.augment import augment_pair
from anomalygen.methods.anomalydiffusion.loss import latent_mask, masked_diffusion_loss
from anomalygen.methods.anomalydiffusion.mask_model import MaskStats, binarize, border_contact
from anomalygen.methods.anomalydiffusion.spatial_encoder import SpatialEncoder

torch.set_num_threads(1)


def box_mask(size, top, left, h, w, batch=1):
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, top:top + h, left:left + w] = 1
    return mask


def test_masked_loss_gradient_is_zero_outside_the_mask():
    torch.manual_seed(0)
    mask = box_mask(32, 8, 8, 8, 12)
    weight = latent_mask(mask, (16, 16))
    eps_pred = torch.randn(1, 4, 16, 16, requires_grad=True)
    eps = torch.randn(1, 4, 16, 16)
    masked_diffusion_loss(eps_pred, eps, weight).backward()
    outside = (weight == 0).expand_as(eps_pred)
    assert eps_pred.grad[outside].abs().max() == 0
    assert eps_pred.grad[~outside].abs().min() > 0
    # the loss is the MSE over the masked cells: changing eps outside leaves it unchanged
    eps_far = eps.clone()
    eps_far[outside] += 100
    assert masked_diffusion_loss(eps_pred, eps_far, weight).item() == pytest.approx(
        masked_diffusion_loss(eps_pred, eps, weight).item())
    for normalise in ("latent_size", "mask_area"):  # all ones: the plain LDM loss
        assert masked_diffusion_loss(eps_pred, eps, torch.ones_like(weight), normalise).item() == pytest.approx(
            torch.nn.functional.mse_loss(eps_pred, eps).item(), rel=1e-5)
    # a change inside moves it by exactly its mean square over the mask (the box is latent-aligned: w in {0, 1})
    assert set(weight.unique().tolist()) == {0.0, 1.0}
    exact = eps.clone()
    assert masked_diffusion_loss(exact, eps, weight).item() == 0
    exact[~outside] += 2
    assert masked_diffusion_loss(exact, eps, weight, "mask_area").item() == pytest.approx(4.0)


def test_latent_mask_keeps_thin_defects():
    mask = torch.zeros(1, 1, 64, 64)
    mask[:, :, 30, 5:60] = 1  # one pixel wide scratch
    weight = latent_mask(mask, (8, 8))
    assert weight.sum().item() == pytest.approx(55 / 64)
    assert (weight > 0).sum().item() == 8


def test_spatial_tokens_follow_the_mask_only():
    torch.manual_seed(0)
    encoder = SpatialEncoder.from_preset("tiny", num_tokens=4, init=torch.zeros(32)).eval()
    for head in encoder.heads:  # zero-initialised (tokens start at the init word): as after training
        torch.nn.init.normal_(head.weight, std=0.1)
    a = box_mask(128, 10, 10, 30, 30)[:, 0]
    b = box_mask(128, 70, 60, 20, 50)[:, 0]
    with torch.no_grad():
        ta, ta2, tb = encoder(a), encoder(a.clone()), encoder(b)
    assert ta.shape == (1, 4, 32)
    assert torch.equal(ta, ta2)
    assert (ta - tb).abs().max() > 1e-3
    assert not torch.allclose(ta[0, 0], ta[0, 1])  # one head per token


def test_latent_weights_in_range_and_dilation_schedule():
    torch.manual_seed(0)
    good = torch.randn(2, 4, 16, 16)
    latents = good + torch.randn(2, 4, 16, 16) * torch.linspace(0.01, 2, 16)
    mask = box_mask(16, 5, 3, 4, 10, batch=2)
    for t in (999, 500, 0):
        weights = latent_weights(latents, good, mask, t)
        assert weights.shape == (2, 16, 16)
        assert weights.min() >= 1.0 and weights.max() <= 1.5
        far = dilate(mask, dilation_radius(t))[:, 0] == 0
        assert torch.all(weights[far] == 1)
    assert weights.max() > 1.0  # the closest cells are boosted
    assert dilation_radius(999) == 8 and dilation_radius(0) == 0 and dilation_radius(999, scale=16) == 17
    assert torch.all(latent_weights(good, good, mask, 500) == 1)  # nothing differs: no re-weighting


def test_type_tokens_init_and_lookup():
    tokens = TypeTokens(["crack", "hole"], 3, torch.arange(4.0))
    assert tokens(torch.tensor([1, 0])).shape == (2, 3, 4)
    assert torch.equal(tokens.tokens[1, 2], torch.arange(4.0))


def test_joint_augmentation_keeps_image_and_mask_aligned():
    image = np.zeros((90, 120, 3), np.uint8)
    mask = np.zeros((90, 120), bool)
    mask[40:50, 80:100] = True
    image[mask] = 255
    for seed in range(8):
        img, msk = augment_pair(image, mask, np.random.default_rng(seed), size=64)
        assert img.shape == (3, 64, 64) and msk.shape == (1, 64, 64)
        assert set(msk.unique().tolist()) <= {0.0, 1.0} and msk.sum() > 0
        bright = img.mean(0) > 0.5
        inter = (bright & (msk[0] > 0)).sum() / (bright | (msk[0] > 0)).sum()
        assert inter > 0.6  # the white defect is where the mask says
    again = augment_pair(image, mask, np.random.default_rng(3), size=64)
    assert torch.equal(again[0], augment_pair(image, mask, np.random.default_rng(3), size=64)[0])


def test_mask_threshold_and_rejection():
    decoded = torch.full((1, 3, 8, 8), -1.0)
    decoded[:, :, 2:4, 2:4] = 1.0
    decoded[:, :, 5, 5] = 0.5  # 0.75 in [0, 1]: below 0.8
    masks = binarize(decoded)
    assert masks.sum() == 4 and masks[0, 2:4, 2:4].all()
    train = [np.pad(np.ones((4, 4), bool), 6), np.pad(np.ones((6, 6), bool), 5)]
    stats = MaskStats.from_masks(train)
    assert stats.max_border == 0
    assert stats.rejection(np.pad(np.ones((5, 5), bool), 5)) is None
    assert stats.rejection(np.zeros((16, 16), bool)) == "empty"
    assert "area" in stats.rejection(np.pad(np.ones((1, 1), bool), 7, mode="constant")[:16, :16])
    hugging = np.zeros((16, 16), bool)
    hugging[:, :4] = True
    stats_big = MaskStats(min_area=0.1, max_area=0.3, max_border=0.0)
    assert "border" in stats_big.rejection(hugging)
    assert border_contact(hugging) == pytest.approx(22 / 60)
