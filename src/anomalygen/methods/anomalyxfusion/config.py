"""AnomalyXFusion's options (Hu et al., 2024). No official code; the authors' partial code
(``hujiecpp/MVTec-Caption``) gives the loss, prompt and base model: each default names its source
(the paper, the authors' code, or ours)."""

from __future__ import annotations

from anomalygen.methods.kit.config import diffusion_options, mask_foreground_option
from anomalygen.options import MAX_INFERENCE_STEPS, MAX_TOKENS, Bool, Choice, Float, Int, OptionSpec, Text

OPTIONS = OptionSpec(
    **diffusion_options(),
    max_steps=Int(1000, 1),
    lr=Float(1e-4, 0, low_open=True),
    tokens=Int(4, 1, MAX_TOKENS),  # k: tokens per modality; e_X has 3k (MIF), e_sem alone k
    mif=Bool(True),  # Multi-modal In-Fusion (Eqs. 1-5)
    ddf=Bool(True),  # Dynamic Dif-Fusion (Eq. 14)
    captions=Text(None, optional=True),  # {category: {type: [caption of the i-th image]}} JSON; None = "{category} with {type}"
    category=Text(None, optional=True),  # None = the dataset's category folder name (the captions file's key)
    image_encoder=Text(None, optional=True),  # CLIP vision model: hub id / folder / "tiny"; None = model's image_encoder/, else ViT-L/14
    semantic_encoder=Text(None, optional=True),  # CLIP text model for e_sem (hub id / folder / "tiny"); None = the base's own CLIP (an LDM base needs one: the authors' ViT-B/32)
    mask_encoder=Text(None, optional=True),  # a pretrained ISTR mask encoder (.safetensors); None = trained from scratch
    mask_encoder_finetune=Bool(True),  # the pretrained one trains with MIF (the paper) | false: frozen (ours)
    loss=Choice("masked", ("masked", "plain")),  # ε-MSE inside the mask (the authors' code) | the whole image (ours)
    placement=Choice("template", ("template", "caption")),  # e_t at the template's * (authors' code) | after the caption's tokens (ours)
    template=Text("a photo of a *", contains="*"),  # the authors' prompt; its * stands for e_t's tokens
    mask_embedding=Int(256, 1, 4096),  # E_mask's output width when trained from scratch
    mask_augment=Bool(True, sampling=True),  # generation: flip / rotate / scale / move the training mask
    foreground=mask_foreground_option(),  # where augmented training masks go (ours)
    num_inference_steps=Int(50, 1, MAX_INFERENCE_STEPS, sampling=True),
    final_paste=Bool(True, sampling=True),  # the good image's pixels outside the mask (blending alone keeps its latent)
)
