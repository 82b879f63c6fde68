"""Errors that name the file and the problem; the CLI prints them as one line and exits 2."""

from __future__ import annotations

import re
from pathlib import Path


class AnomalygenError(Exception):
    """Base class for errors a user can act on (shown without a traceback)."""


class DataError(AnomalygenError):
    """A problem with an input file or folder: ``DataError(path, problem)``."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class OptionError(AnomalygenError):
    """A bad value of a named option: ``OptionError(option, problem, where="", sep=" ")`` reads
    ``f"{where}{option}{sep}{problem}"`` (``"num 0: give a number of samples from 1 to 1000000"``).
    The library names the option as its callers write it (a keyword, ``section.field`` of a config,
    a method's option with ``method=``); the CLI words the message with its flag (``named``)."""

    def __init__(self, option: str, problem: str, where: str = "", *, sep: str = " ", method: bool = False):
        self.option, self.problem, self.where, self.sep, self.method = option, problem, where, sep, method
        super().__init__(self.named(option))

    def named(self, name: str) -> str:
        """The message with the option called ``name`` (e.g. its command-line flag)."""
        return f"{self.where}{name}{self.sep}{self.problem}"


class ModelNotFoundError(AnomalygenError):
    """Weights are missing (offline, or a wrong path); the message says what to download and where."""


def first_problem(error: BaseException, limit: int = 200) -> str:
    """The first problem ``error`` states, as one short line: torch's "Error(s) in loading state_dict"
    header is skipped for the line under it, a list of keys is cut to its first, and the line to
    ``limit`` characters (a message listing every missing key of a model is thousands long)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict") else lines[0]
    keys = re.match(r"((?:Missing|Unexpected) key\(s\) in state_dict): (.*)", line)
    if keys:
        names = re.findall(r'"([^"]+)"', keys.group(2))
        if names:
            line = f'{keys.group(1)}: "{names[0]}"' + (f" and {len(names) - 1} more" if len(names) > 1 else "")
    return line if len(line) <= limit else line[: limit - 1] + "…"
