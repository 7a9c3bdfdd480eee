"""The docs name tests that pin the invariants: every name must be a test that exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_test_the_docs_name_exists() -> None:
    refs = [
        (doc.name, m.group(1), m.group(2))
        for doc in (ROOT / "docs").glob("*.md")
        for m in _REF.finditer(doc.read_text())
    ]
    assert len(refs) > 50  # architecture.md pins the invariants with them
    missing = [
        f"{doc}: {file}::{name}"
        for doc, file, name in refs
        if not (ROOT / file).exists() or name not in _tests_in(ROOT / file)
    ]
    assert not missing, "docs name tests that do not exist:\n" + "\n".join(missing)
