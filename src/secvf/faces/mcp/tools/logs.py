"""Log tools: query the security, exec and MCP audit logs."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from secvf import api

from ..output import cap_list, jsonable, untrusted
from ..registry import tool
from ..tiers import Tier

#: Events one logs_query returns at most.
MAX_EVENTS = 1000


@tool(Tier.READ_ONLY, read_only=True, idempotent=True, untrusted_output=True)
def logs_query(stream: Literal["security", "exec", "mcp"] = "security",
               since: datetime | None = None, until: datetime | None = None,
               severity: Literal["INFO", "WARNING", "ERROR", "CRITICAL"] | None = None,
               vm: str | None = None, event: str | None = None,
               limit: int = Field(100, gt=0, le=MAX_EVENTS)) -> dict[str, Any]:
    """Events of log ``stream`` between ``since`` and ``until`` (RFC 3339), at least
    ``severity``, of VM ``vm`` and event name ``event``; at most ``limit``. Events can
    quote what guests sent: untrusted."""
    events = api.query_logs(stream, since=since, until=until, severity=severity, vm=vm,
                            event=event, limit=limit + 1)
    return untrusted(cap_list("events", jsonable(events), limit), ["events"])
