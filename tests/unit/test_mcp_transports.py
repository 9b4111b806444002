"""The MCP server as clients reach it: a ``secvf mcp serve`` subprocess on stdio, and
one on streamable HTTP at 127.0.0.1 with and without the bearer token."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from secvf.faces.mcp.registry import catalog
from secvf.faces.mcp.tiers import Tier
from tests.unit.mcp_helpers import audit_lines

SECVF = str(Path(sys.executable).parent / "secvf")


def test_a_stdio_subprocess_lists_the_tools_of_its_tier() -> None:
    params = StdioServerParameters(command=SECVF, args=["mcp", "serve", "--tier", "safe-mutate"],
                                   env=dict(os.environ))

    async def main() -> set[str]:
        async with Client(params) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            result = await c.call_tool("vm_list", {})
            assert not result.is_error and result.structured_content == {"vms": []}
            return names

    names = anyio.run(main)
    assert names == {n for n, s in catalog().items() if Tier.SAFE_MUTATE.allows(s.tier)}
    assert [line["phase"] for line in audit_lines("vm_list")] == ["before", "after"]
    assert audit_lines("vm_list")[0]["transport"] == "stdio"


@pytest.fixture
def http_server() -> Iterator[str]:
    proc = subprocess.Popen([SECVF, "mcp", "serve", "--transport", "http",
                             "--listen", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, f"no URL in {line!r}"
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(30)


def _token() -> str:
    home = Path(os.environ["SECVF_HOME"])
    return (home / "config" / "mcp" / "http-token").read_text().strip()


def _call(url: str, headers: dict[str, str]) -> tuple[set[str], dict]:
    async def main() -> tuple[set[str], dict]:
        async with create_mcp_http_client(headers=headers) as http:
            async with Client(streamable_http_client(url, http_client=http)) as c:
                names = {t.name for t in (await c.list_tools()).tools}
                result = await c.call_tool("vm_list", {})
                return names, result.structured_content
    return anyio.run(main)


def test_http_with_the_token_works_and_the_peer_is_audited(http_server: str) -> None:
    names, result = _call(http_server, {"Authorization": f"Bearer {_token()}"})
    assert "vm_list" in names and "exec_run" not in names  # read-only by default
    assert result == {"vms": []}
    after = [line for line in audit_lines("vm_list") if line["phase"] == "after"][-1]
    assert after["transport"] == "http" and after["peer"].startswith("127.0.0.1:")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic x"}])
def test_http_without_the_right_token_is_401(http_server: str, headers: dict) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    response = httpx2.post(http_server, json=body, headers={
        **headers, "Accept": "application/json, text/event-stream"})
    assert response.status_code == 401
    with pytest.raises(Exception):  # noqa: B017 - the SDK's client fails as it likes
        _call(http_server, headers)
    assert audit_lines() == []


def test_http_keeps_dns_rebinding_protection(http_server: str) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    response = httpx2.post(http_server, json=body, headers={
        "Authorization": f"Bearer {_token()}", "Host": "evil.example:80",
        "Accept": "application/json, text/event-stream"})
    assert response.status_code in (400, 403, 421)
