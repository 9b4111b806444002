"""The Ethernet II header as the switch reads it, and MAC address text.

A frame on a port is one datagram with no header of its own: destination MAC (bytes
0-5), source MAC (6-11), ethertype (12-13), payload. The switch reads only those 14
bytes, so parsing is slicing, and nothing a guest sends can make it fail: every check
is on the length first.

The I/G bit (the least significant bit of the first destination byte) marks a group
address: broadcast ``ff:ff:ff:ff:ff:ff`` and every multicast. Group frames are flooded
and count against the broadcast rate limit.
"""

from __future__ import annotations

import re

HEADER_BYTES = 14  # dst + src + ethertype
MAC_BYTES = 6
DST = slice(0, 6)
SRC = slice(6, 12)
ETHERTYPE = slice(12, 14)
GROUP_BIT = 0x01  # of the first destination byte
BROADCAST = b"\xff" * MAC_BYTES

_MAC_TEXT = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


def parse_mac(text: str) -> bytes:
    """``"52:54:00:12:34:56"`` as 6 bytes.

    Raises:
        ValueError: ``text`` is not six colon-separated hex octets.
    """
    if not isinstance(text, str) or not _MAC_TEXT.match(text):
        raise ValueError(f"not a MAC address (want aa:bb:cc:dd:ee:ff): {text!r}")
    return bytes.fromhex(text.replace(":", ""))


def format_mac(mac: bytes) -> str:
    """6 bytes as ``"52:54:00:12:34:56"`` (any other length as hex pairs too)."""
    return mac.hex(":")


def is_group(mac: bytes) -> bool:
    """True for broadcast and multicast addresses (I/G bit set)."""
    return bool(mac[0] & GROUP_BIT) if mac else False


def ethertype(frame: bytes) -> int | None:
    """The frame's ethertype, or None if it is shorter than a header."""
    if len(frame) < HEADER_BYTES:
        return None
    return int.from_bytes(frame[ETHERTYPE], "big")
