"""Filling the ISO cache: ``secvf iso fetch|add|verify|rm`` (docs/iso.md).

A download (:func:`fetch_iso`) is HTTPS only, with the certificate verified against the
system's CA store (or only the CAs in ``$SECVF_ISO_CA_FILE``, for a private mirror or a
test), and reaches only the hosts of the allowlist (``$SECVF_HOME/config/iso-hosts``),
redirects included. It goes to a staging file keyed by URL and expected hash; a transfer
that breaks off is kept and the same command resumes it with a ``Range`` request. The
file is hashed as it arrives and becomes a cache entry only when its SHA-256 is the one
expected (``--sha256``, or the entry for its file name in a checksum file fetched under
the same rules); otherwise it is removed and the error says expected and actual hash.

HTTP is the standard library's ``http.client`` over ``ssl`` (``ssl.create_default_context``:
certificate and host name checked, TLS 1.2 or newer): no third-party code sees the
network, and redirects are followed here, one hop at a time, so each target is checked
before it is contacted.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

from secvf.errors import (
    ChecksumMismatch,
    ConfigError,
    DownloadFailed,
    InvalidName,
    MediaError,
    UntrustedSource,
)
from secvf.model.config import now_iso
from secvf.model.iso import (
    HTTPS_PORT,
    HostAllowlist,
    IsoRecord,
    normalize_sha256,
    parse_checksums,
    validate_iso_name,
)
from secvf.model.sizes import format_size
from secvf.store import isos
from secvf.store.digest import BLOCK_BYTES
from secvf.store.disks import check_host_file

#: ``progress(what, done_bytes, total_bytes or None)``: hears a long job's bytes.
ByteProgress = Callable[[str, int, int | None], None]

#: Environment variable naming a PEM file of CA certificates to trust *instead of* the
#: system's (a private mirror; the tests' own CA). Verification is never turned off.
CA_FILE_ENV = "SECVF_ISO_CA_FILE"
#: Redirect hops followed before giving up (each one checked against the allowlist).
MAX_REDIRECTS = 5
#: A connection that sends nothing for this long is given up (the download resumes later).
SOCKET_TIMEOUT_S = 60.0
#: The largest checksum file read (real ones are a few KiB).
MAX_CHECKSUM_FILE_BYTES = 1 << 20
_REDIRECTS = (301, 302, 303, 307, 308)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED_RANGE = re.compile(r"^bytes \*/(\d+)$")


@dataclass(frozen=True)
class IsoCheck:
    """What ``iso verify`` found for one entry: ``ok``, or ``actual`` differs from
    ``expected``, or ``error`` says why it could not be hashed."""

    name: str
    ok: bool
    expected: str | None
    actual: str | None
    error: str | None = None


# ---- iso fetch ----------------------------------------------------------------------------


def fetch_iso(url: str, *, sha256: str | None = None, checksums: str | None = None,
              name: str | None = None, ca_file: Path | None = None,
              progress: ByteProgress | None = None) -> isos.CachedIso:
    """Download ``url`` into the cache as ``name`` (default: the URL's file name), once
    its SHA-256 is ``sha256`` or the one checksum file ``checksums`` lists for it.

    ``ca_file``: trust only these CA certificates (default ``$SECVF_ISO_CA_FILE``, else
    the system's). A download cut off before its end is kept; the same call resumes it.

    Raises:
        ConfigError: neither or both of ``sha256`` and ``checksums``; a bad hash; a bad
            allowlist or CA file. InvalidName, AlreadyExists: the name.
        UntrustedSource: ``url``, ``checksums`` or a redirect is not HTTPS or its host is
            not on the allowlist (nothing is contacted for a refused URL).
        DownloadFailed: the connection, certificate or server failed (``resumable``: run
            it again to go on), or the file is empty.
        ChecksumMismatch: the file is not the one expected (it is removed).
        MediaError: the checksum file lists no SHA-256 for the file.
        LockBusy: another command is downloading the same file.
    """
    if (sha256 is None) == (checksums is None):
        raise ConfigError("give exactly one of --sha256 HEX and --checksums URL: SecVF "
                          "caches only media whose SHA-256 it checked")
    client = _Client(isos.host_allowlist(), _ssl_context(ca_file))
    source = client.check(url, "ISO URL")
    filename = unquote(source.path.rsplit("/", 1)[-1])
    name = validate_iso_name(name) if name is not None else _default_name(filename, url)
    if checksums is not None:
        client.check(checksums, "checksum file URL")
    isos.check_name_free(name)
    expected = (normalize_sha256(sha256) if sha256 is not None
                else client.checksum_for(checksums or "", filename))
    part = isos.partial_path(url, expected)
    with isos.held_partial(part, url) as fh:
        try:
            actual, size = _download(client, url, fh, part.parent, name, progress)
        except BaseException:
            if os.fstat(fh.fileno()).st_size == 0:  # nothing to resume
                isos.discard_partial(part)
            raise
        if size == 0:
            isos.discard_partial(part)
            raise DownloadFailed(f"{url} is an empty file (0 bytes), not an ISO; nothing "
                                 "was added (check the URL)")
        if actual != expected:
            isos.discard_partial(part)
            raise ChecksumMismatch(url, expected, actual, "the download was removed and "
                                   "nothing was added to the cache")
        with isos.new_entry() as work:
            os.rename(part, work.path / isos.ISO_FILE)
            when = now_iso()
            record = IsoRecord(name=name, size_bytes=size, sha256=expected, source=url,
                               checksums=checksums, added_at=when, verified_at=when)
            return isos.publish(work, record)


def _default_name(filename: str, url: str) -> str:
    try:
        return validate_iso_name(filename)
    except InvalidName as exc:
        raise InvalidName(f"{exc} (the file name in {url}); give one with --name") from None


def _ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client context that verifies certificates and host names: against ``ca_file``
    (or ``$SECVF_ISO_CA_FILE``) if given, else the system's CA store."""
    chosen = ca_file or (Path(os.environ[CA_FILE_ENV]) if os.environ.get(CA_FILE_ENV) else None)
    try:
        context = ssl.create_default_context(cafile=str(chosen) if chosen else None)
    except (OSError, ssl.SSLError) as exc:
        origin = "--ca-file" if ca_file else f"${CA_FILE_ENV}"
        raise ConfigError(f"cannot load CA certificates from {chosen} ({origin}): "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _Client:
    """HTTPS GETs under the policy: checked URLs, checked redirects, verified TLS."""

    def __init__(self, allowlist: HostAllowlist, context: ssl.SSLContext) -> None:
        self.allowlist = allowlist
        self.context = context

    def check(self, url: str, what: str) -> SplitResult:
        """``url`` split, if the policy lets a download contact it.

        Raises:
            UntrustedSource: not ``https://``, credentials in it, no host, or a host
                (and port) not on the allowlist.
        """
        try:
            parts = urlsplit(url)
            port = parts.port or HTTPS_PORT
        except ValueError as exc:
            raise UntrustedSource(f"{what} {url!r} is not a valid URL: {exc}") from None
        if parts.scheme.lower() != "https":
            shown = f"plain {parts.scheme}" if parts.scheme else "a URL without https://"
            raise UntrustedSource(f"{what} {url} is refused: {shown} can be altered on the "
                                  "way; SecVF downloads over https only (most mirrors serve "
                                  "the same path over https)")
        if parts.username is not None or parts.password is not None:
            raise UntrustedSource(f"{what} {url} has credentials in it; SecVF does not send "
                                  "or keep them")
        host = parts.hostname or ""
        if not host:
            raise UntrustedSource(f"{what} {url!r} names no host")
        if not self.allowlist.allows(host, port):
            where = host if port == HTTPS_PORT else f"{host}:{port}"
            raise UntrustedSource(f"{what} {url} is refused: {where} is not on the ISO host "
                                  f"allowlist; if you trust it, add a line '{where}' to "
                                  f"{self.allowlist.source}")
        return parts

    def get(self, url: str, headers: dict[str, str]) -> _Reply:
        """GET ``url``, following redirects while each target passes :meth:`check`;
        the reply (use it in a ``with`` block: that closes its connection).

        Raises:
            UntrustedSource, DownloadFailed.
        """
        for hop in range(MAX_REDIRECTS + 1):
            reply = self._request(self.check(url, "redirect target" if hop else "URL"),
                                  url, headers)
            if reply.response.status not in _REDIRECTS:
                return reply
            with reply:
                location = reply.response.getheader("Location")
            if not location:
                raise DownloadFailed(f"{url} answered {reply.response.status} without "
                                     "saying where to (no Location)")
            url = urljoin(url, location)
        raise DownloadFailed(f"more than {MAX_REDIRECTS} redirects, the last to {url}")

    def _request(self, parts: SplitResult, url: str, headers: dict[str, str]) -> _Reply:
        host, port = parts.hostname or "", parts.port or HTTPS_PORT
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn = http.client.HTTPSConnection(host, port, context=self.context,
                                           timeout=SOCKET_TIMEOUT_S)
        try:
            conn.request("GET", target, headers={"User-Agent": "secvf-iso-fetch",
                                                 "Accept-Encoding": "identity", **headers})
            return _Reply(url, conn, conn.getresponse())
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise DownloadFailed(f"the TLS certificate of {host} does not verify "
                                 f"({exc.verify_message}); SecVF never downloads without a "
                                 f"verified certificate (for a private CA, set "
                                 f"${CA_FILE_ENV} to its PEM file)") from None
        except ssl.SSLError as exc:
            conn.close()
            raise DownloadFailed(f"TLS with {host}:{port} failed: {exc.reason or exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise DownloadFailed(f"cannot fetch {url}: {_reason(exc)}") from None

    def checksum_for(self, url: str, filename: str) -> str:
        """The SHA-256 checksum file ``url`` gives for ``filename``.

        Raises:
            UntrustedSource, DownloadFailed, MediaError (no usable entry).
        """
        with self.get(url, {}) as reply:
            response = reply.response
            if response.status != 200:
                raise DownloadFailed(f"checksum file {reply.url}: HTTP {response.status} "
                                     f"{response.reason}")
            try:
                body = response.read(MAX_CHECKSUM_FILE_BYTES + 1)
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadFailed(f"checksum file {reply.url}: {_reason(exc)}") from None
        if len(body) > MAX_CHECKSUM_FILE_BYTES:
            raise MediaError(f"checksum file {reply.url} is larger than "
                             f"{format_size(MAX_CHECKSUM_FILE_BYTES)}: not a checksum file")
        return parse_checksums(body.decode("utf-8", "replace"), filename, source=reply.url)


@dataclass
class _Reply:
    """A response, the URL it answers (after redirects) and its connection."""

    url: str
    conn: http.client.HTTPSConnection
    response: http.client.HTTPResponse

    def __enter__(self) -> _Reply:
        return self

    def __exit__(self, *exc: object) -> None:
        self.response.close()
        self.conn.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, http.client.IncompleteRead):
        return "the connection closed early"
    if isinstance(exc, TimeoutError):
        return f"nothing arrived for {SOCKET_TIMEOUT_S:.0f} s"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _download(client: _Client, url: str, fh: BinaryIO, staging: Path, name: str,
              progress: ByteProgress | None) -> tuple[str, int]:
    """Bring staging file ``fh`` (in directory ``staging``) to the whole of ``url``,
    resuming what it holds; return its SHA-256 and size."""
    digest, offset = _hash_stream(fh, f"checking the partial download of {name}", progress)
    for _attempt in range(2):
        with client.get(url, {"Range": f"bytes={offset}-"} if offset else {}) as reply:
            response = reply.response
            if response.status == 416 and offset:
                if _unsatisfied_total(response.getheader("Content-Range")) == offset:
                    return digest.hexdigest(), offset  # the staging file has all of it
                digest, offset = _restart(fh)
                continue
            if response.status == 200 and offset:  # the server ignored the Range
                digest, offset = _restart(fh)
            elif response.status == 206:
                _check_resumed_at(response, offset, reply.url)
            elif response.status != 200:
                raise DownloadFailed(f"{reply.url}: HTTP {response.status} {response.reason}")
            total = _total_size(response, offset)
            _check_space(staging, total, offset, reply.url)
            offset = _receive(response, fh, digest, offset, total, reply.url, name, progress)
            os.fsync(fh.fileno())
            return digest.hexdigest(), offset
    raise DownloadFailed(f"{url}: the server would not send the file from its start")


def _restart(fh: BinaryIO) -> tuple[Any, int]:
    """Empty the staging file: what it held is not the start of what the server has."""
    fh.seek(0)
    fh.truncate()
    return hashlib.sha256(), 0


def _receive(response: http.client.HTTPResponse, fh: BinaryIO, digest: Any, offset: int,
             total: int | None, url: str, name: str, progress: ByteProgress | None) -> int:
    """Append the response body to ``fh`` and ``digest``; return the new size."""
    fh.seek(offset)
    what = f"downloading {name}"
    if progress:
        progress(what, offset, total)
    try:
        while block := response.read(BLOCK_BYTES):
            fh.write(block)
            digest.update(block)
            offset += len(block)
            if progress:
                progress(what, offset, total)
    except (OSError, http.client.HTTPException) as exc:
        fh.flush()
        raise _cut_off(url, offset, total, _reason(exc)) from None
    fh.flush()
    if total is not None and offset != total:
        raise _cut_off(url, offset, total, "the connection closed early")
    return offset


def _cut_off(url: str, size: int, total: int | None, why: str) -> DownloadFailed:
    of = f" of {format_size(total)}" if total is not None else ""
    return DownloadFailed(f"the download of {url} stopped after {format_size(size)}{of}: "
                          f"{why}; run the same command again to resume", resumable=True)


def _total_size(response: http.client.HTTPResponse, offset: int) -> int | None:
    """The whole file's size, from ``Content-Range`` (206) or ``Content-Length``."""
    if response.status == 206:
        match = _CONTENT_RANGE.match(response.getheader("Content-Range") or "")
        if match and match.group(3) != "*":
            return int(match.group(3))
    length = response.getheader("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def _check_resumed_at(response: http.client.HTTPResponse, offset: int, url: str) -> None:
    match = _CONTENT_RANGE.match(response.getheader("Content-Range") or "")
    if not match or int(match.group(1)) != offset:
        raise DownloadFailed(f"{url} answered a resume from byte {offset} with "
                             f"{response.getheader('Content-Range')!r}; not resuming")


def _unsatisfied_total(header: str | None) -> int | None:
    match = _UNSATISFIED_RANGE.match(header or "")
    return int(match.group(1)) if match else None


def _check_space(staging: Path, total: int | None, offset: int, url: str) -> None:
    if total is None:
        return
    free = shutil.disk_usage(staging).free
    if total - offset > free:
        raise DownloadFailed(f"{url} needs {format_size(total - offset)} more, but "
                             f"{format_size(free)} is free for $SECVF_HOME")


def _hash_stream(fh: BinaryIO, what: str, progress: ByteProgress | None,
                 sink: BinaryIO | None = None) -> tuple[Any, int]:
    """SHA-256 and length of what ``fh`` holds from where it is, copied to ``sink`` if
    given (so what is hashed is what was written)."""
    digest, done = hashlib.sha256(), 0
    total = os.fstat(fh.fileno()).st_size
    while block := fh.read(BLOCK_BYTES):
        if sink is not None:
            sink.write(block)
        digest.update(block)
        done += len(block)
        if progress:
            progress(what, done, total)
    return digest, done


# ---- iso add, verify, rm ------------------------------------------------------------------


def add_iso(path: Path, *, sha256: str, name: str | None = None,
            progress: ByteProgress | None = None) -> isos.CachedIso:
    """Copy ISO ``path`` into the cache as ``name`` (default: its file name) if its
    SHA-256 is ``sha256``; the copy is what is hashed. ``path`` is left as it is.

    Raises:
        ConfigError (bad hash), InvalidName, AlreadyExists, DiskError/UnsafeDisk (as
        ``vm create --iso`` checks a file), MediaError (empty), ChecksumMismatch.
    """
    expected = normalize_sha256(sha256)
    source = check_host_file(path, "ISO")
    name = validate_iso_name(name if name is not None else source.name)
    isos.check_name_free(name)
    with source.open("rb") as src, isos.new_entry() as work:
        if os.fstat(src.fileno()).st_size == 0:
            raise MediaError(f"ISO {source} is empty (0 bytes); nothing was added")
        with (work.path / isos.ISO_FILE).open("xb") as dst:
            digest, size = _hash_stream(src, f"copying {name}", progress, sink=dst)
            dst.flush()
            os.fsync(dst.fileno())
        actual = digest.hexdigest()
        if actual != expected:
            raise ChecksumMismatch(str(source), expected, actual,
                                   "nothing was added to the cache")
        when = now_iso()
        return isos.publish(work, IsoRecord(name=name, size_bytes=size, sha256=actual,
                                            source=str(source), added_at=when,
                                            verified_at=when))


def verify_isos(name: str | None = None, progress: ByteProgress | None = None
                ) -> list[IsoCheck]:
    """Hash cached ISO ``name`` (default: every entry) again and compare with its record;
    a match renews its ``verified_at``. A mismatch changes nothing.

    Raises:
        InvalidName, NotFound, ConfigError: ``name`` is given and cannot be checked.
    """
    entries = [isos.get_iso(name)] if name is not None else isos.list_isos()
    return [_verify(entry, progress) for entry in entries]


def _verify(entry: isos.CachedIso, progress: ByteProgress | None) -> IsoCheck:
    record = entry.record
    if record is None:
        return IsoCheck(entry.name, False, None, None, entry.error)
    try:
        with entry.path.open("rb") as fh:
            digest, _size = _hash_stream(fh, f"verifying {entry.name}", progress)
    except OSError as exc:
        return IsoCheck(entry.name, False, record.sha256, None,
                        f"cannot read {entry.path}: {exc.strerror}")
    actual = digest.hexdigest()
    if actual != record.sha256:
        return IsoCheck(entry.name, False, record.sha256, actual)
    isos.rewrite_record(record.model_copy(update={"verified_at": now_iso()}))
    return IsoCheck(entry.name, True, record.sha256, actual)
