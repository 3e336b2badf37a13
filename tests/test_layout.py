"""The package's layering (DESIGN.md §2, STYLE.md 10), checked on the source itself.

Imports flow one way: cli → exporters → runtime → device / compress → planning → the base
modules (io, table, formats, manifest, device_profiles); no module imports a layer above
its own, no two modules import each other (directly or through a longer cycle), and the
torch-free layers stay torch-free when imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> installed package (pyproject's package-dir)
PACKAGE_DIRS = {"flexrank": ROOT / "flexrank", "flexrank.exporters": ROOT / "exporters",
                "flexrank.runtime": ROOT / "runtime",
                "flexrank.device_profiles": ROOT / "device_profiles"}
BASE = {"flexrank.io", "flexrank.table", "flexrank.formats", "flexrank.manifest",
        "flexrank.budget", "flexrank.device_profiles"}
# layer -> the layers it may import (besides itself and the base modules)
MAY_IMPORT = {
    "base": set(),
    "planning": set(),
    "compress": {"planning"},
    "device": {"planning"},
    "runtime": {"device", "planning"},
    "exporters": {"runtime", "compress", "planning"},
    "cli": {"exporters", "runtime", "device", "compress", "planning", "api"},
    "api": {"exporters", "runtime", "device", "compress", "planning"},
}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module == "flexrank":
        return "api"
    return module.split(".")[1]


def runtime_nodes(tree: ast.AST):
    """Every node of `tree` except those under `if TYPE_CHECKING:` (never executed)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules that `module` imports anywhere in its body (lazy imports count;
    imports for type checkers only do not)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:  # `from pkg import submodule` or a symbol
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                out.add(name)
    return out


GRAPH = {m: imported(m, p, set(modules())) for m, p in modules().items()}


def test_the_layer_map_covers_every_module():
    assert {layer(m) for m in GRAPH} <= set(MAY_IMPORT), sorted({layer(m) for m in GRAPH})


def upward_imports(graph: dict[str, set[str]], module: str) -> list[str]:
    own = layer(module)
    allowed = MAY_IMPORT[own] | {own, "base"}
    return sorted(m for m in graph[module] if layer(m) not in allowed)


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every import cycle, as 'a -> b -> a' (a module is in a cycle iff it reaches itself)."""
    found = set()
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    found.add(" -> ".join([*trail, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    return sorted(found)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_a_layer_above_it(module):
    bad = upward_imports(GRAPH, module)
    assert not bad, f"{module} ({layer(module)}) imports {bad}"


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "\n".join(found[:10])


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """The two checks above, on hand-made modules where they must fail."""
    (tmp_path / "a.py").write_text("from flexrank.cli import main\n"
                                   "def f():\n    import flexrank.planning.b\n")
    (tmp_path / "b.py").write_text("from flexrank.planning import a\n")
    known = {"flexrank.cli", "flexrank.planning", "flexrank.planning.a", "flexrank.planning.b"}
    graph = {"flexrank.planning.a": imported("flexrank.planning.a", tmp_path / "a.py", known),
             "flexrank.planning.b": imported("flexrank.planning.b", tmp_path / "b.py", known),
             "flexrank.cli": set()}
    assert graph["flexrank.planning.a"] == {"flexrank.cli", "flexrank.planning.b"}
    assert upward_imports(graph, "flexrank.planning.a") == ["flexrank.cli"]
    assert upward_imports(graph, "flexrank.planning.b") == []
    assert cycles(graph) == ["flexrank.planning.a -> flexrank.planning.b -> flexrank.planning.a",
                             "flexrank.planning.b -> flexrank.planning.a -> flexrank.planning.b"]


BLOCK_TORCH = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED}:
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, Block())
""")


def run_blocked(code: str, blocked=("torch", "transformers")) -> subprocess.CompletedProcess:
    prelude = BLOCK_TORCH.replace("{BLOCKED}", repr(set(blocked)))
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["flexrank", "flexrank.cli", "flexrank.runtime",
                                    "flexrank.device.decide", "flexrank.device.published",
                                    "flexrank.planning.planner", "flexrank.manifest",
                                    "flexrank.exporters"])
def test_light_modules_import_without_torch(module):
    done = run_blocked(f"import {module}\nprint('ok')")
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_cli_help_and_profiles_run_without_torch():
    done = run_blocked("""
        import sys
        from flexrank.cli import main
        assert main(["profiles"]) == 0
        try:
            main(["--help"])
        except SystemExit as stop:
            assert stop.code == 0
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pixel8" in done.stdout and "flexrank-export" in done.stdout or "export" in done.stdout
