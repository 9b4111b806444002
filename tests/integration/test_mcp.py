"""An agent-like MCP session against a real sandbox VM, through the SDK's in-process
client: create a sandbox, run Python, start and poll a long command, upload and
download a file, remove the sandbox (confirmed through elicitation)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from mcp import Client
from mcp_types import ElicitResult

from secvf.faces.mcp.server import build_server
from secvf.faces.mcp.settings import ServerSettings
from secvf.faces.mcp.tiers import Tier

pytestmark = pytest.mark.vm


def test_agent_flow_in_a_real_sandbox(vm_library: Path, tmp_path: Path) -> None:
    asked: list[str] = []

    async def approve(context, params) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"approve": True})

    (tmp_path / "in.txt").write_text("hello from the host\n")
    server, state = build_server(ServerSettings(tier=Tier.FULL, roots=(tmp_path,)))

    async def main() -> None:
        async with Client(server, elicitation_callback=approve) as c:
            async def call(tool: str, **args):
                result = await c.call_tool(tool, args)
                assert not result.is_error, result.content[0].text
                return result.structured_content

            name = (await call("sandbox_create", name="mcp-agent"))["name"]
            await call("sandbox_start", name=name)
            ran = await call("exec_run", name=name,
                             command=["python3", "-c", "print(6 * 7)"])
            assert ran["exit_code"] == 0 and ran["stdout"] == "42\n"
            assert ran["untrusted"]["fields"] == ["stderr", "stdout"]

            started = await call("exec_start", name=name,
                                 command="for i in 1 2 3; do echo line$i; sleep 1; done")
            output, exit_status = "", None
            while exit_status is None:
                polled = await call("exec_poll", process_id=started["process_id"], wait_s=5)
                output += polled["stdout"]
                exit_status = polled["exit"]
            assert output == "line1\nline2\nline3\n" and exit_status["exit_code"] == 0

            await call("file_put", name=name, guest_path="in.txt", host_path="in.txt")
            await call("exec_run", name=name, command="tr a-z A-Z < in.txt > out.txt")
            await call("file_get", name=name, guest_path="out.txt",
                       host_path=str(tmp_path / "out.txt"))
            inline = await call("file_get", name=name, guest_path="out.txt")
            assert inline["content"] == "HELLO FROM THE HOST\n"

            await call("sandbox_remove", name=name, purge=True, force=True)
            assert name not in {s["name"] for s in (await call("sandbox_list"))["sandboxes"]}

    try:
        anyio.run(main)
    finally:
        state.close()
    assert (tmp_path / "out.txt").read_text() == "HELLO FROM THE HOST\n"
    assert len(asked) == 1 and "sandbox_remove" in asked[0]
