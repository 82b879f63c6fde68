"""anomalib 2.7 on generated defects (optional extra: ``pip install 'anomalygen[anomalib]'``).

- ``folder_datamodule``: anomalib's ``Folder`` datamodule that trains on the real good images and
  tests on the generated defects (+ the real ``test/good`` images), for any anomalib model.
- ``training_datamodule``: the generated image + mask pairs in the *training* split (label 1 and
  their mask, next to the real good images), tested on the real test split; for models that learn
  from anomalous training images, e.g. ``Supersimplenet(supervised=True)``, which reads
  ``batch.gt_mask`` and ``batch.gt_label`` in its training step.
- ``AnomalygenAugmenter`` / ``use_anomalygen_augmenter``: a drop-in for anomalib's
  ``PerlinAnomalyGenerator``, the synthetic-anomaly generator that Draem (``model.augmenter``),
  Dsr (``model.perlin_generator``, its upsampling phase) and Glass (``model.model.augmentor``)
  call on each training batch, backed by any anomalygen method, a fitted model or a generated
  folder (a pool, e.g. made by a fitted diffusion model). Supersimplenet synthesises its
  anomalies in feature space (Gaussian noise under Perlin masks), not in images: train it on
  generated images with ``training_datamodule`` instead.

For ``MVTecAD(root=OUT, category=C)`` write the output with ``anomalygen generate --with-good``.
This is the only module of anomalygen that imports anomalib.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalygen.errors import AnomalygenError, DataError

if importlib.util.find_spec("anomalib") is None:
    raise AnomalygenError("anomalib is not installed: install anomalygen[anomalib] (pip install 'anomalygen[anomalib]')")

import cv2  # noqa: E402
from anomalib.data import Folder  # noqa: E402
from anomalib.data.datamodules.base.image import AnomalibDataModule  # noqa: E402
from anomalib.data.datasets.base.image import AnomalibDataset  # noqa: E402
from anomalib.data.utils import LabelName  # noqa: E402
from anomalib.models import Draem, Dsr, Glass  # noqa: E402
from pandas import DataFrame  # noqa: E402
from torchvision.datasets.folder import IMG_EXTENSIONS  # noqa: E402

from anomalygen import pipeline  # noqa: E402
from anomalygen.data import CategoryData, load_category, load_defect, paper_split  # noqa: E402
from anomalygen.masks import resize_mask  # noqa: E402
from anomalygen.methods.base import CONFIG_FILE, AnomalyGenerator, available_methods  # noqa: E402
from anomalygen.seeding import check_seed  # noqa: E402
from anomalygen.types import ImageRecord  # noqa: E402

__all__ = ["AnomalygenAugmenter", "folder_datamodule", "training_datamodule", "use_anomalygen_augmenter"]


def _generated(generated: str | Path, category: str | None) -> CategoryData:
    """The generated defects of ``OUT/<category>`` (or of a bare category folder)."""
    root = Path(generated)
    if category is not None and (root / category).is_dir():
        root = root / category
    made = load_category(root, require_good=False)
    if not made.defects:
        raise DataError(made.root, "no generated defect images (expected test/<type>/*.png with ground_truth masks)")
    return made


def _mask_path(record: ImageRecord) -> Path:
    if len(record.mask_paths) != 1:
        raise DataError(record.path, f"has {len(record.mask_paths)} mask files; anomalib reads one mask per image")
    return record.mask_paths[0]


def _whole_folders(records: Sequence[ImageRecord], what: str) -> list[Path]:
    """The folders of ``records``, each of which must hold exactly those images (``Folder`` reads whole folders)."""
    folders = sorted({record.path.parent for record in records})
    wanted = {record.path.resolve() for record in records}
    for folder in folders:
        images = {p.resolve() for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS}
        if not images <= wanted:
            raise DataError(folder, f"holds images that are not the {what} images; anomalib's Folder reads whole "
                                    "folders: write the output with generate's `with_good` and use MVTecAD")
    return folders


def folder_datamodule(
    generated: str | Path, data: str | Path, category: str | None = None, **options: Any
) -> Folder:
    """anomalib ``Folder``: train on the real ``train/good`` of ``data``, test on the generated
    defects in ``generated`` (``OUT`` or ``OUT/<category>``) and the real ``test/good`` images.

    ``options`` go to ``Folder`` (``train_batch_size``, ``num_workers``, ``val_split_mode``, ...);
    without real ``test/good`` images anomalib moves ``test_split_ratio`` of the good images to the test set.
    """
    real = load_category(data, category)
    records = [record for type_records in _generated(generated, real.name).defects.values() for record in type_records]
    test_good = _whole_folders(real.test_good, "test/good") if real.test_good else None
    return Folder(
        name=f"anomalygen_{real.name}",
        normal_dir=_whole_folders(real.train_good, "train/good"),
        abnormal_dir=sorted({record.path.parent for record in records}),
        mask_dir=sorted({_mask_path(record).parent for record in records}),
        normal_test_dir=test_good,
        **options,
    )


class _RecordsDataset(AnomalibDataset):
    """An anomalib dataset over explicit (image, label, mask) rows."""

    def __init__(self, name: str, rows: list[tuple[Path, int, Path | None]], split: str):
        super().__init__()
        self._name = name
        samples = DataFrame(
            {
                "image_path": [str(path) for path, _, _ in rows],
                "label_index": [int(label) for _, label, _ in rows],
                "mask_path": ["" if mask is None else str(mask) for _, _, mask in rows],
                "split": split,
            }
        )
        samples.attrs["task"] = "segmentation"
        self.samples = samples

    @property
    def name(self) -> str:
        return self._name


class GeneratedTrainingDataModule(AnomalibDataModule):
    """Train: the real good images (label 0, empty mask) + the generated pairs (label 1, their
    mask). Test: the real ``test/good`` images + the real defects of the paper split's test two
    thirds (the first third, which trained the generator, is left out). Validation: anomalib's
    ``val_split_mode`` (default: half of the test set, as ``Folder``)."""

    def __init__(self, name: str, train_rows: list, test_rows: list, **options: Any):
        defaults = {"train_batch_size": 32, "eval_batch_size": 32, "num_workers": 8,
                    "test_split_mode": "from_dir", "val_split_mode": "from_test"}
        super().__init__(**{**defaults, **options})
        self._name = name
        self.train_rows, self.test_rows = train_rows, test_rows

    @property
    def name(self) -> str:
        return self._name

    def _setup(self, _stage: str | None = None) -> None:
        self.train_data = _RecordsDataset(self.name, self.train_rows, "train")
        self.test_data = _RecordsDataset(self.name, self.test_rows, "test")


def training_datamodule(
    generated: str | Path | None, data: str | Path, category: str | None = None, **options: Any
) -> GeneratedTrainingDataModule:
    """The generated pairs of ``generated`` in the training split, with the real good images of
    ``data``; tested on the real test split (``GeneratedTrainingDataModule``). ``options`` go to
    anomalib's ``AnomalibDataModule`` (batch sizes, ``num_workers``, augmentations, split modes, seed).

    Only models that read ``gt_label`` / ``gt_mask`` in training learn from the pairs (anomalib 2.7:
    ``Supersimplenet(supervised=True)``); the unsupervised ones would take them as normal images.
    ``generated=None`` trains on the real good images only: for a model that makes its own
    anomalies (``use_anomalygen_augmenter``), tested without the defects the generator learned from.
    """
    real = load_category(data, category)
    normal, abnormal = int(LabelName.NORMAL), int(LabelName.ABNORMAL)
    train = [(r.path, normal, None) for r in real.train_good]
    if generated is not None:
        made = _generated(generated, real.name)
        train += [(r.path, abnormal, _mask_path(r)) for records in made.defects.values() for r in records]
    _, test_defects = paper_split(real.defects)
    test = [(r.path, normal, None) for r in real.test_good]
    test += [(r.path, abnormal, _mask_path(r)) for records in test_defects.values() for r in records]
    if not any(label == abnormal for _, label, _ in test):
        raise DataError(real.root, "no real test defects to test on (the paper split's test two thirds are empty)")
    return GeneratedTrainingDataModule(f"anomalygen_{real.name}", train, test, **options)


class AnomalygenAugmenter(torch.nn.Module):
    """Drop-in for anomalib's ``PerlinAnomalyGenerator``: ``(images) -> (augmented, masks)`` with
    images ``[B, C, H, W]`` (or ``[C, H, W]``) in [0, 1] and masks ``[B, 1, H, W]`` (0/1, the
    images' dtype). Each image gets a defect with probability ``probability`` (DRAEM: 0.5).

    ``source``:
    - a method name (``"croppaste"``, ...; fitted on the paper split's training third of ``data``),
      an ``AnomalyGenerator`` (fitted, or fitted here on ``data``) or the folder of a fitted model:
      the defect is generated on the training image itself (sample ``i`` of seed ``seed``);
    - a generated folder (``OUT`` or ``OUT/<category>``): a pool; a random pair is resized to the
      image and its masked pixels are pasted.
    In both cases the pixels outside the mask stay those of the training image exactly (DRAEM's
    reconstruction target is the clean image), and the defect is not blended (anomalib's Perlin
    generator mixes it with a random factor ``beta``: anomalygen's defects are meant to look real).
    Draws are reproducible: draw ``k`` depends on ``(seed, k)`` only.
    """

    def __init__(
        self,
        source: str | Path | AnomalyGenerator,
        data: str | Path | None = None,
        *,
        category: str | None = None,
        probability: float = 0.5,
        seed: int = 0,
        options: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if not 0 <= probability <= 1:
            raise AnomalygenError(f"probability {probability}: give a number from 0 to 1")
        check_seed(seed, "seed")
        self.probability, self.seed, self.drawn = float(probability), int(seed), 0
        self.generator: AnomalyGenerator | None = None
        self.pool: list[tuple[np.ndarray, np.ndarray]] = []
        if isinstance(source, AnomalyGenerator):
            self.generator = source
        elif (Path(source) / CONFIG_FILE).is_file():
            self.generator = AnomalyGenerator.load(source)
        elif Path(source).is_dir():
            self.pool = [_pair(r) for records in _generated(source, category).defects.values() for r in records]
        elif str(source) in available_methods():
            self.generator = pipeline.build(str(source), options or {})
        else:
            raise AnomalygenError(f"{source}: neither a generated folder, a fitted model folder nor a method "
                                  f"({', '.join(available_methods())})")
        if self.generator is not None and not self.generator.defect_types:
            if data is None:
                raise AnomalygenError(f"{self.generator.name}: not fitted; give data= (the real category) to fit it on")
            _, defects, goods = pipeline.load_training(data, category)
            self.generator.fit(defects, goods)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = images[None] if images.ndim == 3 else images
        augmented, masks = [], []
        for image in batch:
            index, self.drawn = self.drawn, self.drawn + 1
            rng = np.random.default_rng([self.seed, index])
            mask = torch.zeros((1, *image.shape[-2:]), dtype=image.dtype, device=image.device)
            if rng.random() < self.probability:
                defect, defect_mask = self._defect(image, index, rng)
                mask = _tensor(defect_mask[..., None], image)
                image = image * (1 - mask) + _tensor(defect, image) * mask
            augmented.append(image)
            masks.append(mask)
        augmented, masks = torch.stack(augmented), torch.stack(masks)
        return (augmented[0], masks[0]) if images.ndim == 3 else (augmented, masks)

    def _defect(self, image: torch.Tensor, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(defect image ``[H, W, C]`` float in [0, 1], bool mask ``[H, W]``) for draw ``index`` on one training image."""
        height, width = image.shape[-2:]
        if self.generator is not None:
            good = (image.detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy().transpose(1, 2, 0)
            good = np.repeat(good, 3, axis=2) if good.shape[2] == 1 else good
            sample = next(iter(self.generator.generate([good], 1, seed=self.seed, start=index)))
            picture, mask = sample.image, sample.mask
        else:
            picture, mask = self.pool[int(rng.integers(len(self.pool)))]
        if picture.shape[:2] != (height, width):
            picture = cv2.resize(picture, (width, height), interpolation=cv2.INTER_AREA)
            mask = resize_mask(mask, (height, width), any_pixel=True)  # the label keeps every defect pixel
        picture = picture.astype(np.float32) / 255
        if image.shape[0] == 1:
            picture = picture.mean(axis=2, keepdims=True)
        return picture, mask


def _pair(record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
    defect = load_defect(record)
    return defect.image, defect.mask


def _tensor(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``[H, W, C]`` array -> ``[C, H, W]`` tensor with ``like``'s dtype and device."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32).transpose(2, 0, 1)).to(like)


# model class -> the attribute path of its image-space anomaly generator
SLOTS: dict[type, tuple[str, ...]] = {Draem: ("augmenter",), Dsr: ("perlin_generator",), Glass: ("model", "augmentor")}


def use_anomalygen_augmenter(model: torch.nn.Module, source: Any, data: str | Path | None = None,
                             **options: Any) -> AnomalygenAugmenter:
    """Replace the Perlin anomaly generator of an anomalib Draem, Dsr or Glass model by an
    ``AnomalygenAugmenter(source, data, **options)`` (same ``probability`` unless given) and return it."""
    path = next((slot for klass, slot in SLOTS.items() if isinstance(model, klass)), None)
    if path is None:
        raise AnomalygenError(
            f"{type(model).__name__}: no image-space anomaly generator to replace (works with Draem, Dsr, Glass); "
            "for Supersimplenet(supervised=True) use training_datamodule"
        )
    owner = model
    for name in path[:-1]:
        owner = getattr(owner, name)
    options.setdefault("probability", getattr(getattr(owner, path[-1]), "probability", 0.5))
    augmenter = AnomalygenAugmenter(source, data, **options)
    setattr(owner, path[-1], augmenter)
    return augmenter
