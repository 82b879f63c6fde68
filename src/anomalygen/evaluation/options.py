"""Range checks for the evaluation options, run when a config is built (before anything is written).

Each failure is one ``AnomalygenError`` naming the command-line option, the value and what is allowed.
"""

from __future__ import annotations

from typing import Any

from anomalygen.errors import AnomalygenError


def positive_int(value: Any, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AnomalygenError(f"{option} {value}: must be a whole number >= 1")


def positive_float(value: Any, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise AnomalygenError(f"{option} {value}: must be a number > 0")


def resolution(value: Any, option: str = "--resolution") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 32 or value % 32:
        raise AnomalygenError(f"{option} {value}: must be a multiple of 32 (32, 64, ..., 256)")


def choice(value: Any, option: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise AnomalygenError(f"{option} {value}: choose one of {', '.join(allowed)}")
