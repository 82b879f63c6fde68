"""DualAnoDiff's options (Jin et al., CVPR 2025): the paper's values and the official code's
(``zhiqing0205/DualAnoDiff``), each named for its source; where they differ, both are offered."""

from __future__ import annotations

from anomalygen.diffusion.sampling import SAMPLERS
from anomalygen.masks import FOREGROUND_MODES
from anomalygen.methods.dualanodiff.bcm import BCM_MIXES
from anomalygen.methods.dualanodiff.segment import MASK_REFERENCES, MASK_SOURCES
from anomalygen.methods.kit.config import diffusion_options
from anomalygen.options import MAX_BATCH, MAX_INFERENCE_STEPS, MAX_RANK, Bool, Choice, Float, Int, OptionSpec, Text

PART_BACKGROUNDS = {"gray": 0.5, "black": 0.0}  # the anomaly-part image's value outside the mask, in [0, 1]
# the official scripts' values without / with BCM (dual-interrelated_diff vs bcm-dual-interrelated_diff)
BCM_DEFAULTS = {"batch_size": (4, 2), "num_inference_steps": (100, 50), "guidance_scale": (2.5, 2.0)}

OPTIONS = OptionSpec(
    **diffusion_options(
        batch_size=Int(None, 1, MAX_BATCH, optional=True),  # None: 4, or 2 with BCM (the official scripts)
        sampler=Choice("pndm", SAMPLERS, sampling=True),  # the official code samples with SD's PNDM
        guidance_scale=Float(None, 0, optional=True, sampling=True),  # None: 2.5, or 2.0 with BCM (official; 1.2 for screw)
    ),
    max_steps=Int(5000, 1),
    lr=Float(2e-5, 0, low_open=True),
    weight_decay=Float(1e-2, 0),  # AdamW's, as the official code
    flip=Bool(True),  # random horizontal + vertical flips of image and mask (official; it skips them for cable)
    part_background=Choice("gray", PART_BACKGROUNDS),  # I·M in [-1, 1] leaves 0 = gray outside M (official) | black
    rank=Int(32, 1, MAX_RANK),  # LoRA rank on every attention projection, per branch
    text_encoder_lora=Bool(True),  # a LoRA (same rank) on the text encoder too, per type, as the official code
    vae_latents=Choice("sample", ("sample", "mean")),  # a posterior sample per step (official) | its mean
    object_word=Text("vfx"),  # x of "a x with y" (Eq. 2); e.g. the category name
    defect_word=Text("sks"),  # y; "{type}" = the defect type's name
    saim=Bool(True),
    saim_zero_init=Bool(False),  # True: SAIM starts as the identity (the official code: default init)
    bcm=Bool(True),
    bcm_mix=Choice("paper", BCM_MIXES),  # "paper" (Eq. 5: φ + γ·MLP(φ_b), γ=0.1) | "official" ((1−a)φ + a·MLP(φ_b), a=0)
    bcm_uncond=Choice("gray", ("gray", "black"), sampling=True),  # CFG's negative background: a mid-gray image encoded (official) | black (ours)
    bcm_latent=Choice("unscaled", ("unscaled", "scaled")),  # I_b's latent without the VAE scaling factor (official) | scaled (ours)
    foreground=Choice("auto", (*FOREGROUND_MODES, "u2net")),  # BCM's object to remove: auto = U²-Net with u2net_weights (official), else masks/foreground.py
    num_inference_steps=Int(None, 1, MAX_INFERENCE_STEPS, optional=True, sampling=True),  # None: 100, or 50 with BCM (official)
    u2net_weights=Text(None, optional=True),  # U²-Net weights (u2net.pth / u2netp.pth or safetensors): the official masks
    mask_source=Choice("auto", ("auto", *MASK_SOURCES), sampling=True),  # auto: u2net with u2net_weights (official), else threshold (ours)
    mask_threshold=Float(0.15, 0, 1, sampling=True),  # how far from the part background ([0, 1]) a pixel must be
    mask_reference=Choice("nominal", MASK_REFERENCES, sampling=True),  # that background: its value | as the autoencoder returns it
    attention_threshold=Float(0.5, 0, 1, sampling=True),  # of the attention map scaled to [0, 1]
    mask_min_area=Float(5e-4, 0, 1, sampling=True),  # components smaller than this share of the image are dropped
    mask_tries=Int(4, 1, 100, sampling=True),  # draws per sample until its mask is not empty
    gradient_checkpointing=Bool(False),  # recompute UNet activations in backward: less memory, ~30 % slower
)
