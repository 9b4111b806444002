"""The tool catalog: every tool, its minimum tier and its MCP annotations.

Tools are plain functions in :mod:`.tools` decorated with :func:`tool`; their type
hints are their input schema (the SDK validates every call against it), their
docstring is their description. :func:`tool` also turns SecVF's errors into tool
errors the model can act on (``NotFound: no VM named 'x'``) and records the error
class as the audit line's ``error_code``; anything else is a crash whose text stays
on the server (``error_code`` ``internal``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations

from secvf.errors import SecVFError

from . import audit
from .tiers import Tier

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ToolSpec:
    """One tool: its function, minimum tier and behaviour hints."""

    name: str
    fn: Callable[..., Any]
    tier: Tier
    read_only: bool
    destructive: bool
    idempotent: bool
    open_world: bool
    untrusted_output: bool

    @property
    def annotations(self) -> ToolAnnotations:
        """The MCP tool annotations (``readOnlyHint`` …)."""
        return ToolAnnotations(read_only_hint=self.read_only, destructive_hint=self.destructive,
                               idempotent_hint=self.idempotent, open_world_hint=self.open_world)

    @property
    def meta(self) -> dict[str, Any]:
        """The ``_meta`` SecVF adds to the tool's listing."""
        return {"secvf/tier": self.tier.value, "secvf/untrustedOutput": self.untrusted_output}


#: Every tool there is, by name (filled as :mod:`.tools` is imported).
CATALOG: dict[str, ToolSpec] = {}


def tool(tier: Tier, *, read_only: bool = False, destructive: bool = False,
         idempotent: bool = False, open_world: bool = False,
         untrusted_output: bool = False) -> Callable[[F], F]:
    """Register the decorated function as a tool needing ``tier``."""
    if read_only and (destructive or tier is not Tier.READ_ONLY):
        raise ValueError("a read-only tool is neither destructive nor above the read-only tier")

    def register(fn: F) -> F:
        def failed(record: audit.CallRecord | None, exc: Exception) -> Exception:
            """What the client sees of ``exc`` (and what the audit line records)."""
            if isinstance(exc, ToolError):
                return exc
            if isinstance(exc, SecVFError):
                code = type(exc).__name__
                if record is not None:
                    record.fail(code, str(exc))
                return ToolError(f"{code}: {exc}")
            if record is not None:  # the SDK keeps a crash's text from the client; we keep it
                record.fail("internal", f"{type(exc).__name__}: {exc}")
            return exc

        def started() -> audit.CallRecord | None:
            record = audit.current()
            if record is not None:
                record.body_ran = True
            return record

        run: Callable[..., Any]
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                record = started()
                try:
                    return await fn(*args, **kwargs)
                except Exception as exc:
                    error = failed(record, exc)
                    if error is exc:
                        raise
                    raise error from exc

            run = run_async
        else:
            @functools.wraps(fn)
            def run_sync(*args: Any, **kwargs: Any) -> Any:
                record = started()
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:
                    error = failed(record, exc)
                    if error is exc:
                        raise
                    raise error from exc

            run = run_sync

        name = fn.__name__
        if name in CATALOG:
            raise ValueError(f"tool {name!r} is defined twice")
        CATALOG[name] = ToolSpec(name, run, tier, read_only, destructive, idempotent,
                                 open_world, untrusted_output)
        return fn

    return register


def catalog() -> dict[str, ToolSpec]:
    """Every tool, by name (the tool modules are imported first)."""
    from . import tools

    tools.load()
    return CATALOG
