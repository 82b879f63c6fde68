"""The package's layers (docs/architecture.md), read from the source with ``ast`` (nothing is imported):
no import circle, no import from a lower layer to a higher one, and evaluation imports no method."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# bottom to top; a module may import its own layer and those below (docs/architecture.md)
LAYERS = [
    ("foundation", {"anomalygen", "errors", "types", "seeding", "io", "devices", "weights", "progress", "network", "options"}),
    ("data", {"data", "masks", "synthesis", "visualize"}),
    ("diffusion core", {"diffusion"}),
    ("methods", {"methods"}),
    ("generation", {"generation"}),
    ("evaluation", {"evaluation"}),
    ("applications", {"pipeline", "benchmark", "demo", "pretrain", "integrations"}),
    ("cli", {"cli", "__main__"}),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted((SRC / "anomalygen").rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The package's modules ``name`` imports, at the top or inside a function (a lazy import is an import)."""
    found = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in MODULES and target != name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def layer(name: str) -> int:
    top = name.split(".")[1] if "." in name else name
    return next(i for i, (_, members) in enumerate(LAYERS) if top in members)


def test_every_module_has_a_layer():
    for name in MODULES:
        assert layer(name) is not None


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = [f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
              for a, targets in GRAPH.items() for b in sorted(targets) if layer(b) > layer(a)]
    assert upward == []


def test_no_import_circle():
    """Depth-first search over the module graph; a back edge is a circle."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_evaluation_imports_no_method():
    uses = {(a, b) for a, targets in GRAPH.items() if a.startswith("anomalygen.evaluation")
            for b in targets if b.startswith("anomalygen.methods")}
    assert uses == set()


@pytest.mark.parametrize("lower", ["anomalygen.diffusion", "anomalygen.generation", "anomalygen.data", "anomalygen.synthesis"])
def test_a_lower_layer_names_no_method(lower):
    """The core, the generation package and the data know the generator interface at most, never a method."""
    uses = {(a, b) for a, targets in GRAPH.items() if a.startswith(lower) for b in targets
            if b.startswith("anomalygen.methods") and b != "anomalygen.methods.base"}
    assert uses == set()


# --flag texts below the CLI that are no advice the CLI could word: another program's flag, and report text
FLAGS_ALLOWED = {
    ("anomalygen.diffusion.backbone", "--local-dir"),  # the `huggingface-cli download` command to run
    ("anomalygen.diffusion.image_encoder", "--local-dir"),
    ("anomalygen.evaluation.classification", "--cls-random-init"),  # the report's label of the ResNet's start
    ("anomalygen.evaluation.run", "--cls-random-init"),  # the report's note on it
}


def test_no_flag_named_below_the_cli():
    """Messages below the CLI name options as the library does (`name` in advice: ``cli.flagged`` words
    it as a flag); a ``--flag`` in a string other than a docstring is refused."""
    flag = re.compile(r"(?<![\w-])--[a-z][a-z-]*")
    found = set()
    for name, path in MODULES.items():
        if name in ("anomalygen.cli", "anomalygen.__main__"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        found |= {(name, match) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  for match in flag.findall(node.value)}
    assert found - FLAGS_ALLOWED == set()
