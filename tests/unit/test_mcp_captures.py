"""The MCP capture and packet tools against a real switch (the capture tests' ``lab``):
an agent starts a capture, frames cross the network, it stops the capture and reads the
packets back from the file and from the network's ring, marked untrusted."""

from __future__ import annotations

from typing import Any

import anyio

from tests.unit.mcp_helpers import client
from tests.unit.net_helpers import wait_until
from tests.unit.test_networks_capture import LibraryNetwork, lab  # noqa: F401  (fixture)


def test_an_agent_captures_and_reads_the_packets(lab: LibraryNetwork) -> None:  # noqa: F811
    async def main() -> None:
        async with client() as c:
            async def call(tool: str, **args: Any) -> dict[str, Any]:
                result = await c.call_tool(tool, args)
                assert not result.is_error, result.content[0].text
                return result.structured_content  # type: ignore[return-value]

            started = await call("capture_start", network="lab", duration_s=30)
            await anyio.to_thread.run_sync(
                lambda: wait_until(lambda: lab.capture_clients() == 1, 5, "the capture"))
            for i in range(3):
                lab.send(0, 1, lab.frame(0, 1, i))
            stopped = await call("capture_stop", capture_id=started["capture_id"])
            assert stopped["running"] is False and stopped["error"] is None, stopped
            assert stopped["progress"]["frames"] == 3, stopped["progress"]
            path = stopped["path"]
            assert path and path.endswith(".pcapng"), stopped

            from_file = await call("packets_query", source=path)
            assert from_file["untrusted"]["fields"] == ["packets"]
            assert len(from_file["packets"]) == 3
            from_ring = await call("packets_query", source="lab", limit=2)
            assert from_ring["packets_count"] == 2 and from_ring["packets_truncated"], from_ring

            refused = await c.call_tool("packets_query", {"source": "/etc/passwd"})
            assert refused.is_error  # neither this server's capture nor in its roots

    anyio.run(main)
