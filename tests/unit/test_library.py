"""The VM library's store-level guarantees: a failed step loses nothing, long names fit,
and the store never starts or stops VMs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from secvf import api
from secvf.errors import StateError
from secvf.model.names import MAX_NAME_BYTES
from secvf.store import library
from secvf.store.library import DiskError


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_failed_clone_leaves_the_source_disk_untouched(iso: Path, monkeypatch) -> None:
    """The clone's disk freeze makes the new overlay before moving anything: when
    qemu-img fails (a full disk, say), the source keeps its disk as it was."""
    api.create_vm("src", iso=iso)
    disk = library.get_bundle("src").disk
    before = (_digest(disk), disk.stat().st_ino)
    real = library.qemu_img

    def failing(*args: str) -> str:
        if "create" in args and "-b" in args:
            raise DiskError("qemu-img: No space left on device")
        return real(*args)

    monkeypatch.setattr(library, "qemu_img", failing)
    with pytest.raises(DiskError):
        api.clone_vm("src", "dst")
    assert disk.is_file() and (_digest(disk), disk.stat().st_ino) == before
    assert [i.bundle.name for i in api.list_vms()] == ["src"]
    layers = disk.parents[2] / "layers"
    assert not layers.exists() or list(layers.iterdir()) == []


def test_clone_freezes_the_source_into_a_read_only_layer(iso: Path) -> None:
    api.create_vm("src", iso=iso)
    api.clone_vm("src", "dst")
    src_info = library.image_info(library.get_bundle("src").disk)
    dst_info = library.image_info(library.get_bundle("dst").disk)
    frozen = Path(str(src_info["backing-filename"]))
    assert frozen == Path(str(dst_info["backing-filename"]))
    assert frozen.stat().st_mode & 0o777 == 0o400


def test_a_name_of_the_longest_allowed_length_can_be_created_and_cloned(iso: Path) -> None:
    long_name = "a" * MAX_NAME_BYTES
    api.create_vm(long_name, iso=iso)
    api.clone_vm(long_name, "b" * MAX_NAME_BYTES)
    assert {i.bundle.name for i in api.list_vms()} == {long_name, "b" * MAX_NAME_BYTES}


def test_the_store_refuses_to_delete_a_running_vm(iso: Path, monkeypatch) -> None:
    """Stopping is the workflows layer's job; the store only refuses."""
    api.create_vm("busy", iso=iso)
    monkeypatch.setattr(library, "is_running", lambda bundle: True)
    with pytest.raises(StateError, match="running"):
        library.delete_vm("busy")
    assert library.get_bundle("busy").path.is_dir()


def test_an_overlay_smaller_than_its_base_is_refused_in_units(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    with open(base, "wb") as fh:
        fh.truncate((1 << 30) + (300 << 20))
    with pytest.raises(DiskError) as info:
        library.create_overlay(tmp_path / "disk.qcow2", base, "raw", 1 << 30)
    assert str(info.value) == ("disk size 1G is smaller than the base image (1.3G); "
                               "use --disk 2G or more")
