"""The display-filter language: compile a filter once, then test packets with it.

A short tour::

    from secvf.net.decode import decode
    from secvf.net.filters import compile_filter

    match = compile_filter('dns.qry.name contains "evil" or tcp.port == 4444')
    if match(decode(ts, "web", frame)):
        ...

    compile_filter("tcp.port contains 1")   # InvalidFilter: ... (at character 10)

The grammar is in :mod:`.parser`, the fields in :mod:`.fields`, the evaluation in
:mod:`.evaluate` and the presets in :mod:`.presets`; docs/packets.md is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from secvf.net.decode import Packet
from secvf.net.filters.evaluate import Predicate, compile_node
from secvf.net.filters.fields import FIELDS, PROTOCOLS, Field, FieldType
from secvf.net.filters.parser import MAX_DEPTH, MAX_FILTER_CHARS, field_names, parse
from secvf.net.filters.presets import PRESETS, SECTIONS, Preset, get_preset

__all__ = ["compile_filter", "PacketFilter", "combine", "PRESETS", "SECTIONS", "Preset",
           "get_preset", "FIELDS", "PROTOCOLS", "Field", "FieldType", "field_names",
           "MAX_FILTER_CHARS", "MAX_DEPTH"]


@dataclass(frozen=True)
class PacketFilter:
    """A compiled filter: call it with a :class:`~secvf.net.decode.Packet`."""

    text: str  # the expression it was compiled from
    _predicate: Predicate

    def __call__(self, packet: Packet) -> bool:
        """True if ``packet`` matches."""
        return self._predicate(packet)


def compile_filter(text: str) -> PacketFilter:
    """Parse, check and compile filter ``text``.

    Raises:
        InvalidFilter: it does not parse, names an unknown field, or compares a field
            with something of another type (``.position`` says where).
    """
    return PacketFilter(text, compile_node(parse(text)))


def combine(*expressions: str | None) -> str | None:
    """The ``and`` of the given expressions (each parenthesised), None if none is given:
    how ``--preset`` and ``--filter`` combine."""
    given = [e for e in expressions if e]
    if len(given) <= 1:
        return given[0] if given else None
    return " and ".join(f"({e})" for e in given)
