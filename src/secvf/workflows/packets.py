"""``secvf packets``: decode captured frames and show those a filter selects.

:func:`read_packets` takes any iterable of ``(ts, interface, frame)`` tuples — a capture
file (:func:`read_file`), or an isolated network's capture ring — compiles the filter
(``--filter`` and ``--preset``, combined with ``and``) *before* reading anything, so a
bad filter fails at once and never shows everything, then decodes lazily and stops at
``limit`` matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

from secvf.net.capture_file import read_capture
from secvf.net.decode import Packet, decode
from secvf.net.filters import PRESETS, PacketFilter, combine, compile_filter, get_preset

#: A source of frames: (seconds since the epoch, interface / VM name, frame bytes).
FrameSource = Iterable[tuple[float, str, bytes]]


def read_packets(frames: FrameSource, *, filter: str | None = None,
                 preset: str | None = None, limit: int | None = None) -> Iterator[Packet]:
    """The decoded packets of ``frames`` that match ``filter`` and ``preset`` (both if
    both are given), at most ``limit`` of them.

    The filter is checked here, before any frame is read; the frames are read and
    decoded as the result is iterated (errors of the source, such as a corrupt file,
    surface then, after the packets before them).

    Raises:
        InvalidFilter: the filter (or a combination with the preset) does not parse.
        NotFound: no such preset.
        ValueError: ``limit`` is less than 1.
    """
    expression = combine(get_preset(preset).expression if preset else None, filter)
    match = compile_filter(expression) if expression else None
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be 1 or more, not {limit}")
    return _matching(frames, match, limit)


def _matching(frames: FrameSource, match: PacketFilter | None, limit: int | None
              ) -> Iterator[Packet]:
    shown = 0
    for ts, interface, frame in frames:
        packet = decode(ts, interface, frame)
        if match is None or match(packet):
            yield packet
            shown += 1
            if shown == limit:
                return


def read_file(path: Path, *, filter: str | None = None, preset: str | None = None,
              limit: int | None = None) -> Iterator[Packet]:
    """:func:`read_packets` over the pcapng or pcap file ``path``.

    Raises:
        InvalidFilter, NotFound (no preset, no file): at once.
        CaptureFileError (a ConfigError): while iterating, at the file's damage.
    """
    return read_packets(read_capture(path), filter=filter, preset=preset, limit=limit)


def presets() -> list[dict[str, str]]:
    """Every preset (name, section, expression, catches, cannot), section by section."""
    return [asdict(p) for p in PRESETS]
