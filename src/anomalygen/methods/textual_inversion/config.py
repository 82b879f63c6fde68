"""Textual inversion's options (Gal et al., ICLR 2023: one learned token per defect type)."""

from __future__ import annotations

from anomalygen.methods.kit.config import diffusion_options, mask_foreground_option
from anomalygen.options import MAX_INFERENCE_STEPS, Float, Int, OptionSpec, Text

OPTIONS = OptionSpec(
    **diffusion_options(),
    init_word=Text("defect"),  # each type's token starts as this word's embedding
    max_steps=Int(1000, 1),
    lr=Float(5e-3, 0, low_open=True),
    num_inference_steps=Int(50, 1, MAX_INFERENCE_STEPS, sampling=True),
    eta=Float(0.0, 0, 1, sampling=True),
    prompt=Text("a photo of {}", contains="{}"),
    foreground=mask_foreground_option(),  # where augmented training masks go (ours)
)
