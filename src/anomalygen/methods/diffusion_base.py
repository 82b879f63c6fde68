"""What every method on the shared diffusion core starts from: its options validated when it is
built, the base model and a plain prompt encoder loaded on first use."""

from __future__ import annotations

from typing import Any

from anomalygen.diffusion.backbone import Backbone, default_model, load_backbone
from anomalygen.diffusion.conditioning import PromptEncoder
from anomalygen.methods.base import AnomalyGenerator


class DiffusionGenerator(AnomalyGenerator):
    """``opt`` (the validated options), ``backbone`` (``--model``, else ``$ANOMALYGEN_MODEL``, else
    SD 1.5; the working ``resolution`` settled against its native size) and ``prompts``."""

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
