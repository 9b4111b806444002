"""The names a filter can test: protocol words and typed fields over a decoded packet.

A field's getter returns a tuple of values, empty when the packet has no such field
(``tcp.port`` on a UDP packet) and holding two for the either-way fields (``tcp.port``
is the source *or* the destination port, ``ip.addr`` either address). A comparison is
true if any value satisfies it; ``!=`` is the negation of ``==``.

Every name here is documented in docs/packets.md (a test checks the two agree).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from secvf.net.decode import DHCP_TYPES, DNS_TYPES, Packet

Values = tuple[object, ...]


class FieldType(enum.Enum):
    """What a field holds, which decides the operators and literals it takes."""

    INT = "integer"
    STR = "string"
    BYTES = "bytes"
    ADDR = "IP address"
    MAC = "MAC address"
    BOOL = "boolean"


#: The operators each type accepts (``in`` is set membership).
OPERATORS: Mapping[FieldType, frozenset[str]] = MappingProxyType({
    FieldType.INT: frozenset({"==", "!=", "<", "<=", ">", ">=", "in"}),
    FieldType.STR: frozenset({"==", "!=", "contains", "matches", "in"}),
    FieldType.BYTES: frozenset({"==", "!=", "contains", "matches"}),
    FieldType.ADDR: frozenset({"==", "!=", "in"}),
    FieldType.MAC: frozenset({"==", "!=", "in"}),
    FieldType.BOOL: frozenset({"==", "!="}),
})


@dataclass(frozen=True)
class Field:
    """One filter field."""

    name: str  # the canonical name, e.g. "tcp.dstport"
    type: FieldType  # what it holds
    get: Callable[[Packet], Values] = field(repr=False)  # its values in a packet
    doc: str  # one line for the language reference
    names: Mapping[str, int] = field(default_factory=dict)  # symbolic INT values (TXT=16)
    fold: bool = False  # STR compared case-insensitively (values are stored lowercase)


def _attr(name: str) -> Callable[[Packet], Values]:
    def get(packet: Packet) -> Values:
        value = getattr(packet, name)
        return () if value is None else (value,)
    return get


def _ports(proto: int | None, which: str) -> Callable[[Packet], Values]:
    """Ports of TCP (6), UDP (17) or either (None): ``src``, ``dst`` or ``both``."""
    def get(packet: Packet) -> Values:
        if packet.src_port is None or proto is not None and packet.ip_proto != proto:
            return ()
        if which == "src":
            return (packet.src_port,)
        if which == "dst":
            return (packet.dst_port,)
        return (packet.src_port, packet.dst_port)
    return get


def _tcp_flag(bit: int) -> Callable[[Packet], Values]:
    def get(packet: Packet) -> Values:
        return () if packet.tcp_flags is None else (bool(packet.tcp_flags & bit),)
    return get


def _icmp(version: int, attr: str) -> Callable[[Packet], Values]:
    def get(packet: Packet) -> Values:
        value = getattr(packet, attr)
        return () if value is None or packet.ip_version != version else (value,)
    return get


def _both(*attrs: str) -> Callable[[Packet], Values]:
    def get(packet: Packet) -> Values:
        return tuple(v for v in (getattr(packet, a) for a in attrs) if v is not None)
    return get


def _is_set(attr: str, layer: str) -> Callable[[Packet], Values]:
    """A boolean: the packet has ``layer`` and ``attr`` is set in it."""
    def get(packet: Packet) -> Values:
        return (getattr(packet, attr) is not None,) if layer in packet.layers else ()
    return get


def _seq(attr: str) -> Callable[[Packet], Values]:
    def get(packet: Packet) -> Values:
        return tuple(getattr(packet, attr))
    return get


def _name_lengths(packet: Packet) -> Values:
    return tuple(len(name) for name in packet.dns_names)


def _frame(packet: Packet) -> Values:
    return (packet.frame,)


def _payload(packet: Packet) -> Values:
    return (packet.payload,) if packet.src_port is not None or packet.icmp_type is not None \
        else ()


def _frame_len(packet: Packet) -> Values:
    return (len(packet.frame),)


def _vm(packet: Packet) -> Values:
    return (packet.vm,)


_TCP_FLAGS = {"fin": 0x01, "syn": 0x02, "reset": 0x04, "push": 0x08, "ack": 0x10,
              "urg": 0x20}
_DNS_TYPE_NAMES = {name: number for number, name in DNS_TYPES.items()}
_DHCP_TYPE_NAMES = {name.lower(): number for number, name in DHCP_TYPES.items()}
_IP_PROTO_NAMES = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "gre": 47, "esp": 50,
                   "sctp": 132}

_INT, _STR, _BYTES, _ADDR, _MAC, _BOOL = (FieldType.INT, FieldType.STR, FieldType.BYTES,
                                          FieldType.ADDR, FieldType.MAC, FieldType.BOOL)

_FIELDS = [
    Field("frame.len", _INT, _frame_len, "the frame's length in bytes"),
    Field("frame", _BYTES, _frame, "the whole frame's bytes"),
    Field("payload", _BYTES, _payload, "the TCP/UDP payload (ICMP: the message body)"),
    Field("vm", _STR, _vm, "the capture interface: the VM's name on a SecVF network"),
    Field("eth.src", _MAC, _attr("eth_src"), "source MAC"),
    Field("eth.dst", _MAC, _attr("eth_dst"), "destination MAC"),
    Field("eth.addr", _MAC, _both("eth_src", "eth_dst"), "either MAC"),
    Field("eth.type", _INT, _attr("eth_type"), "EtherType (after VLAN tags), e.g. 0x0806"),
    Field("ip.src", _ADDR, _attr("ip_src"), "source address (IPv4 or IPv6)"),
    Field("ip.dst", _ADDR, _attr("ip_dst"), "destination address (IPv4 or IPv6)"),
    Field("ip.addr", _ADDR, _both("ip_src", "ip_dst"), "either address"),
    Field("ip.proto", _INT, _attr("ip_proto"), "IP protocol / IPv6 next header",
          _IP_PROTO_NAMES),
    Field("ip.ttl", _INT, _attr("ip_ttl"), "TTL (IPv6: hop limit)"),
    Field("ip.version", _INT, _attr("ip_version"), "4 or 6"),
    Field("port", _INT, _ports(None, "both"), "a TCP or UDP port, either side"),
    Field("srcport", _INT, _ports(None, "src"), "a TCP or UDP source port"),
    Field("dstport", _INT, _ports(None, "dst"), "a TCP or UDP destination port"),
    Field("tcp.port", _INT, _ports(6, "both"), "TCP port, either side"),
    Field("tcp.srcport", _INT, _ports(6, "src"), "TCP source port"),
    Field("tcp.dstport", _INT, _ports(6, "dst"), "TCP destination port"),
    Field("tcp.flags", _INT, _attr("tcp_flags"), "the TCP flags byte (SYN 0x02, ACK 0x10 …)"),
    *(Field(f"tcp.flags.{name}", _BOOL, _tcp_flag(bit), f"the {name.upper()} flag")
      for name, bit in _TCP_FLAGS.items()),
    Field("udp.port", _INT, _ports(17, "both"), "UDP port, either side"),
    Field("udp.srcport", _INT, _ports(17, "src"), "UDP source port"),
    Field("udp.dstport", _INT, _ports(17, "dst"), "UDP destination port"),
    Field("icmp.type", _INT, _icmp(4, "icmp_type"), "ICMP type (8 echo request, 0 reply)"),
    Field("icmp.code", _INT, _icmp(4, "icmp_code"), "ICMP code"),
    Field("icmpv6.type", _INT, _icmp(6, "icmp_type"), "ICMPv6 type (128 echo request …)"),
    Field("icmpv6.code", _INT, _icmp(6, "icmp_code"), "ICMPv6 code"),
    Field("arp.opcode", _INT, _attr("arp_op"), "1 request (who-has), 2 reply (is-at)",
          {"request": 1, "reply": 2}),
    Field("arp.src.proto_ipv4", _ADDR, _attr("arp_src_ip"), "ARP sender address"),
    Field("arp.dst.proto_ipv4", _ADDR, _attr("arp_dst_ip"), "ARP target address"),
    Field("arp.src.hw_mac", _MAC, _attr("arp_src_mac"), "ARP sender MAC"),
    Field("dns.qry.name", _STR, _seq("dns_names"), "a question's name", fold=True),
    Field("dns.qry.name.len", _INT, _name_lengths, "a question name's length in characters"),
    Field("dns.qry.type", _INT, _seq("dns_qtypes"), "a question's type (A, AAAA, TXT …)",
          _DNS_TYPE_NAMES),
    Field("dns.flags.response", _BOOL, _attr("dns_response"), "a response, not a query"),
    Field("dns.flags.rcode", _INT, _attr("dns_rcode"), "response code (3 NXDOMAIN)",
          {"noerror": 0, "formerr": 1, "servfail": 2, "nxdomain": 3, "refused": 5}),
    Field("dns.a", _ADDR, _seq("dns_answer_addrs"), "an A or AAAA answer"),
    Field("dns.answer", _STR, _seq("dns_answers"), "any answer's data as text", fold=True),
    Field("http.request", _BOOL, _is_set("http_method", "http"), "an HTTP request"),
    Field("http.response", _BOOL, _is_set("http_status", "http"), "an HTTP response"),
    Field("http.request.method", _STR, _attr("http_method"), "request method (GET, POST …)"),
    Field("http.request.uri", _STR, _attr("http_uri"), "request target (path and query)"),
    Field("http.host", _STR, _attr("http_host"), "the Host header", fold=True),
    Field("http.user_agent", _STR, _attr("http_user_agent"), "the User-Agent header"),
    Field("http.response.code", _INT, _attr("http_status"), "response status code"),
    Field("tls.handshake.type", _INT, _attr("tls_handshake"), "handshake type (1 ClientHello)",
          {"client_hello": 1, "server_hello": 2}),
    Field("tls.sni", _STR, _attr("tls_sni"), "a ClientHello's server name", fold=True),
    Field("dhcp.option.dhcp", _INT, _attr("dhcp_type"), "DHCP message type",
          _DHCP_TYPE_NAMES),
    Field("dhcp.hw.mac_addr", _MAC, _attr("dhcp_client_mac"), "the client's MAC (chaddr)"),
    Field("dhcp.option.hostname", _STR, _attr("dhcp_hostname"), "the client's host name"),
    Field("dhcp.option.requested_ip_address", _ADDR, _attr("dhcp_requested_ip"),
          "the address the client asks for"),
]

#: Other names for fields: the original product's, Wireshark's, and habit.
ALIASES: Mapping[str, str] = MappingProxyType({
    "length": "frame.len", "len": "frame.len", "frame.length": "frame.len",
    "data": "payload", "tcp.payload": "payload", "udp.payload": "payload",
    "ipv6.src": "ip.src", "ipv6.dst": "ip.dst", "ipv6.addr": "ip.addr",
    "ipv6.hlim": "ip.ttl", "ipv6.nxt": "ip.proto",
    "tcp.flags.rst": "tcp.flags.reset", "tcp.flags.psh": "tcp.flags.push",
    "tls.handshake.extensions_server_name": "tls.sni", "ssl.sni": "tls.sni",
    "http.request.full_uri": "http.request.uri", "http.user-agent": "http.user_agent",
    "dns.resp.addr": "dns.a", "dns.aaaa": "dns.a",
    "dhcp.type": "dhcp.option.dhcp", "eth.ether_type": "eth.type",
})

#: Every field by canonical name.
FIELDS: Mapping[str, Field] = MappingProxyType({f.name: f for f in _FIELDS})

#: Protocol words: a bare word that is true when the packet has that layer.
PROTOCOLS: Mapping[str, str] = MappingProxyType({
    "eth": "Ethernet (every frame that decodes at all)",
    "arp": "ARP", "ip": "IPv4", "ipv6": "IPv6", "icmp": "ICMP (IPv4)",
    "icmpv6": "ICMPv6", "tcp": "TCP", "udp": "UDP",
    "dns": "DNS (also mDNS and LLMNR: UDP/TCP 53, 5353, 5355)",
    "http": "an HTTP request or status line at the start of a TCP payload, on any port",
    "tls": "a TLS record header at the start of a TCP payload, on any port",
    "dhcp": "DHCP (UDP 67/68)", "ntp": "NTP (UDP 123, 48 bytes or more)",
    "malformed": "a frame some layer of which did not decode",
})

assert not set(ALIASES) & set(FIELDS), "an alias may not shadow a field"
assert all(target in FIELDS for target in ALIASES.values()), "every alias names a field"
assert not set(PROTOCOLS) & (set(FIELDS) | set(ALIASES)), "protocol words are not fields"


def lookup(name: str) -> Field | None:
    """The field ``name`` (canonical or an alias, any case) names, or None."""
    key = name.lower()
    return FIELDS.get(ALIASES.get(key, key))
