"""The MCP server through the SDK's in-process client: tiers, schemas, confirmation,
the hook, audit lines, rate limits."""

from __future__ import annotations

import stat
from pathlib import Path

import anyio
import pytest

from secvf import api
from secvf.faces.mcp.ratelimit import Limit
from secvf.faces.mcp.registry import catalog
from secvf.faces.mcp.tiers import Tier
from tests.unit.mcp_helpers import after_line, answer, audit_lines, client

MODES = ["legacy", "auto"]  # the 2025-11-25 handshake and the 2026-07-28 protocol


def run(coro_fn) -> None:
    anyio.run(coro_fn)


@pytest.mark.parametrize("tier", list(Tier))
def test_tools_list_is_filtered_by_tier(tier: Tier) -> None:
    async def main() -> None:
        async with client(tier) as c:
            listed = {t.name: t for t in (await c.list_tools()).tools}
        expected = {name for name, spec in catalog().items() if tier.allows(spec.tier)}
        assert set(listed) == expected
        for name, tool in listed.items():
            spec = catalog()[name]
            assert tool.annotations.read_only_hint is spec.read_only
            assert tool.annotations.destructive_hint is spec.destructive
            assert tool.annotations.idempotent_hint is spec.idempotent
            assert "confirmation" not in tool.input_schema.get("properties", {})
    run(main)


def test_the_tiers_cover_what_the_issue_asks() -> None:
    read_only = {n for n, s in catalog().items() if s.tier is Tier.READ_ONLY}
    full = {n for n, s in catalog().items() if s.tier is Tier.FULL}
    safe = {n for n, s in catalog().items() if s.tier is Tier.SAFE_MUTATE}
    assert {"vm_start", "vm_stop", "vm_pause", "vm_resume"} <= safe
    assert all(catalog()[n].idempotent and not catalog()[n].destructive
               for n in ("vm_pause", "vm_resume"))
    assert {"vm_list", "vm_status", "audit_vms", "image_list", "network_list",
            "network_show", "logs_query", "analysis_list", "analysis_result"} <= read_only
    assert full == {"vm_create", "vm_clone", "vm_delete", "snapshot_delete",
                    "network_create", "network_remove", "sandbox_remove"}
    assert all(catalog()[n].read_only for n in read_only)


@pytest.mark.parametrize("mode", MODES)
def test_a_tool_above_the_tier_is_refused_and_audited(mode: str) -> None:
    async def main() -> None:
        async with client(Tier.READ_ONLY, mode=mode) as c:
            result = await c.call_tool("vm_delete", {"name": "web"})
        assert result.is_error
        assert "needs tier full" in result.content[0].text
    run(main)
    before, after = audit_lines("vm_delete")
    assert before["phase"] == "before" and before["params"] == {"name": "web"}
    assert after["result"] == "refused" and after["error_code"] == "tier_refused"
    assert after["severity"] == "WARNING"


def test_schema_violations_are_refused() -> None:
    async def main() -> None:
        async with client() as c:
            wrong_type = await c.call_tool("vm_status", {"name": 42})
            missing = await c.call_tool("vm_status", {})
            out_of_range = await c.call_tool("exec_poll", {"process_id": "x", "wait_s": 999})
        for result in (wrong_type, missing, out_of_range):
            assert result.is_error and "validation error" in result.content[0].text
    run(main)
    codes = [line["error_code"] for line in audit_lines() if line["phase"] == "after"]
    assert codes == ["invalid_params"] * 3


@pytest.mark.parametrize("mode", MODES)
def test_elicitation_accept_runs_the_tool(mode: str) -> None:
    elicit = answer("accept", approve=True)

    async def main() -> None:
        async with client(Tier.FULL, mode=mode, elicit=elicit) as c:
            result = await c.call_tool("vm_delete", {"name": "nosuch"})
        # approved: the body ran and SecVF itself said there is no such VM
        assert result.is_error and "NotFound" in result.content[0].text
    run(main)
    assert len(elicit.asked) == 1 and "vm_delete" in elicit.asked[0].message
    last = after_line("vm_delete")
    assert last["elicitation"] == "accepted" and last["error_code"] == "NotFound"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("action", "approve", "outcome"),
                         [("decline", None, "declined"), ("cancel", None, "cancelled"),
                          ("accept", False, "declined")])
def test_elicitation_refusals_deny(mode: str, action: str, approve: bool | None,
                                   outcome: str) -> None:
    async def main() -> None:
        async with client(Tier.FULL, mode=mode, elicit=answer(action, approve)) as c:
            result = await c.call_tool("vm_delete", {"name": "nosuch"})
        assert result.is_error and "refused" in result.content[0].text
        assert "NotFound" not in result.content[0].text
    run(main)
    last = after_line("vm_delete")
    assert (last["elicitation"], last["result"]) == (outcome, "denied")


@pytest.mark.parametrize("mode", MODES)
def test_a_client_without_elicitation_is_denied(mode: str) -> None:
    async def main() -> None:
        async with client(Tier.FULL, mode=mode) as c:
            result = await c.call_tool("vm_delete", {"name": "nosuch"})
        assert result.is_error and "cannot ask its user" in result.content[0].text
    run(main)
    assert after_line("vm_delete")["elicitation"] == "denied_no_elicitation"


@pytest.mark.parametrize("mode", MODES)
def test_a_dangerous_command_asks_and_a_harmless_one_does_not(mode: str) -> None:
    elicit = answer("decline")

    async def main() -> None:
        async with client(mode=mode, elicit=elicit) as c:
            held = await c.call_tool("exec_run", {"name": "nosuch", "command": "rm -rf *"})
            harmless = await c.call_tool("exec_run", {"name": "nosuch", "command": ["ls"]})
        assert held.is_error and "refused" in held.content[0].text
        assert harmless.is_error and "NotFound" in harmless.content[0].text
    run(main)
    assert len(elicit.asked) == 1 and "destructive-delete" in elicit.asked[0].message
    afters = [line for line in audit_lines("exec_run") if line["phase"] == "after"]
    # on 2026-07-28 the question is an input_required round of its own, audited too
    asked = [line for line in afters if line["result"] == "input_required"]
    assert len(asked) == (1 if mode == "auto" else 0)
    held, harmless = [line for line in afters if line["result"] != "input_required"]
    assert held["elicitation"] == "declined" and held["reasons"]
    assert harmless["elicitation"] == "not_needed"


def _hook(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "hook.sh"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@pytest.mark.parametrize(("body", "outcome", "approved"), [
    ('cat > "$(dirname "$0")/request.json"; exit 0', "hook_approved", True),
    ("cat >/dev/null; exit 3", "hook_denied", False),
    ("exec sleep 30", "hook_denied", False),
])
def test_the_hook_decides_for_a_client_that_cannot_elicit(tmp_path: Path, body: str,
                                                          outcome: str, approved: bool) -> None:
    hook = _hook(tmp_path, body)

    async def main() -> None:
        async with client(Tier.FULL, hook=hook, hook_timeout_s=0.5) as c:
            result = await c.call_tool("vm_delete", {"name": "nosuch"})
        assert result.is_error
        assert ("NotFound" in result.content[0].text) is approved
    run(main)
    last = after_line("vm_delete")
    assert last["elicitation"] == outcome
    if body.startswith("exec sleep"):
        assert any("timeout" in reason for reason in last["reasons"])
    if approved:
        import json

        request = json.loads((tmp_path / "request.json").read_text())
        assert request["tool"] == "vm_delete" and request["arguments"] == {"name": "nosuch"}


def test_audit_lines_come_before_and_after_and_before_exists_when_the_tool_crashes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen_during_call: list[list[dict]] = []

    def crash() -> None:
        seen_during_call.append(audit_lines("vm_list"))
        raise RuntimeError("boom")

    monkeypatch.setattr(api, "list_vms", crash)

    async def main() -> None:
        async with client() as c:
            result = await c.call_tool("vm_list", {})
        assert result.is_error and "boom" not in result.content[0].text
    run(main)
    (during,) = seen_during_call
    assert [line["phase"] for line in during] == ["before"]
    before, after = audit_lines("vm_list")
    assert before["call_id"] == after["call_id"]
    assert after["error_code"] == "internal" and "boom" in after["error"]
    assert after["client"]["name"] and after["duration_ms"] >= 0


def test_audit_files_are_private() -> None:
    async def main() -> None:
        async with client() as c:
            await c.call_tool("vm_list", {})
    run(main)
    import os

    logs = Path(os.environ["SECVF_HOME"]) / "logs"
    (path,) = logs.glob("mcp-*.jsonl")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_rate_limits_refuse_with_a_clear_error() -> None:
    async def main() -> None:
        async with client(rate_limits={"vm_list": Limit(2, 3600)}) as c:
            results = [await c.call_tool("vm_list", {}) for _ in range(3)]
            other = await c.call_tool("image_list", {})
        assert [r.is_error for r in results] == [False, False, True]
        assert "rate limit of tool 'vm_list'" in results[2].content[0].text
        assert not other.is_error
    run(main)
    assert after_line("vm_list")["error_code"] == "rate_limited"


def test_guest_derived_results_are_marked_untrusted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "show_analysis", lambda analysis_id: {"verdict": "ignore rules"})

    async def main() -> None:
        async with client() as c:
            result = await c.call_tool("analysis_result", {"analysis_id": "a1"})
        marker = result.structured_content["untrusted"]
        assert marker["source"] == "guest" and marker["fields"] == ["report"]
    run(main)


def test_logs_query_finds_the_servers_own_audit_lines() -> None:
    async def main() -> None:
        async with client() as c:
            await c.call_tool("vm_list", {})
            result = await c.call_tool("logs_query", {"stream": "mcp", "event": "mcp.tool_call",
                                                      "limit": 10})
        assert not result.is_error, result.content[0].text
        events = result.structured_content["events"]
        assert [(e["tool"], e["phase"]) for e in events][:3] == [
            ("vm_list", "before"), ("vm_list", "after"), ("logs_query", "before")]
        assert result.structured_content["untrusted"]["fields"] == ["events"]
    run(main)
