"""Human confirmation of destructive tools and dangerous exec commands.

The confirmation is a *resolved* tool parameter (the SDK's ``Resolve``): it is not in
the tool's input schema, so the model cannot fill it in; the server asks the human
through MCP elicitation, and the SDK carries the question the way the negotiated
protocol version does it (a mid-call ``elicitation/create`` request up to 2025-11-25,
an ``input_required`` result and retry from 2026-07-28).

A client that cannot elicit gets the call **denied**, unless the configured hook
script approves it (:mod:`.hook`). Every outcome is recorded in the call's audit
line (``elicitation``: ``not_needed``, ``accepted``, ``declined``, ``cancelled``,
``hook_approved``, ``hook_denied``, ``denied_no_elicitation``; ``reasons``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

import anyio.to_thread
from mcp.server.elicitation import (
    AcceptedElicitation,
    CancelledElicitation,
    DeclinedElicitation,
    ElicitationResult,
)
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.resolve import Elicit, Resolve
from pydantic import BaseModel, Field

from . import audit
from .danger import find_dangers
from .hook import run_hook
from .state import current_state

#: How much of the arguments the question shows.
_SHOWN = 600


class Confirmation(BaseModel):
    """What the human is asked: run it or not."""

    approve: bool = Field(description="Approve this call? (false: refuse it)")


@dataclass(frozen=True)
class Decision:
    """A decision reached without asking (not needed, or the hook's verdict)."""

    approved: bool
    how: str


class ConfirmationDenied(ToolError):
    """The human (or the hook) refused the call, or nobody could be asked."""


def _call_arguments(ctx: Context) -> tuple[str, dict[str, Any]]:
    params = ctx.request_context.params or {}
    return str(params.get("name", "?")), dict(params.get("arguments") or {})


def _client_can_elicit(ctx: Context) -> bool:
    capabilities = ctx.client_capabilities
    elicitation = capabilities.elicitation if capabilities is not None else None
    # a bare ``elicitation: {}`` (before modes existed) counts as form support
    return elicitation is not None and (elicitation.form is not None or elicitation.url is None)


async def _ask(ctx: Context, reasons: list[str]) -> Decision | Elicit[Confirmation]:
    tool, arguments = _call_arguments(ctx)
    record = audit.current()
    if record is not None:
        record.reasons = reasons
    if _client_can_elicit(ctx):
        shown = json.dumps(arguments, ensure_ascii=False)[:_SHOWN]
        return Elicit(f"An AI agent wants to call SecVF tool '{tool}' with {shown}.\n"
                      f"Held because: {'; '.join(reasons)}.\nApprove it?", Confirmation)
    state = current_state()
    if state.settings.hook is None:
        return Decision(False, "denied_no_elicitation")
    request = {"tool": tool, "arguments": arguments, "reasons": reasons,
               "tier": state.settings.tier.value,
               "client": {"name": record.client_name if record else None,
                          "version": record.client_version if record else None}}
    verdict = await anyio.to_thread.run_sync(
        lambda: run_hook(state.settings.hook, request,  # type: ignore[arg-type]
                         timeout_s=state.settings.hook_timeout_s))
    if record is not None:
        record.reasons = [*reasons, f"hook: {verdict.reason}"]
    return Decision(verdict.approved, "hook_approved" if verdict.approved else "hook_denied")


async def confirm_destructive(ctx: Context) -> Decision | Elicit[Confirmation]:
    """Resolver of every destructive tool: always ask."""
    tool, _ = _call_arguments(ctx)
    return await _ask(ctx, [f"'{tool}' is destructive"])


async def confirm_command(ctx: Context,
                          command: str | list[str]) -> Decision | Elicit[Confirmation]:
    """Resolver of the exec tools: ask only if ``command`` matches a danger pattern."""
    dangers = find_dangers(command)
    if not dangers:
        return Decision(True, "not_needed")
    return await _ask(ctx, [f"{d.category} (matched {d.matched!r})" for d in dangers])


#: The parameter a destructive tool declares: ``confirmation: DestructiveConfirmation``.
DestructiveConfirmation = Annotated[ElicitationResult[Confirmation], Resolve(confirm_destructive)]

#: The parameter an exec tool declares (it must also take ``command``).
CommandConfirmation = Annotated[ElicitationResult[Confirmation], Resolve(confirm_command)]


def settle(outcome: ElicitationResult[Any]) -> None:
    """Record ``outcome`` in the audit line; raise ConfirmationDenied unless approved."""
    record = audit.current()
    if isinstance(outcome, AcceptedElicitation) and isinstance(outcome.data, Decision):
        approved, how = outcome.data.approved, outcome.data.how
    elif isinstance(outcome, AcceptedElicitation):
        approved = bool(getattr(outcome.data, "approve", False))
        how = "accepted" if approved else "declined"
    elif isinstance(outcome, DeclinedElicitation):
        approved, how = False, "declined"
    elif isinstance(outcome, CancelledElicitation):
        approved, how = False, "cancelled"
    else:  # pragma: no cover - the SDK's union has no other member
        approved, how = False, "unknown"
    if record is not None:
        record.elicitation = how
    if approved:
        return
    reasons = "; ".join(record.reasons) if record and record.reasons else "it needs confirmation"
    advice = {
        "denied_no_elicitation": "this MCP client cannot ask its user (no elicitation), and no "
                                 "confirmation hook is configured (secvf mcp serve --hook SCRIPT)",
        "hook_denied": "the confirmation hook refused it",
    }.get(how, f"the user {how} it")
    if record is not None:
        record.fail("confirmation_denied", f"{how}: {reasons}", result="denied")
    raise ConfirmationDenied(f"refused: {advice} (held because: {reasons})")

