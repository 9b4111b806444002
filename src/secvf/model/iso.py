"""The ISO cache's values and rules: a cached ISO's record (``isos/<name>/iso.json``),
ISO names, SHA-256 values, the three checksum-file formats and the download host
allowlist (``$SECVF_HOME/config/iso-hosts``).

Nothing here does I/O: :mod:`secvf.store.isos` reads and writes the files,
:mod:`secvf.workflows.iso_fetch` downloads and verifies (docs/iso.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from secvf.errors import ConfigError, InvalidName, MediaError
from secvf.model.config import _Strict
from secvf.model.names import validate_name

#: A SHA-256 in hex: 64 digits (stored lower case).
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

#: The ``iso-hosts`` file SecVF writes on first use: HTTPS hosts of the major
#: distributions' release media. ``host`` means port 443, ``host:port`` that port only,
#: ``*.domain`` any host below ``domain`` (not ``domain`` itself).
DEFAULT_ISO_HOSTS = """\
# Hosts `secvf iso fetch` may download from (and be redirected to), one per line.
#   host          that host, port 443
#   host:port     that host, that port only
#   *.domain      any host below domain (not domain itself), port 443
# A URL or redirect to any other host is refused. See docs/iso.md.

# Debian
cdimage.debian.org
get.debian.org
deb.debian.org
# Ubuntu
releases.ubuntu.com
cdimage.ubuntu.com
old-releases.ubuntu.com
# Fedora (download.fedoraproject.org redirects to mirrors not listed here: use dl.)
dl.fedoraproject.org
download.fedoraproject.org
# Arch Linux
geo.mirror.pkgbuild.com
mirrors.kernel.org
mirrors.edge.kernel.org
# Alpine
dl-cdn.alpinelinux.org
# Kali
cdimage.kali.org
kali.download
# Parrot
deb.parrot.sh
# Rocky, AlmaLinux, CentOS Stream
download.rockylinux.org
repo.almalinux.org
mirror.stream.centos.org
# openSUSE
download.opensuse.org
# NixOS
channels.nixos.org
releases.nixos.org
# FreeBSD
download.freebsd.org
# Tails
download.tails.net
"""

#: Default HTTPS port: an allowlist entry without a port allows this one only.
HTTPS_PORT = 443

_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_SHA256SUM_LINE = re.compile(r"^(\\?)([0-9A-Fa-f]{64}) [ *](.+)$")
_BSD_LINE = re.compile(r"^SHA(?:2-)?256 ?\((.+)\) ?= ?([0-9A-Fa-f]{64})$")
_BARE_HASH = re.compile(r"^[0-9A-Fa-f]{64}$")


def validate_iso_name(name: str) -> str:
    """Return ``name`` if it can name a cached ISO (as a VM name: letters, digits,
    ``.``, ``_``, ``-``; no leading dot, no ``/``, no ``..`` component).

    Raises:
        InvalidName: it cannot.
    """
    return validate_name(name, "ISO")


def normalize_sha256(value: str, what: str = "--sha256") -> str:
    """``value`` as a lower-case 64-digit hex SHA-256 (surrounding space dropped).

    Raises:
        ConfigError: it is not one (the message says what a SHA-256 looks like).
    """
    text = value.strip().lower()
    if not SHA256_HEX.match(text):
        raise ConfigError(f"{what} {value!r} is not a SHA-256: expected 64 hex digits "
                          "(as sha256sum prints them)")
    return text


class IsoRecord(_Strict):
    """Validated content of a cached ISO's ``iso.json``."""

    schema_version: Literal[1] = 1
    name: str
    file: Literal["image.iso"] = "image.iso"  # beside iso.json in the entry's directory
    size_bytes: int = Field(gt=0)
    sha256: str
    source: str  # the URL it was fetched from, or the path it was added from
    checksums: str | None = None  # the checksum file's URL (None: given with --sha256)
    added_at: str
    verified_at: str  # when its content last matched sha256 (added, fetched, iso verify)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        try:
            return validate_iso_name(value)
        except InvalidName as exc:
            raise ValueError(str(exc)) from None

    @field_validator("sha256")
    @classmethod
    def _valid_sha256(cls, value: str) -> str:
        if not SHA256_HEX.match(value):
            raise ValueError("must be 64 lower-case hex digits")
        return value


# ---- checksum files ---------------------------------------------------------------------


def parse_checksums(text: str, filename: str, *, source: str) -> str:
    """The SHA-256 that checksum file ``text`` (from ``source``, for messages) gives for
    ``filename``.

    Three formats are read: ``sha256sum``'s (``HASH  NAME`` or ``HASH *NAME``, with its
    ``\\`` escape for odd names), BSD's (``SHA256 (NAME) = HASH``, also openssl's
    ``SHA2-256(NAME)= HASH``) and a bare hash (the file holds one hash and nothing
    else). A listed name matches by its last path component (``./x.iso``, ``iso/x.iso``).
    Lines of other formats and algorithms (PGP armour, SHA-512 lines, comments) are
    ignored.

    Raises:
        MediaError: no SHA-256 for ``filename``, or two different ones.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1 and _BARE_HASH.match(lines[0]):
        return lines[0].lower()
    found: set[str] = set()
    listed: list[str] = []
    for line in lines:
        entry = _checksum_entry(line)
        if entry is None:
            continue
        name, digest = entry
        listed.append(name)
        if name.rsplit("/", 1)[-1] == filename:
            found.add(digest)
    if len(found) > 1:
        raise MediaError(f"checksum file {source} gives {len(found)} different SHA-256 "
                         f"values for {filename}; refusing to guess")
    if found:
        return found.pop()
    if not listed:
        raise MediaError(f"checksum file {source} has no SHA-256 in a format SecVF reads "
                         "(sha256sum's 'HASH  NAME', BSD's 'SHA256 (NAME) = HASH', or one "
                         "bare hash); give --sha256 instead")
    shown = ", ".join(listed[:5]) + (", …" if len(listed) > 5 else "")
    raise MediaError(f"checksum file {source} has no SHA-256 for {filename} (it lists: "
                     f"{shown}); check the URL, or give --sha256")


def _checksum_entry(line: str) -> tuple[str, str] | None:
    """``(name, sha256)`` from one sha256sum or BSD line, or None."""
    match = _SHA256SUM_LINE.match(line)
    if match:
        escaped, digest, name = match.groups()
        if escaped:
            name = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), name)
        return name, digest.lower()
    match = _BSD_LINE.match(line)
    if match:
        return match.group(1), match.group(2).lower()
    return None


# ---- the host allowlist -------------------------------------------------------------------


@dataclass(frozen=True)
class HostRule:
    """One allowlist entry: ``host`` (or, with ``wildcard``, any host below it) on ``port``."""

    host: str
    port: int
    wildcard: bool = False

    def allows(self, host: str, port: int) -> bool:
        """True if this entry lets a download reach ``host`` (lower case) on ``port``."""
        if port != self.port:
            return False
        return host.endswith("." + self.host) if self.wildcard else host == self.host


@dataclass(frozen=True)
class HostAllowlist:
    """The hosts ISO downloads may reach (``source`` names the file, for messages)."""

    rules: tuple[HostRule, ...]
    source: str

    def allows(self, host: str, port: int) -> bool:
        """True if some entry allows ``host`` on ``port``."""
        host = host.lower().rstrip(".")
        return any(rule.allows(host, port) for rule in self.rules)


def parse_host_allowlist(text: str, *, source: str) -> HostAllowlist:
    """The allowlist in ``text`` (the ``iso-hosts`` format, see :data:`DEFAULT_ISO_HOSTS`).

    Raises:
        ConfigError: a line is no host, ``host:port`` or ``*.domain`` (names the line).
    """
    rules = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip().lower()
        if line:
            try:
                rules.append(_host_rule(line))
            except ValueError as exc:
                raise ConfigError(f"{source} line {number}: {raw.strip()!r}: {exc}") from None
    return HostAllowlist(tuple(rules), source)


def _host_rule(entry: str) -> HostRule:
    host, sep, port_text = entry.rpartition(":") if ":" in entry else (entry, "", "")
    port = HTTPS_PORT
    if sep:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError("the port must be a number from 1 to 65535")
        port = int(port_text)
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    labels = name.split(".")
    if not all(_HOST_LABEL.match(label) for label in labels) or (wildcard and len(labels) < 2):
        raise ValueError("expected a host name or address, host:port, or *.domain")
    return HostRule(name, port, wildcard)
