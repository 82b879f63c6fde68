"""``PretrainConfig``: the settings of a ``pretrain`` run, their defaults and their checks.

Light to import (torch and the models load only in ``check``), so that the command line takes its
defaults from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from anomalygen.errors import AnomalygenError, OptionError
from anomalygen.seeding import check_seed

BALANCES = ("categories", "images")


@dataclass
class PretrainConfig:
    resolution: int = 64
    size: str = "small"  # tiny | small | base (pretrain.models.PRESETS)
    vae_steps: int = 3000
    max_steps: int = 30000  # UNet steps; 0: train the autoencoder only
    batch_size: int = 16
    vae_lr: float = 2e-4
    unet_lr: float = 2e-4
    kl_weight: float = 1e-6
    vae_colour_augment: float = 0.5  # share of autoencoder crops recoloured (data.colour_variants)
    vae_defect_weight: float = 0.0  # ours: + this × the L1 over defect pixels (include_defects' masks); 0: LDM's loss
    unet_defect_weight: float = 0.0  # ours: + this × the ε loss over the latents a defect touches; 0: DDPM's loss
    vae_attention: bool | None = None  # the autoencoder's mid-block self-attention; None: the size's (LDM's: on)
    ema_decay: float = 0.999
    uncond_prob: float = 0.1
    include_defects: bool = False
    balance: str = "categories"  # categories: each crop's category drawn first | images: any image (data.PretrainImages)
    time_budget_s: float | None = None  # this run's wall time; the autoencoder gets at most vae_share of it
    vae_share: float = 0.25
    checkpoint_every: int = 250
    sample_every: int = 500
    seed: int = 0
    device: str | None = None

    def check(self) -> None:
        """Every value, before anything is read or written (an ``OptionError`` naming the field)."""
        from anomalygen.devices import resolve_device  # (torch: not for the command line's defaults)
        from anomalygen.pretrain.models import PRESETS

        if self.resolution % 32 or not 32 <= self.resolution <= 512:
            raise OptionError("resolution", f"{self.resolution}: use a multiple of 32 from 32 to 512 (64, 128 or 256)")
        if self.balance not in BALANCES:
            raise OptionError("balance", f"{self.balance!r}: use one of {', '.join(BALANCES)}")
        if self.size not in PRESETS:
            raise OptionError("size", f"{self.size!r}: use one of {', '.join(PRESETS)}")
        for name in ("vae_steps", "batch_size", "checkpoint_every", "sample_every"):
            if getattr(self, name) < 1:
                raise OptionError(name, f"{getattr(self, name)}: must be at least 1")
        if self.batch_size > 256:
            raise OptionError("batch_size", f"{self.batch_size}: at most 256 images per batch")
        if self.max_steps < 0:
            raise OptionError("max_steps", f"{self.max_steps}: must be at least 0 (0: the autoencoder only)")
        for name, value in (("unet_lr", self.unet_lr), ("vae_lr", self.vae_lr)):
            if not (math.isfinite(value) and 0 < value <= 1):
                raise OptionError(name, f"{value:g}: must be a learning rate in (0, 1]")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise OptionError("time_budget_s", f"{self.time_budget_s:g}: must be more than 0 seconds")
        if not (math.isfinite(self.vae_colour_augment) and 0 <= self.vae_colour_augment <= 1):
            raise OptionError("vae_colour_augment", f"{self.vae_colour_augment:g}: must be a share in [0, 1]")
        for name in ("vae_defect_weight", "unet_defect_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 1000):
                raise OptionError(name, f"{value:g}: must be a weight in [0, 1000]")
            if value and not self.include_defects:
                raise OptionError(name, f"{value:g}: weighs the defect pixels, which only the defect images (include_defects) have")
        if not (math.isfinite(self.vae_share) and 0 < self.vae_share < 1):
            raise OptionError("vae_share", f"{self.vae_share:g}: must be a share of the time budget in (0, 1)")
        check_seed(self.seed)
        if not (0 <= self.uncond_prob < 1 and 0 <= self.ema_decay < 1):
            raise AnomalygenError("uncond_prob and ema_decay must lie in [0, 1)")
        resolve_device(self.device)
