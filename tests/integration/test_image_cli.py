"""`secvf image` through the real CLI (the images themselves are built by the fixture)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.vm


def test_build_reuses_the_cache_and_list_shows_every_field(built_images: dict) -> None:
    built = json.loads(run_cli("image", "build", "--json", check=True).stdout)
    assert {b["name"]: b["recipe_hash"] for b in built} == {
        name: info.recipe_hash for name, info in built_images.items()}
    listed = json.loads(run_cli("image", "list", "--json", check=True).stdout)
    for row in listed:
        assert set(row) >= {"name", "recipe_hash", "size_bytes", "built_at", "path"}
    assert {(r["name"], r["recipe_hash"]) for r in listed} >= {
        (n, i.recipe_hash) for n, i in built_images.items()}
    table = run_cli("image", "list", check=True).stdout
    assert "base" in table and built_images["base"].recipe_hash[:12] in table


def test_unknown_images_give_one_line_errors(built_images: dict) -> None:
    for args in (("image", "build", "nosuch"), ("image", "rm", "nosuch")):
        proc = run_cli(*args)
        assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
        assert "nosuch" in proc.stderr


def test_images_must_match_the_kind(built_images: dict) -> None:
    proc = run_cli("vm", "create", "x", "--image", "sandbox")
    assert proc.returncode != 0 and "exec agent" in proc.stderr and "'image'" in proc.stderr
    proc = run_cli("vm", "create", "y", "--kind", "ai-sandbox", "--image", "base")
    assert proc.returncode != 0 and "no exec agent" in proc.stderr
