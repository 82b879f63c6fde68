"""The one generator interface every method implements, and the registry by name.

Determinism contract: the sample with global index ``i`` depends only on ``(seed, i)``, the
fitted state and the inputs, never on ``start``, ``n`` or a batch size. The writer relies on this
to resume an interrupted run with exactly the samples it would have produced.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
from safetensors import SafetensorError

from anomalygen.errors import AnomalygenError, DataError, first_problem
from anomalygen.io import atomic_write_text, corrupt, read_json, remove_partials
from anomalygen.options import OptionSpec
from anomalygen.types import AnomalySample, DefectExample

CONFIG_FILE = "generator.json"


@contextmanager
def malformed_as_corrupt(path: Path) -> Iterator[None]:
    """Turn a missing key or a value of the wrong type or shape met while reading the content of
    ``path`` into ``PATH: corrupt (...)``."""
    try:
        yield
    except KeyError as error:
        raise corrupt(path, f"missing {error}") from None
    except (TypeError, ValueError, IndexError, AttributeError, RuntimeError, SafetensorError) as error:
        raise corrupt(path, first_problem(error)) from None


def model_path(directory: Path, name: Any, recorded_in: Path) -> Path:
    """``directory/name`` for a path ``name`` recorded in a saved model file; only canonical
    relative paths that stay inside ``directory`` (symlinks resolved) are accepted."""
    if not isinstance(name, str) or not name:
        raise corrupt(recorded_in, f"path {name!r} is not a file name")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name or pure.as_posix() != name:
        raise corrupt(recorded_in, f"path {name!r} is not a relative path inside the model folder")
    path = directory / pure
    if not path.resolve().is_relative_to(directory.resolve()):
        raise corrupt(recorded_in, f"path {name!r} leads outside the model folder")
    return path


class AnomalyGenerator(ABC):
    """Learns from a few real defects (``fit``) and produces image+mask pairs (``generate``).

    Subclasses set ``name`` and ``OPTIONS`` and accept their options as constructor keyword
    arguments, checked against ``OPTIONS`` before anything is written; ``config()`` returns them so
    that ``save``/``load`` can rebuild the generator.
    """

    name: ClassVar[str]
    needs_fit: ClassVar[bool] = True
    # What a sample keeps of its source good image (``meta["source_index"]``), for the validity
    # checks: "kept" (the good pixels outside the mask, exactly), "changed" (small changes outside
    # the mask allowed) or "none" (the whole image is generated; the source is no reference).
    outside_mask: ClassVar[str] = "kept"
    OPTIONS: ClassVar[OptionSpec]  # the options the constructor accepts (anomalygen.options)

    def __init__(self, **options: Any):
        self.options = options

    def config(self) -> dict[str, Any]:
        """JSON-serialisable options that rebuild this generator (learned state excluded)."""
        return dict(self.options)

    @abstractmethod
    def fit(self, defects: Sequence[DefectExample], good: Sequence[np.ndarray]) -> None:
        """Learn from the few-shot training defects and the good images of one category."""

    @abstractmethod
    def generate(
        self,
        good: Sequence[np.ndarray],
        n: int,
        *,
        masks: Sequence[np.ndarray] | None = None,
        seed: int = 0,
        start: int = 0,
        defect_type: str | None = None,
    ) -> Iterator[AnomalySample]:
        """Yield samples ``start .. start+n-1`` built on the ``good`` images.

        ``masks`` (optional) fixes where the anomaly goes: sample ``i`` uses ``masks[i % len]``.
        ``defect_type`` restricts generation to one learned type; otherwise types cycle.
        """

    def compile_unet(self) -> None:
        """Sample with a ``torch.compile``'d UNet on CUDA (``pipeline.generate``'s ``compile``); a method
        without a UNet ignores it."""

    def generation_batch(self) -> int:
        """How many samples one batched pass of ``generate`` makes, counted from ``start``: a resumed
        run restarts at such a batch, and sharded generation deals blocks of this size, so that
        every sample is made in the batch of a one-process, uninterrupted run (batched numerics
        depend on the batch). Methods that make one sample at a time: 1."""
        return 1

    @property
    def defect_types(self) -> list[str]:
        """The defect types this generator can produce (after ``fit``)."""
        return list(getattr(self, "_defect_types", []))

    def save(self, directory: str | Path) -> None:
        """Write the learned state (``save_state``), then the config (JSON) into ``directory``.

        The config is written last and atomically, so a folder with ``generator.json`` holds a
        complete model even if an earlier save was killed half-way.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        remove_partials(directory)  # left by a save that was killed
        self.save_state(directory)
        payload = {"method": self.name, "options": self.config(), "defect_types": self.defect_types}
        atomic_write_text(directory / CONFIG_FILE, json.dumps(payload, indent=2))

    def save_state(self, directory: Path) -> None:
        """Write learned state; model-free generators keep what ``fit`` extracted here."""

    def load_state(self, directory: Path) -> None:
        """Read what ``save_state`` wrote."""

    @classmethod
    def load(cls, directory: str | Path, sampling: Mapping[str, Any] | None = None) -> "AnomalyGenerator":
        """Rebuild a saved generator (any method) from ``directory``.

        ``sampling``: new values of options that act only at generation (``Option.sampling``:
        steps, guidance, thresholds, ...), e.g. from ``generate --checkpoint --set``; an option that
        shapes what was fitted is refused with one line saying so, before anything is read."""
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise AnomalygenError(f"{config_path}: not a saved anomalygen model (no {CONFIG_FILE})")
        payload = read_json(config_path)
        if sampling and isinstance(payload, dict) and isinstance(payload.get("method"), str):
            get_method(payload["method"]).OPTIONS.check_sampling(payload["method"], sampling)
        try:
            with malformed_as_corrupt(config_path):
                klass = get_method(payload["method"])
                generator = klass(**{**payload["options"], **(sampling or {})})
                types = payload.get("defect_types")
                if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
                    raise TypeError(f"defect_types must be a non-empty list of names, got {types!r}")
        except DataError:
            raise
        except AnomalygenError as error:  # an unknown method or an invalid option
            if sampling:  # a rule between options the new sampling values break: the user's to fix
                raise AnomalygenError(f"{config_path} with `options`: {error}") from None
            raise corrupt(config_path, str(error)) from None
        generator._defect_types = list(types)
        generator.load_state(directory)
        return generator


# name -> "module:Class"; imported lazily so that model-free use never imports diffusers.
METHODS: dict[str, str] = {
    "cutpaste": "anomalygen.methods.cutpaste:CutPaste",
    "croppaste": "anomalygen.methods.croppaste:CropPaste",
    "draem": "anomalygen.methods.draem:DraemTexture",
    "textual-inversion": "anomalygen.methods.textual_inversion:TextualInversionGenerator",
    "anomalydiffusion": "anomalygen.methods.anomalydiffusion:AnomalyDiffusion",
    "dualanodiff": "anomalygen.methods.dualanodiff:DualAnoDiff",
    "cagen": "anomalygen.methods.cagen:CAGen",
    "anomalyxfusion": "anomalygen.methods.anomalyxfusion:AnomalyXFusion",
}


def register(name: str, target: str) -> None:
    """Register a method by name: ``target`` is ``"package.module:ClassName"``."""
    METHODS[name] = target


def available_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[AnomalyGenerator]:
    """The generator class registered under ``name``."""
    if name not in METHODS:
        raise AnomalygenError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    module_name, class_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def create(name: str, **options: Any) -> AnomalyGenerator:
    return get_method(name)(**options)
