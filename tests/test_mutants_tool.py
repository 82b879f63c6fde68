"""tools/mutants.py: every mutant changes exactly one place, and type hints are never mutated."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("mutants", Path(__file__).parents[1] / "tools" / "mutants.py")
mutants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutants)

SOURCE = "def f(a: int = 3, b: bool = True, c: X[9] = None) -> Y[7]:\n    return -a * 2 > 0.5 and not b\n"


def test_each_mutant_changes_one_place():
    expected = {
        "def f(a: int=4, b: bool=True, c: X[9]=None) -> Y[7]:\n    return -a * 2 > 0.5 and (not b)",
        "def f(a: int=3, b: bool=False, c: X[9]=None) -> Y[7]:\n    return -a * 2 > 0.5 and (not b)",
        "def f(a: int=3, b: bool=True, c: X[9]=None) -> Y[7]:\n    return -a * 2 > 0.5 or not b",
        "def f(a: int=3, b: bool=True, c: X[9]=None) -> Y[7]:\n    return -a * 2 >= 0.5 and (not b)",
        "def f(a: int=3, b: bool=True, c: X[9]=None) -> Y[7]:\n    return -a * 2 > 0.5 and b",
        "def f(a: int=3, b: bool=True, c: X[9]=None) -> Y[7]:\n    return -a / 2 > 0.5 and (not b)",
        "def f(a: int=3, b: bool=True, c: X[9]=None) -> Y[7]:\n    return -a * 2 > 1.0 and (not b)",
        "def f(a: int=3, b: bool=True, c: X[9]=None) -> Y[7]:\n    return a * 2 > 0.5 and (not b)",
        "def f(a: int=3, b: bool=True, c: X[9]=None) -> Y[7]:\n    return -a * 3 > 0.5 and (not b)",
    }
    count = len(mutants.sites(ast.parse(SOURCE)))
    made = {mutants.mutant(SOURCE, k)[0] for k in range(count)}
    assert count == len(expected) and made == expected
