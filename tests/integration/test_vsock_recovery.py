"""A sandbox whose guest reports a dead vsock queue gets its channel back: the supervisor
logs a ``guest_device_error``, unplugs the vsock device, restarts its backend, plugs the
device in again, and exec works on without the VM restarting.

The condition is forced by writing the kernel's line to the console from inside the
guest (the supervisor acts on what the console says; the guest controls that, which is
why a recovery happens at most every 30 s)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from secvf import api
from secvf.errors import AgentUnavailable
from secvf.store.events import read_events

pytestmark = pytest.mark.vm

DEAD_QUEUE_LINE = "vmw_vsock_virtio_transport virtio0: rx:id 117 is not a head!"
RECOVERY_TIMEOUT_S = 120.0


def events(name: str, event: str) -> list[dict]:
    return [e for e in read_events() if e.get("vm") == name and e.get("event") == event]


def test_a_dead_vsock_queue_is_recovered_without_losing_the_vm(vm_factory,
                                                               vm_library: Path) -> None:
    name = vm_factory.sandbox("vsrec", "--memory", "512M", "--cold")
    api.start_sandbox(name)
    before = api.vm_status(name)
    assert any(d["type"] == "vhost-user-vsock-pci" for d in before["devices"])
    try:
        api.run_command(name, ["sh", "-c", f"echo '{DEAD_QUEUE_LINE}' > /dev/console"],
                        user="root")
    except AgentUnavailable:
        pass  # the recovery may unplug the device before this exec's reply is back
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while not events(name, "guest_device_recovered"):
        assert time.monotonic() < deadline, "the channel was not recovered"
        time.sleep(0.2)
    assert events(name, "guest_device_error")
    after = api.vm_status(name)
    assert after["state"] == "running" and after["pid"] == before["pid"]
    assert after["qemu_pid"] == before["qemu_pid"]  # the same QEMU: the VM did not restart
    assert any(DEAD_QUEUE_LINE in line for line in after["device_errors"])
    api.wait_for_exec(name, 60)
    result = api.run_command(name, ["sh", "-c", "echo back"])
    assert result.exit_code == 0 and result.stdout == b"back\n"
