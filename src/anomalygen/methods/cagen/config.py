"""CAGen's options (Jiang et al., ICASSP 2024). No official code exists: the paper's values are
named, every other default is ours (or diffusers') and says so."""

from __future__ import annotations

from anomalygen.masks import FOREGROUND_MODES
from anomalygen.methods.kit.config import diffusion_options
from anomalygen.options import MAX_INFERENCE_STEPS, Bool, Choice, Float, Int, OptionSpec, Text

FUSIONS = ("end", "step")

OPTIONS = OptionSpec(
    **diffusion_options(guidance_scale=Float(7.5, 0, sampling=True)),  # not in the paper; diffusers' ControlNet pipeline default
    epochs=Int(1000, 1),  # the paper: 1000 epochs over the training images
    max_steps=Int(None, 1, optional=True),  # None = epochs × images / batch_size
    lr=Float(1e-5, 0, low_open=True),  # ours: the paper gives no learning rate
    max_per_type=Int(3, 1),  # real defects per type the ControlNet trains on (the paper: 3)
    training_pick=Choice("random", ("random", "first")),  # which of them: drawn at random with the seed (the paper) | the first (ours)
    prompt=Text("{defect} {category}", contains="{defect}"),
    captions=Text(None, optional=True),  # a captions file (MVTec Caption format): each training image's caption is its prompt
    category=Text(None, optional=True),  # None = the dataset's category folder name (the captions file's key)
    mask_source=Choice("perlin", ("perlin", "augment"), sampling=True),  # foreground × Perlin (paper) | augmented training masks
    foreground=Choice("auto", FOREGROUND_MODES),
    perlin_threshold=Float(0.5, 0, 1, sampling=True),
    fusion=Choice("end", FUSIONS, sampling=True),  # "end": Eqs. 2-5, fused once | "step": blended every step (ablation)
    num_inference_steps=Int(50, 1, MAX_INFERENCE_STEPS, sampling=True),
    final_paste=Bool(False, sampling=True),  # True: the good image's pixels outside the mask (the paper decodes z_f as is)
)
