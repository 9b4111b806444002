"""``secvf mcp serve`` and ``secvf mcp token``: the MCP server for AI agents.

The server itself is :mod:`secvf.faces.mcp`; it (and the ``mcp`` SDK) is imported only
when one of these commands runs, so ``secvf --help`` stays light.
"""

from __future__ import annotations

from pathlib import Path

import click

from secvf.faces.cli.common import print_json


@click.group("mcp")
def mcp() -> None:
    """Serve SecVF to AI agents over the Model Context Protocol."""


@mcp.command("serve")
@click.option("--tier", type=click.Choice(["read-only", "safe-mutate", "full"]),
              default="read-only", show_default=True,
              help="What the agent may do: tools above it are absent and refused.")
@click.option("--transport", type=click.Choice(["stdio", "http"]), default="stdio",
              show_default=True)
@click.option("--listen", default="127.0.0.1:8765", show_default=True, metavar="HOST:PORT",
              help="Where the HTTP transport listens (port 0: any free one).")
@click.option("--root", "roots", multiple=True, metavar="DIR",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A host directory file tools may read and write (repeatable).")
@click.option("--hook", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Script that approves (exit 0) or denies a held call when the client "
                   "cannot ask its user.")
@click.option("--hook-timeout", type=click.FloatRange(min=0.1), default=30.0,
              show_default=True, metavar="SECONDS")
@click.option("--rate-limit", "rate_limits", multiple=True, metavar="TOOL=N/SECONDS",
              help="Per-tool rate limit (repeatable; TOOL 'default' for every other tool).")
@click.option("--output-cap", type=click.IntRange(min=1), default=64 * 1024,
              show_default=True, metavar="BYTES", help="Bytes per output field a result carries.")
@click.option("--max-file-bytes", type=click.IntRange(min=1), default=64 * 1024 * 1024,
              show_default=True, metavar="BYTES", help="Largest file file_put/file_get move.")
def mcp_serve(tier: str, transport: str, listen: str, roots: tuple[Path, ...],
              hook: Path | None, hook_timeout: float, rate_limits: tuple[str, ...],
              output_cap: int, max_file_bytes: int) -> None:
    """Run the MCP server on stdio (what an MCP client launches) or streamable HTTP
    (127.0.0.1 by default, bearer token required; see `secvf mcp token`)."""
    from secvf.faces.mcp.ratelimit import parse_limit
    from secvf.faces.mcp.server import serve_http, serve_stdio
    from secvf.faces.mcp.settings import ServerSettings
    from secvf.faces.mcp.tiers import Tier

    limits = dict(parse_limit(spec) for spec in rate_limits)
    settings = ServerSettings(tier=Tier.parse(tier), roots=roots,
                              hook=hook.resolve() if hook else None,
                              hook_timeout_s=hook_timeout, rate_limits=limits,
                              output_cap=output_cap, max_file_bytes=max_file_bytes,
                              transport=transport)
    if transport == "stdio":
        serve_stdio(settings)
    else:
        serve_http(settings, listen)


@mcp.command("token")
@click.option("--rotate", is_flag=True, help="Replace the token (the old one stops working).")
@click.option("--json", "as_json", is_flag=True)
def mcp_token(rotate: bool, as_json: bool) -> None:
    """Print the HTTP transport's bearer token (made on first use, kept 0600)."""
    from secvf.faces.mcp.auth import ensure_token, rotate_token, token_path

    token = rotate_token() if rotate else ensure_token()
    if as_json:
        print_json({"token": token, "path": str(token_path()), "rotated": rotate})
    else:
        click.echo(token)
