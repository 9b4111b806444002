"""A VM's disk chain after the fact: ``secvf audit`` shows every layer and flags a
hand-edited one, and the start path's check (``check_vm_files``) refuses it. Plus the
qcow2 header reader against mutated headers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secvf import api
from secvf.image.store import images_dir
from secvf.model.config import IsoBoot
from secvf.store import disks, library, paths
from secvf.store.disks import DiskError, UnsafeDisk
from tests.helpers import run_cli


@pytest.fixture
def foreign(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere" / "foreign.img"
    path.parent.mkdir()
    path.write_bytes(b"\0" * (1 << 20))
    path.chmod(0o600)
    return path


def rebase(disk: Path, backing: Path) -> None:
    """What a hand edit does: point the overlay at another file, unchecked."""
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(backing), "-F", "raw",
                    str(disk)], check=True, capture_output=True)


def test_audit_shows_each_disk_chain_and_flags_a_hand_edited_one(
        iso: Path, foreign: Path, secvf_env: Path) -> None:
    api.create_vm("clean", iso=iso)
    api.create_vm("edited", iso=iso)
    disk = secvf_env / "vms" / "edited" / "disk.qcow2"
    rebase(disk, foreign)
    proc = run_cli("audit", "--json")
    assert proc.returncode == 1
    vms = {vm["name"]: vm for vm in json.loads(proc.stdout)["vms"]}
    assert vms["clean"]["disk_chain"] == [
        {"path": str(secvf_env / "vms" / "clean" / "disk.qcow2"), "format": "qcow2",
         "where": "bundle"}]
    assert vms["clean"]["findings"] == []
    assert vms["edited"]["disk_chain"] == [
        {"path": str(disk), "format": "qcow2", "where": "bundle"},
        {"path": str(foreign), "format": "raw", "where": "outside"}]
    [finding] = vms["edited"]["findings"]
    assert f"the backing file {foreign} of {disk} is outside" in finding
    table = run_cli("audit", timeout=60).stdout
    assert "DISK CHAIN" in table and "outside:" in table


def test_the_start_check_refuses_a_hand_edited_disk_or_vm_json(
        iso: Path, foreign: Path, secvf_env: Path) -> None:
    api.create_vm("vm1", iso=iso)
    bundle, config = library.get_vm("vm1")
    assert [layer.where for layer in disks.check_vm_files(bundle, config)] == ["bundle"]
    rebase(bundle.disk, foreign)
    with pytest.raises(UnsafeDisk, match="outside"):
        disks.check_vm_files(bundle, config)
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", "", str(bundle.disk)],
                   check=True, capture_output=True)
    disks.check_vm_files(bundle, config)
    edited = json.loads(bundle.config_file.read_text())
    edited["boot"]["path"] = "/etc/shadow"
    bundle.config_file.write_text(json.dumps(edited))
    with pytest.raises(UnsafeDisk, match="in /etc"):
        disks.check_vm_files(*library.get_vm("vm1"))


def test_vm_start_refuses_a_hand_edited_disk_chain_before_qemu_opens_it(
        iso: Path, foreign: Path, secvf_env: Path) -> None:
    api.create_vm("vm2", iso=iso, accel="tcg")
    rebase(library.get_bundle("vm2").disk, foreign)
    proc = run_cli("vm", "start", "vm2")
    assert proc.returncode != 0 and "outside" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads(run_cli("vm", "status", "vm2", "--json", check=True).stdout)["state"] \
        != "running"
    events = [e for e in api_events() if e["event"] == "vm_unsafe_files"]
    assert [e["severity"] for e in events] == ["CRITICAL"]


def api_events() -> list[dict]:
    from secvf.store import events

    return [e for e in events.read_events() if e.get("vm") == "vm2"]


def test_the_store_knows_where_the_image_cache_is() -> None:
    """The store names the image cache without importing the image layer."""
    assert paths.images_dir() == images_dir()


@pytest.fixture(scope="module")
def overlay_header(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The first cluster of a qcow2 with a backing file name and backing format."""
    where = tmp_path_factory.mktemp("hdr")
    disk = where / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-u",
                    "-b", "/nonexistent/base.raw", "-F", "raw", str(disk), "64M"],
                   check=True, capture_output=True)
    return disk.read_bytes()[:4096]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=12))
def test_a_mutated_qcow2_header_is_refused_or_read_never_crashes(
        overlay_header: bytes, tmp_path: Path, edits: list[tuple[int, int]]) -> None:
    data = bytearray(overlay_header)
    for offset, value in edits:
        data[offset] = value
    disk = tmp_path / "bundle" / "disk.qcow2"
    disk.parent.mkdir(exist_ok=True)
    disk.write_bytes(bytes(data))
    places = disks.Places(dirs=(("bundle", disk.parent),), description="the bundle")
    chain = disks.inspect_chain(disk, places)
    assert chain.error is None or isinstance(chain.error, DiskError)
    if chain.error is None:  # accepted: then it names nothing outside the bundle
        assert all(layer.where == "bundle" for layer in chain.layers)


def test_an_ejected_iso_may_be_deleted(iso: Path) -> None:
    """After ``vm media eject`` QEMU opens no ISO, so the start check does not need it."""
    api.create_vm("inst", iso=iso)
    bundle, config = library.get_vm("inst")
    assert isinstance(config.boot, IsoBoot)
    ejected = config.model_copy(update={"boot": config.boot.model_copy(update={"ejected": True})})
    iso.unlink()
    with pytest.raises(DiskError, match="does not exist"):
        disks.check_vm_files(bundle, config)
    assert [layer.where for layer in disks.check_vm_files(bundle, ejected)] == ["bundle"]
