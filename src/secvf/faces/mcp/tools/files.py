"""File tools: copy files into and out of a sandbox, size-capped.

A host path must lie inside one of the server's roots after realpath (``--root DIR``;
``../`` and symlinks out of a root are refused). Without a host path, ``file_put``
takes the content inline and ``file_get`` returns it inline (capped, untrusted).
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from secvf import api
from secvf.errors import ConfigError

from ..confine import confine
from ..output import capped_blob, jsonable, untrusted
from ..registry import tool
from ..state import current_state
from ..tiers import Tier


class FileTooLarge(ConfigError):
    """A file bigger than the server's --max-file-bytes."""


def _private_temp() -> Path:
    fd, name = tempfile.mkstemp(prefix="secvf-mcp-")
    os.close(fd)
    return Path(name)


@tool(Tier.SAFE_MUTATE)
def file_put(name: str, guest_path: str, host_path: str | None = None,
             content: str | None = None, encoding: Literal["utf-8", "base64"] = "utf-8",
             mode: int | None = None, user: str | None = None) -> dict[str, Any]:
    """Copy host file ``host_path`` (inside the server's roots), or ``content``, to
    ``guest_path`` in sandbox ``name`` (relative paths are under /workspace)."""
    settings = current_state().settings
    if (host_path is None) == (content is None):
        raise ConfigError("give exactly one of host_path and content")
    if host_path is not None:
        source = confine(host_path, settings.roots, must_exist=True)
        size = source.stat().st_size
        if size > settings.max_file_bytes:
            raise FileTooLarge(f"{source} is {size} bytes; the limit is "
                               f"{settings.max_file_bytes} (--max-file-bytes)")
        transfer = api.Sandbox.from_vm(name).put_file(source, guest_path, mode=mode, user=user)
        return {"name": name, "guest_path": guest_path, "host_path": str(source),
                "transfer": jsonable(transfer)}
    try:
        data = base64.b64decode(content or "", validate=True) if encoding == "base64" \
            else (content or "").encode()
    except binascii.Error as exc:
        raise ConfigError(f"content is not valid base64: {exc}") from None
    if len(data) > settings.max_file_bytes:
        raise FileTooLarge(f"content is {len(data)} bytes; the limit is "
                           f"{settings.max_file_bytes} (--max-file-bytes)")
    temp = _private_temp()
    try:
        temp.write_bytes(data)
        transfer = api.Sandbox.from_vm(name).put_file(temp, guest_path,
                                                       mode=0o644 if mode is None else mode,
                                                       user=user)
    finally:
        temp.unlink(missing_ok=True)
    return {"name": name, "guest_path": guest_path, "bytes": len(data),
            "transfer": jsonable(transfer)}


@tool(Tier.SAFE_MUTATE, untrusted_output=True)
def file_get(name: str, guest_path: str, host_path: str | None = None,
             user: str | None = None) -> dict[str, Any]:
    """Copy ``guest_path`` from sandbox ``name`` to host file ``host_path`` (inside the
    server's roots), or return its content inline (capped; base64 if not UTF-8)."""
    settings = current_state().settings
    box = api.Sandbox.from_vm(name)
    if host_path is not None:
        target = confine(host_path, settings.roots)
        transfer = box.get_file(guest_path, target, user=user, max_bytes=settings.max_file_bytes)
        return untrusted({"name": name, "guest_path": guest_path, "host_path": str(target),
                          "transfer": jsonable(transfer)}, ["host_path"])
    temp = _private_temp()
    try:
        box.get_file(guest_path, temp, user=user, max_bytes=settings.max_file_bytes)
        data = temp.read_bytes()
    finally:
        temp.unlink(missing_ok=True)
    out = {"name": name, "guest_path": guest_path,
           **capped_blob("content", data, settings.output_cap)}
    return untrusted(out, ["content"])
