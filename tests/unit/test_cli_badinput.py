"""Bad input through the real CLI: one-line error, non-zero exit, other VMs intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import run_cli


def assert_clean_error(proc, *words: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("secvf: error: ")
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", ["", "a/b", "a\\b", "..", ".x", "x" * 256, "a b", "a;b"])
def test_invalid_names(iso: Path, name: str) -> None:
    assert_clean_error(run_cli("vm", "create", name, "--iso", str(iso)), "name")


def test_duplicate_name_keeps_the_first_vm(iso: Path, secvf_env: Path) -> None:
    run_cli("vm", "create", "dup", "--iso", str(iso), check=True)
    before = (secvf_env / "vms" / "dup" / "vm.json").read_text()
    assert_clean_error(run_cli("vm", "create", "dup", "--iso", str(iso)), "already exists")
    assert (secvf_env / "vms" / "dup" / "vm.json").read_text() == before


@pytest.mark.parametrize(("flag", "value", "word"), [
    ("--memory", "1M", "memory"), ("--memory", "lots", "size"), ("--disk", "1K", "--disk"),
    ("--cpus", "0", "cpus"), ("--cpus", "999", "cpus"),
])
def test_sizes_that_cannot_work(iso: Path, flag: str, value: str, word: str) -> None:
    assert_clean_error(run_cli("vm", "create", "v", "--iso", str(iso), flag, value), word)


def test_missing_image_iso_and_disk(tmp_path: Path) -> None:
    assert_clean_error(run_cli("vm", "create", "v", "--image", "nosuch"), "nosuch")
    assert_clean_error(run_cli("vm", "create", "v", "--iso", str(tmp_path / "no.iso")), "ISO")
    assert_clean_error(run_cli("vm", "create", "v", "--disk-image", str(tmp_path / "no.img")),
                       "does not exist")
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 600)
    # SecVF's own header check refuses it before qemu-img ever opens it
    assert_clean_error(run_cli("vm", "create", "v", "--disk-image", str(bad)),
                       "qcow2 image of an unsupported kind")


def test_channel_flags_refused_on_generic_and_malware(iso: Path, tmp_path: Path) -> None:
    for kind in ("generic", "malware-analysis"):
        proc = run_cli("vm", "create", "v", "--kind", kind, "--iso", str(iso),
                       "--share", f"{tmp_path}:/data:ro")
        assert_clean_error(proc, "'shares'", kind)
        proc = run_cli("vm", "create", "v", "--kind", kind, "--iso", str(iso),
                       "--workspace", str(tmp_path))
        assert_clean_error(proc, "'workspace'")


def test_corrupt_and_hand_edited_vm_json(iso: Path, secvf_env: Path) -> None:
    run_cli("vm", "create", "good", "--iso", str(iso), check=True)
    run_cli("vm", "create", "broken", "--iso", str(iso), check=True)
    run_cli("vm", "create", "sneaky", "--iso", str(iso), check=True)
    (secvf_env / "vms" / "broken" / "vm.json").write_text("{not json")
    sneaky = secvf_env / "vms" / "sneaky" / "vm.json"
    data = json.loads(sneaky.read_text())
    data["vsock"] = {"guest_cid": 3}
    sneaky.write_text(json.dumps(data))

    assert_clean_error(run_cli("vm", "status", "broken"), "broken/vm.json", "JSON")
    assert_clean_error(run_cli("vm", "start", "sneaky"), "'vsock'", "generic")
    listed = json.loads(run_cli("vm", "list", "--json", check=True).stdout)
    states = {row["name"]: row["state"] for row in listed}
    assert states == {"good": "stopped", "broken": "invalid", "sneaky": "invalid"}
    assert json.loads(run_cli("vm", "status", "good", "--json", check=True).stdout)["kind"] == \
        "generic"


def test_stop_and_delete_of_unknown_vm_and_bad_rename_or_clone(iso: Path) -> None:
    assert_clean_error(run_cli("vm", "stop", "ghost"), "no VM named 'ghost'")
    assert_clean_error(run_cli("vm", "delete", "ghost"), "no VM named 'ghost'")
    run_cli("vm", "create", "idle", "--iso", str(iso), check=True)
    assert_clean_error(run_cli("vm", "rename", "idle", "../x"), "name")
    assert_clean_error(run_cli("vm", "clone", "idle", "idle"), "already exists")


def test_import_validates_like_create(iso: Path, tmp_path: Path, secvf_env: Path) -> None:
    run_cli("vm", "create", "orig", "--iso", str(iso), check=True)
    exported = tmp_path / "export"
    exported.mkdir()
    src = secvf_env / "vms" / "orig"
    data = json.loads((src / "vm.json").read_text())
    (exported / "disk.qcow2").write_bytes((src / "disk.qcow2").read_bytes())
    data["virtio_serial"] = True
    (exported / "vm.json").write_text(json.dumps(data))
    assert_clean_error(run_cli("vm", "import", str(exported)), "'virtio_serial'")
    del data["virtio_serial"]
    (exported / "vm.json").write_text(json.dumps(data))
    assert_clean_error(run_cli("vm", "import", str(exported)), "already exists")
    run_cli("vm", "import", str(exported), "--name", "copy", check=True)
    status = json.loads(run_cli("vm", "status", "copy", "--json", check=True).stdout)
    assert status["id"] != data["id"] and status["state"] == "stopped"
