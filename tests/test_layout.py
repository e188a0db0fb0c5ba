"""The repository's layering, read with ``ast``: the library imports nothing from the scripts, tools, bench or tests;
scripts and tools import the library and never edit ``sys.path``."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
OUTSIDE_LIBRARY = ("pretrain", "transfer", "tools", "bench", "tests")


def _imports(path: Path) -> Iterator[Tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def _py_files(folder: str):
    return sorted((REPO / folder).rglob("*.py"))


def test_the_library_imports_nothing_from_outside_it():
    bad = [f"{p.relative_to(REPO)}:{line} imports {name}" for p in _py_files("moco_zoo")
           for line, name in _imports(p) if name.split(".")[0] in OUTSIDE_LIBRARY]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", ["pretrain", "transfer", "tools"])
def test_scripts_import_the_library_and_leave_sys_path_alone(folder):
    for p in _py_files(folder):
        text = p.read_text(encoding="utf-8")
        assert "sys.path" not in text, f"{p.relative_to(REPO)} edits sys.path"
        for line, name in _imports(p):
            assert name.split(".")[0] not in ("pretrain", "transfer", "tests"), \
                f"{p.relative_to(REPO)}:{line} imports {name}: scripts import moco_zoo"


def test_user_scripts_are_thin():
    for folder in ("pretrain", "transfer"):
        for p in _py_files(folder):
            n = sum(1 for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
            assert n <= 60, f"{p.relative_to(REPO)} has {n} lines: logic belongs in moco_zoo"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _library_graph():
    """Module-level imports between the library's own modules (``from . import x`` counts as importing ``x``)."""
    modules = {_module_name(p): p for p in _py_files("moco_zoo")}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(name, path.name == "__init__.py", node)
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is not a cycle
                    graph[name].add(t)
    return graph


def test_the_library_has_no_import_cycles():
    graph = _library_graph()
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


# Lazy on purpose: detectron2 is an optional dependency; fcntl and a private torch helper are platform/version guards.
LAZY_IMPORTS_ALLOWED = ("detectron2", "fcntl", "torch.utils._foreach_utils")


def test_library_imports_sit_at_the_top_of_modules():
    bad = []
    for p in _py_files("moco_zoo"):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                        if not (name or "").startswith(LAZY_IMPORTS_ALLOWED):
                            bad.append(f"{p.relative_to(REPO)}:{node.lineno} imports {name} inside {fn.name}()")
    assert not bad, "\n".join(bad)


def test_every_config_file_of_the_library_ships_in_the_wheel():
    """Each YAML beside the library code matches a setup.py package_data pattern (else an installed wheel lacks it)."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    package_data = next(ast.literal_eval(kw.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                        for kw in node.keywords if kw.arg == "package_data")
    missing = []
    for path in (REPO / "moco_zoo").rglob("*.yaml"):
        rel = path.relative_to(REPO)
        ok = any(rel.is_relative_to(Path(*pkg.split("."))) and
                 rel.relative_to(Path(*pkg.split("."))).match(pattern)
                 for pkg, patterns in package_data.items() for pattern in patterns)
        if not ok:
            missing.append(str(rel))
    assert not missing, f"not in setup.py package_data: {missing}"
