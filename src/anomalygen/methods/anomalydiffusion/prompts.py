"""The prompts the learned tokens are placed in (``prompt`` option of AnomalyDiffusion).

``"official"``: as the official code (``ldm/data/personalized.py``, training and generation
alike), each sample's prompt is drawn at random from its ``imagenet_templates_small`` list, the
placeholder "*" standing for the tokens: the 27 textual-inversion templates of Gal et al.
(ICLR 2023), then the same 27 with "a photo of" written "an illustration of", then with "a
depiction of" (81 entries, repeats kept, so the draw has the official frequencies).
``"tokens"``: the tokens alone, no words around them (ours). The paper names no template.
"""

from __future__ import annotations

import numpy as np

PROMPTS = ("official", "tokens")

TEXTUAL_INVERSION_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
OFFICIAL_TEMPLATES = TEXTUAL_INVERSION_TEMPLATES + tuple(
    t.replace("a photo of", words) for words in ("an illustration of", "a depiction of") for t in TEXTUAL_INVERSION_TEMPLATES)


def prompt(kind: str, tokens: str, rng: np.random.Generator) -> str:
    """``tokens`` (the placeholders) in a prompt of ``kind``; ``official`` draws its template from ``rng``."""
    if kind == "tokens":
        return tokens
    return OFFICIAL_TEMPLATES[int(rng.integers(len(OFFICIAL_TEMPLATES)))].format(tokens)
