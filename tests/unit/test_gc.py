"""Disk layers and leftovers: clones do not lengthen their source's chain needlessly,
``secvf gc`` (and ``vm delete``) removes layers no VM uses and work directories of
killed commands, and an image build stays while a VM's disk is based on it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from secvf import api
from secvf.errors import StateError
from secvf.image import build, get_image, recipe_hash, remove_image, store
from secvf.image.recipe import RECIPES
from secvf.store import library, staging
from secvf.store.gc import backing_files
from secvf.store.layers import using_layers
from tests.helpers import run_cli
from tests.unit.fake_images import publish_fake_image


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECVF_CACHE", str(tmp_path / "cache"))


def layers(home: Path) -> list[str]:
    directory = home / "layers"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def chain(name: str) -> list[Path]:
    return backing_files(library.get_bundle(name).disk)


def guest_writes(name: str) -> None:
    """What a run of the VM does to its disk: data in its own overlay."""
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k",
                    str(library.get_bundle(name).disk)], check=True, capture_output=True)


def gc_json(*args: str) -> dict:
    proc = run_cli("gc", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---- cloning keeps chains short --------------------------------------------------------------


def test_cloning_an_unchanged_vm_again_adds_no_layer(iso: Path, secvf_env: Path) -> None:
    api.create_vm("src", iso=iso)
    for clone in ("a", "b", "c"):
        api.clone_vm("src", clone)
    api.clone_vm("a", "a2")
    assert len(layers(secvf_env)) == 1
    assert len(chain("src")) == 1
    assert {tuple(chain(n)) for n in ("src", "a", "b", "c", "a2")} == {tuple(chain("src"))}
    guest_writes("src")
    api.clone_vm("src", "d")
    assert len(layers(secvf_env)) == 2 and len(chain("src")) == 2
    assert chain("d") == chain("src")


def test_an_unchanged_image_vm_is_cloned_straight_over_the_image(secvf_env: Path) -> None:
    base = publish_fake_image("base")
    api.create_vm("web", image="base")
    api.clone_vm("web", "web2")
    assert chain("web") == chain("web2") == [base.rootfs.resolve()]
    assert layers(secvf_env) == []


def test_a_clone_reads_what_the_source_had_written(iso: Path) -> None:
    api.create_vm("src", iso=iso)
    guest_writes("src")
    api.clone_vm("src", "dst")
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 64k",
                          str(library.get_bundle("dst").disk)], capture_output=True, text=True)
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout


# ---- garbage collection ----------------------------------------------------------------------


def test_deleting_every_vm_of_a_chain_leaves_no_layer(iso: Path, secvf_env: Path) -> None:
    api.create_vm("src", iso=iso)
    api.clone_vm("src", "a")
    guest_writes("src")
    api.clone_vm("src", "b")
    assert len(layers(secvf_env)) == 2
    for name in ("a", "b"):
        run_cli("vm", "delete", name, check=True)
    assert len(layers(secvf_env)) == 2  # both still under src
    run_cli("vm", "delete", "src", check=True)
    assert layers(secvf_env) == []


def test_layers_a_vm_still_reads_through_are_kept(iso: Path, secvf_env: Path) -> None:
    api.create_vm("src", iso=iso)
    api.clone_vm("src", "clone")
    api.delete_vm("src")
    assert len(layers(secvf_env)) == 1 and chain("clone")[0].exists()
    assert gc_json()["removed"] == []
    api.delete_vm("clone")
    assert layers(secvf_env) == []


def test_gc_removes_leftover_work_dirs_and_what_only_they_used(iso: Path,
                                                               secvf_env: Path) -> None:
    api.create_vm("src", iso=iso)
    vms = secvf_env / "vms"
    orphan = secvf_env / "layers" / "orphan.qcow2"
    orphan.parent.mkdir(mode=0o700, exist_ok=True)
    library.qemu_img("create", "-q", "-f", "qcow2", str(orphan), "64M")
    stale = {}
    for purpose in staging.PURPOSES:
        stale[purpose] = vms / staging.work_dir_name(purpose)
        stale[purpose].mkdir()
    library.qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(orphan),
                     str(stale["cloning"] / "disk.qcow2"))
    not_ours = vms / ".cloning-by-hand"
    not_ours.mkdir()
    live, held = staging.new_work_dir("creating")
    kept_layer = secvf_env / "layers" / "in-use.qcow2"
    library.qemu_img("create", "-q", "-f", "qcow2", str(kept_layer), "64M")
    library.qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(kept_layer),
                     str(live / "disk.qcow2"))
    try:
        dry = gc_json("--dry-run")
        expected = {str(p) for p in stale.values()} | {str(orphan)}
        assert dry["dry_run"] and {i["path"] for i in dry["removed"]} == expected
        assert all(p.exists() for p in stale.values()) and orphan.exists()

        done = gc_json()
        assert {i["path"] for i in done["removed"]} == expected
        assert {i["kind"] for i in done["removed"]} == {"layer", "work-dir"}
        assert not any(p.exists() for p in stale.values()) and not orphan.exists()
        assert live.is_dir() and kept_layer.exists() and not_ours.is_dir()
        assert (vms / "src").is_dir() and done["kept_layers"] == 1
    finally:
        os.close(held)
    assert {i["path"] for i in gc_json()["removed"]} == {str(live), str(kept_layer)}


def test_gc_keeps_every_layer_when_a_disk_cannot_be_read(iso: Path, secvf_env: Path) -> None:
    api.create_vm("src", iso=iso)
    api.clone_vm("src", "clone")
    api.create_vm("broken", iso=iso)
    (secvf_env / "vms" / "broken" / "disk.qcow2").write_bytes(b"not a disk any more")
    api.delete_vm("src")
    api.delete_vm("clone")  # runs gc, which must not guess
    assert len(layers(secvf_env)) == 1
    proc = run_cli("gc")
    assert proc.returncode == 0 and "kept every layer" in proc.stdout
    assert "broken" in proc.stdout and len(layers(secvf_env)) == 1


def test_gc_does_not_run_while_a_clone_holds_the_layers(iso: Path, secvf_env: Path) -> None:
    api.create_vm("src", iso=iso)
    api.clone_vm("src", "clone")
    api.delete_vm("src")
    with using_layers():
        proc = run_cli("gc")
        assert proc.returncode != 0 and "clone is in progress" in proc.stderr
        run_cli("vm", "delete", "clone", check=True)  # deletes; its gc waits for next time
    assert len(layers(secvf_env)) == 1
    assert len(gc_json()["removed"]) == 1 and layers(secvf_env) == []


# ---- image builds a VM's disk is based on ----------------------------------------------------


def test_a_forced_rebuild_is_refused_while_a_stopped_vm_is_based_on_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    digest = recipe_hash(RECIPES["base"])
    image = publish_fake_image("base", digest)
    api.create_vm("web", image="base")
    monkeypatch.setattr(build, "_preflight", lambda: None)
    with pytest.raises(StateError, match="'web'") as refused:
        build.build_image("base", force=True)
    assert "secvf vm delete" in str(refused.value)
    with pytest.raises(StateError, match="'web'"):  # the last check, just before publishing
        with store.build_lock(), store.staging_dir("base", digest) as work:
            for part in ("vmlinuz", "initrd.img", "rootfs.img"):
                (work / part).write_bytes(b"new")
            store.publish(work, _manifest_of(image))
    assert get_image("base").rootfs.stat().st_size == image.rootfs.stat().st_size


def _manifest_of(image: store.ImageInfo) -> store.ImageManifest:
    return store.ImageManifest.model_validate_json((image.path / "image.json").read_bytes())


def test_an_image_is_not_removed_while_a_vm_reads_through_it() -> None:
    publish_fake_image("base")
    api.create_vm("web", image="base")
    guest_writes("web")
    api.clone_vm("web", "web2")  # web2 -> layer -> rootfs
    api.delete_vm("web")
    proc = run_cli("image", "rm", "base")
    assert proc.returncode != 0 and "'web2'" in proc.stderr
    assert get_image("base")
    api.delete_vm("web2")
    remove_image("base")
    assert run_cli("image", "list", "--json", check=True).stdout.strip() == "[]"
