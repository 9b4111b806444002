"""The MCP audit trail: one JSON line before every tool call and one after.

Lines go to the ``mcp`` stream of SecVF's event log (``$SECVF_HOME/logs/mcp-DAY.jsonl``,
mode 0600), so ``secvf logs`` and the ``logs_query`` tool see them. The *before* line is
written before anything runs — before the tier check, the rate limit, argument
validation and confirmation — so a call that crashes the tool, or the server, still
left one. The *after* line says how it ended: ``result`` (``ok``, ``error``,
``refused``, ``denied``, ``input_required``), ``error_code``, the confirmation's
outcome and the duration.

Parameters are kept as JSON up to :data:`PARAMS_CAP` bytes, with their full size. A
record that cannot be serialised is written in a reduced form (the fixed scalar
fields and why), never dropped.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from secvf import api

#: Parameters beyond this many bytes (as JSON) are cut in the audit line.
PARAMS_CAP = 1024

#: The event name of every audit line.
EVENT = "mcp.tool_call"

#: Outcomes that make the *after* line a WARNING.
_WARN_RESULTS = frozenset({"refused", "denied", "rate_limited"})

_ids = itertools.count(1)


@dataclass
class CallRecord:
    """What the audit lines of one ``tools/call`` say; filled in as the call goes."""

    tool: str
    arguments: Any
    server_tier: str
    tier: str | None = None  # the tool's minimum tier (None: no such tool)
    client_name: str | None = None
    client_version: str | None = None
    peer: str | None = None
    transport: str = "stdio"
    protocol_version: str | None = None
    call_id: str = field(default_factory=lambda: f"{os.getpid()}-{next(_ids)}")
    started: float = field(default_factory=time.monotonic)
    elicitation: str = "not_needed"
    reasons: list[str] = field(default_factory=list)
    result: str | None = None
    error_code: str | None = None
    error: str | None = None
    vm: str | None = None
    body_ran: bool = False  # the tool's own code started (arguments were valid)

    def fail(self, code: str, message: str, *, result: str = "error") -> None:
        """Record that the call ended with error ``code`` (the first failure wins)."""
        if self.error_code is None:
            self.error_code = code
            self.error = message[:PARAMS_CAP]
            self.result = result


_CURRENT: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "secvf_mcp_call", default=None)


def current() -> CallRecord | None:
    """The record of the ``tools/call`` this code runs in (None outside one)."""
    return _CURRENT.get()


def bind(record: CallRecord) -> contextvars.Token[CallRecord | None]:
    """Make ``record`` the current call's record (undo with :func:`unbind`)."""
    return _CURRENT.set(record)


def unbind(token: contextvars.Token[CallRecord | None]) -> None:
    """Undo :func:`bind`."""
    _CURRENT.reset(token)


def params_fields(arguments: Any) -> dict[str, Any]:
    """``params`` (or ``params_text`` cut at :data:`PARAMS_CAP`), ``params_bytes`` and
    ``params_truncated`` for an audit line."""
    text = json.dumps(arguments, default=repr, separators=(",", ":"), ensure_ascii=False)
    size = len(text.encode())
    if size <= PARAMS_CAP:
        return {"params": arguments, "params_bytes": size, "params_truncated": False}
    cut = text.encode()[:PARAMS_CAP].decode("utf-8", "ignore")
    return {"params_text": cut, "params_bytes": size, "params_truncated": True}


def _fields(record: CallRecord, phase: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "phase": phase, "call_id": record.call_id, "tool": record.tool,
        "tier": record.tier, "server_tier": record.server_tier,
        "client": {"name": record.client_name, "version": record.client_version},
        "transport": record.transport, "peer": record.peer,
        "protocol_version": record.protocol_version,
    }
    if phase == "before":
        fields.update(params_fields(record.arguments))
    else:
        fields.update({
            "elicitation": record.elicitation, "reasons": record.reasons,
            "result": record.result or "ok", "error_code": record.error_code,
            "error": record.error,
            "duration_ms": round((time.monotonic() - record.started) * 1000, 3),
        })
    return fields


def _reduced(record: CallRecord, phase: str, why: Exception) -> dict[str, Any]:
    """The fields of a line that could not be serialised: strings and numbers only."""
    def text(value: Any) -> str | None:
        if value is None:
            return None
        try:
            return str(value)[:PARAMS_CAP]
        except Exception:  # a __str__ that raises: the type still says something
            return f"<unprintable {type(value).__name__}>"

    return {"phase": phase, "call_id": record.call_id, "tool": text(record.tool),
            "tier": record.tier, "server_tier": record.server_tier,
            "result": record.result if phase == "after" else None,
            "error_code": record.error_code, "elicitation": record.elicitation,
            "reduced": True, "reduced_reason": text(why)}


def write(record: CallRecord, phase: str) -> dict[str, Any]:
    """Write the ``phase`` (``before`` or ``after``) line of ``record``; return it.

    Never raises and never drops the line: what cannot be serialised is written
    reduced (``"reduced": true`` and the reason).
    """
    severity = "WARNING" if phase == "after" and record.result in _WARN_RESULTS else "INFO"
    try:
        fields = _fields(record, phase)
        json.dumps(fields, default=str)  # what the log writer does: cycles, bad keys fail
    except Exception as exc:  # noqa: BLE001 - anything unserialisable is reduced
        fields = _reduced(record, phase, exc)
    return api.write_log_event("mcp", EVENT, severity=severity, vm=record.vm, **fields)
