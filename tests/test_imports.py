"""The direction of imports: jaxattn → pallas_kernels → jax, nothing back up, no loops.

Reads the source of both packages (ast, nothing is imported) and collects every import:
pallas_kernels never imports jaxattn, neither package imports the `benchmarks`
scripts, and jaxattn's modules import each other without a cycle — counting imports
inside functions too, since a lazy import that closes a loop still makes one.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jaxattn", "pallas_kernels")

def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: pathlib.Path, module: str, *, top_level_only: bool) -> set[str]:
    """Absolute names of the modules `module` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:   # module level includes if/try blocks, not function bodies
        nodes = [n for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # `from pkg import module` imports pkg.module when it is a module
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _known(name: str, modules) -> str | None:
    """The module of ours that `name` refers to (longest prefix), or None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def test_pallas_kernels_never_imports_jaxattn():
    modules = _modules()
    bad = sorted(f"{m} imports {i}" for m, p in modules.items() if m.startswith("pallas_kernels")
                 for i in _imports(p, m, top_level_only=False) if i.split(".")[0] == "jaxattn")
    assert not bad, "pallas_kernels must not import jaxattn (jaxattn → pallas_kernels → jax):\n" + "\n".join(bad)


def test_no_package_imports_benchmarks():
    modules = _modules()
    bad = sorted(f"{m} imports {i}" for m, p in modules.items()
                 for i in _imports(p, m, top_level_only=False) if i.split(".")[0] == "benchmarks")
    assert not bad, "benchmarks/ holds scripts, not a dependency:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk of `graph` closes (empty for a DAG)."""
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycle_among_jaxattn_modules():
    modules = _modules()
    graph = {m: set() for m in modules if m.split(".")[0] == "jaxattn"}
    for m in graph:
        ancestors = {".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)}
        for name in _imports(modules[m], m, top_level_only=False):
            target = _known(name, modules)
            # A module's parent packages are loaded before it anyway (`from jaxattn
            # import masks` needs jaxattn, which is already importing): not an edge.
            if target in graph and target != m and target not in ancestors:
                graph[m].add(target)
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(c) for c in cycles)


def test_cycle_finder_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("source,expected", [
    ("from pallas_kernels import common\n", {"pallas_kernels", "pallas_kernels.common"}),
    ("def f():\n    import benchmarks.bench\n", set()),
])
def test_the_import_collector_itself(tmp_path, source, expected):
    # The checks above can only fail if the collector sees imports: pin what it finds.
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert _imports(path, "jaxattn.probe", top_level_only=True) == expected
