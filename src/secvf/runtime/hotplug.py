"""Hot-plugging a restored sandbox's channel devices over QMP.

The devices come from the machine plan (:attr:`MachinePlan.hotplug`, which only the
AI-sandbox builder fills); this module only carries them out: ``chardev-add`` of the
client socket to the device's vhost-user back end (started and listening before
QEMU), then ``device_add`` onto its spare PCIe root port. The guest sees an ACPI
hot-plug event and probes the device.
"""

from __future__ import annotations

import contextlib
import logging
import time

from qemu.qmp import QMPClient, QMPError

from secvf.errors import LaunchFailed
from secvf.machine.plan import HotplugDevice

log = logging.getLogger("secvf.runtime.hotplug")


async def plug(qmp: QMPClient, devices: list[HotplugDevice]) -> None:
    """Add ``devices`` (in order) to the running guest.

    Raises:
        LaunchFailed: QEMU refused one (what was added before it stays).
    """
    for dev in devices:
        dev_id = str(dev.device["id"])
        began = time.monotonic()
        try:
            await qmp.execute("chardev-add", dev.chardev)
        except QMPError as exc:
            raise LaunchFailed(f"hot-plug of {dev_id}", [], f"chardev-add: {exc}", None) from exc
        try:
            await qmp.execute("device_add", dev.device)
        except QMPError as exc:
            with contextlib.suppress(QMPError):
                await qmp.execute("chardev-remove", {"id": dev.chardev["id"]})
            raise LaunchFailed(f"hot-plug of {dev_id}", [], f"device_add: {exc}", None) from exc
        log.info("hot-plugged %s (%s) in %.3f s", dev_id, dev.device["driver"],
                 time.monotonic() - began)
