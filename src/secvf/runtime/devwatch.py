"""Noticing devices added to a running VM (QEMU 7.2 sends no event when one is).

Only a QMP client can add a device, and the supervisor holds the VM's QMP socket;
but the isolation promise is checked against the running machine, not against that
argument. :class:`DeviceWatch` lists the two containers every ``device_add`` lands in
(``/machine/peripheral`` and ``/machine/peripheral-anon``) every
:data:`POLL_S` — two ``qom-list`` calls, well under a millisecond of QEMU's time — and
reports when the set differs from what the supervisor knows; the supervisor then walks
the whole tree and judges it as at start. The supervisor tells the watch about the
devices it adds itself (:meth:`DeviceWatch.expect`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from qemu.qmp import QMPClient

#: How often the containers of user-added devices are listed.
POLL_S = 0.5
CONTAINERS = ("/machine/peripheral", "/machine/peripheral-anon")


async def peripheral_ids(qmp: QMPClient) -> frozenset[str]:
    """The QOM paths of every device in the user-device containers.

    Raises:
        QMPError: a ``qom-list`` failed.
    """
    found = set()
    for container in CONTAINERS:
        props = await qmp.execute("qom-list", {"path": container})
        for prop in props if isinstance(props, list) else []:
            if str(prop.get("type", "")).startswith("child<"):
                found.add(f"{container}/{prop['name']}")
    return frozenset(found)


class DeviceWatch:
    """Calls ``on_change`` (awaited) whenever the user-device containers change."""

    def __init__(self, qmp: QMPClient,
                 on_change: Callable[[frozenset[str]], Awaitable[None]]) -> None:
        self._qmp = qmp
        self._on_change = on_change
        self._known: frozenset[str] | None = None

    async def expect(self) -> None:
        """Take the containers as they are now for known (after the supervisor's own
        hot-plug, or at start).

        Raises:
            QMPError: a ``qom-list`` failed.
        """
        self._known = await peripheral_ids(self._qmp)

    async def run(self) -> None:
        """Poll until cancelled.

        Raises:
            QMPError: a ``qom-list`` failed (QEMU is gone).
        """
        if self._known is None:
            await self.expect()
        while True:
            await asyncio.sleep(POLL_S)
            now = await peripheral_ids(self._qmp)
            if now != self._known:
                self._known = now
                await self._on_change(now)
