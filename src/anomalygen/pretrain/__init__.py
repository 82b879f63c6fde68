"""``anomalygen pretrain``: a small latent diffusion base model trained from scratch on the user's own
images, for machines that cannot download one (see ``pretrain.run`` for the method and its choices).

``pretrain(data, out, PretrainConfig(...))`` writes a diffusers Stable Diffusion folder that
``load_backbone(out)`` (every method's ``--model``) and ``StableDiffusionPipeline.from_pretrained``
load. ``pretrain.config`` holds the settings, ``pretrain.data`` reads the images and prompts,
``pretrain.models`` holds the component configs (presets ``tiny``, ``small``, ``base``) and the tokenizer.
"""

from typing import Any

from anomalygen.pretrain.config import PretrainConfig

__all__ = ["PretrainConfig", "pretrain"]


def __getattr__(name: str) -> Any:
    if name == "pretrain":  # torch, diffusers and transformers: loaded when the work is asked for
        from anomalygen.pretrain.run import pretrain

        return pretrain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
