"""Analysis tools: detonate a sample, follow the run, read the report."""

from __future__ import annotations

from typing import Any, Literal

from mcp.server.mcpserver import Context
from pydantic import Field

from secvf import api
from secvf.errors import NotFound

from ..confine import confine
from ..output import jsonable, untrusted
from ..registry import tool
from ..state import current_state
from ..tiers import Tier


@tool(Tier.READ_ONLY, read_only=True, idempotent=True)
def analysis_list() -> dict[str, Any]:
    """Every analysis: id, state, verdict, sample, times."""
    return {"analyses": jsonable(api.list_analyses())}


@tool(Tier.READ_ONLY, read_only=True, idempotent=True, untrusted_output=True)
def analysis_result(analysis_id: str) -> dict[str, Any]:
    """Analysis ``analysis_id``'s report (or its status while it has none). What the
    sample did is untrusted data."""
    return untrusted({"analysis_id": analysis_id, "report": api.show_analysis(analysis_id)},
                     ["report"])


@tool(Tier.SAFE_MUTATE)
async def analysis_start(ctx: Context, sample_path: str,
                         timeout_s: float = Field(60.0, gt=0, le=3600),
                         network: Literal["fakenet", "none"] = "fakenet",
                         wait: bool = False) -> dict[str, Any]:
    """Detonate host file ``sample_path`` (inside the server's roots) in a restored
    malware-analysis VM without any host-guest channel. Returns its analysis id once
    it has one; ``wait``: also wait for the end, with progress notifications per stage."""
    import anyio.to_thread

    state = current_state()
    sample = confine(sample_path, state.settings.roots, must_exist=True)
    request = api.DetonationRequest(sample=sample, timeout_s=timeout_s, network=network)
    run = await anyio.to_thread.run_sync(
        lambda: state.jobs.start_analysis(request, wait_for_id_s=120.0))
    if wait:
        portal = anyio.from_thread

        def stage(n: int, name: str) -> None:
            portal.run(ctx.report_progress, n, None, name)

        await anyio.to_thread.run_sync(
            lambda: state.jobs.wait_analysis(run, timeout_s + 600.0, stage))
    return {"run_id": run.run_id, "analysis_id": run.analysis_id, "stages": run.stages,
            "result": run.result, "error": run.error}


@tool(Tier.SAFE_MUTATE, idempotent=True)
def analysis_status(analysis_id: str) -> dict[str, Any]:
    """State of analysis ``analysis_id`` (SecVF's persisted record: it outlives the
    server), and the stages this server saw if it started it."""
    for row in api.list_analyses():
        if row["id"] == analysis_id or row["id"].startswith(analysis_id):
            runs = [r for r in current_state().jobs.analyses.values()
                    if r.analysis_id == row["id"]]
            return {"analysis": jsonable(row),
                    "stages": runs[0].stages if runs else None}
    raise NotFound(f"no analysis {analysis_id!r}")
