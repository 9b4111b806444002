"""Decoding captured Ethernet frames into the fields analysts (and filters) look at.

:func:`decode` turns one frame into a :class:`Packet`: Ethernet (with 802.1Q tags),
ARP, IPv4/IPv6, ICMP/ICMPv6, TCP, UDP, and above them DNS, the first line and ``Host``
of an HTTP request (or the status of a response), the SNI of a TLS ClientHello, DHCP
and NTP. The frames come from guests, which are hostile: a truncated or garbage frame
decodes to every layer that could be decoded plus :attr:`Packet.malformed` (which layer
failed and why), and :func:`decode` never raises.

The layers below the transport are dpkt's (pure Python, maintained; docs/packets.md
says why not scapy); HTTP, TLS and the application-layer guesses are parsed here,
bounded, because dpkt's own HTTP and TLS parsers want whole messages.

Every string that comes from a frame (DNS names, HTTP host and path, SNI, DHCP host
name) goes through :func:`printable`: non-printable characters become ``\\xHH``, so
neither the table nor a terminal can be driven by what a guest sent.
"""

from __future__ import annotations

import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import dpkt

#: Exceptions dpkt (and the parsers here) raise on bytes that are not what they claim.
MALFORMED_ERRORS: tuple[type[Exception], ...] = (
    dpkt.Error, struct.error, ValueError, IndexError, KeyError, TypeError, OverflowError)

#: How much of a TCP payload is searched for an HTTP request line and headers.
HTTP_SCAN_BYTES = 4096
#: The longest string field kept from a frame (longer ones are cut and end with "…").
MAX_TEXT_CHARS = 512

#: The longest interface (VM) name kept.
MAX_NAME_CHARS = 64

#: Ports whose UDP/TCP payload is decoded as DNS (DNS, mDNS, LLMNR).
DNS_PORTS = frozenset({53, 5353, 5355})
DHCP_PORTS = frozenset({67, 68})
NTP_PORT = 123
NTP_MIN_BYTES = 48

HTTP_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH",
                          "CONNECT", "TRACE", "PROPFIND"})

TCP_FLAG_NAMES = (("FIN", 0x01), ("SYN", 0x02), ("RST", 0x04), ("PSH", 0x08),
                  ("ACK", 0x10), ("URG", 0x20), ("ECE", 0x40), ("CWR", 0x80))

ICMP_TYPES = {0: "echo reply", 3: "destination unreachable", 5: "redirect",
              8: "echo request", 11: "time exceeded", 13: "timestamp request",
              14: "timestamp reply"}
ICMPV6_TYPES = {1: "destination unreachable", 2: "packet too big", 3: "time exceeded",
                128: "echo request", 129: "echo reply", 133: "router solicitation",
                134: "router advertisement", 135: "neighbor solicitation",
                136: "neighbor advertisement"}
DNS_TYPES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 10: "NULL", 12: "PTR", 15: "MX", 16: "TXT",
             28: "AAAA", 33: "SRV", 65: "HTTPS", 255: "ANY"}
DHCP_TYPES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK",
              7: "RELEASE", 8: "INFORM"}
IP_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}

_PRINTABLE = frozenset(range(0x20, 0x7F))


@dataclass(slots=True)
class Packet:
    """One decoded frame. A field is ``None`` (an empty tuple for the repeated ones)
    when the frame has no such layer or it could not be decoded."""

    ts: float  # capture time, seconds since the epoch
    vm: str  # the capture interface's name (the VM's name on a SecVF switch), "-" if none
    frame: bytes = field(repr=False)  # the frame as captured
    layers: list[str] = field(default_factory=list)  # protocol words present, lowest first
    malformed: str | None = None  # "layer: why" for the first layer that did not decode
    eth_src: str | None = None  # source MAC, aa:bb:cc:dd:ee:ff
    eth_dst: str | None = None  # destination MAC
    eth_type: int | None = None  # EtherType after any VLAN tags
    ip_version: int | None = None  # 4 or 6
    ip_src: str | None = None  # source address (compressed form for IPv6)
    ip_dst: str | None = None  # destination address
    ip_proto: int | None = None  # IPv4 protocol / IPv6 final next header
    ip_ttl: int | None = None  # TTL / hop limit
    src_port: int | None = None  # TCP or UDP source port
    dst_port: int | None = None  # TCP or UDP destination port
    tcp_flags: int | None = None  # the TCP flags byte (FIN 0x01 … CWR 0x80)
    payload: bytes = field(default=b"", repr=False)  # TCP/UDP payload (ICMP: its body)
    icmp_type: int | None = None  # ICMP or ICMPv6 type (see ip_proto for which)
    icmp_code: int | None = None  # ICMP or ICMPv6 code
    arp_op: int | None = None  # 1 request, 2 reply
    arp_src_mac: str | None = None  # sender hardware address
    arp_src_ip: str | None = None  # sender protocol address
    arp_dst_ip: str | None = None  # target protocol address
    dns_response: bool | None = None  # the QR bit
    dns_rcode: int | None = None  # response code
    dns_names: tuple[str, ...] = ()  # question names, lowercase
    dns_qtypes: tuple[int, ...] = ()  # question types
    dns_answers: tuple[str, ...] = ()  # answer data as text (addresses, names, TXT)
    dns_answer_addrs: tuple[str, ...] = ()  # A and AAAA answers
    http_method: str | None = None  # request method
    http_uri: str | None = None  # request target
    http_host: str | None = None  # Host header, lowercase
    http_user_agent: str | None = None  # User-Agent header
    http_status: int | None = None  # response status code
    tls_handshake: int | None = None  # handshake type of the first record (1 ClientHello)
    tls_sni: str | None = None  # server_name of a ClientHello, lowercase
    dhcp_type: int | None = None  # DHCP message type (option 53)
    dhcp_client_mac: str | None = None  # chaddr
    dhcp_hostname: str | None = None  # option 12
    dhcp_requested_ip: str | None = None  # option 50
    dhcp_your_ip: str | None = None  # yiaddr
    info: str = ""  # the one-line summary (ports, flags, names …)

    @property
    def length(self) -> int:
        """The frame's length in bytes."""
        return len(self.frame)

    @property
    def protocol(self) -> str:
        """The highest layer decoded, as shown in the PROTOCOL column (``DNS``, ``TCP`` …)."""
        return self.layers[-1].upper() if self.layers else "?"

    @property
    def src(self) -> str:
        """The source column: IP address, else ARP sender, else MAC."""
        return self.ip_src or self.arp_src_ip or self.eth_src or "-"

    @property
    def dst(self) -> str:
        """The destination column: IP address, else ARP target, else MAC."""
        return self.ip_dst or self.arp_dst_ip or self.eth_dst or "-"

    def summary(self) -> str:
        """The searchable line: protocol, addresses and info (what a bare filter word
        is matched against)."""
        return f"{self.protocol} {self.src} {self.dst} {self.info}"

    def as_json(self) -> dict[str, Any]:
        """Every decoded field that is set, JSON-ready (addresses as text, the payload's
        length instead of its bytes)."""
        out: dict[str, Any] = {"ts": self.ts, "vm": self.vm, "length": self.length,
                               "protocol": self.protocol, "src": self.src, "dst": self.dst}
        for name in self.__slots__:
            value = getattr(self, name)
            if name in ("ts", "vm", "frame") or value is None or value == ():
                continue
            out[name] = len(value) if name == "payload" else list(value) \
                if isinstance(value, tuple) else value
        return out


def printable(data: bytes | str, limit: int = MAX_TEXT_CHARS) -> str:
    """``data`` as text safe to print: ASCII printable characters as they are, every
    other byte (or character) as ``\\xHH`` (``\\u`` for non-Latin-1), cut at ``limit``."""
    if isinstance(data, str):
        text = "".join(c if 0x20 <= ord(c) < 0x7F else _escape_char(c) for c in data)
    else:
        text = "".join(chr(b) if b in _PRINTABLE else f"\\x{b:02x}" for b in data)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _escape_char(c: str) -> str:
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def format_mac(raw: bytes) -> str:
    """Six bytes as ``aa:bb:cc:dd:ee:ff``."""
    return ":".join(f"{b:02x}" for b in raw)


def decode(ts: float, vm: str, frame: bytes) -> Packet:
    """Decode one Ethernet ``frame`` captured at ``ts`` on interface ``vm`` (a name
    from the capture: made printable too).

    Never raises: what cannot be decoded is left unset and named in
    :attr:`Packet.malformed`, and :attr:`Packet.info` still summarises the rest.
    """
    packet = Packet(ts=ts, vm=printable(vm, MAX_NAME_CHARS), frame=frame)
    layer: str | None = "eth"
    try:
        eth = dpkt.ethernet.Ethernet(frame)
        packet.layers.append("eth")
        packet.eth_src, packet.eth_dst = format_mac(eth.src), format_mac(eth.dst)
        packet.eth_type = eth.type
        layer, inner = _NETWORK.get(eth.type), eth.data
        while layer is not None:
            layer, inner = _DECODERS[layer](packet, inner)
    except MALFORMED_ERRORS as exc:
        packet.malformed = f"{layer}: {_why(exc)}"
    packet.info = _info(packet)
    return packet


def _why(exc: Exception) -> str:
    """A short reason for a decoding error (dpkt's messages quote the raw bytes: cut)."""
    if isinstance(exc, dpkt.NeedData):
        return "truncated"
    text = _RAW_BYTES_IN_MESSAGE.sub("", str(exc)) or type(exc).__name__
    return printable(text, 80)


_RAW_BYTES_IN_MESSAGE = re.compile(r":? b['\"].*$", re.DOTALL)


# ---- the layers: each fills its fields and names the layer above it (None: no more) -----

#: What a layer decoder returns: the next layer's name (None: stop) and its data.
Next = tuple[str | None, Any]

_NETWORK = {dpkt.ethernet.ETH_TYPE_ARP: "arp", dpkt.ethernet.ETH_TYPE_IP: "ip",
            dpkt.ethernet.ETH_TYPE_IP6: "ipv6"}


def _arp(packet: Packet, arp: object) -> Next:
    msg = _require(arp, dpkt.arp.ARP, "arp")
    packet.layers.append("arp")
    packet.arp_op = msg.op
    packet.arp_src_mac = format_mac(msg.sha)
    packet.arp_src_ip = _ip_text(msg.spa)
    packet.arp_dst_ip = _ip_text(msg.tpa)
    return None, None


def _ip(packet: Packet, ip: object) -> Next:
    version = 4 if packet.eth_type == dpkt.ethernet.ETH_TYPE_IP else 6
    hdr = _require(ip, dpkt.ip.IP if version == 4 else dpkt.ip6.IP6, f"ipv{version}")
    packet.layers.append("ip" if version == 4 else "ipv6")
    packet.ip_version = version
    packet.ip_ttl = hdr.ttl if version == 4 else hdr.hlim
    packet.ip_src, packet.ip_dst = _ip_text(hdr.src), _ip_text(hdr.dst)
    packet.ip_proto = hdr.p
    if version == 4 and hdr.offset:
        return None, None  # a later fragment: no transport header in it
    proto = IP_PROTOCOLS.get(hdr.p)
    if proto == "icmpv6" and version == 4 or proto == "icmp" and version == 6:
        return None, None
    return proto, hdr.data


def _icmp(packet: Packet, msg: object) -> Next:
    v6 = packet.ip_version == 6
    icmp = _require(msg, dpkt.icmp6.ICMP6 if v6 else dpkt.icmp.ICMP, "icmp")
    packet.layers.append("icmpv6" if v6 else "icmp")
    packet.icmp_type, packet.icmp_code = icmp.type, icmp.code
    packet.payload = bytes(icmp.data)
    return None, None


def _udp_or_tcp(packet: Packet, segment: object) -> Next:
    tcp = packet.ip_proto == 6
    hdr = _require(segment, dpkt.tcp.TCP if tcp else dpkt.udp.UDP, "tcp" if tcp else "udp")
    packet.layers.append("tcp" if tcp else "udp")
    packet.src_port, packet.dst_port = hdr.sport, hdr.dport
    packet.payload = data = bytes(hdr.data)
    if tcp:
        packet.tcp_flags = hdr.flags
    if not data:
        return None, None
    ports = {hdr.sport, hdr.dport}
    if ports & DNS_PORTS:
        return "dns", data[2:] if tcp else data  # DNS over TCP: a 2-byte length first
    if tcp:
        return _stream_kind(data), data
    if ports & DHCP_PORTS:
        return "dhcp", data
    if NTP_PORT in ports and len(data) >= NTP_MIN_BYTES:
        packet.layers.append("ntp")
    return None, None


def _stream_kind(data: bytes) -> str | None:
    """Which TCP payload parser applies: an HTTP request or status line, a TLS record."""
    word = data[:8].split(b" ", 1)[0]
    if word.startswith(b"HTTP/1.") or word.decode("latin-1") in HTTP_METHODS:
        return "http"
    if len(data) >= 5 and data[0] in (20, 21, 22, 23) and data[1] == 3 and data[2] <= 4:
        return "tls"
    return None


def _dns(packet: Packet, data: bytes) -> Next:
    msg = dpkt.dns.DNS(data)
    packet.layers.append("dns")
    packet.dns_response = bool(msg.qr)
    packet.dns_rcode = msg.rcode
    packet.dns_names = tuple(printable(q.name).lower() for q in msg.qd)
    packet.dns_qtypes = tuple(q.type for q in msg.qd)
    answers = tuple(_rr_text(rr) for rr in msg.an)
    packet.dns_answers = answers
    packet.dns_answer_addrs = tuple(text for rr, text in zip(msg.an, answers, strict=True)
                                    if rr.type in (dpkt.dns.DNS_A, dpkt.dns.DNS_AAAA))
    return None, None


def _rr_text(rr: Any) -> str:
    if rr.type in (dpkt.dns.DNS_A, dpkt.dns.DNS_AAAA):
        return _ip_text(rr.ip if rr.type == dpkt.dns.DNS_A else rr.ip6)
    for attr in ("cname", "ptrname", "nsname", "mxname"):
        if hasattr(rr, attr):
            return printable(getattr(rr, attr)).lower()
    if rr.type == dpkt.dns.DNS_TXT:
        return " ".join(printable(t) for t in rr.text)
    return f"type {rr.type} ({len(rr.rdata)} bytes)"


def _dhcp(packet: Packet, data: bytes) -> Next:
    msg = dpkt.dhcp.DHCP(data)
    packet.layers.append("dhcp")
    opts = dict(msg.opts)
    msgtype = opts.get(dpkt.dhcp.DHCP_OPT_MSGTYPE, b"")
    packet.dhcp_type = msgtype[0] if msgtype else None
    packet.dhcp_client_mac = format_mac(msg.chaddr[:6])
    if dpkt.dhcp.DHCP_OPT_HOSTNAME in opts:
        packet.dhcp_hostname = printable(opts[dpkt.dhcp.DHCP_OPT_HOSTNAME])
    requested = opts.get(dpkt.dhcp.DHCP_OPT_REQ_IP, b"")
    packet.dhcp_requested_ip = _ip_text(requested) if len(requested) == 4 else None
    packet.dhcp_your_ip = _ip_text(struct.pack(">I", msg.yiaddr)) if msg.yiaddr else None
    return None, None


def _http(packet: Packet, data: bytes) -> Next:
    """An HTTP request line (and Host, User-Agent) or status line at the payload's start."""
    lines = data[:HTTP_SCAN_BYTES].split(b"\r\n")
    first = lines[0].split(b" ")
    if first[0].startswith(b"HTTP/1."):
        if len(first) < 2 or not first[1][:3].isdigit():
            raise ValueError("status line without a status code")
        packet.layers.append("http")
        packet.http_status = int(first[1][:3])
        return None, None
    if len(first) != 3 or not first[2].startswith(b"HTTP/"):
        raise ValueError("request line is not 'METHOD target HTTP/x'")
    packet.layers.append("http")
    packet.http_method = first[0].decode("latin-1")
    packet.http_uri = printable(first[1])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"host":
            packet.http_host = printable(value.strip()).lower()
        elif key == b"user-agent":
            packet.http_user_agent = printable(value.strip())
    return None, None


def _tls(packet: Packet, data: bytes) -> Next:
    """A TLS record (checked by :func:`_stream_kind`); for a ClientHello, its SNI."""
    packet.layers.append("tls")
    if data[0] == 22 and len(data) >= 6:
        packet.tls_handshake = data[5]
        if data[5] == 1:
            sni = _client_hello_sni(memoryview(data)[5:])
            packet.tls_sni = None if sni is None else printable(sni).lower()
    return None, None


def _client_hello_sni(hs: memoryview) -> bytes | None:
    """The host name in a ClientHello's server_name extension, or None if it has none.

    Raises IndexError / struct.error on a truncated hello (a malformed TLS layer)."""
    end = min(len(hs), 4 + int.from_bytes(hs[1:4], "big"))
    pos = 4 + 2 + 32  # handshake header, client_version, random
    pos += 1 + hs[pos]  # session_id
    pos += 2 + int.from_bytes(hs[pos:pos + 2], "big")  # cipher_suites
    pos += 1 + hs[pos]  # compression_methods
    if pos >= end:
        return None  # no extensions
    ext_end = min(end, pos + 2 + int.from_bytes(hs[pos:pos + 2], "big"))
    pos += 2
    while pos + 4 <= ext_end:
        ext_type, ext_len = struct.unpack_from(">HH", hs, pos)
        pos += 4
        if ext_type == 0:  # server_name: list length, then (type 0, length, name)
            name_len = struct.unpack_from(">H", hs, pos + 3)[0]
            name = bytes(hs[pos + 5:pos + 5 + name_len])
            if len(name) != name_len:
                raise IndexError("server_name extension is truncated")
            return name
        pos += ext_len
    return None


_DECODERS = {"arp": _arp, "ip": _ip, "ipv6": _ip, "icmp": _icmp, "icmpv6": _icmp,
             "tcp": _udp_or_tcp, "udp": _udp_or_tcp, "dns": _dns, "dhcp": _dhcp,
             "http": _http, "tls": _tls}


def _require(layer: object, kind: type, name: str) -> Any:
    """dpkt leaves a layer it could not decode as bytes: that is a malformed layer."""
    if not isinstance(layer, kind):
        raise dpkt.UnpackError(f"truncated or invalid {name} header")
    return layer


def _ip_text(raw: bytes) -> str:
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    if len(raw) == 16:
        return socket.inet_ntop(socket.AF_INET6, raw)
    raise dpkt.UnpackError(f"address of {len(raw)} bytes")


# ---- the info line -----------------------------------------------------------------------


def tcp_flag_text(flags: int) -> str:
    """``[SYN, ACK]`` for the flags byte 0x12."""
    return "[" + ", ".join(name for name, bit in TCP_FLAG_NAMES if flags & bit) + "]"


def _info(packet: Packet) -> str:
    parts: list[str] = []
    if packet.arp_op is not None:
        parts.append(f"who-has {packet.arp_dst_ip}? tell {packet.arp_src_ip}"
                     if packet.arp_op == 1 else
                     f"{packet.arp_src_ip} is-at {packet.arp_src_mac}"
                     if packet.arp_op == 2 else f"arp op {packet.arp_op}")
    if packet.icmp_type is not None:
        names = ICMPV6_TYPES if packet.ip_proto == 58 else ICMP_TYPES
        parts.append(f"{names.get(packet.icmp_type, f'type {packet.icmp_type}')}"
                     f" code {packet.icmp_code}")
    if packet.src_port is not None:
        parts.append(f"{packet.src_port} → {packet.dst_port}")
    if packet.tcp_flags is not None:
        parts.append(tcp_flag_text(packet.tcp_flags))
    parts += _app_info(packet)
    if packet.malformed:
        parts.append(f"[malformed {packet.malformed}]")
    return " ".join(parts)


def _app_info(packet: Packet) -> list[str]:
    if packet.dns_response is not None:
        queries = " ".join(f"{DNS_TYPES.get(t, t)} {n}"
                           for t, n in zip(packet.dns_qtypes, packet.dns_names, strict=False))
        answers = (" → " + ", ".join(packet.dns_answers)) if packet.dns_answers else ""
        kind = "response" if packet.dns_response else "query"
        return [f"{kind} {queries}{answers}"]
    if packet.http_method is not None:
        return [f"{packet.http_method} {packet.http_host or '-'} {packet.http_uri}"]
    if packet.http_status is not None:
        return [f"HTTP {packet.http_status}"]
    if packet.tls_handshake == 1:
        return [f"ClientHello SNI={packet.tls_sni or '(none)'}"]
    if packet.dhcp_client_mac is not None:
        kind = DHCP_TYPES.get(packet.dhcp_type or 0, f"type {packet.dhcp_type}")
        extra = [f"{k}={v}" for k, v in (("host", packet.dhcp_hostname),
                                         ("requested", packet.dhcp_requested_ip),
                                         ("yours", packet.dhcp_your_ip)) if v]
        return [f"DHCP {kind} {packet.dhcp_client_mac}", *extra]
    return []
