"""What every method on the shared diffusion core starts from: its options validated when it is
built, the base model and a plain prompt encoder loaded on first use."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from anomalygen.diffusion.backbone import Backbone, default_model, load_backbone
from anomalygen.diffusion.conditioning import PromptEncoder
from anomalygen.diffusion.fast import sampling_batch
from anomalygen.methods.base import AnomalyGenerator


def copy_saved(target: torch.Tensor, saved: torch.Tensor, name: str) -> None:
    """``target.copy_(saved)`` for a tensor read from a saved model, which must have exactly the target's
    shape (``copy_`` would broadcast one of width 1, or fail only when generating): else a ``ValueError``
    naming the tensor (``malformed_as_corrupt`` makes it ``FILE: corrupt (...)``)."""
    if tuple(saved.shape) != tuple(target.shape):
        raise ValueError(f"{name} has shape {tuple(saved.shape)}, expected {tuple(target.shape)} for this model "
                         "(saved with another base model?)")
    with torch.no_grad():
        target.copy_(saved)


class DiffusionGenerator(AnomalyGenerator):
    """``opt`` (the validated options), ``backbone`` (``--model``, else ``$ANOMALYGEN_MODEL``, else
    SD 1.5; the working ``resolution`` settled against its native size), ``prompts``, and the batch
    ``generate`` samples in (``generation_batch``: ``generate_batch_size``, 0 = the fast path's)."""

    CPU_BATCH: ClassVar[int] = 8  # the sampling batch on the CPU when generate_batch_size is 0

    def __init__(self, **options: Any):
        self.opt = self.OPTIONS.validate(self.name, options)
        super().__init__(**options)
        self._backbone: Backbone | None = None
        self._prompts: PromptEncoder | None = None

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = load_backbone(self.opt["model"] or default_model(), device=self.opt["device"],
                                           dtype=self.opt["mixed_precision"], seed=self.opt["seed"])
            self.opt["resolution"] = self._backbone.resolution(self.opt["resolution"])
        return self._backbone

    @property
    def prompts(self) -> PromptEncoder:
        if self._prompts is None:
            self._prompts = PromptEncoder(self.backbone.text_encoder, self.backbone.tokenizer, {})
        return self._prompts

    def sampling_rows(self) -> float:
        """UNet rows one sample costs per sampling step (2 under classifier-free guidance)."""
        return 2 if self.opt["guidance_scale"] > 1 else 1

    def generation_batch(self) -> int:
        return sampling_batch(self.backbone, self.opt["generate_batch_size"], self.CPU_BATCH, self.opt["resolution"],
                              self.sampling_rows())
