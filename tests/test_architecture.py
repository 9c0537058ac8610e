"""The tree's shape, checked from the source: dependencies run one way, files stay readable.

- The deploy side (`cxrlite.runtime`, `cxrlite.server`) never reaches the build side
  (`cxrlite.export`, `cxrlite.quantize`, `cxrlite.train`), the phantom generator or the
  benchmarks, not even through another module: a hospital's server must not need them.
- No import cycle between modules (lazy imports inside functions count too).
- No Python file over 600 lines.
Imports are read with `ast`, so nothing here imports the project.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The installed package name of each top-level folder (pyproject's package-dir).
PACKAGE_DIRS = {
    "cxrlite": "cxrlite",
    "train": "cxrlite.train",
    "export": "cxrlite.export",
    "quantize": "cxrlite.quantize",
    "bench": "cxrlite.bench",
}
DEPLOY_SIDE = ("cxrlite.runtime", "cxrlite.server", "cxrlite.pacs")
BUILD_SIDE = (
    "cxrlite.export",
    "cxrlite.quantize",
    "cxrlite.train",
    "cxrlite.phantoms",
    "cxrlite.bench",
)
MAX_LINES = 600


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [*PACKAGE_DIRS[rel.parts[0]].split("."), *rel.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _source_files() -> dict[str, Path]:
    return {
        _module_name(path): path
        for folder in PACKAGE_DIRS
        for path in sorted((ROOT / folder).rglob("*.py"))
    }


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `module` imports, anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
            found |= {n for n in names if n in known} or ({base} & known)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
    found.discard(module)
    return found


def _graph(with_packages: bool = False) -> dict[str, set[str]]:
    """{module: the project modules it imports}; `with_packages` adds the packages whose
    `__init__` an import runs too (importing a.b.c runs a/__init__ and a/b/__init__)."""
    files = _source_files()
    known = set(files)
    graph = {module: _imports(module, path, known) for module, path in files.items()}
    if with_packages:
        for module, deps in graph.items():
            for dep in list(deps):
                parts = dep.split(".")
                deps |= {".".join(parts[:i]) for i in range(1, len(parts))} & known - {module}
    return graph


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` imports, directly or not, with the module that imports it."""
    seen, stack = {}, [start]
    while stack:
        current = stack.pop()
        for dep in graph[current]:
            if dep not in seen and dep != start:
                seen[dep] = current
                stack.append(dep)
    return seen


def _forbidden(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module in sorted(m for m in graph if _within(m, DEPLOY_SIDE)):
        for dep, via in sorted(_reachable(graph, module).items()):
            if _within(dep, BUILD_SIDE):
                bad.append(f"{module} reaches {dep} (imported by {via})")
    return bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_the_deploy_side_never_reaches_the_build_side():
    assert not _forbidden(_graph(with_packages=True)), "\n".join(_forbidden(_graph(True)))


def test_no_two_modules_import_each_other():
    # A package's __init__ re-exporting its modules is not a cycle between modules.
    assert not _cycles(_graph()), _cycles(_graph())


def test_the_checks_fail_on_a_forbidden_import_and_a_cycle():
    graph = {
        "cxrlite.runtime.a": {"cxrlite.b"},
        "cxrlite.b": {"cxrlite.c"},
        "cxrlite.c": {"cxrlite.b", "cxrlite.phantoms.generator"},
        "cxrlite.phantoms.generator": set(),
    }
    assert _forbidden(graph) == [
        "cxrlite.runtime.a reaches cxrlite.phantoms.generator (imported by cxrlite.c)"
    ]
    assert _cycles(graph) == [["cxrlite.b", "cxrlite.c"]]
    # ...and the real graph is read: the engine opens bundles.
    assert "cxrlite.bundle" in _graph()["cxrlite.runtime.engine"]


def test_no_python_file_over_600_lines():
    files = [
        p for folder in (*PACKAGE_DIRS, "tests", "scripts") for p in (ROOT / folder).rglob("*.py")
    ]
    long = {
        str(p.relative_to(ROOT)): n
        for p in files
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, long
