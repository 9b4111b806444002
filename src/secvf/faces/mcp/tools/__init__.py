"""The MCP tools, one module per area; importing a module registers its tools in
:data:`secvf.faces.mcp.registry.CATALOG`."""

from __future__ import annotations

import importlib

#: The tool modules, in the order their tools are listed.
MODULES = ("vms", "sandboxes", "exec", "files", "networks", "logs", "analyses")


def load() -> None:
    """Import every tool module (once)."""
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}")
