"""Turning a checked syntax tree into one predicate over packets, once.

Each node becomes a closure; a packet is then tested by calling it, with no parsing,
lookup or type dispatch left to do per packet. ``and``/``or`` of many terms loop over
their closures (not nested calls), so a long chain does not deepen the stack; nesting is
bounded by the parser's ``MAX_DEPTH``.

Address comparisons parse each packet's address text once per distinct address
(:func:`_address`, cached).
"""

from __future__ import annotations

import functools
import ipaddress
import operator
import re
from collections.abc import Callable
from typing import Any

from secvf.net.decode import Packet
from secvf.net.filters.fields import Field, FieldType
from secvf.net.filters.parser import (
    AllOf,
    AnyOf,
    Compare,
    IPNetwork,
    Node,
    Not,
    Present,
    Protocol,
    Search,
)

Predicate = Callable[[Packet], bool]

#: How much of a bytes field ``matches`` looks at (a regex over a jumbo frame's every
#: byte is the expensive case).
MAX_REGEX_SUBJECT_BYTES = 4096

_ORDER = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def compile_node(node: Node) -> Predicate:
    """The predicate for ``node`` (from :func:`secvf.net.filters.parser.parse`)."""
    if isinstance(node, AllOf | AnyOf):
        terms = tuple(compile_node(term) for term in node.terms)
        return _all(terms) if isinstance(node, AllOf) else _any(terms)
    if isinstance(node, Not):
        inner = compile_node(node.term)
        return lambda packet: not inner(packet)
    if isinstance(node, Protocol):
        return _protocol(node.name)
    if isinstance(node, Search):
        text = node.text
        return lambda packet: text in packet.summary().lower()
    if isinstance(node, Present):
        return _present(node.field)
    return _compare(node)


def _all(terms: tuple[Predicate, ...]) -> Predicate:
    def every(packet: Packet) -> bool:
        return all(term(packet) for term in terms)
    return every


def _any(terms: tuple[Predicate, ...]) -> Predicate:
    def some(packet: Packet) -> bool:
        return any(term(packet) for term in terms)
    return some


def _protocol(name: str) -> Predicate:
    if name == "malformed":
        return lambda packet: packet.malformed is not None
    return lambda packet: name in packet.layers


def _present(field: Field) -> Predicate:
    get = field.get
    if field.type is FieldType.BOOL:
        return lambda packet: True in get(packet)
    return lambda packet: bool(get(packet))


def _compare(node: Compare) -> Predicate:
    get, op = node.field.get, node.op
    test = _value_test(node.field, op, node.value)
    if op == "!=":
        return lambda packet: not any(test(v) for v in get(packet))
    return lambda packet: any(test(v) for v in get(packet))


def _value_test(field: Field, op: str, value: Any) -> Callable[[Any], bool]:
    """The test one of the field's values must pass (``!=``: the ``==`` test, negated
    by the caller)."""
    kind = field.type
    if op == "in":
        return _member_test(kind, value)
    if op == "matches":
        return _regex_test(value)
    if op == "contains":
        return lambda v: value in v
    if kind is FieldType.ADDR:
        assert isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network)
        return functools.partial(_in_networks, networks=(value,))
    if op in _ORDER:
        order = _ORDER[op]
        return lambda v: order(v, value)
    return lambda v: v == value


def _member_test(kind: FieldType, members: Any) -> Callable[[Any], bool]:
    assert isinstance(members, tuple)
    if kind is FieldType.INT:
        ranges = members
        return lambda v: any(low <= v <= high for low, high in ranges)
    if kind is FieldType.ADDR:
        return functools.partial(_in_networks, networks=members)
    allowed = frozenset(members)
    return lambda v: v in allowed


def _regex_test(pattern: Any) -> Callable[[Any], bool]:
    assert isinstance(pattern, re.Pattern)
    search = pattern.search

    def matches(value: Any) -> bool:
        if isinstance(value, bytes):
            value = value[:MAX_REGEX_SUBJECT_BYTES]
        return search(value) is not None
    return matches


def _in_networks(value: object, networks: tuple[IPNetwork, ...]) -> bool:
    address = _address(value)
    return address is not None and any(address in network for network in networks)


@functools.lru_cache(maxsize=4096)
def _address(text: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)  # type: ignore[arg-type]
    except ValueError:
        return None

