"""The agent zipapp: identical bytes from identical sources, every agent module inside,
and a new sandbox recipe hash whenever any of them changes."""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

import secvf
from secvf.errors import ImageBuildFailed
from secvf.image import RECIPES, recipe_hash
from secvf.image.agent_zipapp import ZIPAPP_DATE_TIME, ZIPAPP_STUB, agent_zipapp
from secvf.image.recipe import AGENT_GUEST_PATH, Recipe

PACKAGE = Path(secvf.__file__).parent
AGENT_MODULES = sorted((PACKAGE / "guest" / "agent").glob("*.py"))


@pytest.fixture
def source_copy(tmp_path: Path) -> Path:
    """A copy of the sources the zipapp is built from, with other timestamps and modes."""
    copy = tmp_path / "secvf"
    (copy / "guest" / "agent").mkdir(parents=True)
    (copy / "exec").mkdir()
    for module in AGENT_MODULES:
        shutil.copy(module, copy / "guest" / "agent" / module.name)
    shutil.copy(PACKAGE / "exec" / "protocol.py", copy / "exec" / "protocol.py")
    shutil.copy(PACKAGE / "exec" / "forwarding.py", copy / "exec" / "forwarding.py")
    shutil.copy(PACKAGE / "guest" / "restore_watch.py", copy / "guest" / "restore_watch.py")
    for path in copy.rglob("*.py"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
        path.chmod(0o600)
    return copy


def _entries(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def test_the_same_sources_give_the_same_bytes(source_copy: Path) -> None:
    assert agent_zipapp() == agent_zipapp()
    assert agent_zipapp(source_copy) == agent_zipapp()


def test_it_holds_every_agent_module_the_protocol_and_package_stubs() -> None:
    entries = _entries(agent_zipapp())
    modules = {f"secvf/guest/agent/{m.name}": m.read_bytes() for m in AGENT_MODULES}
    assert entries == {
        **modules,
        "__main__.py": (PACKAGE / "guest" / "agent" / "__main__.py").read_bytes(),
        "secvf/exec/protocol.py": (PACKAGE / "exec" / "protocol.py").read_bytes(),
        "secvf/exec/forwarding.py": (PACKAGE / "exec" / "forwarding.py").read_bytes(),
        "secvf/guest/restore_watch.py": (PACKAGE / "guest" / "restore_watch.py").read_bytes(),
        "secvf/__init__.py": ZIPAPP_STUB,
        "secvf/exec/__init__.py": ZIPAPP_STUB,
        "secvf/guest/__init__.py": ZIPAPP_STUB,
    }


def test_entries_are_sorted_with_fixed_time_and_mode() -> None:
    with zipfile.ZipFile(io.BytesIO(agent_zipapp())) as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    assert {(i.date_time, i.external_attr >> 16, i.compress_type) for i in infos} == {
        (ZIPAPP_DATE_TIME, 0o100644, zipfile.ZIP_STORED)
    }


def _with_agent_from(source: Path) -> Recipe:
    """The sandbox recipe with its agent zipapp built from ``source``."""
    sandbox = RECIPES["sandbox"]
    return replace(sandbox, files=tuple(
        replace(f, source=source) if f.dest == AGENT_GUEST_PATH else f for f in sandbox.files))


@pytest.mark.parametrize("edited",
                         [m.name for m in AGENT_MODULES]
                         + ["protocol.py", "forwarding.py", "restore_watch.py"])
def test_any_edited_module_changes_the_zipapp_and_the_sandbox_recipe_hash(
    source_copy: Path, edited: str
) -> None:
    sandbox = RECIPES["sandbox"]
    copied = _with_agent_from(source_copy)
    before_bytes, before_hash = agent_zipapp(source_copy), recipe_hash(copied)
    assert before_hash == recipe_hash(sandbox)
    path = next(source_copy.rglob(edited))
    path.write_text(path.read_text() + "# edited\n")
    assert agent_zipapp(source_copy) != before_bytes
    assert recipe_hash(copied) != before_hash


def test_missing_agent_sources_are_a_clear_build_error(source_copy: Path) -> None:
    (source_copy / "guest" / "agent" / "__main__.py").unlink()
    broken = _with_agent_from(source_copy)
    with pytest.raises(ImageBuildFailed) as err:
        recipe_hash(broken)
    assert err.value.step == "recipe"
    assert str(source_copy / "guest" / "agent" / "__main__.py") in str(err.value)
