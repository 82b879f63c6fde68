"""Hand-made mutation testing: does the test suite notice when one operator or constant of a module changes?

    python tools/mutants.py anomalygen/masks/augment.py tests/unit/masks/test_masks.py [--only 3,7] [--work DIR]
    python tools/mutants.py anomalygen/synthesis/blending.py -- tests/unit/methods/test_modelfree.py -k blend   (pytest options after --)
    python tools/mutants.py anomalygen/diffusion/sampling.py --kinds swap,argument -- tests/integration/test_wiring.py

Each mutant changes one thing in the module (an arithmetic operator, a comparison, and/or, a unary
minus or ``not``, a number, a boolean constant; or, for wiring, which value goes where in a call:
"swap" exchanges two neighbouring arguments of a call, "argument" replaces a local variable passed
to a call with another local variable of the same function, the one assigned last before the call,
else the first), is written into a copy of the project (``--work``,
default a temporary folder; the copy's ``src`` shadows the installed package through PYTHONPATH) and
the given tests run against it with ``-x``, each run in a fork of this process after it imported
torch, diffusers and the other heavy libraries once (about half the CPU of a new interpreter per
mutant; ``--no-fork`` for a new one). A mutant the tests pass "SURVIVED": either a test is
missing or the change does not alter behaviour (an equivalent mutant: read the line). Type hints
are left alone (and strings are never changed). ``--kinds`` keeps mutants of the named kinds only
(numbers stay those of the full list, so ``--only`` works either way); ``--sample N`` runs N of the
chosen mutants drawn at random (``--seed``), for a module too large to run whole. The last line
counts the survivors. A temporary
copy is removed at the end; one given with ``--work`` is kept.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import signal
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


WIRED = (ast.Name, ast.Attribute, ast.Subscript)  # the arguments a swap exchanges: values, not literals
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _arguments(call: ast.Call) -> list[ast.AST]:
    """A call's argument values in source order (positional, then keyword; ``*``/``**`` left out)."""
    values = [a for a in call.args if not isinstance(a, ast.Starred)]
    return values + [k.value for k in call.keywords if k.arg is not None]


def _locals(tree: ast.AST) -> dict[int, list[tuple[int, str]]]:
    """id of each Name argument of a call -> the (line, name) of every local variable of its function
    and the functions around it (parameters and assigned names), in source order."""
    found: dict[int, list[tuple[int, str]]] = {}

    def visit(node: ast.AST, scope: list[tuple[int, str]]) -> None:
        if isinstance(node, SCOPES):
            own = [(a.lineno if hasattr(a, "lineno") else node.lineno, a.arg)
                   for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs,
                             *filter(None, (node.args.vararg, node.args.kwarg)))]
            body = node.body if isinstance(node.body, list) else [node.body]
            own += [(n.lineno, n.id) for b in body for n in ast.walk(b) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
            scope = scope + sorted(own)
        if isinstance(node, ast.Call) and scope:
            for value in _arguments(node):
                if isinstance(value, ast.Name):
                    found[id(value)] = scope
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(tree, [])
    return found


def _replacement(name: ast.Name, scope: list[tuple[int, str]]) -> str | None:
    """Another local variable for ``name``: the one assigned last before its line, else the first; None
    when ``name`` is not a local variable (a global, a builtin) or the function has no other."""
    names = [n for _, n in scope]
    if name.id not in names:
        return None
    others = [(line, n) for line, n in scope if n != name.id]
    before = [n for line, n in others if line < name.lineno]
    return before[-1] if before else (others[0][1] if others else None)


def sites(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    """Every place a mutant can be made, in a fixed order."""
    skip, found = _annotations(tree), []
    scopes = _locals(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Call):
            values = _arguments(node)
            for a, b in zip(values, values[1:]):
                if isinstance(a, WIRED) and isinstance(b, WIRED) and ast.dump(a) != ast.dump(b):
                    found.append(((node, a, b), "swap"))
            for value in values:
                if id(value) in scopes and _replacement(value, scopes[id(value)]):
                    found.append(((value, _replacement(value, scopes[id(value)])), "argument"))
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
        if self.kind == "swap" and node is self.target[0]:
            _, a, b = self.target
            swap = {id(a): b, id(b): a}
            node.args = [swap.get(id(x), x) for x in node.args]
            for keyword in node.keywords:
                keyword.value = swap.get(id(keyword.value), keyword.value)
            return node
        if self.kind == "argument" and node is self.target[0]:
            return ast.copy_location(ast.Name(id=self.target[1], ctx=ast.Load()), node)
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
    line = (node[0] if isinstance(node, tuple) else node).lineno
    return ast.unparse(_Mutate(node, kind).visit(tree)), line, kind


HEAVY = ("torch", "torchvision", "diffusers", "transformers", "peft", "numpy", "PIL", "scipy", "skimage", "pytest")


def _preload(env: dict[str, str]) -> None:
    """Import the heavy third-party packages once, so that each forked test run starts without their
    import time (seconds); the project itself is never imported here, so every fork imports the mutant."""
    os.environ.update(env)
    for name in HEAVY:
        try:
            __import__(name)
        except ImportError:
            pass


def _spawned(pytest_args: list[str], work: Path, env: dict[str, str], timeout: float) -> int | None:
    """pytest's exit code in a new interpreter; None on a timeout."""
    try:
        return subprocess.run([sys.executable, "-m", "pytest", *pytest_args], cwd=work, env={**os.environ, **env},
                              capture_output=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return None


def _forked(pytest_args: list[str], work: Path, env: dict[str, str], timeout: float) -> int | None:
    """pytest's exit code in a fork of this process (``_preload`` done), killed after ``timeout``; None then."""
    pid = os.fork()
    if pid == 0:  # the child: the copy's src first on the path, output silenced
        code = 3
        try:
            os.chdir(work)
            sys.path.insert(0, str(work / "src"))
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1), os.dup2(null, 2)
            import pytest
            code = int(pytest.main(pytest_args))
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", help="path under src/, e.g. anomalygen/masks/augment.py")
    parser.add_argument("tests", nargs="+", help="pytest arguments (test files, -k ...)")
    parser.add_argument("--only", help="comma-separated mutant numbers")
    parser.add_argument("--kinds", help="comma-separated kinds to make (e.g. swap,argument), default all")
    parser.add_argument("--sample", type=int, help="run this many of the chosen mutants, drawn at random (--seed)")
    parser.add_argument("--seed", type=int, default=0, help="the draw of --sample")
    parser.add_argument("--work", type=Path, help="the project copy (default: a temporary folder)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant (a hang counts as caught)")
    parser.add_argument("--no-fork", dest="fork", action="store_false",
                        help="run each mutant's tests in a new interpreter (default: a fork of one that imported them once)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mutants-"))
    shutil.rmtree(work, ignore_errors=True)
    for name in ("src", "tests", "benchmarks"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", work)
    target = work / "src" / args.module
    source = target.read_text()
    kinds = [kind for _, kind in sites(ast.parse(source))]
    chosen = [int(k) for k in args.only.split(",")] if args.only else range(len(kinds))
    if args.kinds:
        chosen = [k for k in chosen if kinds[k] in args.kinds.split(",")]
    if args.sample is not None and args.sample < len(chosen):
        chosen = sorted(random.Random(args.seed).sample(list(chosen), args.sample))
    print(f"{args.module}: {len(kinds)} mutants, {len(chosen)} chosen", flush=True)
    env = {"PYTHONPATH": str(work / "src"), "OMP_NUM_THREADS": "1"}
    run = _forked if args.fork else _spawned
    if args.fork:
        _preload(env)
    lines, survived = source.splitlines(), 0
    for k in chosen:
        text, line, kind = mutant(source, k)
        target.write_text(text)
        start = time.monotonic()
        code = run(["-x", "-q", "-p", "no:cacheprovider", *args.tests], work, env, args.timeout)
        caught = code != 0  # None (a timeout) counts as caught: on a loaded machine, read it again with a longer --timeout
        verdict = "TIMEOUT " if code is None else "caught  " if caught else "SURVIVED"
        survived += not caught
        print(f"{verdict} #{k} line {line} {kind} ({time.monotonic() - start:.0f} s): "
              f"{lines[line - 1].strip()[:100]}", flush=True)
    print(f"{survived} of {len(chosen)} survived", flush=True)
    if args.work is None:
        shutil.rmtree(work)
    else:
        target.write_text(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
