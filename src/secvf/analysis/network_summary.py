"""Summarising a detonation's capture: DNS, HTTP, TLS SNI, endpoints, preset hits.

:func:`summarize_capture` reads a pcapng (or pcap) file with
:func:`secvf.net.capture_file.read_capture`, decodes each frame with
:func:`secvf.net.decode.decode` and builds the report's ``network`` section
(``docs/analysis-report.md``). The capture is evidence from a hostile guest: reading stops
after ``max_packets`` frames, every section keeps at most ``max_rows`` rows, and a damaged
file gives the summary of the frames before the damage plus an ``error``; nothing here
raises on the file's content.

Endpoints are flows keyed by (proto, initiator IP, responder IP, responder port): a TCP
flow starts at a SYN without ACK, a UDP flow at its first datagram; later packets in
either direction count for the flow. TCP packets of a flow whose SYN was not captured
are counted under a flow with ``syn: false``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secvf.errors import SecVFError
from secvf.net.capture_file import read_capture
from secvf.net.decode import DNS_TYPES, Packet, decode
from secvf.net.filters import PRESETS, PacketFilter, Preset, compile_filter

__all__ = ["summarize_capture", "DEFAULT_MAX_PACKETS", "DEFAULT_MAX_ROWS"]

DEFAULT_MAX_PACKETS = 200_000  # frames read at most
DEFAULT_MAX_ROWS = 500  # rows per section
MAX_ANSWERS = 16  # DNS answers kept per query
MAX_FLOWS = 20_000  # flows tracked (only max_rows are reported)
MAX_PENDING_DNS = 4096  # queries waiting for their answer

_SYN, _ACK = 0x02, 0x10

FlowKey = tuple[str, str, str, int]  # (proto, initiator, responder, responder port)


class _Summary:
    def __init__(self, max_rows: int, presets: Sequence[Preset]) -> None:
        self.max_rows = max_rows
        self.truncated = False
        self.packets = 0
        self.bytes = 0
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.malformed = 0
        self.dns: list[dict[str, Any]] = []
        self.pending_dns: dict[tuple[str | None, str], dict[str, Any]] = {}  # (client, name)
        self.http: list[dict[str, Any]] = []
        self.tls: list[dict[str, Any]] = []
        self.flows: dict[FlowKey, dict[str, Any]] = {}
        self.filters: list[tuple[str, PacketFilter]] = [
            (p.name, compile_filter(p.expression)) for p in presets]
        self.hits: dict[str, dict[str, Any]] = {}

    def add(self, packet: Packet) -> None:
        self.packets += 1
        self.bytes += packet.length
        self.first_ts = packet.ts if self.first_ts is None else self.first_ts
        self.last_ts = packet.ts
        if packet.malformed:
            self.malformed += 1
        if "dns" in packet.layers:
            self._dns(packet)
        if packet.http_method:
            self._row(self.http, {"ts": packet.ts, "vm": packet.vm,
                                  "method": packet.http_method, "host": packet.http_host,
                                  "path": packet.http_uri, "dst": _dst(packet)})
        if packet.tls_sni:
            self._row(self.tls, {"ts": packet.ts, "vm": packet.vm, "sni": packet.tls_sni,
                                 "dst": _dst(packet)})
        if packet.ip_src and packet.dst_port is not None and packet.src_port is not None:
            self._flow(packet)
        for name, predicate in self.filters:
            try:
                hit = predicate(packet)
            except Exception:  # noqa: BLE001 — a filter bug must not lose the summary
                hit = False
            if hit:
                row = self.hits.setdefault(name, {"name": name, "count": 0,
                                                  "first_ts": packet.ts})
                row["count"] += 1

    def _row(self, rows: list[dict[str, Any]], row: dict[str, Any]) -> bool:
        if len(rows) >= self.max_rows:
            self.truncated = True
            return False
        rows.append(row)
        return True

    def _dns(self, packet: Packet) -> None:
        if packet.dns_response:
            for name in packet.dns_names:
                # the answer comes from the resolver's port (another VM): match the
                # client's address, not the capture interface
                row = self.pending_dns.pop((packet.ip_dst, name), None)
                if row is not None:
                    row["answers"] = list(packet.dns_answers[:MAX_ANSWERS])
                    row["rcode"] = packet.dns_rcode
            return
        for name, qtype in zip(packet.dns_names, packet.dns_qtypes, strict=False):
            row = {"ts": packet.ts, "vm": packet.vm, "name": name,
                   "type": DNS_TYPES.get(qtype, str(qtype)), "answers": [], "rcode": None}
            if self._row(self.dns, row) and len(self.pending_dns) < MAX_PENDING_DNS:
                self.pending_dns[(packet.ip_src, name)] = row

    def _flow(self, packet: Packet) -> None:
        proto = "tcp" if packet.tcp_flags is not None else "udp"
        assert packet.ip_src and packet.ip_dst and packet.dst_port is not None
        assert packet.src_port is not None
        key: FlowKey = (proto, packet.ip_src, packet.ip_dst, packet.dst_port)
        reverse: FlowKey = (proto, packet.ip_dst, packet.ip_src, packet.src_port)
        flow = self.flows.get(key) or self.flows.get(reverse)
        syn = proto == "tcp" and (packet.tcp_flags or 0) & (_SYN | _ACK) == _SYN
        if flow is None:
            if len(self.flows) >= MAX_FLOWS:
                self.truncated = True
                return
            flow = self.flows[key] = {
                "proto": proto, "src": packet.ip_src, "dst": packet.ip_dst,
                "dst_port": packet.dst_port, "packets": 0, "bytes": 0,
                "first_ts": packet.ts, "syn": proto == "udp" or syn}
        elif syn and flow is self.flows.get(key):
            flow["syn"] = True
        flow["packets"] += 1
        flow["bytes"] += packet.length

    def to_json(self, path: Path, error: str | None) -> dict[str, Any]:
        flows = sorted(self.flows.values(), key=lambda f: (not f["syn"], f["first_ts"]))
        if len(flows) > self.max_rows:
            self.truncated = True
        return {
            "path": path.name,
            "packets": self.packets,
            "bytes": self.bytes,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "dns": self.dns,
            "http": self.http,
            "tls_sni": self.tls,
            "endpoints": flows[:self.max_rows],
            "presets": sorted(self.hits.values(), key=lambda h: (-h["count"], h["name"])),
            "malformed": self.malformed,
            "truncated": self.truncated,
            "error": error,
        }


def summarize_capture(path: Path, *, max_packets: int = DEFAULT_MAX_PACKETS,
                      max_rows: int = DEFAULT_MAX_ROWS,
                      presets: Sequence[Preset] = PRESETS) -> dict[str, Any]:
    """The ``network`` section of the report for the capture at ``path``.

    Args:
        path: a pcapng or classic pcap file.
        max_packets: stop after this many frames (``truncated`` is then true).
        max_rows: at most this many rows in each list.
        presets: the filter presets to count hits of.

    Returns:
        the section as a JSON-ready dict. A missing, unreadable or damaged file does not
        raise: ``error`` says what happened, and the counts cover the frames before it.
    """
    summary = _Summary(max_rows, presets)
    error: str | None = None
    try:
        for frame in read_capture(path):
            if summary.packets >= max_packets:
                summary.truncated = True
                break
            summary.add(decode(frame.ts, frame.interface, frame.frame))
    except SecVFError as exc:
        error = str(exc)
    except OSError as exc:
        error = f"{path.name}: {exc.strerror or exc}"
    return summary.to_json(path, error)


def _dst(packet: Packet) -> str:
    host = packet.ip_dst or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{packet.dst_port}" if packet.dst_port is not None else host
