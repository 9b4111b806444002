"""The generic machine builder can never emit a host-guest channel."""

from __future__ import annotations

import itertools
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from secvf.errors import ForbiddenDevice
from secvf.machine.generic import build_generic_machine
from secvf.machine.plan import MachinePlan
from secvf.model.channels import channel_of
from secvf.model.config import new_mac, now_iso, parse_config
from secvf.store.bundle import Bundle, RuntimeFiles

FORBIDDEN_WORDS = ("vsock", "vhost-user", "virtiofs", "virtio-fs", "9p", "virtio-serial",
                   "virtserialport", "virtconsole", "guest-agent", "qga")


@pytest.fixture(scope="module")
def boot_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("boot")
    iso = d / "installer.iso"
    iso.write_bytes(b"\0" * 4096)
    disk = d / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1G"], check=True)
    return {"iso": iso, "disk-image": disk}


def make_config(kind: str, network: str, boot: dict[str, str], cpus: int, accel: str):
    return parse_config({
        "id": str(uuid.uuid4()), "name": "g", "kind": kind, "cpus": cpus, "memory_mib": 256,
        "disk_bytes": 1 << 30, "boot": boot, "network": network, "mac": new_mac(),
        "accel": accel, "created_at": now_iso(), "updated_at": now_iso(),
    }, source="test")


COMBOS = list(itertools.product(["generic", "malware-analysis"], ["none", "nat"],
                                ["iso", "disk-image"], [1, 2], ["kvm", "tcg"]))


@pytest.mark.parametrize(("kind", "network", "boot", "cpus", "accel"), COMBOS)
def test_no_channel_for_any_option_combination(boot_files, tmp_path, kind, network, boot,
                                               cpus, accel) -> None:
    spec = ({"type": "iso", "path": str(boot_files["iso"])} if boot == "iso" else
            {"type": "disk-image", "path": str(boot_files["disk-image"]), "format": "qcow2"})
    config = make_config(kind, network, spec, cpus, accel)
    plan = build_generic_machine(config, Bundle(tmp_path), RuntimeFiles(config.id), accel)
    assert [d for d in plan.devices if channel_of(d.driver)] == []
    joined = " ".join(plan.args).lower()
    # the first token of every option value is the device/backend type (paths excluded)
    pairs = zip(plan.args, plan.args[1:], strict=False)
    kinds = [v.split(",")[0] for k, v in pairs if k.startswith("-")]
    assert not [k for k in kinds for w in FORBIDDEN_WORDS if w in k.lower()], kinds
    assert "-nodefaults" in plan.args and "-no-user-config" in plan.args
    assert any(a.startswith("on,obsolete=deny") for a in plan.args)
    assert ("virtio-net-pci" in joined) == (network == "nat")
    if kind == "malware-analysis":
        assert "console-" not in joined  # no attachable console socket: output-only serial


def test_plan_refuses_a_channel_device_on_a_generic_vm(boot_files) -> None:
    config = make_config("generic", "none", {"type": "iso", "path": str(boot_files["iso"])},
                         1, "tcg")
    plan = MachinePlan(vm=config, accel="tcg")
    for driver in ("vhost-user-vsock-pci", "vhost-vsock-pci", "vhost-user-fs-pci",
                   "virtio-9p-pci", "virtio-serial-pci", "virtserialport"):
        with pytest.raises(ForbiddenDevice):
            plan.add_device(driver, "x", "test")
    assert plan.devices == []


def test_generic_builder_refuses_a_sandbox_config(boot_files, tmp_path) -> None:
    config = parse_config({
        "id": str(uuid.uuid4()), "name": "s", "kind": "ai-sandbox", "cpus": 1,
        "memory_mib": 256, "disk_bytes": 1 << 30,
        "boot": {"type": "iso", "path": str(boot_files["iso"])}, "network": "nat",
        "mac": new_mac(), "channels": {}, "created_at": now_iso(), "updated_at": now_iso(),
    }, source="test")
    with pytest.raises(ForbiddenDevice):
        build_generic_machine(config, Bundle(tmp_path), RuntimeFiles(config.id), "tcg")


def test_the_kernel_time_is_stamped_again_when_qemu_starts() -> None:
    from secvf.machine.common import PRE_KERNEL_NS, restamp_kernel_time

    argv = ["-name", "x", "-append", "console=ttyS0 secvf_time=1 secvf_hostname=x"]
    before = time.time_ns()
    out = restamp_kernel_time(argv, "tcg")
    stamp = int(out[3].split("secvf_time=")[1].split()[0])
    assert out[:3] == argv[:3] and out[3].endswith(" secvf_hostname=x")
    assert stamp >= before + PRE_KERNEL_NS["tcg"]
