"""The forwarding engine with fake ports, fake time and recording fakes (no sockets)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from secvf.net.engine import DROP_REASONS
from secvf.net.events import (
    FOREIGN_SENDER,
    FRAME_RATE_LIMITED,
    FRAME_SIZE_DROPPED,
    MAC_SPOOF,
    MAX_GATE_KEYS,
)
from secvf.net.frame import BROADCAST
from tests.unit.net_helpers import engine_under_test, eth, mac_bytes

UNKNOWN = bytes.fromhex("525400ffffff")


def test_unknown_unicast_floods_then_learned_unicast_goes_to_one_port() -> None:
    t = engine_under_test(3)
    assert t.send(0, eth(mac_bytes(1), mac_bytes(0)))  # 1 has not sent yet: flooded
    assert len(t.received(1)) == len(t.received(2)) == 1
    t.send(1, eth(mac_bytes(0), mac_bytes(1)))  # 1 learned; 0 was learned already
    assert len(t.received(0)) == 1 and len(t.received(2)) == 1
    t.send(0, eth(mac_bytes(1), mac_bytes(0)))
    assert len(t.received(1)) == 2 and len(t.received(2)) == 1
    assert t.port(0).learned and t.port(1).learned and not t.port(2).learned
    assert t.port(1).tx == 2 and t.port(0).rx == 2 and t.port(0).rx_bytes == 128


def test_broadcast_and_multicast_flood_to_every_other_port() -> None:
    t = engine_under_test(3)
    t.send(0, eth(BROADCAST, mac_bytes(0)))
    t.send(0, eth(bytes.fromhex("01005e000001"), mac_bytes(0)))
    assert [len(t.received(n)) for n in range(3)] == [0, 2, 2]


def test_frame_to_own_mac_goes_nowhere_and_is_not_a_drop() -> None:
    t = engine_under_test(2)
    t.send(0, eth(mac_bytes(0), mac_bytes(0)))
    assert t.sent == [] and sum(t.port(0).drops.values()) == 0


def test_foreign_sender_is_dropped_with_one_event_per_minute() -> None:
    t = engine_under_test(2)
    for second in range(100):
        assert not t.send(0, eth(BROADCAST, mac_bytes(0)), now=second, sender="/tmp/evil")
    assert t.sent == [] and t.port(0).drops["foreign_sender"] == 100 and t.port(0).rx == 0
    events = t.named(FOREIGN_SENDER)
    assert [e["suppressed"] for e in events] == [0, 59]
    assert events[0]["sender"] == "'/tmp/evil'" and events[0]["vm"] == "vm0"
    assert events[0]["network"] == "lab"


def test_size_bounds_drop_runts_and_oversize_with_one_event_per_minute() -> None:
    t = engine_under_test(2, max_frame=1514)
    assert not t.send(0, b"")
    assert not t.send(0, b"\x01" * 13)
    assert not t.send(0, eth(BROADCAST, mac_bytes(0), b"x" * 1501))
    assert t.send(0, eth(BROADCAST, mac_bytes(0), b"x" * 1500))
    drops = t.port(0).drops
    assert (drops["runt"], drops["oversize"]) == (2, 1)
    assert [e["reason"] for e in t.named(FRAME_SIZE_DROPPED)] == ["runt"]


def test_spoofed_source_is_dropped_and_the_event_names_both_vms() -> None:
    t = engine_under_test(3)
    t.send(2, eth(BROADCAST, mac_bytes(1)))  # VM 2 claims VM 1's MAC
    t.send(2, eth(BROADCAST, mac_bytes(1)), now=1)
    t.send(2, eth(BROADCAST, mac_bytes(1)), now=61)
    assert t.sent == [] and t.port(2).drops["spoof"] == 3
    first, second = t.named(MAC_SPOOF)
    assert first["vm"] == "vm2" and first["victim_vm"] == "vm1"
    assert first["victim_port"] == t.port(1).name and first["pinned_mac"] == "52:54:00:00:00:02"
    assert first["claimed_mac"] == "52:54:00:00:00:01"
    assert (first["suppressed"], second["suppressed"]) == (0, 1)
    assert not t.port(1).learned  # a spoofed frame teaches the table nothing


def test_mac_churn_keeps_the_table_and_the_event_gate_bounded() -> None:
    t = engine_under_test(2)
    rng = random.Random(7)
    for i in range(20_000):
        src = bytes([0x52]) + rng.randbytes(5)
        t.send(0, eth(BROADCAST, src), now=i / 1000)
    assert len(t.engine._table) == 0 and t.port(0).drops["spoof"] == 20_000
    assert len(t.port(0).spoof_gate._marks) <= MAX_GATE_KEYS + 1
    assert len(t.named(MAC_SPOOF)) <= MAX_GATE_KEYS + 1
    t.send(0, eth(BROADCAST, mac_bytes(0)), now=30)
    assert list(t.engine._table.values()) == [t.port(0)]


def test_rate_limit_drops_past_the_limit_with_one_event_per_window() -> None:
    t = engine_under_test(2, frames_per_s=10, broadcast_per_s=0)
    for window in range(3):
        for i in range(15):
            t.send(0, eth(mac_bytes(1), mac_bytes(0)), now=window + i / 100)
    t.engine.tick(3.5)
    assert len(t.received(1)) == 30 and t.port(0).drops["rate"] == 15
    events = t.named(FRAME_RATE_LIMITED)
    assert [(e["reason"], e["dropped"]) for e in events] == [("rate", 5)] * 3
    t.engine.tick(10)
    assert len(t.named(FRAME_RATE_LIMITED)) == 3


def test_broadcast_rate_limit_counts_group_frames_only() -> None:
    t = engine_under_test(2, frames_per_s=0, broadcast_per_s=3)
    for _ in range(5):
        t.send(0, eth(BROADCAST, mac_bytes(0)))
        t.send(0, eth(mac_bytes(1), mac_bytes(0)))
    assert t.port(0).drops["broadcast_rate"] == 2 and t.port(0).drops["rate"] == 0
    assert len(t.received(1)) == 8
    t.engine.tick(1.0)
    assert t.named(FRAME_RATE_LIMITED)[0]["reason"] == "broadcast_rate"


def test_isolated_guests_reach_only_routers_and_routers_reach_everyone() -> None:
    t = engine_under_test(3, routers=frozenset({2}), isolate_guests=True)
    for n in range(3):
        t.send(n, eth(BROADCAST, mac_bytes(n)))  # everyone learned
    assert [len(t.received(n)) for n in range(3)] == [1, 1, 2]  # guests' floods: router only
    t.sent.clear()
    t.send(0, eth(mac_bytes(1), mac_bytes(0)))  # guest -> guest
    t.send(1, eth(mac_bytes(0), mac_bytes(1)))
    assert t.sent == [] and t.port(0).drops["isolation"] == t.port(1).drops["isolation"] == 1
    t.send(0, eth(mac_bytes(2), mac_bytes(0)))  # guest -> router
    t.send(2, eth(mac_bytes(1), mac_bytes(2)))  # router -> guest
    assert len(t.received(2)) == 1 and len(t.received(1)) == 1


def test_isolated_guest_without_routers_counts_its_floods_as_isolation() -> None:
    t = engine_under_test(2, isolate_guests=True)
    t.send(0, eth(BROADCAST, mac_bytes(0)))
    assert t.sent == [] and t.port(0).drops["isolation"] == 1


def test_egress_failures_are_charged_to_the_refusing_port() -> None:
    t = engine_under_test(3)
    t.failures.update({t.port(1).name: "tx_full", t.port(2).name: "tx_error"})
    assert t.send(0, eth(BROADCAST, mac_bytes(0)))
    assert t.port(1).drops["tx_full"] == 1 and t.port(2).drops["tx_error"] == 1
    assert t.engine.drop_totals() == dict.fromkeys(DROP_REASONS, 0) | {"tx_full": 1,
                                                                       "tx_error": 1}


def test_reconfigure_keeps_unchanged_ports_and_their_counters() -> None:
    t = engine_under_test(3)
    t.send(0, eth(BROADCAST, mac_bytes(0)))
    kept = t.port(0)
    configs = [t.port(n).config for n in (0, 2)]
    added, removed = t.engine.configure(t.engine.config, configs)
    assert added == [] and [p.config.vm for p in removed] == ["vm1"]
    assert t.port(0) is kept and kept.rx == 1 and kept.learned
    t.sent.clear()
    t.send(0, eth(BROADCAST, mac_bytes(0)))
    assert [name for name, _ in t.sent] == [t.port(2).name]


def test_a_second_port_with_a_taken_mac_is_refused() -> None:
    t = engine_under_test(2)
    clash = t.port(1).config.__class__(**(t.port(1).config.to_json() | {
        "port": "a00000ff-0", "qemu_path": str(t.paths.qemu_path("a00000ff-0")),
        "switch_path": str(t.paths.switch_path("a00000ff-0")), "mac": "52:54:00:00:00:00"}))
    added, _ = t.engine.configure(t.engine.config, [t.port(0).config, t.port(1).config, clash])
    assert added == [] and len(t.engine.ports) == 2


@settings(max_examples=300, deadline=None)
@given(frames=st.lists(st.tuples(st.integers(0, 2), st.binary(max_size=200),
                                 st.sampled_from([None, "/x", b"\0abstract", ""]),
                                 st.floats(0, 100)), max_size=40))
def test_fuzz_random_frames_never_raise_and_counters_add_up(frames) -> None:
    t = engine_under_test(3, frames_per_s=5, broadcast_per_s=2, max_frame=150)
    for n, data, sender, now in sorted(frames, key=lambda f: f[3]):
        port = t.port(n)
        t.engine.ingress(port, sender if sender is not None else port.qemu_path, data, now)
    t.engine.tick(1000)
    total_tx = sum(t.port(n).tx for n in range(3))
    assert total_tx == len(t.sent)
    assert len(t.engine._table) <= 3
