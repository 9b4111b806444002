"""What the TUI shows, built from API results: VM rows, and the text of its cells.

Pure functions over the dicts :mod:`secvf.api` returns, so they are tested without a
terminal. Text that came from a guest (serial output, exec output) goes through
:func:`clean` before it is shown: it is untrusted and may hold terminal escapes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich.text import Text

from secvf import api
from secvf.errors import SecVFError

#: VM states as the table shows them, with the style of each (no colour under NO_COLOR:
#: Textual then drops colours and keeps the bold/italic).
STATE_STYLES = {
    "running": "bold green",
    "paused": "bold yellow",
    "starting": "italic cyan",
    "stopping": "italic cyan",
    "stopped": "dim",
    "crashed": "bold red",
    "invalid": "bold red reverse",
}

#: What cannot be typed into a terminal cell safely: C0/C1 controls except tab and newline.
#: The clock uptimes count on with (tests freeze it).
clock = time.monotonic

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    """``text`` with control characters (escape sequences included) shown as ``?``:
    guest output cannot move the cursor or change the terminal."""
    return _CONTROL.sub("?", text.replace("\r\n", "\n"))


def decode(data: bytes) -> str:
    """Guest bytes as printable text (invalid UTF-8 replaced, controls cleaned)."""
    return clean(data.decode("utf-8", errors="replace"))


def error_line(exc: BaseException) -> str:
    """One line for a notification: a SecVFError's own message, else the type and
    message (never a traceback)."""
    if isinstance(exc, SecVFError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def uptime(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``; ``-`` for none."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def memory(mib: int | None) -> str:
    """MiB as ``512M``/``2G``."""
    return "-" if mib is None else str(api.format_size(mib << 20))


@dataclass
class VMRow:
    """One VM as the table shows it; ``status`` is ``api.vm_status`` (empty if invalid)."""

    name: str
    kind: str = "?"
    state: str = "invalid"
    accel: str = "-"
    cpus: int | None = None
    memory_mib: int | None = None
    uptime_s: float | None = None
    channels: list[str] = field(default_factory=list)
    error: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    fetched_at: float = field(default_factory=lambda: clock())

    @classmethod
    def from_status(cls, status: dict[str, Any]) -> VMRow:
        """The row of one ``vm_status`` dict."""
        return cls(name=status["name"], kind=status["kind"], state=status["state"],
                   accel=status.get("accel") or "-", cpus=status.get("cpus"),
                   memory_mib=status.get("memory_mib"), uptime_s=status.get("uptime_s"),
                   channels=sorted({str(d.get("channel")) for d in status.get("channels", [])
                                    if d.get("channel")}),
                   status=status)

    def uptime_now(self, now: float | None = None) -> float | None:
        """Uptime at ``now`` (monotonic), counted on from when the status was read."""
        if self.uptime_s is None or self.state not in ("running", "paused", "stopping"):
            return self.uptime_s
        return self.uptime_s + ((clock() if now is None else now) - self.fetched_at)

    def cells(self, now: float | None = None) -> tuple[str, ...]:
        """The table's cells: name, kind, state, accel, CPU/RAM, uptime, channels."""
        size = "-" if self.cpus is None else f"{self.cpus}/{memory(self.memory_mib)}"
        return (self.name, self.kind, self.state, self.accel, size,
                uptime(self.uptime_now(now)), ",".join(self.channels) or "none")

    def matches(self, text: str) -> bool:
        """Whether filter ``text`` (words, all must match, any case) fits this row."""
        hay = " ".join((self.name, self.kind, self.state, self.accel, *self.channels)).lower()
        return all(word in hay for word in text.lower().split())


def row_for(name: str) -> VMRow | None:
    """The current row of VM ``name``; None once it is gone. An unreadable VM is a row
    with its error."""
    from secvf.errors import NotFound

    try:
        return VMRow.from_status(api.vm_status(name))
    except NotFound:
        return None
    except SecVFError as exc:
        return VMRow(name=name, error=error_line(exc))


def all_rows() -> list[VMRow]:
    """Every VM in the library, by name (an invalid one with its error)."""
    rows = []
    for item in api.list_vms():
        if item.config is None:
            rows.append(VMRow(name=item.bundle.name, error=item.error))
            continue
        row = row_for(item.bundle.name)
        if row is not None:
            rows.append(row)
    return rows


def names_changed(record: dict[str, Any]) -> Iterable[str] | None:
    """The VM names a change event touches, or None when the whole list must be read
    again (a VM appeared, went or was renamed)."""
    if record.get("event") in ("vm_created", "vm_deleted", "vm_renamed", "vm_cloned",
                               "vm_imported") or not record.get("vm"):
        return None
    return [str(record["vm"])]


def device_lines(status: dict[str, Any]) -> list[tuple[str, bool]]:
    """The live device tree of a status, one ``(text, is_channel)`` line per device,
    hot-plugged ones marked."""
    hot = {d["path"] for d in status.get("hotplugged", [])}
    lines = []
    for dev in sorted(status.get("devices", []), key=lambda d: d["path"]):
        channel = dev.get("channel")
        mark = " (hot-plugged)" if dev["path"] in hot else ""
        text = f"{dev['path']}  {dev['type']}" + (f"  [{channel}]" if channel else "") + mark
        lines.append((text, bool(channel)))
    return lines


def channel_proof(status: dict[str, Any]) -> str:
    """For a VM that must have no host-guest channel: what says it has none."""
    if status.get("kind") == "ai-sandbox":
        return ""
    if status.get("state") not in ("running", "paused"):
        return (f"{status.get('kind')} VM: no host-guest channel by design (its machine "
                "builder cannot add one); the live device tree is checked when it runs")
    if status.get("channels"):
        return "FINDING: channel devices on a VM that must have none: " + ", ".join(
            d["type"] for d in status["channels"])
    return (f"no channel: {len(status.get('devices', []))} live devices, none of them a "
            "host-guest channel; no exec socket")


def drop_text(drops: dict[str, Any]) -> str:
    """``reason=N`` for each non-zero drop counter, or ``none``."""
    shown = [f"{reason}={count}" for reason, count in sorted(drops.items()) if count]
    return ", ".join(shown) or "none"


def bounded_append(buffer: list[str], lines: Iterable[str], limit: int) -> None:
    """Append ``lines`` to ``buffer`` keeping only its last ``limit`` entries."""
    buffer.extend(lines)
    del buffer[:-limit]



class LineSplitter:
    """Guest output chunks to whole lines: a line cut between two chunks comes out
    once, whole (``flush`` gives what is left when the output ends)."""

    def __init__(self) -> None:
        self.pending = ""

    def feed(self, chunk: bytes) -> list[str]:
        """The lines ``chunk`` completes."""
        lines = (self.pending + decode(chunk)).split("\n")
        self.pending = lines.pop()
        return lines

    def flush(self) -> list[str]:
        """The last, unterminated line, if any."""
        rest, self.pending = self.pending, ""
        return [rest] if rest else []


def plain(*values: object) -> list[Text]:
    """Table cells shown as they are: a ``str`` cell would be read as Rich markup, and a
    name, a path or guest text in brackets would vanish or style the table."""
    return [value if isinstance(value, Text) else Text(str(value)) for value in values]
