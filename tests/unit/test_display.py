"""The graphical console (``vm create --display vnc``, ``vm display``): a VNC server on a
private Unix socket with display and input devices that are not host-guest channels;
view-only on malware-analysis VMs; never on an AI sandbox. Real QEMU, firmware only."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from secvf.errors import ConfigError
from secvf.machine.generic import build_generic_machine
from secvf.model.channels import channel_of
from secvf.model.config import parse_config
from secvf.store.bundle import RuntimeFiles
from secvf.store.library import get_vm
from secvf.store.runstate import read_runtime_state
from tests.helpers import run_cli
from tests.unit.boot_media import bootable_iso

#: The QOM types the graphical console adds, with and without its input devices.
DISPLAY_TYPES = {"VGA"}
INPUT_TYPES = {"qemu-xhci", "usb-tablet"}


@pytest.fixture
def iso(tmp_path: Path) -> Path:
    return bootable_iso(tmp_path / "boot.iso", b"SECVF-TEST-DISPLAY\r\n")


def create(name: str, iso: Path, *extra: str) -> dict:
    proc = run_cli("vm", "create", name, "--iso", str(iso), "--memory", "256M", "--disk",
                   "64M", "--accel", "tcg", "--json", *extra, check=True)
    return json.loads(proc.stdout)


def display(name: str) -> dict:
    return json.loads(run_cli("vm", "display", name, "--json", check=True).stdout)


def live_types(name: str) -> set[str]:
    record = read_runtime_state(RuntimeFiles(get_vm(name)[1].id))
    assert record is not None
    return set(record.device_types)


def rfb_greeting(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        return sock.recv(12)


def test_a_generic_vm_gets_a_private_vnc_console_that_is_no_channel(iso: Path) -> None:
    assert create("gui", iso, "--display", "vnc")["display"] == "vnc"
    run_cli("vm", "start", "gui", check=True)
    info = display("gui")
    assert info == {"name": "gui", "protocol": "vnc", "socket": info["socket"],
                    "mode": "0600", "view_only": False,
                    "connect": f"vncviewer {info['socket']}"}
    sock = Path(info["socket"])
    # the VM's own runtime directory: a jailed QEMU sees that one only
    assert sock.parent == Path(os.environ["SECVF_RUNTIME_DIR"]) / f"vm-{get_vm('gui')[1].id}"
    assert sock.name == "vnc.sock"
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert rfb_greeting(str(sock)) == b"RFB 003.008\n"
    human = run_cli("vm", "display", "gui", check=True).stdout
    assert str(sock) in human and "socat" in human and "vncviewer" in human

    status = json.loads(run_cli("vm", "status", "gui", "--json", check=True).stdout)
    assert DISPLAY_TYPES | INPUT_TYPES <= {d["type"] for d in status["devices"]}
    assert status["channels"] == []
    assert "i8042" in live_types("gui")  # the PS/2 keyboard
    audit = json.loads(run_cli("audit", "--json", check=True).stdout)
    assert [(v["name"], v["channel_devices"], v["findings"]) for v in audit["vms"]] == [
        ("gui", [], [])]

    run_cli("vm", "stop", "gui", "--force", check=True)
    assert not sock.exists()
    proc = run_cli("vm", "display", "gui")
    assert proc.returncode == 1 and "is not running" in proc.stderr


def test_a_malware_analysis_console_is_view_only(iso: Path) -> None:
    create("detonate", iso, "--kind", "malware-analysis", "--display", "vnc")
    run_cli("vm", "start", "detonate", check=True)
    info = display("detonate")
    assert info["view_only"] is True and info["mode"] == "0600"
    assert rfb_greeting(info["socket"]) == b"RFB 003.008\n"
    types = live_types("detonate")
    assert DISPLAY_TYPES <= types
    assert not types & (INPUT_TYPES | {"i8042"}), "a view-only console has no input device"
    assert "view-only" in run_cli("vm", "display", "detonate", check=True).stdout
    run_cli("vm", "stop", "detonate", "--force", check=True)


def test_the_default_is_no_display(iso: Path) -> None:
    assert create("plain", iso)["display"] == "none"
    bundle, config = get_vm("plain")
    plan = build_generic_machine(config, bundle, RuntimeFiles(config.id), "tcg")
    assert "-vnc" not in plan.args and plan.args[plan.args.index("-display") + 1] == "none"
    assert not {d.driver for d in plan.devices} & (DISPLAY_TYPES | INPUT_TYPES)
    proc = run_cli("vm", "display", "plain", "--json")
    assert proc.returncode == 1 and "has no graphical console" in proc.stderr
    assert json.loads(proc.stdout)["error"]["type"] == "ConfigError"


def test_an_ai_sandbox_never_has_a_display(tmp_path: Path) -> None:
    proc = run_cli("vm", "create", "sbx", "--kind", "ai-sandbox", "--display", "vnc")
    assert proc.returncode == 1
    assert "an ai-sandbox VM has no display" in proc.stderr and "vm exec" in proc.stderr
    assert not (tmp_path / "home" / "vms" / "sbx").exists()
    data = {"id": "00000000-0000-4000-8000-000000000001", "name": "sbx",
            "kind": "ai-sandbox", "cpus": 1, "memory_mib": 256, "disk_bytes": 1 << 30,
            "boot": {"type": "disk-image", "path": "/x.img", "format": "raw"},
            "network": "none", "mac": "52:54:00:00:00:01", "channels": {},
            "display": "vnc", "created_at": "t", "updated_at": "t"}
    with pytest.raises(ConfigError, match=r"vm\.json: field 'display': .*no display"):
        parse_config(data, source="vm.json")


def test_display_and_input_devices_are_not_channels() -> None:
    """The channel table (and so the plan, the live check and audit) leaves them alone:
    they move pixels and key/pointer events, and reach no host process or file."""
    for qom_type in ("VGA", "qemu-xhci", "base-xhci", "usb-tablet", "usb-bus", "i8042"):
        assert channel_of(qom_type) is None, qom_type
