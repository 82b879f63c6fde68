"""Validity checks of one generated (image, mask) pair, calibrated on the real training defects.

Four checks, each giving a score, pass/fail and a one-line reason (``CheckResult``):

- **visible**: inside the mask the image differs from its source good image, or, without a
  source (whole-image methods, real pairs), from the ring of pixels around the mask, by more than
  the local texture variation. With a source the score is the mean per-pixel change inside the
  mask; without, the 1-D Wasserstein distance between the pixel values inside the mask and in
  the ring; both (max over channels) are divided by the ring's standard deviation + 1 (the local
  texture variation; +1 keeps flat images finite). Higher is more visible.
- **aligned**: the change lies inside the mask. With a source it is measured: the fraction of
  pixels outside the mask (widened by ``band`` pixels for feathered edges) that changed by more
  than ``pixel_tolerance`` grey levels; blended methods must change none, others at most
  ``max_changed_outside``. Without a source: the Wasserstein distance between the inner ring
  (just outside the mask) and the outer ring beyond it, over the outer ring's std + 1; a defect
  spilling out of its mask makes the inner ring unlike the outer one. Lower is better.
- **on the object**: for object categories, the fraction of the mask on the object foreground
  (``masks.foreground.object_mask`` of the source, or of the image itself without one);
  texture categories pass with score 1.
- **plausible size**: the mask area (fraction of the image) within the range of the real
  training defects of that type, widened by the factor ``size_margin`` on both sides (log scale).
  A type with no real defects (one the method makes up: CutPaste's ``patch`` / ``scar``, DRAEM's
  ``draem``) has no such range: its size is not checked (the other three checks still apply).

Calibration on the real training pairs (``Calibration.fit``). Real pairs have no source good
image, so they are scored with the *surroundings* variants. The nearest good image was rejected:
real good images are not pixel-aligned with a defect image (other tile, other crop, shifted
grid), so the difference to it is dominated by misalignment, not by the defect. A threshold
fitted in the surroundings variant is used for the source variant of *visible* as well: a
defect's mean change to its own source is at least the Wasserstein distance between the two
pixel distributions (an upper bound of W1), and the source's inside pixels follow the ring's
distribution, so the source score is the larger one and the threshold errs on the side of keeping
a sample. Lower thresholds (visible, on the object) are ``min(q, q_type)`` and upper thresholds
(surroundings aligned) ``max(q, q_type)``, with ``q`` the ``quantile`` (5 %) / ``1 - quantile``
quantile over all real pairs and ``q_type`` over the type's pairs: at least 95 % of the real
pairs pass overall and within every type. Types never seen in calibration use the overall value (size: see above).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from anomalygen.errors import AnomalygenError, DataError
from anomalygen.masks.foreground import object_mask, resolve_mode
from anomalygen.types import AnomalySample

CHECKS = ("visible", "aligned", "on_object", "size")
ALL = "*"  # the key of the over-all-types threshold


@dataclass(frozen=True)
class CheckResult:
    """One check on one pair: its score, whether it passed and why, in one line."""

    name: str
    score: float
    passed: bool
    reason: str

    def __post_init__(self):  # plain Python types (numpy scalars do not serialise to JSON)
        object.__setattr__(self, "score", float(self.score))
        object.__setattr__(self, "passed", bool(self.passed))


def _channels(image: np.ndarray) -> np.ndarray:
    """``image`` as float32 (H, W, C)."""
    return image.reshape(image.shape[0], image.shape[1], -1).astype(np.float32)


def distance_to(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to ``mask`` (0 on it); rings around the mask are its level
    sets (one linear-time transform instead of dilations with large discs)."""
    return cv2.distanceTransform((~mask.astype(bool)).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def ring_radius(mask: np.ndarray) -> int:
    """Width of the surroundings ring: 3 % of the short side, at least 3 pixels."""
    return max(3, round(0.03 * min(mask.shape)))


def _w1_over_std(values: np.ndarray, reference: np.ndarray) -> float:
    """Max over channels of W1(values, reference) / (std(reference) + 1); (N, C) arrays."""
    from scipy.stats import wasserstein_distance  # imported here: scipy.stats costs every CLI call 0.5 s

    return max(
        wasserstein_distance(values[:, c], reference[:, c]) / (reference[:, c].std() + 1.0)
        for c in range(values.shape[1])
    )


def visible_score(image: np.ndarray, mask: np.ndarray, source: np.ndarray | None = None) -> float:
    """How much the inside of ``mask`` differs, in units of the local texture variation (see the
    module docstring); 0 when the mask has no surroundings to compare with."""
    mask = mask.astype(bool)
    distance = distance_to(mask)
    ring = (distance > 0) & (distance <= ring_radius(mask))
    if not ring.any():
        ring = ~mask
    if not ring.any():
        return 0.0
    img = _channels(image)
    if source is None:
        return _w1_over_std(img[mask], img[ring])
    src = _channels(source)
    change = np.abs(img - src)[mask].mean(axis=0)
    return float((change / (src[ring].std(axis=0) + 1.0)).max())


def changed_outside(image: np.ndarray, mask: np.ndarray, source: np.ndarray, band: int, pixel_tolerance: float) -> float:
    """Fraction of the pixels outside ``mask`` widened by ``band`` whose change to ``source``
    exceeds ``pixel_tolerance`` grey levels in some channel."""
    outside = distance_to(mask) > band
    if not outside.any():
        return 0.0
    change = np.abs(_channels(image) - _channels(source)).max(axis=-1)
    return float((change[outside] > pixel_tolerance).mean())


def spill_score(image: np.ndarray, mask: np.ndarray) -> float:
    """Surroundings variant of *aligned*: how unlike the inner ring is to the outer ring."""
    mask = mask.astype(bool)
    radius, distance = ring_radius(mask), distance_to(mask)
    inner, outer = (distance > 0) & (distance <= radius), (distance > radius) & (distance <= 3 * radius)
    if not inner.any() or not outer.any():
        return 0.0
    img = _channels(image)
    return _w1_over_std(img[inner], img[outer])


def on_object_score(mask: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of ``mask`` on the object foreground of ``reference`` (1 when none is found)."""
    foreground = object_mask(reference)
    if not foreground.any():
        return 1.0
    mask = mask.astype(bool)
    return float((mask & foreground).sum() / max(mask.sum(), 1))


def area_fraction(mask: np.ndarray) -> float:
    return float(mask.astype(bool).mean())


def _for_type(table: dict, defect_type: str):
    return table.get(defect_type, table[ALL])


@dataclass
class Calibration:
    """Thresholds of the four checks, per defect type plus ``"*"`` for all types (see the module
    docstring for how ``fit`` sets them); saved and loaded as JSON."""

    mode: str  # "object" or "texture": whether the on-the-object check applies
    visible: dict[str, float]  # lower bound per type
    spill: dict[str, float]  # upper bound of the surroundings aligned score per type
    on_object: dict[str, float]  # lower bound per type
    area: dict[str, list[float]]  # [min, max] real mask-area fraction per type (no margin)
    size_margin: float = 2.0
    pixel_tolerance: float = 8.0
    band: int = 2
    max_changed_outside: float = 0.02
    counts: dict[str, int] = field(default_factory=dict)  # real pairs per type used to fit

    @classmethod
    def fit(
        cls,
        pairs: list[tuple[np.ndarray, np.ndarray, str]],
        goods: list[np.ndarray],
        *,
        mode: str = "auto",
        quantile: float = 0.05,
        min_type_pairs: int = 5,
        **options,
    ) -> Calibration:
        """Fit on real (image, mask, defect type) training pairs; ``goods`` decide ``mode="auto"``.
        A type with fewer than ``min_type_pairs`` pairs gets the area range of all types."""
        if not pairs:
            raise AnomalygenError("validity calibration needs at least one real defect pair")
        if not 0.0 <= quantile < 0.5:
            raise AnomalygenError(f"validity quantile must be in [0, 0.5), got {quantile}")
        mode = resolve_mode(mode, goods)
        scores: dict[str, dict[str, list[float]]] = {}
        for image, mask, defect_type in pairs:
            per = scores.setdefault(defect_type, {"visible": [], "spill": [], "on_object": [], "area": []})
            per["visible"].append(visible_score(image, mask))
            per["spill"].append(spill_score(image, mask))
            per["on_object"].append(on_object_score(mask, image) if mode == "object" else 1.0)
            per["area"].append(area_fraction(mask))

        def table(name: str, q: float, combine) -> dict[str, float]:
            # "lower"/"higher" pick an observed score: at most q * n pairs fall on the wrong side
            method = "lower" if q < 0.5 else "higher"
            every = np.concatenate([per[name] for per in scores.values()])
            overall = float(np.quantile(every, q, method=method))
            out = {ALL: overall}
            out.update({t: float(combine(overall, np.quantile(per[name], q, method=method))) for t, per in scores.items()})
            return out

        every_area = np.concatenate([per["area"] for per in scores.values()])
        area = {ALL: [float(every_area.min()), float(every_area.max())]}
        for t, per in scores.items():  # a type with few pairs says little about its range: use all types'
            area[t] = [float(min(per["area"])), float(max(per["area"]))] if len(per["area"]) >= min_type_pairs else area[ALL]
        return cls(
            mode=mode,
            visible=table("visible", quantile, min),
            spill=table("spill", 1.0 - quantile, max),
            on_object=table("on_object", quantile, min),
            area=area,
            counts={t: len(per["area"]) for t, per in scores.items()},
            **options,
        )

    def check(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        defect_type: str,
        source: np.ndarray | None = None,
        *,
        blended: bool = False,
    ) -> dict[str, CheckResult]:
        """All four checks of one pair. ``source``: the good image the sample was made from
        (None for whole-image methods); ``blended``: the method pastes into the source, so
        nothing outside the mask may change."""
        mask = np.asarray(mask).astype(bool)
        if image.shape[:2] != mask.shape or (source is not None and source.shape != image.shape):
            raise AnomalygenError(
                f"validity check: image {image.shape}, mask {mask.shape} and source "
                f"{None if source is None else source.shape} sizes differ"
            )
        if not mask.any():
            return {name: CheckResult(name, 0.0, False, "the mask is empty") for name in CHECKS}
        return {
            "visible": self._visible(image, mask, defect_type, source),
            "aligned": self._aligned(image, mask, defect_type, source, blended),
            "on_object": self._on_object(image if source is None else source, mask, defect_type),
            "size": self._size(mask, defect_type),
        }

    def _visible(self, image, mask, defect_type, source) -> CheckResult:
        score, low = visible_score(image, mask, source), _for_type(self.visible, defect_type)
        against = "its source" if source is not None else "its surroundings"
        ok = score >= low
        verdict = "differs from" if ok else "hardly differs from"
        reason = f"inside the mask the image {verdict} {against}: {score:.3g} (needs >= {low:.3g})"
        return CheckResult("visible", score, ok, reason)

    def _aligned(self, image, mask, defect_type, source, blended) -> CheckResult:
        if source is None:
            score, high = spill_score(image, mask), _for_type(self.spill, defect_type)
            ok = score <= high
            what = "the ring around the mask is like" if ok else "the defect spills out of the mask: its ring is unlike"
            return CheckResult("aligned", score, ok, f"{what} the surroundings: {score:.3g} (needs <= {high:.3g})")
        score = changed_outside(image, mask, source, self.band, self.pixel_tolerance)
        high = 0.0 if blended else self.max_changed_outside
        ok = score <= high
        return CheckResult(
            "aligned", score, ok,
            f"{score:.2%} of the pixels outside the mask changed by > {self.pixel_tolerance:g} grey levels "
            f"(allowed {high:.2%}{', blended' if blended else ''})",
        )

    def _on_object(self, reference, mask, defect_type) -> CheckResult:
        if self.mode != "object":
            return CheckResult("on_object", 1.0, True, "texture category: every pixel is foreground")
        score, low = on_object_score(mask, reference), _for_type(self.on_object, defect_type)
        ok = score >= low
        return CheckResult("on_object", score, ok, f"{score:.0%} of the mask lies on the object (needs >= {low:.0%})")

    def _size(self, mask, defect_type) -> CheckResult:
        if defect_type not in self.area:  # a type the method makes up (CutPaste's patch, DRAEM's draem)
            score = area_fraction(mask)
            return CheckResult("size", score, True, f"no real {defect_type!r} defects to compare the mask area with")
        lo, hi = self.area[defect_type]
        lo, hi = lo / self.size_margin, min(1.0, hi * self.size_margin)
        score = area_fraction(mask)
        ok = lo <= score <= hi
        verdict = "within" if ok else "outside"
        reason = f"mask area {score:.3%} of the image, {verdict} [{lo:.3%}, {hi:.3%}] of real {defect_type!r} defects"
        return CheckResult("size", score, ok, reason)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            data = json.loads(Path(path).read_text())
            calibration = cls(**data)
        except (OSError, ValueError, TypeError) as error:
            raise DataError(path, f"not a validity calibration ({error})") from error
        missing = [name for name in ("visible", "spill", "on_object", "area") if ALL not in getattr(calibration, name)]
        if missing:
            raise DataError(path, f"validity calibration lacks the all-types entry '*' of {', '.join(missing)}")
        return calibration


def failures(results: dict[str, CheckResult]) -> list[CheckResult]:
    """The checks that failed, in ``CHECKS`` order."""
    return [results[name] for name in CHECKS if not results[name].passed]


def fit_category(data, *, mode: str = "auto", train_fraction: float = 1 / 3, **options) -> Calibration:
    """``Calibration.fit`` on the paper-split training defects and train/good of a ``CategoryData``."""
    from anomalygen.data import load_defects, load_goods, paper_split

    train, _ = paper_split(data.defects, train_fraction)
    pairs = [(ex.image, ex.mask, ex.defect_type) for records in train.values() for ex in load_defects(records)]
    return Calibration.fit(pairs, load_goods(data.train_good, limit=8), mode=mode, **options)


def judge(calibration: Calibration, sample: AnomalySample, goods: list[np.ndarray], outside: str) -> dict[str, CheckResult]:
    """``calibration.check`` of a generated sample, with its source good image (``meta["source_index"]``
    into ``goods``) where the method keeps one. ``outside`` is the method's outside-mask policy
    (``AnomalyGenerator.outside_mask``): blended methods ("kept") paste into the source, so nothing
    outside the mask may change; whole-image methods ("none") use it as a hint only, so they are judged
    against the mask's surroundings; any other method ("changed") gets "little change outside"."""
    index = sample.meta.get("source_index")
    source = None if index is None or outside == "none" else goods[index]
    if source is not None and source.shape != sample.image.shape:
        source = None
    return calibration.check(sample.image, sample.mask, sample.defect_type, source, blended=outside == "kept")
