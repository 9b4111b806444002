"""Host paths a tool may touch: only inside the configured roots, after realpath.

A file tool's host path is resolved (every symlink followed, ``..`` collapsed) and
must then lie inside one of the server's roots (``--root DIR``, also resolved). So
``../`` and a symlink that leads out of a root are refused, and so is a root that is
itself a symlink to somewhere the path does not go. With no roots configured, file
tools that take a host path refuse every one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from secvf.errors import SecVFError


class PathNotAllowed(SecVFError):
    """A host path outside every configured root (or no roots are configured)."""


def confine(path: str | Path, roots: Sequence[Path], *, must_exist: bool = False) -> Path:
    """``path`` resolved, if it lies in one of ``roots``; a relative path is taken
    relative to the first root.

    Raises:
        PathNotAllowed: no roots, or the resolved path is outside all of them (the
            message names the roots), or ``must_exist`` and it does not exist.
    """
    if not roots:
        raise PathNotAllowed("no host directories are open to MCP file tools: start the "
                             "server with --root DIR to allow one")
    resolved_roots = [Path(os.path.realpath(root)) for root in roots]
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = resolved_roots[0] / candidate
    resolved = Path(os.path.realpath(candidate))
    if not any(resolved == root or resolved.is_relative_to(root) for root in resolved_roots):
        names = ", ".join(str(r) for r in resolved_roots)
        raise PathNotAllowed(f"host path {str(path)!r} resolves to {str(resolved)!r}, outside "
                             f"the directories open to MCP file tools ({names})")
    if must_exist and not resolved.exists():
        raise PathNotAllowed(f"host path {str(resolved)!r} does not exist")
    return resolved
