"""Network tools: isolated networks, captures and the packets in them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from secvf import api
from secvf.errors import NotFound

from ..confine import PathNotAllowed, confine
from ..confirm import DestructiveConfirmation, settle
from ..output import cap_list, jsonable, untrusted
from ..registry import tool
from ..state import current_state
from ..tiers import Tier

#: Packets one packets_query returns at most.
MAX_PACKETS = 1000


@tool(Tier.READ_ONLY, read_only=True, idempotent=True)
def network_list() -> dict[str, Any]:
    """Every isolated network: subnet, options, VMs, switch state."""
    return {"networks": jsonable(api.list_networks())}


@tool(Tier.READ_ONLY, read_only=True, idempotent=True)
def network_show(name: str) -> dict[str, Any]:
    """Network ``name``: its record, NICs (VM, MAC, address, counters, drops) and switch."""
    return jsonable(api.show_network(name))  # type: ignore[no-any-return]


@tool(Tier.FULL)
def network_create(name: str, subnet: str = "10.0.100.0/24",
                   isolate_guests: bool = False) -> dict[str, Any]:
    """Create isolated network ``name`` (``isolate_guests``: guests reach only the
    router NIC)."""
    return {"network": jsonable(api.create_network(name, subnet=subnet,
                                                   isolate_guests=isolate_guests))}


@tool(Tier.FULL, destructive=True)
def network_remove(name: str, confirmation: DestructiveConfirmation) -> dict[str, Any]:
    """Remove network ``name`` (no VM may use it). Asks the user."""
    settle(confirmation)
    api.remove_network(name)
    return {"name": name, "removed": True}


@tool(Tier.SAFE_MUTATE)
def capture_start(network: str, filter: str | None = None, vm: str | None = None,
                  duration_s: float | None = Field(None, gt=0),
                  max_frames: int | None = Field(None, gt=0)) -> dict[str, Any]:
    """Capture network ``network``'s frames to a pcapng file under $SECVF_HOME/captures
    until ``duration_s``, ``max_frames`` or capture_stop."""
    request = api.CaptureRequest(network=network, filter=filter, vm=vm,
                                 duration_s=duration_s, max_frames=max_frames)
    return current_state().jobs.start_capture(request).as_json()


@tool(Tier.SAFE_MUTATE)
def capture_stop(capture_id: str) -> dict[str, Any]:
    """Stop capture ``capture_id``; its file and counters."""
    capture = current_state().jobs.capture(capture_id)
    capture.stop()
    return capture.as_json()


def _packet_source(source: str) -> str | Path:
    """A network name, a file a capture of this server wrote, or a file in the roots."""
    state = current_state()
    if "/" not in source and not source.endswith((".pcap", ".pcapng")):
        return source
    path = Path(source)
    if path in state.jobs.capture_paths():
        return path
    try:
        return confine(path, state.settings.roots, must_exist=True)
    except PathNotAllowed as exc:
        raise NotFound(f"{exc} (captures this server started may be read too)") from None


@tool(Tier.SAFE_MUTATE, untrusted_output=True)
def packets_query(source: str, filter: str | None = None, preset: str | None = None,
                  limit: int = Field(100, gt=0, le=MAX_PACKETS)) -> dict[str, Any]:
    """Decoded packets of ``source`` (a network's always-on ring, or a capture file)
    that match ``filter`` (docs/packets.md) and ``preset``; at most ``limit``."""
    packets = [p.as_json() for p in api.read_packets(_packet_source(source), filter=filter,
                                                     preset=preset, limit=limit + 1)]
    return untrusted(cap_list("packets", packets, limit), ["packets"])
