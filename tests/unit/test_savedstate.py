"""Saved guest state without a guest: the records, the files, the store, the machine plans
of a restore and a template run, and the device watch."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from secvf.errors import AlreadyExists, ConfigError, CorruptRecord, InvalidName, NotFound
from secvf.machine.generic import build_generic_machine
from secvf.machine.plan import RunMode
from secvf.machine.sandbox import SPARE_PORTS, build_sandbox_machine
from secvf.model.config import new_mac, now_iso, parse_config
from secvf.model.runtime import ControlRequest, SnapshotRequest, decode
from secvf.model.savedstate import (
    MachineShape,
    SavedState,
    SnapshotInfo,
    SnapshotKind,
    TemplateInfo,
)
from secvf.runtime.devwatch import DeviceWatch
from secvf.store import snapshots, templates
from secvf.store.bundle import Bundle, RuntimeFiles
from secvf.store.savedstate import (
    check_state_files,
    ram_file,
    read_saved_state,
    state_file,
    write_record,
)
from secvf.store.sparse import allocated_bytes, copy_into, copy_sparse, data_extents

SHAPE = MachineShape(qemu_version="7.2.22", cpu_model="max", cpus=1, memory_mib=256,
                     accel="tcg", devices=["virtio-blk-pci:disk0dev", "pvpanic:panic0"])


def saved(state_bytes: int = 8, ram_bytes: int = 1 << 20) -> SavedState:
    return SavedState(shape=SHAPE, state_bytes=state_bytes, ram_bytes=ram_bytes,
                      ram_allocated_bytes=0, saved_at=now_iso(), pause_s=0.1)


def write_state_dir(directory: Path, *, magic: bytes = b"QEVM") -> SavedState:
    directory.mkdir(parents=True, exist_ok=True)
    state_file(directory).write_bytes(magic + b"\0\0\0\3")
    with open(ram_file(directory), "wb") as fh:
        fh.truncate(1 << 20)
    return saved()


# ---- the records ------------------------------------------------------------------------------


def test_the_same_shape_has_no_mismatch() -> None:
    assert SHAPE.mismatch(SHAPE.model_copy()) is None


@pytest.mark.parametrize(("change", "words"), [
    ({"qemu_version": "8.2.0"}, "qemu version was 7.2.22 when saved, is 8.2.0 now"),
    ({"memory_mib": 512}, "memory mib was 256"),
    ({"accel": "kvm"}, "accel was tcg"),
    ({"devices": ["virtio-blk-pci:disk0dev"]}, "saved with pvpanic:panic0"),
    ({"devices": ["pvpanic:panic0", "virtio-blk-pci:disk0dev"]}, "in another order"),
])
def test_a_mismatch_names_the_difference(change: dict[str, Any], words: str) -> None:
    problem = SHAPE.mismatch(SHAPE.model_copy(update=change))
    assert problem is not None and words in problem


def test_a_snapshot_request_travels_as_one_control_line() -> None:
    request = SnapshotRequest(disk_tag="secvf-a-1", state_dir="/x")
    line = request.model_dump_json().encode()
    assert decode(ControlRequest, line, source="t").root == request
    with pytest.raises(CorruptRecord, match="disk_tag"):
        decode(ControlRequest, b'{"op": "snapshot", "disk_tag": ""}', source="t")


# ---- sparse copies -----------------------------------------------------------------------------


def test_a_sparse_copy_keeps_the_data_and_the_holes(tmp_path: Path) -> None:
    src = tmp_path / "ram"
    with open(src, "wb") as fh:
        fh.truncate(64 << 20)
        fh.seek(5 << 20)
        fh.write(b"a" * 4096)
        fh.seek(40 << 20)
        fh.write(os.urandom(1 << 20))
    copied = copy_sparse(src, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == src.read_bytes()
    assert copied < (2 << 20) + 8192
    assert allocated_bytes(tmp_path / "copy") < 4 << 20
    with open(src, "rb") as fh:
        assert len(data_extents(fh.fileno(), 64 << 20)) == 2


def test_a_ram_copy_fills_an_existing_file_through_its_buffer(tmp_path: Path) -> None:
    """copy_into: data extents bigger and smaller than its buffer, at odd offsets, land
    where they were in the (already mapped, same-size) RAM file; holes stay holes."""
    src, dst = tmp_path / "saved-ram", tmp_path / "ram"
    big = os.urandom((8 << 20) * 2 + 12345)  # spans three buffer fills
    with open(src, "wb") as fh:
        fh.truncate(64 << 20)
        fh.seek((3 << 20) + 17)
        fh.write(b"small")
        fh.seek(30 << 20)
        fh.write(big)
    with open(dst, "wb") as fh:
        fh.truncate(64 << 20)
    copied = copy_into(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert len(big) <= copied < len(big) + (2 << 20)
    assert allocated_bytes(dst) < 24 << 20


def test_a_ram_copy_into_a_file_of_another_size_is_refused(tmp_path: Path) -> None:
    (tmp_path / "saved").write_bytes(b"x" * 8192)
    (tmp_path / "ram").write_bytes(b"y" * 4096)
    with pytest.raises(OSError, match="is not 8192 bytes"):
        copy_into(tmp_path / "saved", tmp_path / "ram")
    assert (tmp_path / "ram").read_bytes() == b"y" * 4096


def test_a_sparse_copy_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "b").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        copy_sparse(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == b"keep"


# ---- saved-state files -------------------------------------------------------------------------


def test_complete_state_files_pass(tmp_path: Path) -> None:
    check_state_files(tmp_path, write_state_dir(tmp_path), "snapshot 'a'")


@pytest.mark.parametrize(("damage", "error", "words"), [
    (lambda d: state_file(d).unlink(), NotFound, "is missing"),
    (lambda d: ram_file(d).unlink(), NotFound, "is missing"),
    (lambda d: os.truncate(ram_file(d), 4096), CorruptRecord, "truncated"),
    (lambda d: state_file(d).write_bytes(b"QEVM"), CorruptRecord, "truncated"),
    (lambda d: state_file(d).write_bytes(b"ELF\0\0\0\0\3"), CorruptRecord, "not a QEMU state"),
])
def test_damaged_state_files_are_refused(tmp_path: Path, damage, error, words) -> None:
    expected = write_state_dir(tmp_path)
    damage(tmp_path)
    with pytest.raises(error, match=words):
        check_state_files(tmp_path, expected, "snapshot 'a'")


def test_a_disk_only_snapshot_holds_no_state_to_restore(tmp_path: Path) -> None:
    info = SnapshotInfo(name="d", kind=SnapshotKind.DISK, created_at=now_iso(), vm_was="stopped",
                        disk_tag="secvf-d-1", took_s=0.1, size_bytes=0)
    write_record(tmp_path / "snapshot.json", info)
    with pytest.raises(NotFound, match="disk-only"):
        read_saved_state(tmp_path)


def test_a_corrupt_record_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "snapshot.json").write_text('{"name": 3}')
    with pytest.raises(CorruptRecord, match="snapshot.json"):
        read_saved_state(tmp_path)


# ---- the snapshot store --------------------------------------------------------------------


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    path = tmp_path / "vms" / "web"
    path.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path / "disk.qcow2"), "64M"],
                   check=True)
    return Bundle(path)


def disk_snapshot(name: str, tag: str) -> SnapshotInfo:
    return SnapshotInfo(name=name, kind=SnapshotKind.DISK, created_at=now_iso(),
                        vm_was="stopped", disk_tag=tag, took_s=0.0, size_bytes=0)


def test_a_committed_snapshot_is_listed_and_a_discarded_one_is_gone(bundle: Bundle) -> None:
    with snapshots.Staging(bundle, "kept") as staging:
        staging.commit(disk_snapshot("kept", "secvf-kept-1"))
    with snapshots.Staging(bundle, "dropped") as staging:
        (staging.path / "state").write_bytes(b"half")
        leftover = staging.path
    assert not leftover.exists()
    found, problems = snapshots.list_snapshots(bundle)
    assert [s.name for s in found] == ["kept"] and problems == []
    with pytest.raises(AlreadyExists), snapshots.Staging(bundle, "kept") as again:
        again.commit(disk_snapshot("kept", "secvf-kept-2"))


def test_a_bad_snapshot_name_is_refused(bundle: Bundle) -> None:
    for bad in ("", "../up", ".hidden", "a b", "x/y"):
        with pytest.raises(InvalidName):
            snapshots.Staging(bundle, bad)
    assert not (bundle.path / "snapshots").exists() or not any(
        (bundle.path / "snapshots").iterdir())


def test_sweep_removes_a_killed_saves_leftovers_and_reports_orphan_tags(bundle: Bundle) -> None:
    held = snapshots.Staging(bundle, "live")  # a save in progress: kept
    dead = bundle.path / "snapshots" / ".saving-0123"  # nobody holds it: removed
    dead.mkdir()
    snapshots.create_disk_snapshot(bundle.disk, "secvf-owned-1")
    snapshots.create_disk_snapshot(bundle.disk, "secvf-orphan-1")
    with snapshots.Staging(bundle, "owned") as staging:
        staging.commit(disk_snapshot("owned", "secvf-owned-1"))
    assert snapshots.sweep(bundle) == ["secvf-orphan-1"]
    assert not dead.exists() and held.path.exists()
    held.discard()


def test_a_snapshot_record_of_another_name_is_corrupt(bundle: Bundle) -> None:
    with snapshots.Staging(bundle, "a") as staging:
        staging.commit(disk_snapshot("b", "secvf-b-1"))
    found, problems = snapshots.list_snapshots(bundle)
    assert found == [] and "names 'b'" in problems[0]


def test_disk_snapshots_round_trip_with_qemu_img(bundle: Bundle) -> None:
    snapshots.create_disk_snapshot(bundle.disk, "secvf-x-1")
    assert snapshots.disk_tags(bundle.disk) == ["secvf-x-1"]
    snapshots.apply_disk_snapshot(bundle.disk, "secvf-x-1")
    snapshots.delete_disk_snapshot(bundle.disk, "secvf-x-1")
    snapshots.delete_disk_snapshot(bundle.disk, "secvf-x-1")  # gone already: fine
    assert snapshots.disk_tags(bundle.disk) == []


# ---- the template store ----------------------------------------------------------------------


def template(key: str, layer: Path) -> TemplateInfo:
    return TemplateInfo(id=key, image="sandbox", recipe_hash="r", network="nat",
                        disk_bytes=1 << 30, spare_ports=SPARE_PORTS, layer=str(layer),
                        state=saved(), created_at=now_iso(), build_s=1.0)


def test_templates_commit_replace_and_remove(secvf_env: Path) -> None:
    key = "a" * 64
    for layer in ("one", "two"):
        with templates.TemplateStaging() as staging:
            write_state_dir(staging.path)
            staging.commit(template(key, secvf_env / layer))
    found, problems = templates.list_templates()
    assert [t.layer for t in found] == [str(secvf_env / "two")] and problems == []
    assert templates.template_layers() == {(secvf_env / "two").resolve()}
    assert templates.find_template_ids("aaa") == [key]
    templates.remove_template(key)
    with pytest.raises(NotFound):
        templates.remove_template(key)
    with pytest.raises(NotFound, match="not a template ID"):
        templates.template_dir("../x")


# ---- the machine of a restore and of a template run --------------------------------------------


def sandbox_config(tmp_path: Path, shares: int = 1) -> Any:
    disk = tmp_path / "base.qcow2"
    if not disk.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1G"], check=True)
    share_list = []
    for i in range(shares):
        host = tmp_path / f"share{i}"
        host.mkdir(exist_ok=True)
        share_list.append({"tag": "workspace" if i == 0 else f"s{i}", "host_path": str(host),
                           "guest_path": "/workspace" if i == 0 else f"/data/s{i}",
                           "read_only": i != 0})
    return parse_config({
        "id": str(uuid.uuid4()), "name": "sbx", "kind": "ai-sandbox", "cpus": 1,
        "memory_mib": 256, "disk_bytes": 1 << 30,
        "boot": {"type": "disk-image", "path": str(disk), "format": "qcow2"},
        "network": "nat", "mac": new_mac(), "created_at": now_iso(), "updated_at": now_iso(),
        "channels": {"shares": share_list},
    }, source="test")


def test_a_template_run_has_spare_slots_and_no_channel(tmp_path: Path) -> None:
    config = sandbox_config(tmp_path, shares=2)
    plan = build_sandbox_machine(config, Bundle(tmp_path), RuntimeFiles(config.id), "tcg",
                                 RunMode.TEMPLATE)
    drivers = [d.driver for d in plan.devices]
    assert drivers.count("pcie-root-port") == SPARE_PORTS
    assert not [d for d in drivers if "vhost-user" in d]
    assert plan.helpers == [] and plan.hotplug == [] and "-incoming" not in plan.args
    assert not [p for p in plan.kernel_params if p.startswith("secvf_shares")]


def test_a_restore_hot_plugs_the_channels_onto_the_spare_slots(tmp_path: Path) -> None:
    config = sandbox_config(tmp_path, shares=2)
    files = RuntimeFiles(config.id)
    template_run = build_sandbox_machine(config, Bundle(tmp_path), files, "tcg", RunMode.TEMPLATE)
    plan = build_sandbox_machine(config, Bundle(tmp_path), files, "tcg", RunMode.RESTORE)
    assert plan.shape() == template_run.shape()  # what the restore checks
    assert plan.args[plan.args.index("-incoming") + 1] == "defer"
    plugged = [(h.device["driver"], h.device["bus"]) for h in plan.hotplug]
    assert plugged == [("vhost-user-vsock-pci", "rp0"), ("vhost-user-fs-pci", "rp1"),
                       ("vhost-user-fs-pci", "rp2")]
    assert [h.name for h in plan.helpers] == ["vsock", "virtiofsd-workspace", "virtiofsd-s1"]
    # they serve hot-plugged devices only, so they start while QEMU does
    assert all(h.for_hotplug for h in plan.helpers)
    cold = build_sandbox_machine(config, Bundle(tmp_path), files, "tcg", RunMode.COLD)
    assert [h.name for h in cold.helpers if not h.for_hotplug] == [h.name for h in plan.helpers]
    paths = [h.chardev["backend"]["data"]["addr"]["data"]["path"] for h in plan.hotplug]
    assert paths[0] == str(files.vhost_vsock_socket)
    assert paths[1] == str(files.virtiofs_socket("workspace"))


def test_a_restore_with_more_shares_than_slots_is_refused(tmp_path: Path) -> None:
    config = sandbox_config(tmp_path, shares=SPARE_PORTS)
    with pytest.raises(ConfigError, match="at most"):
        build_sandbox_machine(config, Bundle(tmp_path), RuntimeFiles(config.id), "tcg",
                              RunMode.RESTORE)


def test_guest_ram_is_a_shared_file_on_the_ram_dir(tmp_path: Path) -> None:
    config = sandbox_config(tmp_path)
    files = RuntimeFiles(config.id)
    plan = build_sandbox_machine(config, Bundle(tmp_path), files, "tcg")
    backend = next(a for a in plan.args if a.startswith("memory-backend-file"))
    assert f"mem-path={files.ram_file}" in backend and "share=on" in backend
    assert files.ram_file in files.all_files()


def test_a_generic_restore_is_the_same_machine_waiting_for_its_state(iso: Path,
                                                                     tmp_path: Path) -> None:
    config = parse_config({
        "id": str(uuid.uuid4()), "name": "g", "kind": "generic", "cpus": 1, "memory_mib": 256,
        "disk_bytes": 1 << 30, "boot": {"type": "iso", "path": str(iso)}, "network": "nat",
        "mac": new_mac(), "created_at": now_iso(), "updated_at": now_iso()}, source="t")
    files = RuntimeFiles(config.id)
    cold = build_generic_machine(config, Bundle(tmp_path), files, "tcg")
    restore = build_generic_machine(config, Bundle(tmp_path), files, "tcg", RunMode.RESTORE)
    assert cold.shape() == restore.shape() and restore.hotplug == []
    assert [a for a in restore.args if a not in cold.args] == ["-incoming", "defer"]
    with pytest.raises(ConfigError, match="only AI sandboxes"):
        build_generic_machine(config, Bundle(tmp_path), files, "tcg", RunMode.TEMPLATE)


# ---- the device watch --------------------------------------------------------------------------


class FakeQMP:
    """Answers qom-list for the two user-device containers from a mutable dict."""

    def __init__(self) -> None:
        self.children: dict[str, list[str]] = {"/machine/peripheral": ["disk0dev"],
                                               "/machine/peripheral-anon": []}

    async def execute(self, command: str, args: dict[str, Any]) -> list[dict[str, str]]:
        assert command == "qom-list"
        return [{"name": "type", "type": "string"},
                *({"name": n, "type": "child<x>"} for n in self.children[args["path"]])]


def test_the_device_watch_reports_an_added_device_once(monkeypatch) -> None:
    monkeypatch.setattr("secvf.runtime.devwatch.POLL_S", 0.01)
    qmp = FakeQMP()
    seen: list[frozenset[str]] = []

    async def changed(now: frozenset[str]) -> None:
        seen.append(now)

    async def scenario() -> None:
        watch = DeviceWatch(qmp, changed)  # type: ignore[arg-type]
        await watch.expect()
        task = asyncio.create_task(watch.run())
        await asyncio.sleep(0.05)
        qmp.children["/machine/peripheral-anon"].append("device[0]")
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(scenario())
    assert seen == [frozenset({"/machine/peripheral/disk0dev",
                               "/machine/peripheral-anon/device[0]"})]
