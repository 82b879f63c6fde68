"""Hand-made mutation testing: does the test suite notice when one operator or constant of a module changes?

    python tools/mutants.py anomalygen/masks/augment.py tests/test_masks.py [--only 3,7] [--work DIR]
    python tools/mutants.py anomalygen/methods/blending.py -- tests/test_methods_modelfree.py -k blend   (pytest options after --)

Each mutant changes one thing in the module (an arithmetic operator, a comparison, and/or, a unary
minus or ``not``, a number, a boolean constant), is written into a copy of the project (``--work``,
default a temporary folder; the copy's ``src`` shadows the installed package through PYTHONPATH) and
the given tests run against it with ``-x``. A mutant the tests pass "SURVIVED": either a test is
missing or the change does not alter behaviour (an equivalent mutant: read the line). Type hints
are left alone (and strings are never changed). The last line counts the survivors. A temporary
copy is removed at the end; one given with ``--work`` is kept.
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BINARY = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
          ast.Pow: ast.Mult}
COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
           ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}


def _annotations(tree: ast.AST) -> set[int]:
    """ids of the nodes inside annotations (mutating a type hint changes nothing)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        hints = [getattr(node, "annotation", None), getattr(node, "returns", None)]
        for hint in filter(None, hints):
            skip |= {id(n) for n in ast.walk(hint)}
    return skip


def sites(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    """Every place a mutant can be made, in a fixed order."""
    skip, found = _annotations(tree), []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            found.append((node, "operator"))
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in COMPARE:
            found.append((node, "comparison"))
        elif isinstance(node, ast.BoolOp):
            found.append((node, "and/or"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            found.append((node, "unary"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            found.append((node, "number"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            found.append((node, "boolean"))
    return found


class _Mutate(ast.NodeTransformer):
    def __init__(self, target: ast.AST, kind: str):
        self.target, self.kind = target, kind

    def visit(self, node: ast.AST) -> ast.AST:
        if node is not self.target:
            return self.generic_visit(node)
        if self.kind == "operator":
            node.op = BINARY[type(node.op)]()
        elif self.kind == "comparison":
            node.ops[0] = COMPARE[type(node.ops[0])]()
        elif self.kind == "and/or":
            node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        elif self.kind == "unary":
            return node.operand
        elif self.kind == "number":
            node.value = node.value + 1 if isinstance(node.value, int) else (node.value * 2 if node.value else 1.0)
        else:
            node.value = not node.value
        return node


def mutant(source: str, k: int) -> tuple[str, int, str]:
    """The module's source with mutant ``k`` applied, its line and kind."""
    tree = ast.parse(source)
    node, kind = sites(tree)[k]
    line = node.lineno
    return ast.unparse(_Mutate(node, kind).visit(tree)), line, kind


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", help="path under src/, e.g. anomalygen/masks/augment.py")
    parser.add_argument("tests", nargs="+", help="pytest arguments (test files, -k ...)")
    parser.add_argument("--only", help="comma-separated mutant numbers")
    parser.add_argument("--work", type=Path, help="the project copy (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant (a hang counts as caught)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mutants-"))
    shutil.rmtree(work, ignore_errors=True)
    for name in ("src", "tests", "benchmarks"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", work)
    target = work / "src" / args.module
    source = target.read_text()
    count = len(sites(ast.parse(source)))
    chosen = [int(k) for k in args.only.split(",")] if args.only else range(count)
    print(f"{args.module}: {count} mutants", flush=True)
    env = {**os.environ, "PYTHONPATH": str(work / "src"), "OMP_NUM_THREADS": "1"}
    lines, survived = source.splitlines(), 0
    for k in chosen:
        text, line, kind = mutant(source, k)
        target.write_text(text)
        start = time.monotonic()
        try:
            caught = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args.tests],
                                    cwd=work, env=env, capture_output=True, timeout=args.timeout).returncode != 0
        except subprocess.TimeoutExpired:
            caught = True
        survived += not caught
        print(f"{'caught  ' if caught else 'SURVIVED'} #{k} line {line} {kind} ({time.monotonic() - start:.0f} s): "
              f"{lines[line - 1].strip()[:100]}", flush=True)
    print(f"{survived} of {len(chosen)} survived", flush=True)
    if args.work is None:
        shutil.rmtree(work)
    else:
        target.write_text(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
