"""tools/mutants.py: every mutant changes exactly one place, and type hints are never mutated."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("mutants", Path(__file__).parents[2] / "tools" / "mutants.py")
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


WIRED = "def f(x, mask):\n    good = g(x)\n    return blend(x, good, mask=mask, n=len(x), k=3)\n"


def test_each_wiring_mutant_moves_one_value_to_another_place_of_one_call():
    """"swap": two neighbouring arguments of one call exchanged (values only, not literals);
    "argument": one local variable passed to a call replaced by another local of the function (the
    last assigned before that line, else the first); globals and builtins (``g``, ``len``) are not
    replaced, nor is anything in ``x = g(x)`` replaced by ``x``'s own new value."""
    expected = {
        ("swap", "def f(x, mask):\n    good = g(x)\n    return blend(good, x, mask=mask, n=len(x), k=3)"),
        ("swap", "def f(x, mask):\n    good = g(x)\n    return blend(x, mask, mask=good, n=len(x), k=3)"),
        ("argument", "def f(x, mask):\n    good = g(mask)\n    return blend(x, good, mask=mask, n=len(x), k=3)"),
        ("argument", "def f(x, mask):\n    good = g(x)\n    return blend(good, good, mask=mask, n=len(x), k=3)"),
        ("argument", "def f(x, mask):\n    good = g(x)\n    return blend(x, x, mask=mask, n=len(x), k=3)"),
        ("argument", "def f(x, mask):\n    good = g(x)\n    return blend(x, good, mask=good, n=len(x), k=3)"),
        ("argument", "def f(x, mask):\n    good = g(x)\n    return blend(x, good, mask=mask, n=len(good), k=3)"),
    }
    tree = ast.parse(WIRED)
    kinds = [kind for _, kind in mutants.sites(tree) if kind in ("swap", "argument")]
    made = {(kind, mutants.mutant(WIRED, k)[0]) for k, (_, kind) in enumerate(mutants.sites(tree)) if kind in ("swap", "argument")}
    assert len(kinds) == len(expected) and made == expected
    for k in range(len(mutants.sites(tree))):  # every mutant, of any kind, changes one line only
        text = mutants.mutant(WIRED, k)[0]
        assert sum(a != b for a, b in zip(ast.unparse(tree).splitlines(), text.splitlines())) == 1
