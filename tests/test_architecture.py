"""ARCHITECTURE.md stays true: the files it names exist, the layers it draws hold, and no import
cycle joins two tvtool packages or two modules, not even through an import inside a function
(static analysis of the source with `ast`)."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "ARCHITECTURE.md").read_text()
# The rooms from the bottom up: a room may import only the rooms before it in this list.
LAYERS = ["errors", "request", "checkpoints", "store", "vectors", "datasets", "models",
          "compose", "cli", "demo"]


def _modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "tvtool").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, bool]]:
    return _imports_of(path.read_text())


def _imports_of(source: str) -> list[tuple[str, bool]]:
    """(imported tvtool module, at import time?) for every import outside TYPE_CHECKING blocks,
    those inside functions included (they are not at import time)."""
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, top)
                continue
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                    ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for a in child.names:
                    full = f"{child.module}.{a.name}"
                    out.append((full if full in MODULES else child.module, top))
            visit(child, inner)

    visit(ast.parse(source), True)
    return [(m, top) for m, top in out if m in MODULES]


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "tvtool"


GRAPH = {m: _imports(p) for m, p in MODULES.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            strong(v)
    return found


def test_every_file_the_architecture_names_exists() -> None:
    named = set(re.findall(r"`((?:tvtool|tests|bench|completions)/[\w./-]*)`", DOC))
    assert len(named) > 30
    missing = sorted(p for p in named if not (ROOT / p.rstrip("/")).exists())
    assert missing == [], f"ARCHITECTURE.md names files that do not exist: {missing}"


def test_every_package_is_described() -> None:
    for p in sorted((ROOT / "tvtool").iterdir()):
        if p.is_dir() and (p / "__init__.py").exists():
            assert f"`tvtool/{p.name}/`" in DOC, f"ARCHITECTURE.md does not describe {p.name}/"


def test_no_import_cycle_between_packages() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for m, imports in GRAPH.items():
        for target, _ in imports:
            if _room(target) != _room(m):
                edges[_room(m)].add(_room(target))
    assert _cycles(edges) == []


def test_rooms_import_only_the_rooms_below_them() -> None:
    bad = []
    for m, imports in GRAPH.items():
        here = _room(m)
        for target, _ in imports:
            there = _room(target)
            if here in LAYERS and there in LAYERS and LAYERS.index(there) > LAYERS.index(here):
                bad.append(f"{m} -> {target}")
    assert bad == [], "imports against the layers of ARCHITECTURE.md:\n" + "\n".join(bad)
    assert " -> ".join(f"`{r}`" for r in LAYERS) in " ".join(DOC.split())


def test_no_import_cycle_between_modules() -> None:
    """No two tvtool modules import each other, directly or around a loop, counting the lazy
    imports inside functions too (they keep `--help` torch-free, but a loop through them is
    still a loop: the shared piece belongs in a lower module)."""
    edges = {m: {t for t, _ in imports} for m, imports in GRAPH.items()}
    assert _cycles(edges) == []


def test_the_cycle_check_sees_imports_inside_functions() -> None:
    """The check above would fail on a loop closed by a function-level import."""
    src = "def f():\n    from tvtool.errors import few\n"
    tree = {"a": [("tvtool.errors", False)], "tvtool.errors": [("a", True)]}
    assert ("tvtool.errors", False) in _imports_of(src)
    assert _cycles({m: {t for t, _ in ts} for m, ts in tree.items()}) == [["a", "tvtool.errors"]]


def _fixtures(path: Path) -> set[str]:
    """Names of the functions decorated with a pytest fixture in a test file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef):
            for d in node.decorator_list:
                target = d.func if isinstance(d, ast.Call) else d
                if "fixture" in ast.unparse(target):
                    out.add(node.name)
    return out


def test_no_test_module_imports_another_modules_fixtures() -> None:
    """Shared fixtures live in tests/conftest.py; a test module may import helpers (from helper
    modules or, for plain functions, another test module), never a fixture."""
    tests = ROOT / "tests"
    bad = []
    for p in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                src = tests / f"{node.module}.py"
                if src.is_file() and src.name != "conftest.py":
                    shared = _fixtures(src) & {a.name for a in node.names}
                    bad += [f"{p.name} imports fixture {n} from {src.name}" for n in shared]
    assert bad == [], "\n".join(bad)
