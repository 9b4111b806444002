"""Capability tiers: what an MCP client may do through this server.

A tier is a hard filter. A tool above the server's tier is absent from ``tools/list``
and refused (and audited) if called anyway; the tiers are ordered, so ``full``
includes ``safe-mutate``, which includes ``read-only``.
"""

from __future__ import annotations

from enum import StrEnum

from secvf.errors import ConfigError


class Tier(StrEnum):
    """A server's (or a tool's minimum) capability tier, lowest first."""

    READ_ONLY = "read-only"
    SAFE_MUTATE = "safe-mutate"
    FULL = "full"

    @property
    def rank(self) -> int:
        """0, 1, 2: the order of the tiers."""
        return list(Tier).index(self)

    def allows(self, needed: Tier) -> bool:
        """True if a server at this tier may run a tool that needs ``needed``."""
        return self.rank >= needed.rank

    @classmethod
    def parse(cls, text: str) -> Tier:
        """The tier named ``text``. Raises ConfigError naming the tiers there are."""
        try:
            return cls(text)
        except ValueError:
            names = ", ".join(t.value for t in cls)
            raise ConfigError(f"unknown MCP tier {text!r}: use one of {names}") from None
