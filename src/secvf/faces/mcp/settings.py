"""How one MCP server is configured (``secvf mcp serve`` options)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .ratelimit import DEFAULT_LIMIT, Limit
from .tiers import Tier

#: Bytes of each output field (stdout, stderr, a file's content) one result carries.
DEFAULT_OUTPUT_CAP = 64 * 1024

#: The largest file ``file_put``/``file_get`` move (host paths or inline content).
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024

#: Seconds the confirmation hook may take before it counts as a denial.
DEFAULT_HOOK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServerSettings:
    """The tier, the host directories file tools may use, the confirmation hook, the
    rate limits and the output caps of one server."""

    tier: Tier = Tier.READ_ONLY
    roots: tuple[Path, ...] = ()
    hook: Path | None = None
    hook_timeout_s: float = DEFAULT_HOOK_TIMEOUT_S
    rate_limits: dict[str, Limit] = field(default_factory=dict)
    default_rate_limit: Limit = DEFAULT_LIMIT
    output_cap: int = DEFAULT_OUTPUT_CAP
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    transport: str = "stdio"
