"""The supervisor's QMP client formats messages only when DEBUG logging wants them
(``qemu.qmp``'s own hooks pretty-print every message whatever the level)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.message import Message

from secvf.runtime.devtree import walk_devices
from secvf.runtime.qmpclient import QuietQMPClient
from secvf.testing.qmp import FakeQMPServer, QMPScript


def _walk_counting_formats(tmp_path: Path, client: type[QMPClient],
                           monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """Walk the fake peer's device tree with ``client``; return the number of devices
    and how often a message was turned into text."""
    formatted = []
    original = Message.__str__
    monkeypatch.setattr(Message, "__str__",
                        lambda msg: formatted.append(1) or original(msg))

    async def scenario() -> int:
        sock = tmp_path / "qmp.sock"
        async with FakeQMPServer(sock, QMPScript()):
            qmp = client("test")
            await qmp.connect(str(sock))
            devices = await walk_devices(qmp)
            await qmp.disconnect()
            return len(devices)

    return asyncio.run(scenario()), len(formatted)


def test_no_message_is_formatted_when_debug_is_off(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(logging.getLogger("qemu.qmp"), "level", logging.INFO)
    devices, quiet = _walk_counting_formats(tmp_path, QuietQMPClient, monkeypatch)
    assert devices > 5 and quiet == 0
    _, stock = _walk_counting_formats(tmp_path, QMPClient, monkeypatch)
    assert stock > 2 * devices  # the stock client formats both ways, every message


def test_debug_logging_still_shows_every_message(tmp_path: Path, monkeypatch,
                                                 caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="qemu.qmp")
    devices, formatted = _walk_counting_formats(tmp_path, QuietQMPClient, monkeypatch)
    sent = [r for r in caplog.records if r.getMessage().startswith("--> ")]
    received = [r for r in caplog.records if r.getMessage().startswith("<-- ")]
    assert formatted > 0 and len(sent) >= devices and len(received) >= devices
    assert '"execute": "qom-list"' in sent[-1].getMessage()
