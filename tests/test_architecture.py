"""The package's import graph is layered: no circles between files, no arrow from a lower area up to a higher one.

Reads every module's imports with ``ast`` (function-level imports included, since a lazy import is still an
arrow), so the rule stays true without running anything. Areas are the first-level subpackages of
``batchpilot``; ``batchpilot.io`` and ``batchpilot.metrics`` are shared by every area and import nothing else
of batchpilot.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "batchpilot"

# area -> the areas it may import (besides itself and the shared modules)
ALLOWED: dict[str, set[str]] = {
    "cli": {"train", "generate", "plan", "data", "model", "reports", "eval", "serve"},
    "train": {"plan", "data", "model"},
    "plan": {"model"},
    "generate": {"model", "data"},
    "eval": {"generate", "model", "data"},
    "serve": {"generate", "model", "data"},
    "data": set(),
    "model": set(),
    "reports": set(),
}
SHARED = {"io", "metrics"}  # metrics may import io; io imports nothing of batchpilot
TOP = {"__init__", "__main__"}  # the package root: ``batchpilot`` and ``python -m batchpilot``

# Arrows against the rule still allowed, each with the change that removes it. Both lists must be empty when
# the architecture step (issue 13) has merged; an entry that no longer exists fails the test, so it is removed.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
KNOWN_CIRCLES: dict[tuple[str, ...], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The batchpilot modules that ``name`` imports (a ``from pkg import sub`` counts as importing ``pkg.sub``)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import batchpilot.a.b.c` of a non-module name
                target = target.rpartition(".")[0]
            if target.startswith("batchpilot") and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward_arrows(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs whose areas break the layering."""
    bad = []
    for src, targets in g.items():
        a = area(src)
        for dst in targets:
            b = area(dst)
            if b == a or a in TOP or (b in SHARED and a not in SHARED):
                continue
            if a in SHARED:  # io imports nothing of batchpilot, metrics only io
                if (a, b) != ("metrics", "io"):
                    bad.append((src, dst))
            elif b in TOP and a == "cli":  # the CLI may use the package's top-level names (they re-export model)
                continue
            elif b in TOP or b not in ALLOWED.get(a, set()):
                bad.append((src, dst))
    return sorted(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one file (each one is at least one circle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the package is small, recursion depth is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def without_package_reexports(g: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop arrows from a package's ``__init__`` into its own submodules (re-exports, not a design circle)."""
    return {src: {dst for dst in targets if not dst.startswith(src + ".")} for src, targets in g.items()}


def test_every_area_is_known():
    areas = {area(m) for m in modules()} - TOP - SHARED
    assert areas <= set(ALLOWED), f"new area(s) {sorted(areas - set(ALLOWED))}: add them to ALLOWED"


def test_no_upward_arrows(capsys):
    bad = upward_arrows(graph())
    with capsys.disabled():
        print(f"\nimport graph: {len(bad)} upward arrow(s) ({len(KNOWN_UPWARD)} allowed as known)")
    unexpected = [edge for edge in bad if edge not in KNOWN_UPWARD]
    assert not unexpected, "imports against the layering: " + "; ".join(f"{a} -> {b}" for a, b in unexpected)
    stale = [edge for edge in KNOWN_UPWARD if edge not in bad]
    assert not stale, f"KNOWN_UPWARD lists edges that are gone: {stale}"


def test_no_circular_imports(capsys):
    circles = [tuple(c) for c in cycles(without_package_reexports(graph()))]
    with capsys.disabled():
        print(f"\nimport graph: {len(circles)} circle(s) between files ({len(KNOWN_CIRCLES)} allowed as known)")
    unexpected = [c for c in circles if c not in KNOWN_CIRCLES]
    assert not unexpected, "circular imports: " + "; ".join(" <-> ".join(c) for c in unexpected)
    stale = [c for c in KNOWN_CIRCLES if c not in circles]
    assert not stale, f"KNOWN_CIRCLES lists circles that are gone: {stale}"


def test_shared_modules_import_nothing_else_of_batchpilot():
    g = graph()
    assert g["batchpilot.io"] == set(), f"batchpilot.io imports {sorted(g['batchpilot.io'])}"
    assert g["batchpilot.metrics"] <= {"batchpilot.io"}, f"batchpilot.metrics imports {sorted(g['batchpilot.metrics'])}"


def test_reader_sees_function_level_imports(tmp_path):
    """The checker itself: a lazy import inside a function is an arrow too."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from batchpilot.train import trainer\n    import batchpilot.plan.laws as laws\n")
    known = {"batchpilot.train", "batchpilot.train.trainer", "batchpilot.plan", "batchpilot.plan.laws"}
    assert imports_of("batchpilot.model.x", src, known) == {"batchpilot.train.trainer", "batchpilot.plan.laws"}
    assert upward_arrows({"batchpilot.model.x": {"batchpilot.train.trainer"}}) == [
        ("batchpilot.model.x", "batchpilot.train.trainer")]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


@pytest.mark.parametrize("name", ["batchpilot.io", "batchpilot.metrics"])
def test_shared_modules_exist(name):
    assert name in modules()
