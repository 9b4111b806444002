"""Filters evaluated on real decoded frames (built with dpkt): each kind of packet
matched and not matched by the filters about it, the either-way and negation rules,
and every preset against a packet it is meant to catch."""

from __future__ import annotations

import dpkt
import pytest

from secvf.net.decode import decode
from secvf.net.filters import PRESETS, SECTIONS, combine, compile_filter
from tests.unit.test_packets_decode import (
    FRAMES,
    client_hello,
    decoded,
    dns_query,
    eth,
    ipv4,
    tcp,
    udp,
)

# (frame name, filters that match it, filters that do not)
CASES = [
    ("dns", ["dns", "udp", "ip", "udp.port == 53", "udp.dstport == 53", "port 53",
             "dst port 53", "udp 53", "ip.dst == 10.0.2.3", "ip.addr == 10.0.2.0/24",
             'dns.qry.name == "example.com"', 'dns.qry.name contains "EXAMPLE"',
             "dns.qry.type == A", "not dns.flags.response", "dns.qry.name.len == 11",
             'contains "example"', "example.com", "query", "vm == web", 'vm matches "^w"',
             "ip.proto == udp", "frame.len < 100", "!tcp", "eth.src == 52:54:00:12:34:56",
             "eth.addr == 52:54:00:ab:cd:ef", "ip.ttl == 64", "udp.port != 80"],
     ["tcp", "udp.port == 80", "src port 53", "tcp.port == 53", "dns.flags.response",
      'dns.qry.name == "example"', "ip.src == 10.0.2.3", "vm == db", "udp.port != 53",
      "http", "ip.dst != 10.0.2.3"]),
    ("dns_answer", ["dns.flags.response", "dns.a == 93.184.216.34",
                    'dns.answer contains "93.184"', "src port 53"],
     ["dns.a == 1.1.1.1"]),
    ("http", ["http", "tcp", "tcp.port == 80", "tcp 80", "http.request",
              'http.host == "example.com"', 'http.host == "EXAMPLE.com"',
              'http.request.method == "GET"', 'http.request.uri contains "index"',
              'http.user_agent matches "^curl/"', 'contains "Host: Example"',
              "example.com", "tcp.flags.push == 1", "tcp.flags.syn == 0"],
     ["http.response", 'http.request.method == "POST"', 'contains "host: example"',
      "tls", "udp", "tcp.flags.syn"]),
    ("tls", ["tls", "tls.sni", 'tls.sni == "secret.example.org"',
             'tls.handshake.extensions_server_name contains "example"',
             "tls.handshake.type == 1", "tls.handshake.type == client_hello", "tcp 443",
             "secret.example"],
     ["not tls.sni", "http", 'tls.sni == "example.org"']),
    ("tls_no_sni", ["tls and not tls.sni", "tls.handshake.type == 1"], ["tls.sni"]),
    ("arp", ["arp", "arp.opcode == request", "arp.opcode == 1",
             "arp.src.proto_ipv4 == 10.0.0.1", "arp.dst.proto_ipv4 == 10.0.0.0/24",
             "eth.dst == ff:ff:ff:ff:ff:ff", "who-has", '"who-has 10.0.0.9"'],
     ["ip", "ip.addr == 10.0.0.1", "arp.opcode == reply", "port 0", "tcp or udp"]),
    ("icmp", ["icmp", "icmp.type == 8", "icmp.code == 0", "ip.dst == 10.0.2.2",
              'contains "ping"', '"echo request"'],
     ["icmpv6", "icmp.type == 0", "icmpv6.type == 128", "tcp"]),
    ("syn", ["tcp.flags.syn == 1 and tcp.flags.ack == 0", "tcp.flags.syn",
             "tcp.flags == 0x02", "tcp.dstport == 22", "tcp.port in {20..25}",
             "not tcp.flags.ack", '"[syn]"', "length == 54", "frame.len >= 54"],
     ["tcp.flags.ack == 1", "tcp.flags.syn == 0", "tcp.srcport == 22", "length > 54"]),
    ("dhcp", ["dhcp", "dhcp.option.dhcp == discover", "dhcp.hw.mac_addr == 52:54:00:12:34:56",
              'dhcp.option.hostname == "web"', "udp.port in {67 68}"],
     ["dhcp.option.dhcp == ack", "dns"]),
    ("ipv6", ["ipv6", "dns", "ip.src == fe80::1", "ipv6.addr == ff02::/16", "udp.port == 5353",
              "ip.version == 6", 'dns.qry.name == "printer.local"'],
     ["ip", "ip.addr == 10.0.0.0/8", "ip.version == 4"]),
]


@pytest.mark.parametrize(("name", "hits", "misses"), CASES, ids=[c[0] for c in CASES])
def test_filters_match_and_do_not_match(name, hits, misses):
    packet = decoded(name)
    assert [f for f in hits if not compile_filter(f)(packet)] == []
    assert [f for f in misses if compile_filter(f)(packet)] == []


def test_either_way_fields_and_negation():
    packet = decoded("dns")  # 40000 -> 53
    assert compile_filter("udp.port == 40000")(packet)
    assert compile_filter("udp.port == 53 and udp.port == 40000")(packet)
    assert not compile_filter("udp.port != 53")(packet)  # != is "not ==", not "any !="
    assert compile_filter("tcp.port != 53")(packet)  # absent field: == is false
    assert not compile_filter("tcp.port > 0")(packet)


def test_malformed_frames_are_selectable_and_keep_their_lower_layers():
    cut = decode(0.0, "web", FRAMES["syn"][:40])
    assert compile_filter("malformed and ip.src == 10.0.2.15")(cut)
    assert not compile_filter("malformed")(decoded("syn"))


def test_combine_puts_each_part_in_parentheses():
    assert combine(None, None) is None
    assert combine("tcp", None) == "tcp"
    assert combine("tcp or udp", "port 53") == "(tcp or udp) and (port 53)"


#: A packet each preset is meant to catch.
POSITIVE = {
    "dns-long-names": eth(ipv4(udp(40000, 53, dns_query("a" * 60 + ".evil.example")))),
    "dns-txt": eth(ipv4(udp(40000, 53, dns_query("c2.example", dpkt.dns.DNS_TXT)))),
    "uncommon-ports": eth(ipv4(tcp(40000, 4444, flags=dpkt.tcp.TH_SYN), dst="203.0.113.5")),
    "irc": eth(ipv4(tcp(40000, 6667, b"NICK bot\r\n"))),
    "http-odd-port": eth(ipv4(tcp(40000, 8081, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))),
    "http-post": eth(ipv4(tcp(40000, 80, b"POST /up HTTP/1.1\r\nHost: x\r\n\r\n"))),
    "dns-outside-resolver": eth(ipv4(udp(40000, 53, dns_query()), dst="8.8.8.8")),
    "icmp-large": eth(ipv4(dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(
        id=1, seq=1, data=b"x" * 300)))),
    "ftp-tftp": eth(ipv4(tcp(40000, 21, b"USER anonymous\r\n"))),
    "tls-client-hello": FRAMES["tls"],
    "tls-no-sni": FRAMES["tls_no_sni"],
    "tls-sni": FRAMES["tls"],
    "tls-odd-port": eth(ipv4(tcp(40000, 4443, client_hello("odd.example")))),
    "syn-scan": FRAMES["syn"],
    "stealth-scan": eth(ipv4(tcp(40000, 80, flags=dpkt.tcp.TH_FIN | dpkt.tcp.TH_PUSH
                                 | dpkt.tcp.TH_URG))),
    "closed-port-replies": eth(ipv4(tcp(80, 40000, flags=dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK))),
    "arp-sweep": FRAMES["arp"],
    "icmp-sweep": FRAMES["icmp"],
    "smb": eth(ipv4(tcp(40000, 445, flags=dpkt.tcp.TH_SYN))),
    "rdp": eth(ipv4(tcp(40000, 3389, flags=dpkt.tcp.TH_SYN))),
    "winrm": eth(ipv4(tcp(40000, 5985, flags=dpkt.tcp.TH_SYN))),
    "ssh": FRAMES["syn"],
    "rpc-kerberos-ldap": eth(ipv4(udp(40000, 88, b"\x6a\x00"))),
    "telnet-vnc": eth(ipv4(tcp(40000, 5901, flags=dpkt.tcp.TH_SYN))),
    "dns": FRAMES["dns"],
    "dhcp": FRAMES["dhcp"],
    "ntp": eth(ipv4(udp(40000, 123, b"\x23" + b"\x00" * 47), dst="10.0.2.2")),
    "arp": FRAMES["arp"],
    "icmp": FRAMES["icmp"],
    "http": FRAMES["http"],
    "broadcast-discovery": FRAMES["ipv6"],
    "malformed": FRAMES["tls"][:-4],
}


def test_there_is_an_example_for_every_preset_and_every_section_is_used():
    assert sorted(POSITIVE) == sorted(p.name for p in PRESETS)
    assert [s for s in SECTIONS if not any(p.section == s for p in PRESETS)] == []


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_each_preset_compiles_and_catches_its_example(preset):
    match = compile_filter(preset.expression)
    assert match(decode(0.0, "web", POSITIVE[preset.name]))
    assert preset.catches and preset.cannot


@pytest.mark.parametrize(("preset", "frame"), [
    ("dns-long-names", "dns"), ("dns-txt", "dns"), ("dns-outside-resolver", "dns"),
    ("tls-no-sni", "tls"), ("tls-sni", "tls_no_sni"), ("syn-scan", "http"),
    ("http-post", "http"), ("http-odd-port", "http"), ("uncommon-ports", "syn"),
    ("malformed", "tls"), ("icmp-large", "icmp"), ("tls-odd-port", "tls"),
])
def test_presets_leave_out_ordinary_traffic(preset, frame):
    expression = next(p.expression for p in PRESETS if p.name == preset)
    assert not compile_filter(expression)(decoded(frame))
