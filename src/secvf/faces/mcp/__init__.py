"""SecVF's MCP server (``secvf mcp serve``): agents drive sandboxes, VMs, networks and
analyses through the official ``mcp`` SDK, with capability tiers, human confirmation,
an audit trail and untrusted-output marking (docs/mcp.md).

One concept per module: :mod:`.server` (the SDK server, the audit/tier/rate-limit
middleware, the transports), :mod:`.registry` (the tool catalog), :mod:`.tools` (the
tools), :mod:`.tiers`, :mod:`.confirm` (elicitation), :mod:`.danger` (the patterns),
:mod:`.hook` (the confirmation script), :mod:`.audit`, :mod:`.output` (caps and
untrusted marking), :mod:`.confine` (host paths), :mod:`.auth` (the HTTP token),
:mod:`.ratelimit`, :mod:`.settings`, :mod:`.state`, :mod:`.processes` and :mod:`.jobs`
(work that outlives a call). Importing this package loads the SDK: the CLI imports it
only inside ``secvf mcp`` commands.
"""
