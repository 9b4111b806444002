"""The promise, end to end: a channel exists only on the AI sandbox (the original PR's
test plan, automated), with a generic, a malware-analysis and a sandbox VM running at once."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest

from secvf.exec.bridge import start_bridge, stop_bridge
from secvf.store.bundle import RuntimeFiles
from secvf.store.library import get_vm
from tests.helpers import run_cli

pytestmark = pytest.mark.vm

CHANNEL_WORDS = ("vsock", "vhost-user-fs", "virtio-fs", "9p", "virtio-serial", "virtserial")


def runtime_dir() -> Path:
    return Path(os.environ["SECVF_RUNTIME_DIR"])


def test_sandbox_has_its_socket_and_exec_works(fleet: dict) -> None:
    sbx = fleet["sbx"]
    sock = runtime_dir() / f"secvf-exec-{sbx['id']}.sock"
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(runtime_dir().stat().st_mode) == 0o700
    assert {d["channel"] for d in sbx["channels"]} == {"vsock", "virtio-fs"}
    for cli in ("secvf", "secvf-cli"):
        proc = run_cli("vm", "exec", "sbx", "--", "sh", "-c", f"echo via-{cli}; exit 7",
                       prog=cli)
        assert proc.returncode == 7 and proc.stdout == f"via-{cli}\n"


@pytest.mark.parametrize("name", ["gen", "mal"])
def test_generic_and_malware_vms_have_no_channel(fleet: dict, name: str) -> None:
    status = fleet[name]
    assert status["state"] == "running" and status["guest_ready"]
    assert status["channels"] == []
    vm_id = status["id"]
    assert not (runtime_dir() / f"secvf-exec-{vm_id}.sock").exists()
    assert not list(RuntimeFiles(vm_id).vm_dir.glob("vsock*"))
    live = json.loads(run_cli("vm", "status", name, "--json", check=True).stdout)
    types = " ".join(d["type"] for d in live["devices"]).lower()
    assert not [w for w in CHANNEL_WORDS if w in types], types
    proc = run_cli("vm", "exec", name, "--", "true")
    assert proc.returncode == 125
    assert "has no exec channel by design" in proc.stderr


def test_generic_vm_got_an_address_and_malware_vm_has_no_nic(fleet: dict,
                                                             vm_library: Path) -> None:
    gen_log = (vm_library / "vms" / "gen" / "serial.log").read_text()
    assert "network: eth0 10.0.2.15" in gen_log
    assert "virtio-net-pci" not in {d["type"] for d in fleet["mal"]["devices"]}
    assert fleet["mal"]["network"] == "none"
    assert not RuntimeFiles(fleet["mal"]["id"]).console_socket.exists()
    assert RuntimeFiles(fleet["gen"]["id"]).console_socket.exists()


def test_stop_bridge_is_a_safe_noop_where_no_bridge_exists(fleet: dict) -> None:
    before = sorted(p.name for p in runtime_dir().iterdir())
    _, never_started = get_vm("gen")

    async def stop_twice() -> None:
        for vm_id in (fleet["gen"]["id"], fleet["gen"]["id"], never_started.id):
            await stop_bridge(vm_id)

    asyncio.run(stop_twice())
    assert sorted(p.name for p in runtime_dir().iterdir()) == before


def test_start_bridge_without_vsock_creates_nothing(fleet: dict) -> None:
    _, config = get_vm("mal")
    files = RuntimeFiles(config.id)
    assert asyncio.run(start_bridge(config, files)) is None
    assert not files.exec_socket.exists()


def test_audit_is_clean_on_the_fleet_and_flags_a_planted_socket(fleet: dict) -> None:
    proc = run_cli("audit", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, report
    by_name = {vm["name"]: vm for vm in report["vms"]}
    assert by_name["sbx"]["exec_socket"]["mode"] == "0600"
    assert {d["channel"] for d in by_name["sbx"]["channel_devices"]} == {"vsock", "virtio-fs"}
    assert by_name["gen"]["channel_devices"] == [] and by_name["gen"]["source"] == "live"
    planted = runtime_dir() / f"secvf-exec-{fleet['gen']['id']}.sock"
    planted.touch()
    try:
        proc = run_cli("audit", "--json")
        report = json.loads(proc.stdout)
        assert proc.returncode == 1
        gen = next(vm for vm in report["vms"] if vm["name"] == "gen")
        assert any("exec socket" in f for f in gen["findings"])
    finally:
        planted.unlink()


def test_console_attaches_and_detaches_and_logs_show_the_boot(fleet: dict) -> None:
    proc = run_cli("vm", "console", "gen", input_bytes=b"\x1d", timeout=30)
    assert proc.returncode == 0
    assert b"attached to 'gen'" in proc.stderr and b"detached" in proc.stderr
    logs = run_cli("vm", "logs", "gen", check=True)
    assert "SECVF-READY" in logs.stdout


def test_malware_analysis_console_is_output_only(fleet: dict) -> None:
    import subprocess
    import sys

    console = subprocess.Popen([sys.executable, "-m", "secvf", "vm", "console", "mal"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        _, err = console.communicate(b"echo typed\n", timeout=3)
    except subprocess.TimeoutExpired:
        console.kill()
        _, err = console.communicate()
    assert b"output-only" in err
    assert b"typed" not in (Path(os.environ["SECVF_HOME"]) / "vms" / "mal" /
                            "serial.log").read_bytes()
