"""``secvf iso fetch`` against a real HTTPS server on 127.0.0.1 whose certificate comes
from a CA this module makes (openssl), trusted through ``$SECVF_ISO_CA_FILE``: verified
TLS, the host allowlist (redirects too), resume, checksum files in each format, and that
a refused or failed download leaves nothing in the cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from secvf import api
from secvf.errors import (
    AlreadyExists,
    ChecksumMismatch,
    DownloadFailed,
    InvalidName,
    MediaError,
    UntrustedSource,
)
from tests.helpers import run_cli
from tests.unit.test_cli_badinput import assert_clean_error

ISO = bytes(range(256)) * 1200  # 300 KiB: several reads, quick to serve
ISO_SHA = hashlib.sha256(ISO).hexdigest()
WRONG_SHA = "0" * 64


# ---- a test CA and an HTTPS server ---------------------------------------------------------


@dataclass
class MadeCA:
    ca_file: Path
    cert_file: Path
    key_file: Path


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> MadeCA:
    """A CA and a server certificate for 127.0.0.1 and localhost, made with openssl."""
    d = tmp_path_factory.mktemp("ca")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=SecVF test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                               "basicConstraints=critical,CA:FALSE\n"
                               "keyUsage=critical,digitalSignature\n"
                               "extendedKeyUsage=serverAuth\n"
                               "authorityKeyIdentifier=keyid\n"
                               "subjectKeyIdentifier=hash\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return MadeCA(d / "ca.pem", d / "server.pem", d / "server.key")


@dataclass
class Route:
    """What the server answers for one path."""

    body: bytes = b""
    redirect: str | None = None
    cut_after: int | None = None  # the next full answer stops after this many bytes
    honour_range: bool = True


@dataclass
class Server:
    port: int
    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: Server  # set per server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        state = self.server.state  # type: ignore[attr-defined]
        state.requests.append((self.path, self.headers.get("Range")))
        route = state.routes.get(self.path)
        if route is None:
            self._answer(404, b"not found")
            return
        if route.redirect is not None:
            self._answer(302, b"", Location=route.redirect)
            return
        body, start = route.body, 0
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if wanted and route.honour_range:
            start = int(wanted.group(1))
            if start >= len(body):
                self._answer(416, b"", **{"Content-Range": f"bytes */{len(body)}"})
                return
        payload = body[start:]
        headers = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"} if start else {}
        if route.cut_after is not None:
            payload, route.cut_after = payload[:route.cut_after], None
            self.close_connection = True
            self._answer(206 if start else 200, payload, length=len(body) - start, **headers)
            return
        self._answer(206 if start else 200, payload, **headers)

    def _answer(self, status: int, payload: bytes, length: int | None = None,
                **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload) if length is None else length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(test_ca: MadeCA) -> Iterator[Server]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(test_ca.cert_file, test_ca.key_file)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    state = Server(httpd.server_address[1])
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def trusted(server: Server, test_ca: MadeCA, secvf_env: Path,
            monkeypatch: pytest.MonkeyPatch) -> Server:
    """The server, with its CA trusted and only 127.0.0.1:PORT on the allowlist."""
    monkeypatch.setenv("SECVF_ISO_CA_FILE", str(test_ca.ca_file))
    config = secvf_env / "config"
    config.mkdir(parents=True, exist_ok=True, mode=0o700)
    (config / "iso-hosts").write_text(f"# the test server\n127.0.0.1:{server.port}\n")
    server.routes["/d/test.iso"] = Route(ISO)
    return server


def cache_files(home: Path) -> list[Path]:
    """Every file under the ISO cache (directories and the cache's lock file aside)."""
    root = home / "isos"
    return sorted(p for p in root.rglob("*") if not p.is_dir() and p != root / ".lock")


# ---- downloads that work ---------------------------------------------------------------------


def test_a_good_download_is_published_read_only_and_listed(trusted: Server,
                                                           secvf_env: Path) -> None:
    proc = run_cli("iso", "fetch", trusted.url("/d/test.iso"), "--sha256", ISO_SHA.upper(),
                   "--json", check=True)
    entry = json.loads(proc.stdout)
    medium = secvf_env / "isos" / "test.iso" / "image.iso"
    assert (entry["name"], entry["path"], entry["sha256"], entry["size_bytes"]) == (
        "test.iso", str(medium), ISO_SHA, len(ISO))
    assert entry["source"] == trusted.url("/d/test.iso") and entry["checksums"] is None
    assert medium.read_bytes() == ISO
    assert stat.S_IMODE(medium.stat().st_mode) == 0o644
    assert stat.S_IMODE((medium.parent / "iso.json").stat().st_mode) == 0o600
    assert cache_files(secvf_env) == [medium, medium.parent / "iso.json"]  # no partial left
    listed = json.loads(run_cli("iso", "list", "--json", check=True).stdout)
    assert [(e["name"], e["sha256"], e["error"]) for e in listed] == [("test.iso", ISO_SHA, None)]
    table = run_cli("iso", "list", check=True).stdout
    assert "test.iso" in table and ISO_SHA[:16] in table and trusted.url("/d/test.iso") in table


def test_the_default_name_comes_from_the_url_and_a_taken_name_is_refused_early(
        trusted: Server) -> None:
    api.fetch_iso(trusted.url("/d/test.iso"), sha256=ISO_SHA)
    before = len(trusted.requests)
    with pytest.raises(AlreadyExists, match="--name"):
        api.fetch_iso(trusted.url("/d/test.iso"), sha256=ISO_SHA)
    assert len(trusted.requests) == before  # refused before downloading anything
    assert api.fetch_iso(trusted.url("/d/test.iso"), sha256=ISO_SHA, name="deb12")["name"] == \
        "deb12"


def test_a_redirect_to_an_allowed_host_is_followed(trusted: Server) -> None:
    trusted.routes["/latest.iso"] = Route(redirect=trusted.url("/d/test.iso"))
    entry = api.fetch_iso(trusted.url("/latest.iso"), sha256=ISO_SHA)
    assert entry["name"] == "latest.iso" and Path(entry["path"]).read_bytes() == ISO
    assert trusted.paths() == ["/latest.iso", "/d/test.iso"]


def test_a_truncated_download_is_kept_and_resumed_with_a_range_request(
        trusted: Server, secvf_env: Path) -> None:
    cut = len(ISO) // 3
    trusted.routes["/d/test.iso"].cut_after = cut
    with pytest.raises(DownloadFailed, match="run the same command again to resume") as exc:
        api.fetch_iso(trusted.url("/d/test.iso"), sha256=ISO_SHA)
    assert exc.value.resumable
    [partial] = cache_files(secvf_env)
    assert partial.parent.name == ".partial" and partial.read_bytes() == ISO[:cut]
    assert api.list_isos() == []  # nothing is published before it is whole and verified

    entry = api.fetch_iso(trusted.url("/d/test.iso"), sha256=ISO_SHA)
    assert trusted.requests == [("/d/test.iso", None), ("/d/test.iso", f"bytes={cut}-")]
    assert Path(entry["path"]).read_bytes() == ISO
    assert not partial.exists()


def test_a_server_that_ignores_the_range_gives_a_whole_fresh_download(
        trusted: Server, secvf_env: Path) -> None:
    route = trusted.routes["/d/test.iso"]
    route.cut_after, route.honour_range = 1000, False
    with pytest.raises(DownloadFailed):
        api.fetch_iso(trusted.url("/d/test.iso"), sha256=ISO_SHA)
    entry = api.fetch_iso(trusted.url("/d/test.iso"), sha256=ISO_SHA)
    assert trusted.requests[-1] == ("/d/test.iso", "bytes=1000-")
    assert Path(entry["path"]).read_bytes() == ISO  # not the first 1000 bytes twice


def test_a_complete_partial_is_verified_without_downloading_again(
        trusted: Server, secvf_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fetch killed after the last byte: the server answers 416 and the file is whole."""
    from secvf.store import isos

    part = isos.partial_path(trusted.url("/d/test.iso"), ISO_SHA)
    part.write_bytes(ISO)
    entry = api.fetch_iso(trusted.url("/d/test.iso"), sha256=ISO_SHA)
    assert trusted.requests == [("/d/test.iso", f"bytes={len(ISO)}-")]
    assert Path(entry["path"]).read_bytes() == ISO


# ---- checksum files ----------------------------------------------------------------------


@pytest.mark.parametrize("checksums", [
    f"{'a' * 64}  other.iso\n{ISO_SHA}  test.iso\n{'b' * 64} *tools.iso\n",  # sha256sum
    f"{'c' * 128}  test.iso\n{ISO_SHA} *./test.iso\n",  # binary marker, ./ prefix, SHA-512
    "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n# test.iso: 307200 bytes\n"
    f"SHA256 (test.iso) = {ISO_SHA}\nSHA256 (other.iso) = {'d' * 64}\n"
    "-----BEGIN PGP SIGNATURE-----\nxyz\n",  # BSD (a Fedora CHECKSUM file)
    f"SHA2-256(test.iso)= {ISO_SHA.upper()}\n",  # openssl dgst's BSD form
    f"{ISO_SHA}\n",  # a bare hash
], ids=["sha256sum", "sha256sum-binary", "bsd", "openssl-bsd", "bare"])
def test_a_checksum_file_in_each_format_gives_the_hash(trusted: Server, checksums: str) -> None:
    trusted.routes["/d/SHA256SUMS"] = Route(checksums.encode())
    entry = api.fetch_iso(trusted.url("/d/test.iso"), checksums=trusted.url("/d/SHA256SUMS"))
    assert entry["sha256"] == ISO_SHA and entry["checksums"] == trusted.url("/d/SHA256SUMS")
    assert trusted.paths() == ["/d/SHA256SUMS", "/d/test.iso"]


@pytest.mark.parametrize("checksums", [f"{WRONG_SHA}  test.iso\n",
                                       f"SHA256 (test.iso) = {WRONG_SHA}\n", f"{WRONG_SHA}\n"],
                         ids=["sha256sum", "bsd", "bare"])
def test_the_checksum_file_is_what_the_download_is_checked_against(
        trusted: Server, secvf_env: Path, checksums: str) -> None:
    trusted.routes["/d/SHA256SUMS"] = Route(checksums.encode())
    with pytest.raises(ChecksumMismatch):
        api.fetch_iso(trusted.url("/d/test.iso"), checksums=trusted.url("/d/SHA256SUMS"))
    assert cache_files(secvf_env) == []


def test_a_checksum_file_without_the_file_is_refused_before_the_download(
        trusted: Server) -> None:
    trusted.routes["/d/SHA256SUMS"] = Route(f"{ISO_SHA}  other.iso\n".encode())
    with pytest.raises(MediaError, match=r"no SHA-256 for test.iso \(it lists: other.iso\)"):
        api.fetch_iso(trusted.url("/d/test.iso"), checksums=trusted.url("/d/SHA256SUMS"))
    assert trusted.paths() == ["/d/SHA256SUMS"]


def test_the_checksum_file_obeys_the_allowlist_too(trusted: Server) -> None:
    with pytest.raises(UntrustedSource, match="checksum file URL"):
        api.fetch_iso(trusted.url("/d/test.iso"),
                      checksums=trusted.url("/d/SHA256SUMS", host="localhost"))
    assert trusted.requests == []


# ---- refusals that leave nothing behind -------------------------------------------------------


def test_a_wrong_hash_says_expected_and_actual_and_leaves_nothing(
        trusted: Server, secvf_env: Path) -> None:
    proc = run_cli("iso", "fetch", trusted.url("/d/test.iso"), "--sha256", WRONG_SHA)
    assert_clean_error(proc, f"expected {WRONG_SHA}", f"got {ISO_SHA}", "nothing was added")
    assert cache_files(secvf_env) == []
    assert api.list_isos() == []


def test_plain_http_is_refused_before_connecting(trusted: Server, secvf_env: Path) -> None:
    url = trusted.url("/d/test.iso").replace("https://", "http://")
    proc = run_cli("iso", "fetch", url, "--sha256", ISO_SHA)
    assert_clean_error(proc, "plain http", "https only")
    assert proc.returncode == 1
    assert trusted.requests == [] and cache_files(secvf_env) == []


def test_a_host_not_on_the_allowlist_is_refused_before_connecting(trusted: Server) -> None:
    """localhost is the same server (its certificate names it) but not on the list."""
    with pytest.raises(UntrustedSource, match=r"localhost:\d+ is not on the ISO host allowlist"):
        api.fetch_iso(trusted.url("/d/test.iso", host="localhost"), sha256=ISO_SHA)
    assert trusted.requests == []


def test_a_redirect_to_a_host_not_on_the_allowlist_is_refused(trusted: Server,
                                                              secvf_env: Path) -> None:
    trusted.routes["/latest.iso"] = Route(redirect=trusted.url("/d/test.iso", host="localhost"))
    with pytest.raises(UntrustedSource, match="redirect target .*localhost"):
        api.fetch_iso(trusted.url("/latest.iso"), sha256=ISO_SHA)
    assert trusted.paths() == ["/latest.iso"]  # the other host was never contacted
    assert cache_files(secvf_env) == []


def test_a_redirect_to_plain_http_is_refused(trusted: Server) -> None:
    trusted.routes["/latest.iso"] = Route(
        redirect=trusted.url("/d/test.iso").replace("https://", "http://"))
    with pytest.raises(UntrustedSource, match="plain http"):
        api.fetch_iso(trusted.url("/latest.iso"), sha256=ISO_SHA)


def test_an_empty_file_is_refused(trusted: Server, secvf_env: Path) -> None:
    trusted.routes["/d/empty.iso"] = Route(b"")
    with pytest.raises(DownloadFailed, match=r"empty file \(0 bytes\)"):
        api.fetch_iso(trusted.url("/d/empty.iso"), sha256=hashlib.sha256(b"").hexdigest())
    assert trusted.paths() == ["/d/empty.iso"]
    assert cache_files(secvf_env) == []


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", ""])
def test_names_that_could_leave_the_cache_are_refused(trusted: Server, secvf_env: Path,
                                                      name: str) -> None:
    with pytest.raises(InvalidName):
        api.fetch_iso(trusted.url("/d/test.iso"), sha256=ISO_SHA, name=name)
    assert trusted.requests == [] and cache_files(secvf_env) == []
    assert not (secvf_env / "evil").exists()


def test_a_url_whose_file_name_is_no_name_needs_name(trusted: Server) -> None:
    with pytest.raises(InvalidName, match="give one with --name"):
        api.fetch_iso(trusted.url("/d/..%2Fevil.iso"), sha256=ISO_SHA)
    assert trusted.requests == []


def test_the_certificate_is_verified(trusted: Server, secvf_env: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the test CA (the system's CAs only) the same server is refused."""
    monkeypatch.delenv("SECVF_ISO_CA_FILE")
    with pytest.raises(DownloadFailed, match="does not verify"):
        api.fetch_iso(trusted.url("/d/test.iso"), sha256=ISO_SHA)
    assert cache_files(secvf_env) == []


def test_a_missing_ca_file_is_a_clear_error(trusted: Server, tmp_path: Path) -> None:
    proc = run_cli("iso", "fetch", trusted.url("/d/test.iso"), "--sha256", ISO_SHA,
                   "--ca-file", str(tmp_path / "nope.pem"))
    assert_clean_error(proc, "cannot load CA certificates", "nope.pem")


def test_sha256_or_checksums_is_required_and_checked(trusted: Server) -> None:
    assert_clean_error(run_cli("iso", "fetch", trusted.url("/d/test.iso")),
                       "exactly one of --sha256 HEX and --checksums URL")
    assert_clean_error(run_cli("iso", "fetch", trusted.url("/d/test.iso"), "--sha256", "abc"),
                       "not a SHA-256")
    assert trusted.requests == []


def test_the_default_allowlist_is_written_on_first_use_and_allows_distributions(
        secvf_env: Path) -> None:
    with pytest.raises(UntrustedSource, match="example.org is not on the ISO host allowlist"):
        api.fetch_iso("https://example.org/x.iso", sha256=ISO_SHA)
    hosts = (secvf_env / "config" / "iso-hosts").read_text()
    assert stat.S_IMODE(os.stat(secvf_env / "config" / "iso-hosts").st_mode) == 0o600
    for host in ("cdimage.debian.org", "releases.ubuntu.com", "dl.fedoraproject.org",
                 "geo.mirror.pkgbuild.com", "dl-cdn.alpinelinux.org", "cdimage.kali.org"):
        assert f"\n{host}\n" in hosts
