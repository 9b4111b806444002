"""``vm create`` checks an ISO or disk image with the same rules as an imported bundle:
no system files, and a disk image must stand alone (no backing or data file)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import run_cli


def _refused(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr
    assert run_cli("vm", "list", "--json", check=True).stdout.strip() == "[]"


def test_an_iso_in_a_system_tree_is_refused() -> None:
    _refused(run_cli("vm", "create", "x", "--iso", "/etc/shadow"), "/etc/shadow", "in /etc")


def test_a_disk_image_with_a_backing_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.img"
    secret.write_bytes(b"\0" * (1 << 20))
    layered = tmp_path / "layered.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret),
                    str(layered)], check=True)
    _refused(run_cli("vm", "create", "x", "--disk-image", str(layered)), str(secret))


def test_a_disk_image_with_an_external_data_file_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "host-file"
    data.write_bytes(b"\0" * (1 << 20))
    image = tmp_path / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data}",
                    str(image), "1M"], check=True)
    _refused(run_cli("vm", "create", "x", "--disk-image", str(image)), "data file")


def test_a_standalone_disk_image_is_accepted(tmp_path: Path) -> None:
    image = tmp_path / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
    run_cli("vm", "create", "ok", "--disk-image", str(image), check=True)
