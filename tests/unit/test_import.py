"""``vm import`` treats a bundle as hostile input: every host file it can name — the
disk chain, external data files, json:/protocol backing names, multi-file formats, the
boot ISO or disk image, share directories — is checked before anything is written, and
a refusal leaves nothing behind. Also: a VM's name is its directory's name.

The hostile bundles are made with the real ``qemu-img``; no guest image is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from secvf import api
from secvf.store import library
from tests.helpers import run_cli

SECRET_BYTES = 64 << 20
QCOW2_BACKING_FORMAT_EXT = bytes.fromhex("e2792aca")


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A private host file (mode 0600) outside SecVF, the size of a small disk."""
    path = tmp_path / "private" / "secret.img"
    path.parent.mkdir()
    with path.open("wb") as f:
        f.write(b"TOP SECRET\n")
        f.truncate(SECRET_BYTES)
    path.chmod(0o600)
    return path


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every local user can enter (pytest's tmp_path is private)."""
    path = Path(tempfile.mkdtemp(prefix="secvf-public-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def template(iso: Path, secvf_env: Path) -> dict[str, Any]:
    """The vm.json of a stopped ISO-booted VM 'orig' (whose ISO is then one in use)."""
    api.create_vm("orig", iso=iso)
    data: dict[str, Any] = json.loads((secvf_env / "vms" / "orig" / "vm.json").read_text())
    return data


def make_bundle(where: Path, config: dict[str, Any], disk: tuple[str, ...] | None = ()) -> Path:
    """A bundle directory with ``config`` as vm.json and a disk made by
    ``qemu-img create -f qcow2 <disk args> disk.qcow2`` (a standalone one by default)."""
    where.mkdir(exist_ok=True)
    (where / "vm.json").write_text(json.dumps(config))
    if disk is not None:
        qemu_img("create", "-q", "-f", "qcow2", *disk, str(where / "disk.qcow2"), "64M")
    return where


def library_state(home: Path) -> list[str]:
    """Every path in the VM library and the layers directory."""
    return sorted(str(p.relative_to(home)) for top in ("vms", "layers")
                  for p in (home / top).rglob("*")) if home.exists() else []


def assert_refused(bundle: Path, home: Path, *words: str) -> str:
    """``vm import`` fails with one clear line containing ``words`` and changes nothing."""
    before = library_state(home)
    proc = run_cli("vm", "import", str(bundle), "--name", "imported", timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("secvf: error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert library_state(home) == before
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the disk chain ------------------------------------------------------------------------


def test_a_qcow2_with_an_external_data_file_is_refused(tmp_path: Path, secret: Path,
                                                       template: dict, secvf_env: Path) -> None:
    bundle = make_bundle(tmp_path / "b", template, ("-o", f"data_file={secret}"))
    before = sha256(secret)
    assert_refused(bundle, secvf_env, "external data file", str(bundle / "disk.qcow2"))
    assert sha256(secret) == before


def test_a_backing_file_outside_secvf_is_refused(tmp_path: Path, secret: Path,
                                                 template: dict, secvf_env: Path) -> None:
    bundle = make_bundle(tmp_path / "b", template, ("-b", str(secret), "-F", "raw"))
    assert_refused(bundle, secvf_env, f"the backing file {secret}", "outside")


def test_a_symlink_in_the_bundle_to_a_file_outside_is_refused(
        tmp_path: Path, secret: Path, template: dict, secvf_env: Path) -> None:
    bundle = make_bundle(tmp_path / "b", template, None)
    (bundle / "base.img").symlink_to(secret)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw",
             str(bundle / "disk.qcow2"))
    assert_refused(bundle, secvf_env, str(secret), "outside")


@pytest.mark.parametrize("backing", [
    'json:{"driver":"raw","file":{"driver":"file","filename":"SECRET"}}',
    "nbd:127.0.0.1:10809",
    "http://127.0.0.1/disk.img",
    "file:SECRET",
])
def test_json_and_protocol_backing_names_are_refused(backing: str, tmp_path: Path,
                                                     secret: Path, template: dict,
                                                     secvf_env: Path) -> None:
    backing = backing.replace("SECRET", str(secret))
    bundle = make_bundle(tmp_path / "b", template, ("-u", "-b", backing, "-F", "raw"))
    assert_refused(bundle, secvf_env, "json: or protocol filename", backing)


def _hostile_vmdk(bundle: Path, extent: Path) -> Path:
    """A vmdk made by qemu-img whose flat extent is then pointed at ``extent``."""
    vmdk = bundle / "base.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(vmdk), "64M")
    text = vmdk.read_text().replace('"base-flat.vmdk"', f'"{extent}"')
    assert str(extent) in text
    vmdk.write_text(text)
    (bundle / "base-flat.vmdk").unlink()
    return vmdk


@pytest.mark.parametrize("how", ["recorded", "unrecorded", "as-disk"])
def test_vmdk_extents_are_never_opened(how: str, tmp_path: Path, template: dict,
                                       secvf_env: Path) -> None:
    """A vmdk names extent files; it is refused whether the overlay says its backing is
    a vmdk, records no backing format (QEMU would guess vmdk), or the disk is one.

    The extent is a FIFO, so whoever opens it hangs (and the import times out)."""
    extent = tmp_path / "extent.fifo"
    os.mkfifo(extent)
    bundle = make_bundle(tmp_path / "b", template, None)
    vmdk = _hostile_vmdk(bundle, extent)
    disk = bundle / "disk.qcow2"
    if how == "as-disk":
        vmdk.rename(disk)
        assert_refused(bundle, secvf_env, "is not a qcow2 image")
        return
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", vmdk.name, "-F",
             "vmdk" if how == "recorded" else "raw", str(disk), "64M")
    if how == "unrecorded":  # turn the backing-format extension into an unknown one
        data = bytearray(disk.read_bytes())
        at = data.index(QCOW2_BACKING_FORMAT_EXT)
        data[at:at + 4] = b"\x01\x02\x03\x04"
        disk.write_bytes(bytes(data))
    assert_refused(bundle, secvf_env,
                   "'vmdk' image" if how == "recorded" else "does not record the format")


def test_a_disk_that_is_no_qcow2_is_refused(tmp_path: Path, secret: Path, template: dict,
                                            secvf_env: Path) -> None:
    bundle = make_bundle(tmp_path / "b", template, None)
    (bundle / "disk.qcow2").symlink_to(secret)
    assert_refused(bundle, secvf_env, "outside")
    (bundle / "disk.qcow2").unlink()
    (bundle / "disk.qcow2").write_bytes(b"\0" * 65536)
    assert_refused(bundle, secvf_env, "is not a qcow2 image")


def test_a_bundle_others_can_write_is_refused(tmp_path: Path, template: dict,
                                              secvf_env: Path) -> None:
    bundle = make_bundle(tmp_path / "b", template)
    bundle.chmod(0o777)
    assert_refused(bundle, secvf_env, "can be changed by other users", "chmod go-w")


# ---- boot paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("boot_type,target,words", [
    ("iso", "/etc/shadow", ("ISO /etc/shadow", "in /etc")),
    ("iso", "SECRET", ("private file",)),
    ("disk-image", "SECRET", ("disk image", "private file")),
    ("iso", "LINK", ("-> /etc/shadow", "in /etc")),
    ("iso", "FIFO", ("not a regular file",)),
    ("iso", "/proc/self/environ", ("in /proc",)),
    ("iso", "relative.iso", ("not absolute",)),
])
def test_boot_paths_are_checked_like_create_and_more(
        boot_type: str, target: str, words: tuple[str, ...], tmp_path: Path, secret: Path,
        template: dict, secvf_env: Path) -> None:
    """An ISO or disk image a bundle names must pass create's checks, and be a file
    every local user could read (or one a VM here already uses)."""
    link, fifo = tmp_path / "evil.iso", tmp_path / "fifo.iso"
    link.symlink_to("/etc/shadow")
    os.mkfifo(fifo)
    path = {"SECRET": str(secret), "LINK": str(link), "FIFO": str(fifo)}.get(target, target)
    boot = {"type": boot_type, "path": path}
    if boot_type == "disk-image":
        boot["format"] = "raw"
    bundle = make_bundle(tmp_path / "b", {**template, "boot": boot})
    assert_refused(bundle, secvf_env, *words)


def test_a_private_iso_a_vm_here_already_uses_may_be_named(
        tmp_path: Path, iso: Path, template: dict, secvf_env: Path) -> None:
    assert template["boot"] == {"type": "iso", "path": str(iso)}
    bundle = make_bundle(tmp_path / "b", template)
    config = api.import_vm(bundle, name="again")
    assert config.boot.path == str(iso)  # type: ignore[union-attr]


def test_a_disk_image_must_be_standalone(tmp_path: Path, public_dir: Path, template: dict,
                                         secvf_env: Path) -> None:
    base = public_dir / "base.raw"
    base.write_bytes(b"\0" * (1 << 20))
    base.chmod(0o644)
    image = public_dir / "image.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(image))
    image.chmod(0o644)
    boot = {"type": "disk-image", "path": str(image), "format": "qcow2"}
    bundle = make_bundle(tmp_path / "b", {**template, "boot": boot},
                         ("-b", str(image), "-F", "qcow2"))
    assert_refused(bundle, secvf_env, f"the backing file {base} of {image}", "standalone")


# ---- shares -------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["/etc", "OTHER_WORKSPACE"])
def test_sandbox_shares_are_validated_under_the_new_name(
        host: str, tmp_path: Path, template: dict, secvf_env: Path) -> None:
    """A bundle may not share a system tree, nor another sandbox's default workspace."""
    other = secvf_env / "sandboxes" / "other" / "workspace"
    other.mkdir(parents=True)
    host = str(other) if host == "OTHER_WORKSPACE" else host
    share = {"tag": "workspace", "host_path": host, "guest_path": "/workspace",
             "read_only": host == "/etc"}
    config = {**template, "kind": "ai-sandbox", "channels": {"shares": [share]}}
    config.pop("console", None)  # the kind's default
    bundle = make_bundle(tmp_path / "b", config)
    assert_refused(bundle, secvf_env, host)


# ---- what an import makes ---------------------------------------------------------------------


def test_a_backing_file_inside_the_bundle_is_flattened(tmp_path: Path, template: dict,
                                                       secvf_env: Path) -> None:
    bundle = make_bundle(tmp_path / "b", template, None)
    base, disk = bundle / "base.qcow2", bundle / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "64M")
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 64k", str(base)], check=True,
                   capture_output=True)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(disk))
    api.import_vm(bundle, name="flat")
    new = library.get_bundle("flat").disk
    assert "backing-filename" not in library.image_info(new)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(disk), str(new))


def test_a_backing_file_in_secvf_layers_is_kept(tmp_path: Path, template: dict,
                                               secvf_env: Path) -> None:
    layers = secvf_env / "layers"
    layers.mkdir(exist_ok=True)
    layer = layers / "frozen.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(layer), "64M")
    bundle = make_bundle(tmp_path / "b", template, ("-b", str(layer), "-F", "qcow2"))
    subprocess.run(["qemu-io", "-c", "write -P 0x33 1M 64k", str(bundle / "disk.qcow2")],
                   check=True, capture_output=True)
    api.import_vm(bundle, name="onlayer")
    new = library.get_bundle("onlayer").disk
    assert library.image_info(new)["backing-filename"] == str(layer)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(bundle / "disk.qcow2"), str(new))


def test_the_disk_image_a_vm_is_based_on_stays_its_base(tmp_path: Path, public_dir: Path,
                                                       template: dict, secvf_env: Path) -> None:
    image = public_dir / "image.raw"
    image.write_bytes(b"\0" * (64 << 20))
    image.chmod(0o644)
    boot = {"type": "disk-image", "path": str(image), "format": "raw"}
    bundle = make_bundle(tmp_path / "b", {**template, "boot": boot},
                         ("-b", str(image), "-F", "raw"))
    api.import_vm(bundle, name="based")
    assert library.image_info(library.get_bundle("based").disk)["backing-filename"] == \
        str(image)
    assert json.loads(run_cli("audit", "--json").stdout)["finding_count"] == 0


# ---- names --------------------------------------------------------------------------------


def test_an_imported_vm_is_named_by_its_directory(tmp_path: Path, template: dict,
                                                  secvf_env: Path) -> None:
    """A bundle whose vm.json names another VM than its directory: the VM takes the
    vm.json's name (or --name), which is its new directory's name and its vm.json's."""
    bundle = make_bundle(tmp_path / "export-dir", {**template, "name": "renamed"})
    run_cli("vm", "import", str(bundle), check=True)
    run_cli("vm", "import", str(bundle), "--name", "chosen", check=True)
    for name in ("renamed", "chosen"):
        saved = json.loads((secvf_env / "vms" / name / "vm.json").read_text())
        assert saved["name"] == name and saved["id"] != template["id"]
    listed = json.loads(run_cli("vm", "list", "--json", check=True).stdout)
    assert {row["name"] for row in listed} == {"orig", "renamed", "chosen"}


def test_a_bundle_copied_into_the_library_is_invalid_until_deleted(
        template: dict, secvf_env: Path) -> None:
    """A copy of a VM directory in vms/ (same UUID, vm.json names the original) is
    neither listed nor started under either name; it can be deleted."""
    vms = secvf_env / "vms"
    shutil.copytree(vms / "orig", vms / "copy")
    listed = {row["name"]: row for row in
              json.loads(run_cli("vm", "list", "--json", check=True).stdout)}
    assert listed["orig"]["state"] == "stopped"
    assert listed["copy"]["state"] == "invalid"
    for word in ("'orig'", "'copy'", "secvf vm delete copy", "secvf vm import"):
        assert word in listed["copy"]["error"]
    proc = run_cli("vm", "start", "copy")
    assert proc.returncode == 1 and "names the VM 'orig'" in proc.stderr
    assert "is invalid: " in run_cli("vm", "list", check=True).stdout
    run_cli("vm", "delete", "copy", check=True)
    assert not (vms / "copy").exists() and (vms / "orig" / "disk.qcow2").is_file()


def test_a_library_directory_without_vm_json_is_listed_and_deletable(secvf_env: Path) -> None:
    empty = secvf_env / "vms" / "leftover"
    empty.mkdir(parents=True)
    (empty / "disk.qcow2").write_bytes(b"")
    [row] = json.loads(run_cli("vm", "list", "--json", check=True).stdout)
    assert row["state"] == "invalid" and "has no vm.json" in row["error"]
    assert "secvf vm delete leftover" in row["error"]
    run_cli("vm", "delete", "leftover", check=True)
    assert not empty.exists()


def test_a_library_entry_secvf_did_not_make_says_how_to_remove_it(secvf_env: Path) -> None:
    odd = secvf_env / "vms" / "has space"
    odd.mkdir(parents=True)
    [row] = json.loads(run_cli("vm", "list", "--json", check=True).stdout)
    assert row["state"] == "invalid"
    assert f"remove the directory by hand: rm -r {odd}" in row["error"]
