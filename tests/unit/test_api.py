"""The curated public API: every exported name resolves and is documented, and the
faces use nothing from it that is not exported."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from secvf import api

FACES = Path(api.__file__).parent / "faces"


def test_every_export_resolves_once() -> None:
    assert len(api.__all__) == len(set(api.__all__))
    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert missing == []


def test_every_exported_callable_is_documented() -> None:
    undocumented = [name for name in api.__all__
                    if (inspect.isfunction(obj := getattr(api, name)) or inspect.isclass(obj))
                    and not inspect.getdoc(obj)]
    assert undocumented == []


def test_faces_use_only_exported_names() -> None:
    used: set[str] = set()
    for path in FACES.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "api"):
                used.add(node.attr)
    assert used, "the faces are expected to use the API"
    assert sorted(used - set(api.__all__)) == []
