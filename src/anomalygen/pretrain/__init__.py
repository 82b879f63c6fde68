"""``anomalygen pretrain``: a small latent diffusion base model trained from scratch on the user's own
images, for machines that cannot download one (see ``pretrain.run`` for the method and its choices).

``pretrain(data, out, PretrainConfig(...))`` writes a diffusers Stable Diffusion folder that
``load_backbone(out)`` (every method's ``--model``) and ``StableDiffusionPipeline.from_pretrained``
load. ``pretrain.data`` reads the images and prompts, ``pretrain.models`` holds the component
configs (presets ``tiny``, ``small``, ``base``) and the tokenizer.
"""

from anomalygen.pretrain.run import PretrainConfig, pretrain

__all__ = ["PretrainConfig", "pretrain"]
