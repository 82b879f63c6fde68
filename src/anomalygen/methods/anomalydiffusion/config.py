"""AnomalyDiffusion's options (Hu et al., AAAI 2024). Where the paper and the official code
(``sjtuplayer/anomalydiffusion``) differ, or where a choice is ours, each is an option named for its
source (the generator's docstring lists them); ablation switches are the rows of the paper's Table 4."""

from __future__ import annotations

from anomalygen.diffusion.sampling import SAMPLERS
from anomalygen.methods.anomalydiffusion.aar import AAR_TOKENS, AAR_VARIANTS, APPLY
from anomalygen.methods.anomalydiffusion.loss import NORMALISATIONS
from anomalygen.methods.anomalydiffusion.mask_model import MASK_FILTERS, OFFICIAL_THRESHOLD
from anomalygen.methods.anomalydiffusion.prompts import PROMPTS
from anomalygen.methods.anomalydiffusion.spatial_encoder import PRESETS
from anomalygen.methods.kit.config import diffusion_options, mask_foreground_option
from anomalygen.options import MAX_INFERENCE_STEPS, MAX_TOKENS, Bool, Choice, Float, Int, OptionSpec, Text

OPTIONS = OptionSpec(
    **diffusion_options(),  # resolution None = the base's native size (LDM text2im 256, as the paper; SD 1.x 512)
    init_word=Text("defect"),  # e_a and e_m start as this word's embedding
    max_steps=Int(2000, 1),
    lr=Float(None, 0, low_open=True, optional=True),  # None = 5e-3 × batch_size, as the official code scales it
    num_anomaly_tokens=Int(8, 1, MAX_TOKENS),  # k (paper; the official code uses 4)
    num_spatial_tokens=Int(4, 1, MAX_TOKENS),  # n
    spatial_encoder=Choice(None, sorted(PRESETS), optional=True),  # None = "tiny" for the tiny model, else "resnet50"
    spatial_token_bound=Float(1.0, 0, low_open=True, optional=True),  # ours: |E(m) − init| < this × the vocabulary's mean token norm; None = unbounded (official)
    prompt=Choice("official", PROMPTS),  # "official": a random textual-inversion template around the tokens (prompts.py) | "tokens": the tokens alone (ours)
    aar=Choice("off", AAR_VARIANTS, sampling=True),  # "off" unless asked (official: --adaptive_mask, for texture defects) | "latent" (official code) | "paper" (Eq. 7, one extra UNet pass per step)
    aar_tokens=Choice("official", AAR_TOKENS, sampling=True),  # "official": start column + anomaly + spatial tokens | "anomaly": the anomaly tokens only (ours)
    aar_apply=Choice(None, APPLY, optional=True, sampling=True),  # "multiply_logits" | "probabilities" | "add_log_logits"; None = the variant's own (aar.py)
    aar_dilation_scale=Int(None, 0, optional=True, sampling=True),  # latent AAR; None = the official rule: 16 at 50 DDIM steps, else 8
    masked_loss=Bool(True),
    masked_loss_norm=Choice("latent_size", NORMALISATIONS),  # "latent_size": ÷ C·h·w (official code) | "sum": Eq. 5 as written | "mask_area": ÷ C·mask area (ours)
    spatial_encoder_lr=Float(None, 0, low_open=True, optional=True),  # None = lr (official: one Adam over e_a, e_m and E)
    spatial_embedding=Bool(True),
    mask_source=Choice("learned", ("learned", "augment")),  # "learned" (Eq. 9) | "augment" (augmented training masks)
    foreground=mask_foreground_option(),  # where augmented training masks go (ours)
    mask_tokens=Int(4, 1, MAX_TOKENS),  # k'
    num_inference_steps=Int(200, 1, MAX_INFERENCE_STEPS, sampling=True),
    eta=Float(1.0, 0, 1, sampling=True),
    mask_sampler=Choice("ddim", SAMPLERS, sampling=True),
    mask_inference_steps=Int(100, 1, MAX_INFERENCE_STEPS, sampling=True),
    mask_guidance_scale=Float(5.0, 0, sampling=True),
    mask_eta=Float(1.0, 0, 1, sampling=True),  # official: log_images' ddim_eta = 1
    mask_threshold=Float(OFFICIAL_THRESHOLD, -1, 1, sampling=True),  # on the decoded mask's [-1, 1] channel mean (official 0.8; ours was 0.6)
    mask_filter=Choice("official", MASK_FILTERS, sampling=True),  # "official": > 1/3 of a border side (and empty) | "ours": area and border vs the training masks
    mask_tries=Int(8, 0, 100, sampling=True),
)
