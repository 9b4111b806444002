from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from secvf.runtime.guestlog import MAX_DEVICE_ERRORS, SerialScanner

BOOT = (b"[    1.0] virtio_blk virtio1: [vda] 2097152 512-byte logical blocks\n"
        b"secvf-init: ready: hostname x\nSECVF-READY\n"
        b"[   10.8] vmw_vsock_virtio_transport virtio0: rx:id 117 is not a head!\n")


@given(st.lists(st.integers(min_value=1, max_value=len(BOOT)), max_size=10))
def test_events_do_not_depend_on_chunking(cuts: list[int]) -> None:
    scanner = SerialScanner()
    events, start = [], 0
    for cut in sorted(cuts) + [len(BOOT)]:
        events += scanner.feed(BOOT[start:cut])
        start = max(start, cut)
    assert [e.kind for e in events] == ["ready", "device_error"]
    assert "is not a head" in events[1].line


def test_the_marker_must_be_a_whole_line_and_counts_once() -> None:
    scanner = SerialScanner()
    assert scanner.feed(b"echo SECVF-READY from a guest program\n") == []
    assert [e.kind for e in scanner.feed(b"SECVF-READY\r\nSECVF-READY\n")] == ["ready"]


def test_a_flooding_guest_is_bounded() -> None:
    scanner = SerialScanner()
    flood = b"virtio0: rx:id 1 is not a head!\n" * 1000 + b"x" * 10_000_000
    events = scanner.feed(flood)
    assert len(events) == MAX_DEVICE_ERRORS
    assert len(scanner._partial) <= 4096


def test_the_guest_init_prints_the_marker_the_host_waits_for() -> None:
    from secvf.image.recipe import INIT_SCRIPT
    from secvf.model.guest import READY_MARKER

    assert f"READY_MARKER={READY_MARKER}\n" in INIT_SCRIPT.read_text()
