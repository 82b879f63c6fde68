"""Range checks for the evaluation options, run when a config is built (before anything is written).

Each failure is one ``OptionError`` naming the option as the library calls it (a keyword such as
``lpips_net``, or ``section.field`` of a config: ``classification.epochs``), the value and what is
allowed; the CLI names its flag instead.
"""

from __future__ import annotations

from typing import Any

from anomalygen.errors import OptionError


# the largest input size and network width the evaluation networks can use (the papers: 256 px, U-Net base 64)
MAX_RESOLUTION = 1024
MAX_WIDTH = 512
MAX_BATCH = 256


def positive_int(value: Any, option: str, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (high is not None and value > high):
        raise OptionError(option, f"{value}: must be a whole number >= 1" + (f" and <= {high}" if high else ""))


def positive_float(value: Any, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise OptionError(option, f"{value}: must be a number > 0")


def resolution(value: Any, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 32 <= value <= MAX_RESOLUTION or value % 32:
        raise OptionError(option, f"{value}: must be a multiple of 32 from 32 to {MAX_RESOLUTION} (32, 64, ..., 256)")


def choice(value: Any, option: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise OptionError(option, f"{value}: choose one of {', '.join(allowed)}")
