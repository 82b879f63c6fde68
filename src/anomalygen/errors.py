"""Errors that name the file and the problem; the CLI prints them as one line and exits 2."""

from __future__ import annotations

from pathlib import Path


class AnomalygenError(Exception):
    """Base class for errors a user can act on (shown without a traceback)."""


class DataError(AnomalygenError):
    """A problem with an input file or folder: ``DataError(path, problem)``."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class ModelNotFoundError(AnomalygenError):
    """Weights are missing (offline, or a wrong path); the message says what to download and where."""
