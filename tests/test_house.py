"""House rules, checked: short functions, `hub/` and `synthetic/` independent, no pointers outside the repo."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sources(skip_tests: bool = True) -> list[Path]:
    files = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or "demo_model" in rel.parts or (skip_tests and rel.parts[0] == "tests"):
            continue
        files.append(path)
    return files


def test_no_function_outside_tests_is_over_100_lines():
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 100:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


@pytest.mark.parametrize(("package", "other"), [("hub", "synthetic"), ("synthetic", "hub")])
def test_hub_and_synthetic_do_not_import_each_other(package, other):
    pattern = re.compile(rf"^\s*(from\s+(\.\.|dynamic_llava\.){other}\b|import\s+dynamic_llava\.{other}\b)", re.M)
    found = [str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py") if pattern.search(p.read_text())]
    assert not found, found


def test_nothing_points_at_documents_or_issues_outside_the_repository():
    pattern = re.compile(r"DESIGN\.md|TRANSFORMERS_NOTES|\bissue \d+|\(item \d+\)|test_item\d+")
    found = []
    for path in [*_sources(skip_tests=False), *ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md")]:
        if path.name in ("CHANGELOG.md", "test_house.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert not found, found
