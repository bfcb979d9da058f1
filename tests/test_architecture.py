"""The layer picture of docs/architecture.md, enforced: one-way imports, no cycles, no torch below.

Every ``import samedge...`` in the package counts, module level or inside a function: a lazy
import that points upward is still a dependency in the wrong direction.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "samedge"

# Lower layers first; a module may import its own layer or any layer before it.
LAYERS = [
    {"errors", "progress", "speed"},
    {"runtime", "data", "overlay"},
    {"models"},
    {"export"},
    {"validation"},
    {"quantize"},
    {"pipeline", "doctor"},
    {"cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("samedge"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("samedge"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports_of(path):
            # ``from samedge.data import x`` may name a submodule; keep the deepest module that exists
            targets.add(imported if imported in modules else imported.rsplit(".", 1)[0])
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for index, members in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")


def test_imports_point_down_the_layers():
    wrong = [f"{a} -> {b}" for a, targets in graph().items() if a != "samedge"
             for b in targets if b != "samedge" and layer(b) > layer(a)]
    assert not wrong, "upward imports:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    for package_init in [m for m in edges if m.count(".") == 1 and (PACKAGE / m.split(".")[1] / "__init__.py").exists()]:
        edges[package_init] = set()  # a package's __init__ re-exporting its own modules is no cycle
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("module", ["samedge.runtime", "samedge.data", "samedge.cli",
                                    "samedge.models.registry",
                                    "samedge.speed"])  # the benchmarks' timing
def test_bottom_layers_and_cli_import_no_torch(module):
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'torchvision', 'onnx') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, f"{module} imports {run.stdout.strip()} {run.stderr[-500:]}"
