"""``vm snapshot …`` and ``sandbox template …`` through the real CLI, without a guest:
a stopped VM's disk snapshots are real (``qemu-img`` on a real qcow2), templates are
records published in the store, and the rendering of what only a running VM has
(restored from, hot-plugged devices) is checked against a status it is handed.

Booted VMs (memory snapshots, restores, hot-plug) are tests/integration's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from secvf import api
from secvf.faces.cli import common as cli_common
from secvf.faces.cli.commands import cli
from secvf.model.config import SandboxChannels, VMKind, now_iso
from secvf.model.runtime import DeviceInfo, PlannedDeviceInfo, RuntimeRecord, VmState
from secvf.model.savedstate import SavedState, TemplateInfo
from secvf.store import paths
from secvf.store import templates as template_store
from secvf.store.layers import LAYER_SUFFIX, layers_dir
from secvf.workflows import audit as audit_workflow
from secvf.workflows.create import build_config
from secvf.workflows.templates import key_for
from tests.helpers import run_cli
from tests.unit.fake_images import publish_fake_image
from tests.unit.fake_vm import make_vm, use_fake_qemu
from tests.unit.test_cli_badinput import assert_clean_error

NOTE = "secvf: note: "


@pytest.fixture(autouse=True)
def empty_image_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An image cache of this test's own: nothing here may find a real image to boot."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SECVF_CACHE", str(cache))
    return cache


@pytest.fixture
def web(tmp_path: Path) -> str:
    """A stopped generic VM with a real (empty) qcow2 disk."""
    make_vm("web", paths.ensure_private_dir(tmp_path / "files"))
    return "web"


def only_notes(stderr: str) -> None:
    """stderr holds nothing but notes (a progress note may appear on a slow machine)."""
    assert all(line.startswith(NOTE) for line in stderr.splitlines()), stderr


def json_of(*args: str) -> Any:
    proc = run_cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    only_notes(proc.stderr)
    return json.loads(proc.stdout)  # the whole of stdout is one JSON document


def disk_of(name: str) -> Path:
    return api.vm_dir(name) / "disk.qcow2"


def disk_tags(name: str) -> list[str]:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U",
                                      str(disk_of(name))], capture_output=True, check=True,
                                     text=True).stdout)
    return [snap["name"] for snap in info.get("snapshots", [])]


def disk_reads(name: str, byte: int) -> bool:
    """Whether the first 64 KiB of VM ``name``'s disk all read as ``byte``."""
    proc = subprocess.run(["qemu-io", "-c", f"read -P {byte:#x} 0 64k", str(disk_of(name))],
                          capture_output=True, text=True, check=False)
    return proc.returncode == 0


# ---- a stopped VM: create, list, status, revert, delete -------------------------------------


def test_disk_snapshot_round_trip_on_a_stopped_vm(web: str) -> None:
    created = json_of("vm", "snapshot", "create", web, "clean")
    assert (created["name"], created["kind"], created["vm_was"]) == ("clean", "disk", "stopped")
    assert created["state"] is None and created["disk_tag"] in disk_tags(web)

    subprocess.run(["qemu-io", "-c", "write -P 0xab 0 64k", str(disk_of(web))],
                   capture_output=True, check=True)
    assert disk_reads(web, 0xAB)
    listed = json_of("vm", "snapshot", "list", web)
    assert [s["name"] for s in listed] == ["clean"] and listed[0] == created

    table = run_cli("vm", "snapshot", "list", web, check=True)
    row = [line for line in table.stdout.splitlines() if "clean" in line]
    assert len(row) == 1 and "disk" in row[0] and "stopped" in row[0], table.stdout
    status = run_cli("vm", "status", web, check=True).stdout
    assert "snapshots: clean" in status
    assert json_of("vm", "status", web)["snapshots"] == ["clean"]

    reverted = run_cli("vm", "snapshot", "revert", web, "clean", check=True)
    assert reverted.stdout.startswith("VM web reverted to 'clean' in ")
    assert reverted.stdout.rstrip().endswith("; it is stopped")
    assert disk_reads(web, 0) and not disk_reads(web, 0xAB)  # the write after it is gone

    deleted = run_cli("vm", "snapshot", "delete", web, "clean", check=True)
    assert deleted.stdout == "deleted snapshot 'clean' of VM web\n"
    assert json_of("vm", "snapshot", "list", web) == []
    assert disk_tags(web) == []
    assert "snapshots:" not in run_cli("vm", "status", web, check=True).stdout


def test_human_create_says_what_was_taken(web: str) -> None:
    proc = run_cli("vm", "snapshot", "create", web, "base", check=True)
    only_notes(proc.stderr)
    assert proc.stdout.startswith("VM web: disk snapshot 'base' taken in ")
    assert proc.stdout.rstrip().endswith("s (VM stopped)")


def test_disk_only_on_a_stopped_vm_is_a_disk_snapshot(web: str) -> None:
    assert json_of("vm", "snapshot", "create", web, "d", "--disk-only")["kind"] == "disk"


def test_json_of_revert_and_delete(web: str) -> None:
    json_of("vm", "snapshot", "create", web, "s1")
    reverted = json_of("vm", "snapshot", "revert", web, "s1")
    assert reverted["name"] == web and reverted["state"] == "stopped"
    assert reverted["took_s"] >= 0 and reverted["snapshots"] == ["s1"]
    assert json_of("vm", "snapshot", "delete", web, "s1") == {
        "name": web, "snapshot": "s1", "deleted": True}


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("snap", ["", "a/b", "..", ".x", "a b", "x" * 256])
def test_bad_snapshot_names(web: str, snap: str) -> None:
    assert_clean_error(run_cli("vm", "snapshot", "create", web, snap), "snapshot name")
    assert json_of("vm", "snapshot", "list", web) == []
    assert disk_tags(web) == []


@pytest.mark.parametrize("args", [
    ("create", "ghost", "s"), ("list", "ghost"), ("revert", "ghost", "s"),
    ("delete", "ghost", "s"),
])
def test_a_missing_vm(args: tuple[str, ...]) -> None:
    assert_clean_error(run_cli("vm", "snapshot", *args), "no VM named 'ghost'")


@pytest.mark.parametrize("command", ["revert", "delete"])
def test_a_missing_snapshot(web: str, command: str) -> None:
    assert_clean_error(run_cli("vm", "snapshot", command, web, "nope"),
                       "snapshot 'nope' of VM 'web' does not exist")


def test_a_duplicate_keeps_the_first(web: str) -> None:
    first = json_of("vm", "snapshot", "create", web, "clean")
    assert_clean_error(run_cli("vm", "snapshot", "create", web, "clean"),
                       "already has a snapshot 'clean'", "vm snapshot delete web clean")
    assert json_of("vm", "snapshot", "list", web) == [first]
    assert disk_tags(web) == [first["disk_tag"]]


def test_memory_on_a_stopped_vm_is_a_usage_error(web: str) -> None:
    for flags in (("--memory",), ("--memory", "--json")):
        proc = run_cli("vm", "snapshot", "create", web, "m", *flags)
        assert proc.returncode == 2 and proc.stdout == ""
        assert "--memory needs a running VM" in proc.stderr and "stopped" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert json_of("vm", "snapshot", "list", web) == []
    assert disk_tags(web) == []


@pytest.mark.parametrize(("args", "error_type"), [
    (("vm", "snapshot", "create", "ghost", "s"), "NotFound"),
    (("vm", "snapshot", "create", "web", "a;b"), "InvalidName"),
    (("vm", "snapshot", "list", "ghost"), "NotFound"),
    (("vm", "snapshot", "revert", "web", "nope"), "NotFound"),
    (("vm", "snapshot", "delete", "web", "nope"), "NotFound"),
    (("sandbox", "template", "rm", "abc"), "NotFound"),
    (("sandbox", "template", "build", "--image", "nope"), "NotFound"),
])
def test_json_errors_are_json_with_the_same_exit_code(web: str, args: tuple[str, ...],
                                                      error_type: str) -> None:
    plain = run_cli(*args)
    assert plain.returncode == 1 and plain.stdout == ""
    proc = run_cli(*args, "--json")
    assert proc.returncode == 1 and proc.stderr == plain.stderr
    assert json.loads(proc.stdout)["error"] == {
        "type": error_type, "message": plain.stderr[len("secvf: error: "):-1], "exit_code": 1}


# ---- sandbox templates -------------------------------------------------------------------------


def sandbox_key() -> tuple[str, Any]:
    """The template ID and machine shape a default ``sandbox create`` looks for."""
    config = build_config(name="probe", kind=VMKind.AI_SANDBOX, cpus=1, memory="1G",
                          disk_size="8G", image="sandbox", networks=["nat"], accel="auto",
                          channels=SandboxChannels())
    key, shape, _ = key_for(config)
    return key, shape


def publish_template(template_id: str, shape: Any, *, created_at: str | None = None,
                     purpose: str = "sandbox") -> Path:
    """Put a template record (and a real qcow2 layer for sessions to sit on) in the store;
    it has no saved state files, so nothing can restore it."""
    layer = layers_dir() / f"{template_id[:12]}{LAYER_SUFFIX}"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(layer), "8G"], check=True)
    state = SavedState(shape=shape, state_bytes=1, ram_bytes=1 << 30,
                       ram_allocated_bytes=200 << 20, saved_at=now_iso(), pause_s=0.25)
    info = TemplateInfo(id=template_id, purpose=purpose, image="sandbox", recipe_hash="a" * 64,
                        network="nat",
                        disk_bytes=8 << 30, spare_ports=4, layer=str(layer), state=state,
                        created_at=created_at or now_iso(), build_s=7.4)
    with template_store.TemplateStaging() as staging:
        return staging.commit(info)


def test_template_list_rm_and_errors() -> None:
    publish_fake_image("sandbox")
    key, shape = sandbox_key()
    assert json_of("sandbox", "template", "list") == []
    publish_template(key, shape)
    other = key[:2] + ("0" if key[2] != "0" else "1") + key[3:]
    publish_template(other, shape, created_at="2000-01-01T00:00:00Z")

    listed = json_of("sandbox", "template", "list")
    assert [t["id"] for t in listed] == [key, other]  # newest first
    assert listed[0]["state"]["ram_allocated_bytes"] == 200 << 20
    table = run_cli("sandbox", "template", "list", check=True).stdout
    row = [line for line in table.splitlines() if key[:12] in line]
    assert len(row) == 1 and key[:13] not in row[0], table
    for cell in ("sandbox", " 1G ", "nat", "8G", "200M", "7.4"):
        assert cell in row[0], (cell, row[0])

    assert_clean_error(run_cli("sandbox", "template", "rm", key[:2]),
                       f"2 templates with an ID starting '{key[:2]}'")
    assert_clean_error(run_cli("sandbox", "template", "rm", "f" * 65), "no template")
    removed = run_cli("sandbox", "template", "rm", key[:12], check=True)
    assert removed.stdout == f"removed template {key[:12]}\n"
    assert json_of("sandbox", "template", "rm", other[:5]) == {"id": other, "removed": True}
    assert json_of("sandbox", "template", "list") == []


def test_analysis_clean_states_are_not_sandbox_templates() -> None:
    publish_fake_image("sandbox")
    key, shape = sandbox_key()
    clean = "c" * 64
    publish_template(clean, shape, purpose="clean-state")
    assert json_of("sandbox", "template", "list") == []
    assert_clean_error(run_cli("sandbox", "template", "rm", clean[:12]), "no template")
    publish_template(key, shape)
    assert [t["id"] for t in json_of("sandbox", "template", "list")] == [key]
    assert {t.id for t in template_store.list_templates()[0]} == {key, clean}


def test_template_build_fails_cleanly_before_booting_anything() -> None:
    # the image cache is empty: nothing can be booted, and nothing is printed but the error
    assert_clean_error(run_cli("sandbox", "template", "build"), "sandbox")
    assert_clean_error(run_cli("sandbox", "template", "build", "--image", "nope"), "'nope'")
    proc = run_cli("sandbox", "template", "build", "--network", "isolated")
    assert proc.returncode == 2 and "Invalid value for '--network'" in proc.stderr
    assert json_of("vm", "list") == [] and json_of("sandbox", "template", "list") == []


def test_create_uses_a_fitting_template_unless_cold() -> None:
    publish_fake_image("sandbox")
    key, shape = sandbox_key()
    publish_template(key, shape)
    warm = run_cli("sandbox", "create", "s1", check=True)
    assert f"its first start restores template {key[:12]}" in warm.stdout
    assert json.loads(run_cli("vm", "status", "s1", "--json", check=True).stdout)["kind"] == \
        "ai-sandbox"
    channels = api.get_vm("s1").channels
    assert channels is not None and channels.template == key
    cold = json_of("sandbox", "create", "s2", "--cold")
    assert cold["channels"]["template"] is None
    other_shape = json_of("sandbox", "create", "s3", "--memory", "2G")
    assert other_shape["channels"]["template"] is None


@pytest.mark.parametrize("command", ["create", "start", "run"])
def test_cold_is_offered(command: str) -> None:
    help_text = run_cli("sandbox", command, "--help", check=True).stdout
    assert "--cold" in help_text and "template" in help_text


# ---- what only a running VM shows: restored from, hot-plugged devices --------------------------


def invoke(args: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the CLI in this process (so the API can be stood in for); its stdout."""
    monkeypatch.setattr(cli_common.out, "width", cli_common.UNLIMITED_WIDTH)  # also under -s
    return CliRunner().invoke(cli, args, catch_exceptions=False).stdout


def test_status_shows_what_a_run_was_restored_from_and_hot_plugged(
        web: str, monkeypatch: pytest.MonkeyPatch) -> None:
    status = api.vm_status(web)
    status.update(state="running", restored_from="/x/templates/[abc]", snapshots=["a", "b"],
                  hotplugged=[{"path": "/machine/peripheral/vsock0",
                               "type": "vhost-user-vsock-pci", "channel": "vsock"},
                              {"path": "/machine/peripheral/usb1", "type": "usb-storage",
                               "channel": None}])
    monkeypatch.setattr(api, "vm_status", lambda name: status)
    out = invoke(["vm", "status", web], monkeypatch)
    assert "restored from: /x/templates/[abc]" in out
    assert "hot-plugged: vsock0 (vhost-user-vsock-pci, vsock channel)" in out
    assert "hot-plugged: usb1 (usb-storage)" in out
    assert "snapshots: a, b" in out


def test_audit_lists_hot_plugged_devices_and_marks_unplanned_ones() -> None:
    record = RuntimeRecord(
        state=VmState.RUNNING, name="s1", id="0" * 8 + "-0000-0000-0000-" + "0" * 12,
        kind=VMKind.AI_SANDBOX, supervisor_pid=1, started_at=now_iso(), transitions=[],
        planned_devices=[PlannedDeviceInfo(id="vsock0", driver="vhost-user-vsock-pci",
                                           purpose="exec channel")],
        hotplugged=[DeviceInfo(path="/machine/peripheral/vsock0",
                               type="vhost-user-vsock-pci", channel="vsock"),
                    DeviceInfo(path="/machine/peripheral-anon/device[3]", type="usb-storage")])
    assert audit_workflow._hotplugged(record) == [
        {"path": "/machine/peripheral/vsock0", "type": "vhost-user-vsock-pci",
         "channel": "vsock", "planned": True},
        {"path": "/machine/peripheral-anon/device[3]", "type": "usb-storage", "channel": None,
         "planned": False}]
    assert audit_workflow._hotplugged(None) == []


def test_audit_shows_the_hot_plugged_column(web: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = api.audit()
    assert data["vms"][0]["hotplugged"] == []  # a stopped VM has none
    data["vms"][0].update(state="running", hotplugged=[
        {"path": "/machine/peripheral/vsock0", "type": "vhost-user-vsock-pci",
         "channel": "vsock", "planned": True},
        {"path": "/machine/peripheral-anon/device[3]", "type": "usb-storage",
         "channel": None, "planned": False}])
    monkeypatch.setattr(api, "audit", lambda: data)
    out = invoke(["audit"], monkeypatch)
    assert "HOT-PLUGGED" in out
    assert "vsock0 vhost-user-vsock-pci (vsock)" in out
    assert "not planned: device[3] usb-storage" in out


# ---- a running VM whose QEMU cannot snapshot (the fake QMP peer): nothing is left behind -------


def test_a_failed_save_of_a_running_vm_leaves_it_running_and_no_snapshot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = use_fake_qemu(tmp_path, monkeypatch.setenv)  # no snapshot commands
    make_vm("live", paths.ensure_private_dir(tmp_path / "files"))
    run_cli("vm", "start", "live", check=True)
    try:
        for flags in ((), ("--memory",), ("--disk-only",)):  # --memory: no usage error here
            proc = run_cli("vm", "snapshot", "create", "live", "s1", *flags)
            assert proc.returncode == 1, proc.stderr
            errors = [line for line in proc.stderr.splitlines() if not line.startswith(NOTE)]
            assert errors == ["secvf: error: VM 'live': QEMU could not snapshot the disk: The "
                              "command blockdev-snapshot-internal-sync has not been found"]
        assert json_of("vm", "snapshot", "list", "live") == []
        assert json_of("vm", "status", "live")["state"] == "running"
        sent = commands.read_text().split()
        assert "stop" in sent and sent[::-1].index("cont") < sent[::-1].index("stop")
        assert_clean_error(run_cli("vm", "snapshot", "revert", "live", "s1"), "does not exist")
    finally:
        run_cli("vm", "stop", "live", "--force", check=True)


@pytest.mark.parametrize(("kind", "flags", "disk_only", "noted"), [
    ("generic", (), False, False),  # a running VM: memory by default
    ("generic", ("--disk-only",), True, False),
    ("malware-analysis", ("--memory",), False, False),
    ("ai-sandbox", (), True, True),  # a sandbox: the disk, and a note says why
    ("ai-sandbox", ("--memory",), False, False),  # asked for: the API refuses it
])
def test_what_a_running_vm_is_asked_for(web: str, monkeypatch: pytest.MonkeyPatch, kind: str,
                                         flags: tuple[str, ...], disk_only: bool,
                                         noted: bool) -> None:
    status = {**api.vm_status(web), "state": "running", "kind": kind}
    calls: list[bool] = []

    def create_snapshot(name: str, snap: str, *, disk_only: bool = False) -> api.SnapshotInfo:
        calls.append(disk_only)
        return api.SnapshotInfo(name=snap, kind=api.SnapshotKind.DISK, created_at=now_iso(),
                                vm_was="running", disk_tag="secvf-x", took_s=0.1, size_bytes=0)

    monkeypatch.setattr(api, "vm_status", lambda name: status)
    monkeypatch.setattr(api, "create_snapshot", create_snapshot)
    monkeypatch.setattr(cli_common.out, "width", cli_common.UNLIMITED_WIDTH)
    result = CliRunner().invoke(cli, ["vm", "snapshot", "create", web, "s", *flags],
                                catch_exceptions=False)
    assert result.exit_code == 0 and calls == [disk_only]
    assert ("is an AI sandbox: its snapshot holds the disk only" in result.stderr) == noted
