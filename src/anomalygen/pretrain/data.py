"""The images a prior trains on, with their prompts, read and checked before anything is written.

Every category of every ``--data`` (a dataset root or one category folder) gives its
``train/good`` images, prompted ``"a photo of {category}"``; with ``include_defects`` also the
training third of each defect type (``paper_split``: never the test two-thirds), prompted
``"a photo of {category} with {defect type}"``. Images of any size are accepted: each is resized
(bicubic, aspect kept) so that its shorter side is the training resolution, and training takes
random square crops of it (and horizontal flips); a defect image's mask is resized (nearest) and
cropped with it (``crops``). A few good images per category are held back
(never trained on) to measure the autoencoder. By default each crop's category is drawn first,
uniformly, then an image of it (``balanced``): a prior of several categories learns each of them,
however unequal their image counts (magnetic_tile's 280 good images against hazelnut_toy's 32
would give the second 1 crop in 10); ``balanced=False`` draws uniformly over all images.

``colour_variants`` recolours images for the autoencoder stage: the good images of one part show
few colours, and an autoencoder trained on them alone decodes every latent into those colours (on
hazelnut_toy, 33 images: a gray or a blue image came back hazelnut yellow), so no method on top can
draw a defect of another colour (a blue stain) or DualAnoDiff's gray anomaly-part background.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from anomalygen.data import list_categories, load_category, load_image, load_mask, paper_split
from anomalygen.data.readers import category_layout
from anomalygen.diffusion.tiny import TINY_WORDS, clip_words
from anomalygen.errors import DataError

GOOD_PROMPT = "a photo of {category}"
DEFECT_PROMPT = "a photo of {category} with {defect}"
HELD_BACK = 0.05  # share of each category's good images held back (at least 1 when it has 2, at most 8)
MAX_HELD_BACK = 8


CHANNEL_ORDERS = list(itertools.permutations(range(3)))  # (0, 1, 2) first: the original colours
COLOURINGS = 2 * len(CHANNEL_ORDERS)  # each channel order, as it is and inverted; 0 = the original


def colour_variant(pixels: torch.Tensor, colouring: int) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] in ``colouring`` (0 .. COLOURINGS - 1): their channels in
    ``CHANNEL_ORDERS[colouring % 6]``, negated (the complementary colours) from ``colouring`` 6 on."""
    out = pixels[:, list(CHANNEL_ORDERS[colouring % len(CHANNEL_ORDERS)])]
    return -out if colouring >= len(CHANNEL_ORDERS) else out


def colour_variants(pixels: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """Each image, with probability ``p``, in one of the 11 other colourings (``colour_variant``, the
    original excluded); else unchanged. Draws from ``generator``, the same draws whatever ``p``."""
    out = pixels.clone()
    for i in range(len(pixels)):
        recolour = torch.rand(1, generator=generator).item() < p
        colouring = 1 + int(torch.randint(COLOURINGS - 1, (1,), generator=generator))
        if recolour:
            out[i : i + 1] = colour_variant(pixels[i : i + 1], colouring)
    return out


def prompt_name(name: str) -> str:
    """A folder name as words of a prompt: ``metal_nut`` -> ``metal nut``."""
    return " ".join(name.replace("_", " ").replace("-", " ").split())


@dataclass
class PretrainImages:
    """Images resized to shorter side = ``resolution`` (uint8 HxWx3) and the index of each one's prompt."""

    resolution: int
    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray | None] = field(default_factory=list)  # a defect image's (H, W) bool mask; None: good
    prompt_ids: list[int] = field(default_factory=list)
    held_back: list[np.ndarray] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)
    upscaled: int = 0  # images whose shorter side was below the resolution
    by_category: dict[int, list[int]] = field(default_factory=dict)  # index in ``categories`` -> its images' indices
    balanced: bool = True  # draw a category first, then an image of it (else any image)

    @property
    def words(self) -> list[str]:
        """The tokenizer's vocabulary: prompt words, category and defect-type words, the core's prompt words."""
        text = " ".join([*self.prompts, *map(prompt_name, self.categories + self.defect_types), *TINY_WORDS])
        return list(dict.fromkeys(clip_words(text)))

    def add(self, image: np.ndarray, prompt: str, held_back: bool = False, mask: np.ndarray | None = None) -> None:
        """``image`` (and a defect image's ``mask``) of the last category added to ``categories``."""
        if held_back:
            self.held_back.append(image)
            return
        if prompt not in self.prompts:
            self.prompts.append(prompt)
        self.images.append(image)
        self.masks.append(mask)
        self.prompt_ids.append(self.prompts.index(prompt))
        self.by_category.setdefault(len(self.categories) - 1, []).append(len(self.images) - 1)

    def _pick(self, size: int, generator: torch.Generator) -> list[int]:
        if not self.balanced:
            return torch.randint(len(self.images), (size,), generator=generator).tolist()
        groups = list(self.by_category.values())
        chosen = torch.randint(len(groups), (size,), generator=generator).tolist()
        return [groups[k][int(torch.randint(len(groups[k]), (1,), generator=generator))] for k in chosen]

    def crops(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """``size`` random crops (B, 3, R, R) in [-1, 1], half of them flipped, their prompt ids, and
        their defect masks cropped and flipped alike ((B, R, R) bool, all False for good images);
        every draw comes from ``generator``."""
        picks = self._pick(size, generator)
        crops, masks = [], []
        r = self.resolution
        for i in picks:
            image, mask = self.images[i], self.masks[i]
            y = int(torch.randint(image.shape[0] - r + 1, (1,), generator=generator))
            x = int(torch.randint(image.shape[1] - r + 1, (1,), generator=generator))
            window = (slice(y, y + r), slice(x, x + r))
            crop, crop_mask = image[window], np.zeros((r, r), bool) if mask is None else mask[window]
            if torch.rand(1, generator=generator).item() < 0.5:
                crop, crop_mask = crop[:, ::-1], crop_mask[:, ::-1]
            crops.append(torch.from_numpy(np.array(crop)))
            masks.append(torch.from_numpy(np.array(crop_mask)))
        pixels = torch.stack(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
        return pixels, [self.prompt_ids[i] for i in picks], torch.stack(masks)

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[int]]:
        """``crops`` without the masks."""
        pixels, ids, _ = self.crops(size, generator)
        return pixels, ids

    def held_back_batch(self) -> torch.Tensor:
        """The held-back images, centre-cropped, (N, 3, R, R) in [-1, 1]."""
        r = self.resolution
        crops = [im[(im.shape[0] - r) // 2 : (im.shape[0] - r) // 2 + r, (im.shape[1] - r) // 2 : (im.shape[1] - r) // 2 + r]
                 for im in self.held_back]
        return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1


def resize_short_side(image: np.ndarray, size: int, resample: int = Image.BICUBIC) -> np.ndarray:
    """Resize so that the shorter side is ``size`` px (bicubic by default, aspect ratio kept)."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    shape = (max(size, round(w * scale)), max(size, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(shape, resample)) if shape != (w, h) else image


def _categories(root: Path) -> list:
    """The categories of one ``--data``: the folder itself or every category under a dataset root."""
    if root.is_dir() and category_layout(root):
        return [load_category(root)]
    names = list_categories(root)
    if not names:
        load_category(root)  # raises the reader's error: no such folder, not a dataset, ...
    return [load_category(root, name) for name in names]


def load_pretrain_images(roots: list[Path], resolution: int, include_defects: bool = False,
                         balanced: bool = True) -> PretrainImages:
    """Read and decode every training image of ``roots``; a missing ``train/good`` or an unreadable
    file is a ``DataError`` naming it."""
    data = PretrainImages(resolution, balanced=balanced)
    for root in roots:
        for category in _categories(Path(root)):
            name = prompt_name(category.name)
            data.categories.append(category.name)
            data.defect_types += [t for t in category.defect_types if t not in data.defect_types]
            if not category.train_good:
                raise DataError(category.root / "train" / "good", "no good images to train on")
            goods = category.train_good
            held = min(MAX_HELD_BACK, max(1, round(HELD_BACK * len(goods)))) if len(goods) >= 2 else 0
            records = [(r, GOOD_PROMPT.format(category=name), i >= len(goods) - held) for i, r in enumerate(goods)]
            if include_defects:
                train, _ = paper_split(category.defects)
                records += [(r, DEFECT_PROMPT.format(category=name, defect=prompt_name(t)), False)
                            for t, rs in train.items() for r in rs]
            for record, prompt, held_back in records:
                image = load_image(record.path)
                data.upscaled += min(image.shape[:2]) < resolution
                mask = None
                if record.mask_paths:
                    mask = resize_short_side(load_mask(record).astype(np.uint8), resolution, Image.NEAREST).astype(bool)
                data.add(resize_short_side(image, resolution), prompt, held_back, mask)
    if not data.images:
        raise DataError(Path(roots[0]), "no good images to train on")
    return data
