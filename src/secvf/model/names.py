"""Validation of user-chosen names (VMs, sandboxes, share tags).

A name becomes a directory name under ``$SECVF_HOME``, so it must be safe as one
path component on every filesystem we care about, and unambiguous in a shell.
"""

from __future__ import annotations

import re

from secvf.errors import InvalidName

MAX_NAME_BYTES = 255
_ALLOWED = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def validate_name(name: str, what: str = "VM") -> str:
    """Return ``name`` if it is a usable name, else raise :class:`InvalidName`.

    Rules: not empty, at most 255 bytes in UTF-8, no leading dot, and only letters,
    digits, ``.``, ``_`` and ``-`` (which rules out ``/``, ``\\``, ``..``, spaces
    and control characters).
    """
    if not name:
        raise InvalidName(f"{what} name must not be empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidName(f"{what} name is longer than {MAX_NAME_BYTES} bytes")
    if name.startswith("."):
        raise InvalidName(f"{what} name {name!r} must not start with '.'")
    if not _ALLOWED.match(name):
        raise InvalidName(
            f"{what} name {name!r} may only contain letters, digits, '.', '_' and '-'"
        )
    return name
