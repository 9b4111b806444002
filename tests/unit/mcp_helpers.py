"""Helpers of the MCP tests: a server in this process, its audit lines."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mcp import Client
from mcp_types import ElicitResult

from secvf.faces.mcp.server import build_server
from secvf.faces.mcp.settings import ServerSettings
from secvf.faces.mcp.tiers import Tier


def client(tier: Tier = Tier.SAFE_MUTATE, *, mode: str = "auto",
           elicit: Callable[..., Any] | None = None, **settings: Any) -> Client:
    """An in-process client of a fresh server (``mode``: ``legacy`` for the
    handshake protocol, ``auto`` for 2026-07-28)."""
    server, _ = build_server(ServerSettings(tier=tier, **settings))
    return Client(server, mode=mode, elicitation_callback=elicit)


def answer(action: str, approve: bool | None = None) -> Callable[..., Any]:
    """An elicitation callback that answers every question with ``action``."""
    asked: list[Any] = []

    async def callback(context: Any, params: Any) -> ElicitResult:
        asked.append(params)
        content = None if approve is None else {"approve": approve}
        return ElicitResult(action=action, content=content)  # type: ignore[arg-type]

    callback.asked = asked  # type: ignore[attr-defined]
    return callback


def audit_lines(tool: str | None = None) -> list[dict[str, Any]]:
    """Every MCP audit line in this test's $SECVF_HOME (of ``tool``), in order."""
    logs = Path(os.environ["SECVF_HOME"]) / "logs"
    lines = [json.loads(line) for path in sorted(logs.glob("mcp-*.jsonl"))
             for line in path.read_text().splitlines()]
    return [line for line in lines if tool is None or line.get("tool") == tool]


def after_line(tool: str) -> dict[str, Any]:
    """The last *after* line of ``tool``."""
    return [line for line in audit_lines(tool) if line["phase"] == "after"][-1]
