"""The options every method on the diffusion core shares (same meaning, same default); a method
passes one again to change its default (``diffusion_options(guidance_scale=Float(7.5, 0, sampling=True))``)
and declares its own after them in its ``config.py``."""

from __future__ import annotations

from anomalygen.diffusion.sampling import SAMPLERS
from anomalygen.masks import FOREGROUND_MODES
from anomalygen.options import MAX_BATCH, MAX_RESOLUTION, Choice, Device, Float, Int, Option, Precision, Text
from anomalygen.seeding import MAX_SEED


def diffusion_options(**changed: Option) -> dict[str, Option]:
    """The shared options, ``changed`` ones replaced in place (so the declaration order stays)."""
    shared = dict(
        model=Text(None, optional=True),  # hub id, local diffusers folder or "tiny"; None = $ANOMALYGEN_MODEL, else the method's paper base (SD 1.5; LDM text2im-256 for anomalydiffusion)
        time_budget_s=Float(None, 0, low_open=True, optional=True),
        device=Device(),
        mixed_precision=Precision(),
        batch_size=Int(4, 1, MAX_BATCH),
        seed=Int(0, 0, MAX_SEED),
        sampler=Choice("ddim", SAMPLERS, sampling=True),
        guidance_scale=Float(1.0, 0, sampling=True),
        checkpoint_every=Int(500, 0),  # 0: only at the end
        work_dir=Text(None, optional=True),  # keep training checkpoints here (a re-run resumes); None = a temporary folder
        resolution=Int(None, 8, MAX_RESOLUTION, optional=True),  # None = the base model's native size
        generate_batch_size=Int(0, 0, MAX_BATCH, sampling=True),  # 0: auto (fast.sampling_batch; the method's CPU batch on the CPU)
    )
    unknown = set(changed) - set(shared)
    if unknown:
        raise ValueError(f"not shared options: {sorted(unknown)}")  # a method's own option goes after these
    return {**shared, **changed}


def mask_foreground_option() -> Choice:
    """``foreground`` of a method that moves augmented training masks (ours): onto the good image's object
    (``auto`` decides per image; a texture: anywhere), ``object`` or ``texture`` (anywhere)."""
    return Choice("auto", FOREGROUND_MODES, sampling=True)
