"""``PretrainConfig``: the settings of a ``pretrain`` run, their defaults and their checks.

Light to import (torch and the models load only in ``check``), so that the command line takes its
defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from anomalygen.errors import OptionError
from anomalygen.options import MAX_BATCH, Choice, Float, Int, OptionSpec, check, problem
from anomalygen.seeding import check_seed

BALANCES = ("categories", "images")
STEPS = Int(low=1)
LR = Float(low=0, high=1, low_open=True)
DEFECT_WEIGHT = Float(low=0, high=1000)


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

    FIELDS = OptionSpec(
        resolution=Int(low=32, high=512, multiple=32), balance=Choice(None, BALANCES),
        vae_steps=STEPS, batch_size=Int(low=1, high=MAX_BATCH), checkpoint_every=STEPS, sample_every=STEPS,
        max_steps=Int(low=0), unet_lr=LR, vae_lr=LR, time_budget_s=Float(low=0, low_open=True, optional=True),
        vae_colour_augment=Float(low=0, high=1), vae_defect_weight=DEFECT_WEIGHT, unet_defect_weight=DEFECT_WEIGHT,
        vae_share=Float(low=0, high=1, low_open=True, high_open=True), uncond_prob=Float(low=0, high=1, high_open=True),
        ema_decay=Float(low=0, high=1, high_open=True))

    def check(self) -> None:
        """Every value, before anything is read or written (an ``OptionError`` naming the field)."""
        from anomalygen.devices import resolve_device  # (torch: not for the command line's defaults)
        from anomalygen.pretrain.models import PRESETS

        self.FIELDS.check_fields(self)
        check("size", Choice(None, tuple(PRESETS)), self.size)
        for name in ("vae_defect_weight", "unet_defect_weight"):
            if getattr(self, name) and not self.include_defects:
                raise OptionError(name, problem(getattr(self, name), "0 without include_defects (it weighs the defect "
                                                                     "pixels, which only the defect images have)"))
        check_seed(self.seed)
        resolve_device(self.device)
