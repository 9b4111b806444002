"""The filter language's lexer and parser: every grammar form (the original product's and
the Wireshark subset), errors with their positions, bounded parsing, and fuzzing (any
string either compiles or raises InvalidFilter)."""

from __future__ import annotations

import ipaddress
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secvf.errors import InvalidFilter
from secvf.net.filters import FIELDS, compile_filter
from secvf.net.filters.lexer import Kind, tokenize
from secvf.net.filters.parser import (
    MAX_DEPTH,
    MAX_FILTER_CHARS,
    AllOf,
    AnyOf,
    Compare,
    Not,
    Present,
    Protocol,
    Search,
    parse,
)


def test_tokens_and_their_positions():
    tokens = tokenize('!tcp && (udp.port==53 || dns.qry.name contains "a\\"b") eq')
    assert [(t.kind, t.text, t.pos) for t in tokens] == [
        (Kind.NOT, "not", 0), (Kind.WORD, "tcp", 1), (Kind.AND, "and", 5),
        (Kind.LPAREN, "(", 8), (Kind.WORD, "udp.port", 9), (Kind.CMP, "==", 17),
        (Kind.WORD, "53", 19), (Kind.OR, "or", 22), (Kind.WORD, "dns.qry.name", 25),
        (Kind.CONTAINS, "contains", 38), (Kind.STRING, 'a"b', 47), (Kind.RPAREN, ")", 53),
        (Kind.CMP, "==", 55), (Kind.END, "", 57)]


def test_string_escapes_give_text_and_bytes():
    token = tokenize(r'"\x00\xff\n\t\\é"')[0]
    assert token.text == "\x00\xff\n\t\\é"
    assert token.data == b"\x00\xff\n\t\\" + "é".encode()


def field(name: str):
    return FIELDS[name]


@pytest.mark.parametrize(("text", "tree"), [
    # the original product's grammar
    ("tcp", Protocol("tcp")),
    ("icmpv6", Protocol("icmpv6")),
    ("port 53", Compare(field("port"), "==", 53)),
    ("src port 53", Compare(field("srcport"), "==", 53)),
    ("dst port 0x35", Compare(field("dstport"), "==", 53)),
    ("length > 100", Compare(field("frame.len"), ">", 100)),
    ("length <= 100", Compare(field("frame.len"), "<=", 100)),
    ("ip.addr == 10.0.2.3", Compare(field("ip.addr"), "==",
                                    ipaddress.ip_network("10.0.2.3/32"))),
    ("ip.src == 10.0.0.0/24", Compare(field("ip.src"), "==",
                                      ipaddress.ip_network("10.0.0.0/24"))),
    ("ip.dst != fe80::1", Compare(field("ip.dst"), "!=", ipaddress.ip_network("fe80::1"))),
    ('contains "GET"', Compare(field("payload"), "contains", b"GET")),
    ("tcp 80", AllOf((Protocol("tcp"), Compare(field("port"), "==", 80)))),
    ("tcp and not udp or arp", AnyOf((AllOf((Protocol("tcp"), Not(Protocol("udp")))),
                                      Protocol("arp")))),
    ("tcp and (udp or arp)", AllOf((Protocol("tcp"), AnyOf((Protocol("udp"),
                                                            Protocol("arp")))))),
    ("evil", Search("evil")),
    ("example.com", Search("example.com")),
    ("evil.example.org", Search("evil.example.org")),
    ('"Who-Has 10.0.0.9"', Search("who-has 10.0.0.9")),
    ("host 10.0.0.1", Compare(field("ip.addr"), "==", ipaddress.ip_network("10.0.0.1"))),
    ("TCP AND PORT 80", AllOf((Protocol("tcp"), Compare(field("port"), "==", 80)))),
    # the Wireshark subset
    ("udp.port == 53", Compare(field("udp.port"), "==", 53)),
    ("tcp.srcport eq 1", Compare(field("tcp.srcport"), "==", 1)),
    ("tcp.dstport >= 1024", Compare(field("tcp.dstport"), ">=", 1024)),
    ("udp.srcport < 5", Compare(field("udp.srcport"), "<", 5)),
    ("udp.dstport gt 5", Compare(field("udp.dstport"), ">", 5)),
    ('dns.qry.name contains "EVIL"', Compare(field("dns.qry.name"), "contains", "evil")),
    ('dns.qry.name == "a.b"', Compare(field("dns.qry.name"), "==", "a.b")),
    ("http.host == example.com", Compare(field("http.host"), "==", "example.com")),
    ('http.request.uri contains "/admin"', Compare(field("http.request.uri"), "contains",
                                                   "/admin")),
    ("http.request.method == POST", Compare(field("http.request.method"), "==", "POST")),
    ('tls.sni == "x.org"', Compare(field("tls.sni"), "==", "x.org")),
    ('tls.handshake.extensions_server_name == "x.org"', Compare(field("tls.sni"), "==",
                                                                "x.org")),
    ("eth.src == 52:54:00:AA:bb:cc", Compare(field("eth.src"), "==", "52:54:00:aa:bb:cc")),
    ("eth.dst == 52-54-00-aa-bb-cc", Compare(field("eth.dst"), "==", "52:54:00:aa:bb:cc")),
    ("eth.addr != ff:ff:ff:ff:ff:ff", Compare(field("eth.addr"), "!=", "ff:ff:ff:ff:ff:ff")),
    ("frame.len > 1000", Compare(field("frame.len"), ">", 1000)),
    ("ip.proto == 17", Compare(field("ip.proto"), "==", 17)),
    ("ip.proto == udp", Compare(field("ip.proto"), "==", 17)),
    ("tcp.flags.syn == 1", Compare(field("tcp.flags.syn"), "==", True)),
    ("tcp.flags.ack == false", Compare(field("tcp.flags.ack"), "==", False)),
    ("tcp.flags.syn", Present(field("tcp.flags.syn"))),
    ('vm == "web-1"', Compare(field("vm"), "==", "web-1")),
    ("vm == web-1", Compare(field("vm"), "==", "web-1")),
    ("!arp", Not(Protocol("arp"))),
    ("tcp && udp || arp", AnyOf((AllOf((Protocol("tcp"), Protocol("udp"))),
                                 Protocol("arp")))),
    ("dns.qry.type == TXT", Compare(field("dns.qry.type"), "==", 16)),
    ("tcp.port in {22 80, 8000..8080}", Compare(field("tcp.port"), "in",
                                                ((22, 22), (80, 80), (8000, 8080)))),
    ("ip.dst in {10.0.0.0/8 fe80::/10}", Compare(field("ip.dst"), "in", (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fe80::/10")))),
    ("http.host", Present(field("http.host"))),
    ("tcp.flags.rst == 1", Compare(field("tcp.flags.reset"), "==", True)),
    ("ipv6.addr == ::1", Compare(field("ip.addr"), "==", ipaddress.ip_network("::1"))),
])
def test_grammar_forms(text, tree):
    assert parse(text) == tree


def test_matches_compiles_a_regex_case_insensitive_for_folded_fields():
    node = parse('dns.qry.name matches "^[a-z0-9]{30,}\\\\."')
    assert isinstance(node, Compare) and node.op == "matches"
    assert node.value.flags & re.IGNORECASE
    payload = parse('payload matches "\\x00{4}"')
    assert isinstance(payload, Compare) and isinstance(payload.value.pattern, bytes)


@pytest.mark.parametrize(("text", "position", "says"), [
    ("tcp and", 7, "expected a protocol, a field"),
    ("(tcp", 4, "expected ')' to close the '(' at character 1"),
    ("tcp)", 3, "expected 'and', 'or', ')' or the end"),
    ("tcp = 80", 4, "expected '=='"),
    ("tcp.port == ", 12, "expected a number for tcp.port"),
    ("tcp.port == abc", 12, "expected a number for tcp.port"),
    ('tcp.port contains "x"', 9, "integer field: 'contains' does not apply"),
    ("ip.src == 5", 10, "expected an IPv4 or IPv6 address"),
    ('ip.src == "10.0.0.1"', 10, "expected an IPv4 or IPv6 address"),
    ("ip.src > 10.0.0.1", 7, "'>' does not apply"),
    ('dns.qry.nmae == "x"', 0, "did you mean 'dns.qry.name'"),
    ("tcp.prot == 1", 0, "did you mean 'tcp.port'"),
    ("tpc.port", 0, "did you mean 'tcp.port'"),
    ("bogus == 1", 0, "unknown field 'bogus'"),
    ("eth.src == 52:54:00", 11, "expected a MAC address"),
    ("tcp.flags.syn == 2", 17, "expected 1, 0, true or false"),
    ('"unterminated', 0, "unterminated string"),
    ('"bad \\q escape"', 5, "unknown escape"),
    ("a & b", 2, "expected '&&'"),
    ("a | b", 2, "expected '||'"),
    ("tcp ; udp", 4, "unexpected character ';'"),
    ("", 0, "the filter is empty"),
    ("   ", 0, "the filter is empty"),
    ("src 80", 4, "expected 'port' or 'host' after 'src'"),
    ("tcp == 1", 4, "'tcp' is a protocol, not a field"),
    ("tcp.port in 80", 12, "expected '{'"),
    ("tcp.port in {}", 13, "at least one value"),
    ("tcp.port in {9..1}", 13, "is empty"),
    ('dns.qry.name matches "("', 21, "invalid regular expression"),
    ("dns.qry.name matches abc", 21, "in double quotes"),
    ("dns.qry.name 5", 13, "expected a comparison"),
    ('contains x', 9, "expected a quoted string"),
    ("not", 3, "expected a protocol, a field"),
    ("()", 1, "expected a protocol, a field"),
])
def test_errors_name_the_position_and_what_was_expected(text, position, says):
    with pytest.raises(InvalidFilter) as caught:
        compile_filter(text)
    assert caught.value.position == position
    assert says in str(caught.value)
    assert f"(at character {position + 1})" in str(caught.value)


def test_a_long_regex_is_refused():
    with pytest.raises(InvalidFilter, match="at most 256"):
        parse(f'http.host matches "{"a" * 300}"')


def test_a_megabyte_filter_fails_fast_without_being_read():
    start = time.perf_counter()
    with pytest.raises(InvalidFilter, match=f"at most {MAX_FILTER_CHARS}"):
        compile_filter("tcp or " * 150_000)
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize("opener", ["(", "not ", "!"])
def test_deep_nesting_fails_at_the_limit_not_the_stack(opener):
    deep = opener * 100_000 + "tcp" + (")" * 100_000 if opener == "(" else "")
    with pytest.raises(InvalidFilter, match=f"more than {MAX_DEPTH} deep") as caught:
        compile_filter(deep[:MAX_FILTER_CHARS])
    assert caught.value.position == MAX_DEPTH * len(opener)
    compile_filter("(" * MAX_DEPTH + "tcp" + ")" * MAX_DEPTH)


def test_the_longest_chain_compiles_and_evaluates_without_recursion():
    from tests.unit.test_packets_decode import decoded

    chain = " or ".join(["udp.port == 9"] * 3000) + " or dns"
    assert len(chain) < MAX_FILTER_CHARS
    assert compile_filter(chain)(decoded("dns"))


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_any_text_compiles_or_raises_invalid_filter(text):
    try:
        compile_filter(text)
    except InvalidFilter as exc:
        assert exc.position is None or 0 <= exc.position <= len(text)


_PIECES = st.sampled_from(["tcp", "udp", "dns", "(", ")", "and", "or", "not", "!", "&&",
                           "||", "==", "!=", ">", "contains", "matches", "in", "{", "}",
                           "port", "src", "tcp.port", "ip.addr", "dns.qry.name", "53",
                           "10.0.0.0/8", '"x"', '"(["', "tls.sni", "eth.src", "1..5",
                           "52:54:00:00:00:01", "frame.len", ",", "vm", "host", "zz.top"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_PIECES, max_size=12))
def test_token_soup_compiles_or_raises_invalid_filter(pieces):
    try:
        compile_filter(" ".join(pieces))
    except InvalidFilter:
        pass
