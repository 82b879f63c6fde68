"""CAGen's downstream protocol (Jiang et al., ICASSP 2024, Sec. 3.3): train DRAEM with a share of its
simulated anomalies replaced by generated pairs, test on the real test split.

DRAEM (Zavrtanik et al., ICCV 2021) as its paper and official code train it: every training sample is
a ``train/good`` image (rotated by U(-90, 90) degrees with probability 0.3), left normal with
probability 0.5, else given a simulated anomaly (Perlin mask x augmented texture, Eq. 1:
``synthesis.draem``). The reconstructive sub-network maps the sample back to the good image (L2 + SSIM
loss, Eq. 2-3), the discriminative one segments the anomaly from (reconstruction, sample) with the
focal loss (Eq. 4); Adam lr 1e-4 for both, x0.2 at 80 % and 90 % of 700 epochs, batch 8, 256 px.
Anomaly map = softmax of the anomalous class; image score = max of the 21 x 21 average-pooled map.

CAGen's paper replaces "30 % of the training set" by generated anomalies. Two readings
(``share_of``): ``"training_set"`` (default, the paper's words): each training sample is a generated
pair with probability ``ratio``, and the others are DRAEM's (half normal, half simulated), so 30 %
of the samples are generated and 35 % simulated; ``"anomalies"`` (ours, an option): ``ratio`` of
DRAEM's simulated anomalies are replaced, i.e. 15 % of the samples are generated. CAGen has no
public code; the paper's numbers most likely used its own words, hence the default. A
generated pair's reconstruction target is its source good image (read from the generated folder's
manifest) when its method keeps the image around the mask; pairs without one (whole-image
methods) train the discriminative loss only. The same run without generated pairs (DRAEM alone,
same seed) is the baseline beside it. The last epoch is tested (no test-set selection) on the
``clean`` split (real ``test/good`` + the test two thirds of each defect type, the generator's
training defects left out) or, as the paper, on the ``full`` test set (``test="full"``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from anomalygen.data.images import load_image
from anomalygen.errors import AnomalygenError, OptionError
from anomalygen.evaluation.inputs import EvaluationData, resize_image, resize_mask
from anomalygen.evaluation.localization import (BATCH, LR, MAX_RESOLUTION, MAX_WIDTH, as_input, diverged, measure,
                                                tensor_images, tensor_masks)
from anomalygen.evaluation.unet import DiscriminativeUNet, ReconstructiveNet, focal_loss
from anomalygen.options import Choice, Float, Int, OptionSpec
from anomalygen.progress import Bar
from anomalygen.seeding import check_seed, sample_rng
from anomalygen.synthesis.draem import load_textures, pick_texture, simulate

TESTS = ("clean", "full")
SHARES = ("training_set", "anomalies")  # what ``ratio`` is a share of: CAGen's words | ours
# DRAEM's settings (paper and official code), and the reduced ones used on CPU unless set.
PAPER = {"epochs": 700, "resolution": 256, "rec_base": 128, "disc_base": 64}
CPU_REDUCED = {"epochs": 20, "resolution": 64, "rec_base": 16, "disc_base": 8}


@dataclass
class DraemAugmentationConfig:
    """The protocol's knobs. ``None`` fields take DRAEM's values on CUDA and ``CPU_REDUCED`` on CPU
    (the report names every value that differs from DRAEM's). ``texture_source`` is DRAEM's anomaly
    source: "skimage" (bundled textures) or a folder (DRAEM uses DTD). ``workers``: data-loading
    processes (None: 8 on CUDA, 0 on CPU)."""

    ratio: float = 0.3
    share_of: str = "training_set"
    epochs: int | None = None
    resolution: int | None = None
    rec_base: int | None = None
    disc_base: int | None = None
    batch_size: int = 8
    lr: float = 1e-4
    test: str = "clean"
    baseline: bool = True
    texture_source: str = "skimage"
    workers: int | None = None
    seed: int = 0

    FIELDS = OptionSpec(
        ratio=Float(low=0, high=1), epochs=Int(low=1, optional=True), rec_base=Int(low=1, high=MAX_WIDTH, optional=True),
        disc_base=Int(low=1, high=MAX_WIDTH, optional=True),
        resolution=Int(low=32, high=MAX_RESOLUTION, multiple=32, optional=True), batch_size=BATCH, lr=LR,
        test=Choice(None, TESTS), share_of=Choice(None, SHARES), workers=Int(low=0, optional=True))

    def __post_init__(self) -> None:
        self.FIELDS.check_fields(self, "draem_augmentation")
        check_seed(self.seed)
        if not isinstance(self.texture_source, str) or (self.texture_source != "skimage"
                                                         and not Path(self.texture_source).is_dir()):
            raise OptionError("draem_augmentation.texture_source",
                              f"{self.texture_source}: not a folder of texture images (or 'skimage')")

    def resolved(self, device: torch.device) -> "DraemAugmentationConfig":
        """A copy with every ``None`` filled in for ``device``."""
        fill = PAPER if device.type == "cuda" else CPU_REDUCED
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({key: fill[key] for key in fill if values[key] is None})
        values["workers"] = values["workers"] if values["workers"] is not None else (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
        return DraemAugmentationConfig(**values)

    def label(self) -> str:
        """"DRAEM's settings", or the values that differ from them."""
        changed = [f"{key} {getattr(self, key)} (DRAEM: {value})" for key, value in {**PAPER, "batch_size": 8, "lr": 1e-4}.items()
                   if getattr(self, key) != value]
        return "DRAEM's settings" if not changed else "reduced settings: " + ", ".join(changed)


@dataclass
class GeneratedPair:
    """A generated (image, mask) and its reconstruction target (None: discriminative loss only)."""

    image: np.ndarray
    mask: np.ndarray
    target: np.ndarray | None


def generated_pairs(data: EvaluationData, size: int) -> list[GeneratedPair]:
    """Every generated pair at ``size`` px with its source good image as reconstruction target when
    the manifest names one and the method keeps the image around the mask (the ``outside_mask`` policy
    its ``run.json`` records; a run without one is taken as keeping nothing)."""
    pairs, targets = [], {}  # source path -> resized good image (many pairs share one)
    for example in (e for examples in data.generated.values() for e in examples):
        run, line = data.manifest.get(Path(example.source).resolve(), ({}, {})) if example.source else ({}, {})
        source = line.get("source")
        keeps = run.get("outside_mask", "none") != "none"
        if keeps and source and source not in targets and Path(source).is_file():
            targets[source] = resize_image(load_image(source), size)
        target = targets.get(source) if keeps else None
        pairs.append(GeneratedPair(resize_image(example.image, size), resize_mask(example.mask, size), target))
    return pairs


def _rotate(image: np.ndarray, angle: float, nearest: bool = False) -> np.ndarray:
    """Rotate about the centre, zeros outside (DRAEM's imgaug ``Affine(rotate)``)."""
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


class TrainingSamples(torch.utils.data.Dataset):
    """DRAEM's training samples, item ``epoch * len(good) + k`` drawn from its own seeded generator
    (so that any number of loader workers gives the same run). Items are (sample, target, mask,
    has_target) as uint8 HWC, uint8 HWC, bool HW and bool."""

    def __init__(self, good: list[np.ndarray], pairs: list[GeneratedPair], ratio: float, texture_source: str, seed: int,
                 share_of: str = "training_set"):
        self.good, self.pairs, self.ratio, self.seed, self.share_of = good, pairs, ratio, seed, share_of
        self.source = pick_texture(load_textures(texture_source))

    def __getitem__(self, item: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        rng = np.random.default_rng([self.seed, item])
        epoch, k = divmod(item, len(self.good))
        image = self.good[int(np.random.default_rng([self.seed, epoch]).permutation(len(self.good))[k])]
        angle = rng.uniform(-90, 90) if rng.random() < 0.3 else None
        image = image if angle is None else _rotate(image, angle)  # DRAEM rotates the good image first
        sample, target, mask = image, image, np.zeros(image.shape[:2], bool)  # normal, probability 0.5
        if self.share_of == "training_set":  # CAGen's words: ratio of all samples generated, the rest DRAEM's
            generated = bool(self.pairs) and rng.random() < self.ratio
            anomalous = generated or rng.random() < 0.5
        else:  # ours: ratio of DRAEM's anomalous half
            anomalous = rng.random() < 0.5
            generated = anomalous and bool(self.pairs) and rng.random() < self.ratio
        if anomalous:
            if generated:
                pair = self.pairs[int(rng.integers(len(self.pairs)))]
                sample, target, mask = pair.image, pair.target, pair.mask
                if angle is not None:  # a generated pair turns with its mask and target
                    sample, mask = _rotate(sample, angle), _rotate(mask.astype(np.uint8), angle, nearest=True) > 0
                    target = None if target is None else _rotate(target, angle)
            else:
                sample, mask, _ = simulate(image, sample_rng(int(rng.integers(2**31)), 0), self.source)
        has_target = target is not None
        target = target if has_target else np.zeros_like(sample)
        return sample, target, mask, has_target


def _batches(count: int, epochs: int, batch_size: int) -> list[list[int]]:
    """Item indices per batch, epoch by epoch (the last batch of an epoch may be smaller)."""
    return [list(range(e * count + s, e * count + min(s + batch_size, count))) for e in range(epochs) for s in range(0, count, batch_size)]


class Draem(torch.nn.Module):
    """Both sub-networks; ``forward`` returns (reconstruction, segmentation logits)."""

    def __init__(self, rec_base: int, disc_base: int):
        super().__init__()
        self.reconstructive = ReconstructiveNet(3, rec_base)
        self.discriminative = DiscriminativeUNet(6, 2, disc_base)

    def reconstruct_and_segment(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction = self.reconstructive(x)
        return reconstruction, self.discriminative(torch.cat([reconstruction, x], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The segmentation logits (what the protocol tests)."""
        return self.reconstruct_and_segment(x)[1]


def draem_loss(reconstruction, logits, target, mask, has_target) -> torch.Tensor:
    """L2 + SSIM loss (over samples with a reconstruction target) + focal loss (DRAEM Eq. 2-4)."""
    reconstruction = reconstruction.float()
    weight = has_target.float()
    l2 = ((reconstruction - target) ** 2).flatten(1).mean(1)
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim  # seconds to import

    structural = 1 - ssim(reconstruction, target, data_range=1.0, reduction="none")
    rec = ((l2 + structural) * weight).sum() / weight.sum().clamp(min=1)
    return rec + focal_loss(logits, mask)


def train_draem(good: list[np.ndarray], pairs: list[GeneratedPair], config: DraemAugmentationConfig,
                device: torch.device, what: str) -> Draem:
    """Train DRAEM on ``good`` (resized) with ``config.ratio`` of its samples (``share_of``
    "training_set") or of its anomalies ("anomalies") from ``pairs``."""
    torch.manual_seed(config.seed)
    model = Draem(config.rec_base, config.disc_base).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    milestones = [int(config.epochs * 0.8), int(config.epochs * 0.9)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.2)
    samples = TrainingSamples(good, pairs, config.ratio, config.texture_source, config.seed, config.share_of)
    batches = _batches(len(good), config.epochs, config.batch_size)
    loader = torch.utils.data.DataLoader(samples, batch_sampler=batches, num_workers=config.workers,
                                         collate_fn=_collate, pin_memory=device.type == "cuda")
    epoch = 0
    with Bar(config.epochs, what, leave=False) as bar:
        for indices, (sample, target, mask, has_target) in zip(batches, loader):
            if indices[0] // len(good) != epoch:
                epoch += 1
                scheduler.step()
                bar.update(1)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                reconstruction, logits = model.reconstruct_and_segment(as_input(sample, device))
            loss = draem_loss(reconstruction, logits, as_input(target, device), mask.to(device), has_target.to(device))
            if not torch.isfinite(loss):
                raise diverged("DRAEM", epoch + 1, "the training loss is NaN or infinite", device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        bar.update(1)  # the last epoch
    return model


def _collate(items) -> tuple[torch.Tensor, ...]:
    """Samples and targets as uint8 NCHW (``localization.as_input`` scales them on the device)."""
    sample, target, mask, has_target = zip(*items)
    return (torch.from_numpy(np.stack(sample)).permute(0, 3, 1, 2), torch.from_numpy(np.stack(target)).permute(0, 3, 1, 2),
            torch.from_numpy(np.stack(mask)), torch.tensor(has_target))


def run_draem_augmentation(data: EvaluationData, config: DraemAugmentationConfig, device: torch.device,
                           baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """DRAEM + generated pairs (and DRAEM alone unless ``baseline`` is given or ``config.baseline``
    is off), tested on the real test split. Returns the report section."""
    config = config.resolved(device)
    size = config.resolution
    test = [e for examples in data.test_defects.values() for e in examples]
    if config.test == "full":
        test = [e for examples in data.train_defects.values() for e in examples] + test
    if not test:
        raise AnomalygenError(f"{data.category}: no real test defect images for the DRAEM-augmentation protocol")
    images = tensor_images(data.test_good + [e.image for e in test], size)
    masks = torch.cat([torch.zeros(len(data.test_good), size, size, dtype=torch.bool), tensor_masks([e.mask for e in test], size)])
    good = [resize_image(image, size) for image in data.train_good]
    pairs = generated_pairs(data, size)
    result: dict[str, Any] = {
        "config": asdict(config), "settings": config.label(), "test": config.test,
        "test_images": {"good": len(data.test_good), "defect": len(test)},
        "generated_pairs": len(pairs), "with_reconstruction_target": sum(p.target is not None for p in pairs),
    }
    model = train_draem(good, pairs, config, device, f"DRAEM + generated ({config.ratio:.0%} of the {config.share_of.replace('_', ' ')})")
    result["augmented"] = measure(model, images, masks, device, config.epochs, "DRAEM")[0]
    if baseline is None and config.baseline:
        alone = train_draem(good, [], config, device, "DRAEM alone")
        baseline = measure(alone, images, masks, device, config.epochs, "DRAEM")[0]
    if baseline is not None:
        result["draem"] = baseline
    return result
