"""Sandbox workspaces over a VM's life (docs/sandbox.md, Workspaces): every new sandbox
and every clone gets a fresh directory, a rename takes the default workspace along, a
reused name never inherits what an earlier guest left, a failed create leaves nothing,
and the audit flags a directory two VMs can both write.

The sandboxes here are created, never booted, from a stand-in ``sandbox`` image."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from secvf import api
from secvf.errors import SecVFError
from secvf.machine.shares import default_workspace
from secvf.model.config import save_config
from secvf.store import library
from secvf.store.library import DiskError
from secvf.workflows.workspaces import with_workspace
from tests.helpers import run_cli
from tests.unit.fake_images import publish_fake_image


@pytest.fixture(autouse=True)
def sandbox_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECVF_CACHE", str(tmp_path / "cache"))
    publish_fake_image("sandbox")


def workspace(name: str) -> Path:
    config = api.get_vm(name)
    assert config.channels is not None
    [path] = [s.host_path for s in config.channels.shares if s.tag == "workspace"]
    return Path(path)


def own_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True)
    return path


def plant_what_a_hostile_guest_leaves(directory: Path) -> None:
    (directory / "notes.txt").write_text("from the old guest\n")
    tool = directory / "tool"
    tool.write_bytes(b"\x7fELF")
    tool.chmod(0o4755)
    (directory / "shadow").symlink_to("/etc/shadow")
    os.mkfifo(directory / "pipe")
    (directory / "sub").mkdir()
    (directory / "sub" / "deep.txt").write_text("deep\n")


# ---- clones --------------------------------------------------------------------------------


def test_a_sandbox_clone_gets_its_own_empty_workspace() -> None:
    api.create_sandbox("sp")
    (workspace("sp") / "notes.txt").write_text("only sp's\n")
    proc = run_cli("vm", "clone", "sp", "sp2")
    assert proc.returncode == 0, proc.stderr
    assert workspace("sp2") == default_workspace("sp2")
    assert workspace("sp2").is_dir() and list(workspace("sp2").iterdir()) == []
    assert workspace("sp") == default_workspace("sp")
    assert (workspace("sp") / "notes.txt").read_text() == "only sp's\n"


def test_a_clone_keeps_read_only_shares(tmp_path: Path) -> None:
    reference = own_dir(tmp_path / "reference")
    api.create_sandbox("sp", shares=[f"{reference}:/data/ref:ro"])
    api.clone_vm("sp", "sp2")
    shares = {s.tag: s for s in api.get_vm("sp2").channels.shares}  # type: ignore[union-attr]
    assert shares["ro0"].host_path == str(reference) and shares["ro0"].read_only
    assert shares["workspace"].host_path == str(default_workspace("sp2"))


def test_copy_workspace_copies_files_and_nothing_dangerous() -> None:
    api.create_sandbox("sp")
    source = workspace("sp")
    plant_what_a_hostile_guest_leaves(source)
    proc = run_cli("vm", "clone", "sp", "sp2", "--copy-workspace")
    assert proc.returncode == 0, proc.stderr
    copy = workspace("sp2")
    assert copy == default_workspace("sp2") != source
    assert (copy / "notes.txt").read_text() == "from the old guest\n"
    assert (copy / "sub" / "deep.txt").read_text() == "deep\n"
    assert (copy / "tool").read_bytes() == b"\x7fELF"
    assert stat.S_IMODE((copy / "tool").stat().st_mode) == 0o755  # setuid dropped
    assert (copy / "shadow").is_symlink() and os.readlink(copy / "shadow") == "/etc/shadow"
    assert not (copy / "pipe").exists()
    assert "pipe" in proc.stderr  # what was left out is said
    assert sorted(p.name for p in source.iterdir()) == [
        "notes.txt", "pipe", "shadow", "sub", "tool"]


def test_copy_workspace_needs_a_vm_with_a_workspace(tmp_path: Path) -> None:
    iso = tmp_path / "blank.iso"
    iso.write_bytes(b"\0" * 2048)
    api.create_vm("gen", iso=iso)
    proc = run_cli("vm", "clone", "gen", "gen2", "--copy-workspace")
    assert proc.returncode != 0 and "no workspace" in proc.stderr
    assert [i.bundle.name for i in api.list_vms()] == ["gen"]


def test_a_clone_onto_a_name_with_a_leftover_workspace_is_refused() -> None:
    api.create_sandbox("sp")
    leftover = own_dir(default_workspace("sp2"))
    (leftover / "old.txt").write_text("left\n")
    proc = run_cli("vm", "clone", "sp", "sp2")
    assert proc.returncode != 0 and str(leftover) in proc.stderr
    assert [i.bundle.name for i in api.list_vms()] == ["sp"]
    assert sorted(p.name for p in leftover.iterdir()) == ["old.txt"]


def test_a_failed_clone_removes_the_workspace_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    api.create_sandbox("sp")
    (workspace("sp") / "notes.txt").write_text("x\n")
    real = library.qemu_img

    def failing(*args: str) -> str:
        if args[0] == "create":
            raise DiskError("qemu-img: No space left on device")
        return real(*args)

    monkeypatch.setattr(library, "qemu_img", failing)
    with pytest.raises(DiskError):
        api.clone_vm("sp", "sp2", copy_workspace=True)
    assert not default_workspace("sp2").parent.exists()
    monkeypatch.setattr(library, "qemu_img", real)
    api.clone_vm("sp", "sp2")
    assert list(workspace("sp2").iterdir()) == []


# ---- renames -------------------------------------------------------------------------------


def test_rename_moves_the_default_workspace_and_frees_the_name() -> None:
    api.create_sandbox("sp")
    (workspace("sp") / "notes.txt").write_text("sp's work\n")
    run_cli("vm", "rename", "sp", "sp-old", check=True)
    assert workspace("sp-old") == default_workspace("sp-old")
    assert (workspace("sp-old") / "notes.txt").read_text() == "sp's work\n"
    assert not default_workspace("sp").parent.exists()
    run_cli("sandbox", "create", "sp", check=True)
    assert workspace("sp") == default_workspace("sp") != workspace("sp-old")
    assert list(workspace("sp").iterdir()) == []


def test_rename_leaves_a_workspace_named_with_workspace_where_it_is(tmp_path: Path) -> None:
    project = own_dir(tmp_path / "project")
    (project / "src.c").write_text("int main;\n")
    api.create_sandbox("sp", workspace=project)
    api.rename_vm("sp", "sp2")
    assert workspace("sp2") == project and (project / "src.c").exists()
    assert not default_workspace("sp2").exists()


def test_rename_onto_a_name_with_a_leftover_workspace_is_refused() -> None:
    api.create_sandbox("sp")
    leftover = own_dir(default_workspace("other"))
    proc = run_cli("vm", "rename", "sp", "other")
    assert proc.returncode != 0 and str(leftover) in proc.stderr
    assert workspace("sp") == default_workspace("sp") and workspace("sp").is_dir()
    assert [i.bundle.name for i in api.list_vms()] == ["sp"]


# ---- reused names --------------------------------------------------------------------------


def test_a_reused_name_does_not_inherit_the_old_workspace() -> None:
    api.create_sandbox("sp")
    old = workspace("sp")
    plant_what_a_hostile_guest_leaves(old)
    run_cli("vm", "delete", "sp", check=True)  # keeps the workspace
    proc = run_cli("sandbox", "create", "sp")
    assert proc.returncode != 0
    assert str(old) in proc.stderr and "secvf sandbox rm --purge sp" in proc.stderr
    assert f"--workspace {old}" in proc.stderr
    assert api.list_vms() == [] and (old / "notes.txt").exists()
    assert run_cli("vm", "create", "sp", "--kind", "ai-sandbox").returncode != 0

    run_cli("sandbox", "rm", "--purge", "sp", check=True)  # no VM: the leftover goes
    assert not old.parent.exists()
    run_cli("sandbox", "create", "sp", check=True)
    assert workspace("sp") == old and list(old.iterdir()) == []


def test_a_leftover_workspace_can_be_reused_on_purpose() -> None:
    api.create_sandbox("sp")
    old = workspace("sp")
    (old / "notes.txt").write_text("keep me\n")
    api.delete_vm("sp")
    run_cli("sandbox", "create", "sp", "--workspace", str(old), check=True)
    assert workspace("sp") == old and (old / "notes.txt").read_text() == "keep me\n"


def test_sandbox_rm_keeps_the_workspace_unless_purged() -> None:
    api.create_sandbox("keep")
    api.create_sandbox("purged")
    run_cli("sandbox", "rm", "keep", check=True)
    run_cli("sandbox", "rm", "purged", "--purge", check=True)
    assert default_workspace("keep").is_dir()
    assert not default_workspace("purged").parent.exists()
    proc = run_cli("sandbox", "rm", "--purge", "never-was")
    assert proc.returncode != 0 and "no VM named 'never-was'" in proc.stderr


def test_purge_never_deletes_a_workspace_another_vm_uses() -> None:
    """As left by a rename before renames moved workspaces (or by a hand edit)."""
    api.create_sandbox("user")
    shared = own_dir(default_workspace("ghost"))
    bundle, config = library.get_vm("user")
    save_config(bundle.config_file, with_workspace(config, shared))
    proc = run_cli("sandbox", "rm", "--purge", "ghost")
    assert proc.returncode != 0 and "'user'" in proc.stderr
    assert shared.is_dir()


# ---- failed creates ------------------------------------------------------------------------


FAILURES = {
    "missing share": {"shares": ["/nonexistent/dir:/data/x:ro"]},
    "unknown image": {"image": "nosuch"},
    "bad memory": {"memory": "1K"},
}


@pytest.mark.parametrize("create", [api.create_sandbox, api.create_vm], ids=["sandbox", "vm"])
@pytest.mark.parametrize("failure", FAILURES, ids=list(FAILURES))
def test_a_failed_create_leaves_no_workspace(create, failure: str) -> None:
    options = dict(FAILURES[failure])
    if create is api.create_vm:
        options["kind"] = api.VMKind.AI_SANDBOX
    with pytest.raises(SecVFError):
        create("sp", **options)
    assert not default_workspace("sp").parent.exists()
    assert api.list_vms() == []
    create("sp", **({"kind": api.VMKind.AI_SANDBOX} if create is api.create_vm else {}))
    assert list(workspace("sp").iterdir()) == []


def test_a_create_that_fails_making_the_disk_leaves_no_workspace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: str) -> str:
        raise DiskError("qemu-img: No space left on device")

    monkeypatch.setattr(library, "qemu_img", failing)
    with pytest.raises(DiskError):
        api.create_sandbox("sp")
    assert not default_workspace("sp").parent.exists()


def test_creating_an_existing_name_says_so_and_keeps_its_workspace() -> None:
    api.create_sandbox("sp")
    (workspace("sp") / "notes.txt").write_text("x\n")
    proc = run_cli("sandbox", "create", "sp")
    assert proc.returncode != 0 and "already exists" in proc.stderr
    assert (workspace("sp") / "notes.txt").exists()


# ---- the audit -----------------------------------------------------------------------------


def test_audit_flags_a_directory_two_vms_can_both_write(tmp_path: Path) -> None:
    project = own_dir(tmp_path / "project")
    nested = own_dir(project / "part")
    api.create_sandbox("one", workspace=project)
    api.create_sandbox("two", workspace=project)
    api.create_sandbox("three", workspace=nested)
    api.create_sandbox("alone")
    api.clone_vm("alone", "alone-clone")
    findings = {vm["name"]: [f for f in vm["findings"] if "also writable by" in f]
                for vm in api.audit()["vms"]}
    assert findings["alone"] == findings["alone-clone"] == []
    assert any("'two'" in f for f in findings["one"])
    assert any("'three'" in f for f in findings["one"])
    assert any("'one'" in f for f in findings["two"])
    assert any("'one'" in f and str(project) in f for f in findings["three"])
    assert run_cli("audit").returncode == 1
