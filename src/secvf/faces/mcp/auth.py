"""The HTTP transport's bearer token: generated on first use, stored 0600, rotatable.

The token lives in ``$SECVF_HOME/config/mcp/http-token`` (directory 0700, file 0600).
Clients send ``Authorization: Bearer <token>``; a missing or wrong token gets HTTP
401 from the SDK's bearer middleware before any MCP message is read. Rotating writes
a new token atomically; a running server reads the file on every request, so the old
token stops working at once.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from mcp.server.auth.provider import AccessToken

from secvf import api
from secvf.errors import ConfigError

#: The token file's name in :func:`secvf.api.mcp_config_dir`.
TOKEN_FILE = "http-token"

#: The client id every request with the right token is known by.
CLIENT_ID = "secvf-http-token"


def token_path() -> Path:
    """Where the HTTP bearer token is kept."""
    return api.mcp_config_dir() / TOKEN_FILE


def _write_token(path: Path, token: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_token(path: Path | None = None) -> str:
    """The current token. Raises ConfigError for a token file others can read or that
    is empty (rotate it: ``secvf mcp token --rotate``)."""
    path = path or token_path()
    try:
        mode = path.stat().st_mode & 0o777
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the MCP token file {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise ConfigError(f"the MCP token file {path} is mode {mode:04o}: others may read it; "
                          "run `secvf mcp token --rotate` to replace it")
    if not token:
        raise ConfigError(f"the MCP token file {path} is empty; run `secvf mcp token --rotate`")
    return token


def ensure_token(path: Path | None = None) -> str:
    """The token, generated (and stored 0600) if there is none yet."""
    path = path or token_path()
    if not path.exists():
        _write_token(path, secrets.token_urlsafe(32))
    return read_token(path)


def rotate_token(path: Path | None = None) -> str:
    """Replace the token with a new one and return it."""
    path = path or token_path()
    token = secrets.token_urlsafe(32)
    _write_token(path, token)
    return token


class FileTokenVerifier:
    """The SDK's ``TokenVerifier`` for the token file: a constant-time comparison
    against the file's current token."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def verify_token(self, token: str) -> AccessToken | None:
        """The access info for the right token, None for any other."""
        try:
            expected = read_token(self.path)
        except ConfigError:
            return None
        if not hmac.compare_digest(token.encode(), expected.encode()):
            return None
        return AccessToken(token=token, client_id=CLIENT_ID, scopes=[])
