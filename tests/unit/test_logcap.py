"""The bound on a malware-analysis guest's serial logs (runtime/logcap.py): a port whose
file grew past the limit in this run is switched to QEMU's null backend once, and its
file says it was cut."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qemu.qmp import QMPError

from secvf.runtime.logcap import CUT_MARK, GuestLogCap, GuestLogPort


class _Qmp:
    def __init__(self, fail: int = 0) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail

    async def execute(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        if self.fail:
            self.fail -= 1
            raise QMPError("busy")
        self.calls.append((command, args))
        return {}


def _ports(tmp_path: Path, before: bytes = b"") -> list[GuestLogPort]:
    (tmp_path / "serial.log").write_bytes(before)
    (tmp_path / "monitor.log").write_bytes(b"")
    return [GuestLogPort("ser0", tmp_path / "serial.log"),
            GuestLogPort("ser1", tmp_path / "monitor.log")]


def test_a_port_past_the_limit_is_cut_once_and_noted(tmp_path: Path) -> None:
    ports = _ports(tmp_path)
    cuts: list[tuple[str, int]] = []
    cap = GuestLogCap(ports, 1000, lambda port, size: cuts.append((port.chardev, size)))
    qmp = _Qmp()
    ports[1].path.write_bytes(b"x" * 1000)  # at the limit: kept
    asyncio.run(cap.check(qmp))  # type: ignore[arg-type]
    assert qmp.calls == []
    ports[0].path.write_bytes(b"y" * 1001)
    asyncio.run(cap.check(qmp))  # type: ignore[arg-type]
    asyncio.run(cap.check(qmp))  # type: ignore[arg-type]
    assert qmp.calls == [("chardev-change", {"id": "ser0",
                                             "backend": {"type": "null", "data": {}}})]
    assert cuts == [("ser0", 1001)]
    assert CUT_MARK in ports[0].path.read_bytes()
    assert CUT_MARK not in ports[1].path.read_bytes()


def test_what_earlier_runs_appended_does_not_count(tmp_path: Path) -> None:
    ports = _ports(tmp_path, before=b"z" * 5000)
    cap = GuestLogCap(ports, 1000, lambda port, size: None)
    qmp = _Qmp()
    with ports[0].path.open("ab") as fh:
        fh.write(b"y" * 900)
    asyncio.run(cap.check(qmp))  # type: ignore[arg-type]
    assert qmp.calls == []
    with ports[0].path.open("ab") as fh:
        fh.write(b"y" * 200)
    asyncio.run(cap.check(qmp))  # type: ignore[arg-type]
    assert [c[1]["id"] for c in qmp.calls] == ["ser0"]


def test_a_refused_change_is_tried_again_and_watch_ends_when_all_are_cut(
        tmp_path: Path) -> None:
    ports = _ports(tmp_path)
    cap = GuestLogCap(ports, 1000, lambda port, size: None)
    for port in ports:
        port.path.write_bytes(b"x" * 2000)
    qmp = _Qmp(fail=1)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        assert len(slept) < 10, "the watch did not end"

    asyncio.run(cap.watch(lambda: qmp, sleep))  # type: ignore[arg-type, return-value]
    assert sorted(c[1]["id"] for c in qmp.calls) == ["ser0", "ser1"]
    assert len(slept) == 2  # the first check lost ser0 to the refusal
