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
