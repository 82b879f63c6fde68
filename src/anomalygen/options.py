"""Declarative options: name -> kind, range or choices, default; the one way options are checked.

A method declares ``OPTIONS = OptionSpec(name=Int(3, low=1), ...)``; adding an option is one line.
``OPTIONS.validate(method, given)`` refuses unknown names and values of the wrong type, out of range
or not among the choices with one line naming the option (an ``OptionError``: the CLI adds how to
set it) and what is allowed, before anything is written. Values are returned as given (tuples as
lists), so a method's ``config()`` and the ``run.json`` it feeds do not change.

A config dataclass declares its fields' checks the same way (``FIELDS = OptionSpec(epochs=Int(low=1))``,
its defaults staying the dataclass's) and runs ``FIELDS.check_fields(self, "section")``; a keyword
argument is checked with ``check(name, option, value)``. Both raise the ``OptionError`` the methods do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from anomalygen.errors import AnomalygenError, OptionError

# Upper bounds of size-like options, by what a method can use (a larger value only reached the allocator):
MAX_RESOLUTION = 2048  # px: 4 × SD 1.5's native 512
MAX_BATCH = 256  # images per training or sampling batch
MAX_INFERENCE_STEPS = 1000  # the schedulers' training timesteps (SD 1.x, LDM): more cannot be sampled
MAX_RANK = 320  # LoRA rank: SD 1.5's narrowest attention projection is 320 wide; a higher rank adds nothing
MAX_TOKENS = 75  # learned tokens of one kind: CLIP's 77 context positions less the start and end tokens

class Invalid(ValueError):
    """Raised by a check with the description of what is allowed."""


def problem(value: Any, allowed: Invalid | str) -> str:
    """What an ``OptionError`` says of a bad ``value``."""
    return f"got {value!r}; allowed: {allowed}"


@dataclass(frozen=True)
class Option:
    """One option: ``default``, a ``check(value)`` raising ``Invalid(allowed)``; ``None`` is
    accepted when ``optional``. ``sampling``: the option acts only when generating (steps, guidance,
    thresholds, ...), so a fitted model may take a new value (``generate --checkpoint --set``);
    every other option shapes what is fitted and stays as it was fitted."""

    default: Any
    check: Callable[[Any], None]
    optional: bool = False
    sampling: bool = False

    def validate(self, value: Any) -> None:
        if value is None and self.optional:
            return
        self.check(value)


def _number(value: Any, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    if integer:
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)


def _bounds(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def _in_bounds(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool = False) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    return above and (high is None or (value < high if high_open else value <= high))


def Number(default: Any = None, low: float | None = None, high: float | None = None, *, integer: bool = False,
           multiple: int | None = None, low_open: bool = False, high_open: bool = False, optional: bool = False,
           sampling: bool = False) -> Option:
    """An int (``integer``; a multiple of ``multiple`` when given) or a finite float (ints accepted)
    in [``low``, ``high``]; ``low_open`` / ``high_open`` make a bound strict."""
    kind = f"a multiple of {multiple}" if multiple else "an integer" if integer else "a number"
    allowed = f"{kind} {_bounds(low, high, low_open, high_open)}".strip() + (" or null" if optional else "")

    def check(value: Any) -> None:
        if (not _number(value, integer) or not _in_bounds(value, low, high, low_open, high_open)
                or (multiple and value % multiple)):
            raise Invalid(allowed)

    return Option(default, check, optional, sampling)


def Int(default: Any = None, low: int | None = None, high: int | None = None, *, multiple: int | None = None,
        optional: bool = False, sampling: bool = False) -> Option:
    return Number(default, low, high, integer=True, multiple=multiple, optional=optional, sampling=sampling)


def Float(default: Any = None, low: float | None = None, high: float | None = None, *, low_open: bool = False,
          high_open: bool = False, optional: bool = False, sampling: bool = False) -> Option:
    return Number(default, low, high, low_open=low_open, high_open=high_open, optional=optional, sampling=sampling)


def Bool(default: bool, *, sampling: bool = False) -> Option:
    def check(value: Any) -> None:
        if not isinstance(value, bool):
            raise Invalid("true or false")

    return Option(default, check, sampling=sampling)


def Choice(default: Any, choices: Sequence[str], *, optional: bool = False, sampling: bool = False) -> Option:
    allowed = "one of " + ", ".join(map(str, choices)) + (" or null" if optional else "")

    def check(value: Any) -> None:
        if not isinstance(value, str) or value not in choices:
            raise Invalid(allowed)

    return Option(default, check, optional, sampling)


def Text(default: Any, *, contains: str | None = None, optional: bool = False, sampling: bool = False) -> Option:
    """A non-empty string (holding ``contains`` when given)."""
    allowed = "a non-empty string" + (f" containing {contains}" if contains else "") + (" or null" if optional else "")

    def check(value: Any) -> None:
        if not isinstance(value, str) or not value or (contains and contains not in value):
            raise Invalid(allowed)

    return Option(default, check, optional, sampling)


def Range(default: Sequence[float], low: float | None = None, high: float | None = None, *,
          low_open: bool = False, sampling: bool = False) -> Option:
    """A ``[min, max]`` pair of numbers with ``min <= max``, both within the bounds."""
    allowed = f"a list [min, max] of two numbers with min <= max, each {_bounds(low, high, low_open)}"

    def check(value: Any) -> None:
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(_number(v, False) and _in_bounds(v, low, high, low_open) for v in value)
                or value[0] > value[1]):
            raise Invalid(allowed)

    return Option(default, check, sampling=sampling)


def Subset(default: Sequence[str], choices: Sequence[str], *, sampling: bool = False) -> Option:
    """A non-empty list of distinct names from ``choices``."""
    allowed = "a non-empty list of " + ", ".join(choices)

    def check(value: Any) -> None:
        if (not isinstance(value, (list, tuple)) or not value or len(set(map(str, value))) != len(value)
                or any(not isinstance(v, str) or v not in choices for v in value)):
            raise Invalid(allowed)

    return Option(default, check, sampling=sampling)


def _check_device(value: Any) -> None:
    from anomalygen.devices import device_problem

    problem = device_problem(value)
    if problem is not None:
        raise Invalid(problem)


def Device(default: Any = None) -> Option:
    """A torch device string that exists on this machine (``None``/``"auto"``: CUDA when available)."""
    return Option(default, _check_device, optional=True, sampling=True)


PRECISIONS = ("auto", "no", "fp32", "bf16", "fp16")


def Precision(default: str = "auto") -> Option:
    """Mixed precision: ``auto`` (bf16 on CUDA, fp32 on CPU: the fast path), ``no``/``fp32`` (full
    precision), ``bf16`` or ``fp16``."""
    return Choice(default, PRECISIONS, sampling=True)


class OptionSpec:
    """The options of one method, by name (declaration order is kept)."""

    def __init__(self, **options: Option):
        self.options = options

    def defaults(self) -> dict[str, Any]:
        return {name: option.default for name, option in self.options.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.options

    def sampling(self) -> list[str]:
        """The options a fitted model may take new values of (``Option.sampling``)."""
        return [name for name, option in self.options.items() if option.sampling]

    def check_sampling(self, method: str, given: Mapping[str, Any]) -> None:
        """Refuse, in one line, options of ``given`` that shape what was fitted (or are unknown),
        then check the values; for ``generate --checkpoint --set``."""
        fitted = sorted(name for name in given if name in self.options and not self.options[name].sampling)
        if fitted:
            raise AnomalygenError(
                f"{method}: `options` {', '.join(fitted)}: shapes what was fitted, so a model loaded from a `checkpoint` "
                f"keeps its fitted value; fit a new model to change it (options that act at generation: "
                f"{', '.join(self.sampling()) or 'none'})")
        self.validate(method, given)

    def validate(self, method: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """``given`` merged over the defaults; an unknown name or a bad value raises one line."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise AnomalygenError(f"{method}: unknown option(s) {', '.join(unknown)}; known: {', '.join(self.options)}")
        for name, value in given.items():
            try:
                self.options[name].validate(value)
            except Invalid as allowed:
                raise OptionError(name, problem(value, allowed), f"{method}: option ", method=True) from None
        lists = {name: list(value) for name, value in given.items() if isinstance(value, tuple)}
        return {**self.defaults(), **given, **lists}


    def check_fields(self, config: Any, section: str = "") -> None:
        """Check the field of ``config`` (a dataclass) of each option; a bad value raises an
        ``OptionError`` naming ``section.field`` (the field's name without a ``section``)."""
        for name, option in self.options.items():
            check(f"{section}.{name}" if section else name, option, getattr(config, name))


def check(name: str, option: Option, value: Any) -> None:
    """``value`` of the option called ``name`` (as the caller writes it); a bad one raises an ``OptionError``."""
    try:
        option.validate(value)
    except Invalid as allowed:
        raise OptionError(name, problem(value, allowed)) from None


def require(condition: bool, method: str, message: str) -> None:
    """A rule between options (e.g. ``min_exp < max_exp``), checked after each one's own."""
    if not condition:
        raise AnomalygenError(f"{method}: {message}")
