"""The ISO cache without the network: ``iso add|list|verify|rm``, ``vm create --iso NAME``,
records that do not validate, and the checksum-file and allowlist parsers."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from secvf import api
from secvf.errors import ConfigError, InvalidName, MediaError, StateError
from secvf.model.iso import parse_checksums, parse_host_allowlist
from tests.helpers import run_cli
from tests.unit.test_cli_badinput import assert_clean_error

CONTENT = b"SECVF-TEST-ISO\n" * 4096
SHA = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def medium(tmp_path: Path) -> Path:
    path = tmp_path / "dl" / "installer.iso"
    path.parent.mkdir()
    path.write_bytes(CONTENT)
    return path


def cached(home: Path, name: str) -> Path:
    return home / "isos" / name / "image.iso"


# ---- iso add ------------------------------------------------------------------------------


def test_add_copies_a_verified_file_and_leaves_the_original(medium: Path,
                                                            secvf_env: Path) -> None:
    proc = run_cli("iso", "add", str(medium), "--sha256", SHA, check=True)
    assert "added ISO installer.iso" in proc.stdout and "--iso installer.iso" in proc.stdout
    copy = cached(secvf_env, "installer.iso")
    assert copy.read_bytes() == CONTENT and medium.read_bytes() == CONTENT
    assert stat.S_IMODE(copy.stat().st_mode) == 0o644
    [entry] = api.list_isos()
    assert (entry["name"], entry["sha256"], entry["source"], entry["size_bytes"]) == (
        "installer.iso", SHA, str(medium), len(CONTENT))
    assert entry["verified_at"] == entry["added_at"]


def test_add_with_the_wrong_hash_adds_nothing(medium: Path, secvf_env: Path) -> None:
    wrong = "f" * 64
    proc = run_cli("iso", "add", str(medium), "--sha256", wrong, "--name", "deb")
    assert_clean_error(proc, f"expected {wrong}", f"got {SHA}", "nothing was added")
    assert api.list_isos() == []
    assert [p.name for p in (secvf_env / "isos").iterdir() if not p.name.startswith(".")] == []
    assert [p for p in (secvf_env / "isos").rglob("*") if p.is_file() and p.name != ".lock"] \
        == []


def test_add_refuses_an_empty_file_and_bad_names(tmp_path: Path, medium: Path) -> None:
    empty = tmp_path / "empty.iso"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty \(0 bytes\)"):
        api.add_iso(empty, sha256=hashlib.sha256(b"").hexdigest())
    for name in ("../up", "a/b", ".dot"):
        with pytest.raises(InvalidName):
            api.add_iso(medium, sha256=SHA, name=name)
    assert api.list_isos() == []


# ---- iso verify ---------------------------------------------------------------------------


def test_verify_renews_the_date_and_a_changed_medium_fails_with_both_hashes(
        medium: Path, secvf_env: Path) -> None:
    api.add_iso(medium, sha256=SHA, name="deb")
    record = secvf_env / "isos" / "deb" / "iso.json"
    data = json.loads(record.read_text())
    data["verified_at"] = "2000-01-01T00:00:00Z"
    record.write_text(json.dumps(data))
    proc = run_cli("iso", "verify", "deb", check=True)
    assert proc.stdout.startswith("ok") and SHA in proc.stdout
    assert api.list_isos()[0]["verified_at"] != "2000-01-01T00:00:00Z"

    copy = cached(secvf_env, "deb")
    copy.chmod(0o600)
    copy.write_bytes(CONTENT[:-1] + b"!")
    actual = hashlib.sha256(CONTENT[:-1] + b"!").hexdigest()
    proc = run_cli("iso", "verify")
    assert proc.returncode == 1
    assert f"MISMATCH  deb: expected {SHA}, got {actual}" in proc.stdout
    assert_clean_error(proc, "1 of 1 cached ISOs failed verification: deb")
    as_json = run_cli("iso", "verify", "deb", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout) == [{"name": "deb", "ok": False, "expected": SHA,
                                           "actual": actual, "error": None}]
    assert copy.exists()  # a mismatch is reported, not deleted


def test_verify_of_a_missing_entry_is_a_clean_error() -> None:
    assert_clean_error(run_cli("iso", "verify", "nope"), "no cached ISO named 'nope'")


# ---- records that do not validate ---------------------------------------------------------


@pytest.mark.parametrize("garbage", ["{not json", '{"name": "deb"}', "[]"])
def test_a_corrupt_record_is_reported_and_loses_nothing(medium: Path, secvf_env: Path,
                                                        garbage: str) -> None:
    api.add_iso(medium, sha256=SHA, name="deb")
    api.add_iso(medium, sha256=SHA, name="other")
    record = secvf_env / "isos" / "deb" / "iso.json"
    record.write_text(garbage)
    listed = {e["name"]: e for e in api.list_isos()}
    assert listed["other"]["error"] is None and listed["other"]["sha256"] == SHA
    assert str(record) in listed["deb"]["error"] and listed["deb"]["sha256"] is None
    proc = run_cli("iso", "list", check=True)
    assert "invalid" in proc.stdout and "other" in proc.stdout
    assert_clean_error(run_cli("iso", "verify", "deb"), str(record), "untouched")
    assert_clean_error(run_cli("vm", "create", "v", "--iso", "deb"), str(record))
    assert record.read_text() == garbage and cached(secvf_env, "deb").read_bytes() == CONTENT
    run_cli("iso", "rm", "deb", check=True)  # the way out the message names
    assert [e["name"] for e in api.list_isos()] == ["other"]


def test_a_record_naming_another_entry_is_refused(medium: Path, secvf_env: Path) -> None:
    api.add_iso(medium, sha256=SHA, name="deb")
    record = secvf_env / "isos" / "deb" / "iso.json"
    record.write_text(record.read_text().replace('"deb"', '"ubuntu"'))
    with pytest.raises(ConfigError, match="names the ISO 'ubuntu'"):
        api.verify_isos("deb")


# ---- vm create --iso NAME and iso rm --------------------------------------------------------


def test_vm_create_boots_a_cached_iso_by_name_and_rm_is_refused_while_it_is_used(
        medium: Path, secvf_env: Path) -> None:
    api.add_iso(medium, sha256=SHA, name="deb")
    run_cli("vm", "create", "web", "--iso", "deb", "--network", "none", check=True)
    run_cli("vm", "create", "db", "--iso", "deb", "--network", "none", check=True)
    boot = json.loads((secvf_env / "vms" / "web" / "vm.json").read_text())["boot"]
    assert boot["type"] == "iso" and boot["path"] == str(cached(secvf_env, "deb"))

    assert_clean_error(run_cli("iso", "rm", "deb"), "used by VM db, web")
    run_cli("vm", "media", "eject", "db", check=True)
    with pytest.raises(StateError, match="used by VM db, web"):  # ejected still names it
        api.remove_iso("deb")
    run_cli("vm", "delete", "web", check=True)
    run_cli("vm", "delete", "db", check=True)
    assert "removed cached ISO deb" in run_cli("iso", "rm", "deb", check=True).stdout
    assert not (secvf_env / "isos" / "deb").exists() and api.list_isos() == []


def test_a_corrupt_vm_that_names_the_iso_still_blocks_rm(medium: Path, secvf_env: Path) -> None:
    api.add_iso(medium, sha256=SHA, name="deb")
    run_cli("vm", "create", "web", "--iso", "deb", "--network", "none", check=True)
    config = secvf_env / "vms" / "web" / "vm.json"
    config.write_text(config.read_text().replace('"cpus": 1', '"cpus": "lots"'))
    assert_clean_error(run_cli("iso", "rm", "deb"), "used by VM web")


def test_a_bare_name_is_the_cache_entry_and_a_path_is_a_file(
        medium: Path, secvf_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api.add_iso(medium, sha256=SHA, name="installer.iso")
    monkeypatch.chdir(medium.parent)  # a file of the same name is in the current directory
    run_cli("vm", "create", "a", "--iso", "installer.iso", check=True)
    run_cli("vm", "create", "b", "--iso", "./installer.iso", check=True)
    paths = [json.loads((secvf_env / "vms" / vm / "vm.json").read_text())["boot"]["path"]
             for vm in ("a", "b")]
    assert paths == [str(cached(secvf_env, "installer.iso")), str(medium)]
    assert_clean_error(run_cli("vm", "create", "c", "--iso", "nosuch.iso"), "ISO", "nosuch.iso")


def test_rm_of_a_missing_entry_and_a_bad_name() -> None:
    assert_clean_error(run_cli("iso", "rm", "nope"), "no cached ISO named 'nope'")
    assert_clean_error(run_cli("iso", "rm", "../x"), "name")


# ---- the parsers ------------------------------------------------------------------------------


def test_sha256sum_escaped_names_and_conflicting_entries() -> None:
    sums = f"\\{SHA}  odd\\\\name.iso\n"  # sha256sum escapes a backslash in a name
    assert parse_checksums(sums, "odd\\name.iso", source="s") == SHA
    twice = f"{SHA}  x.iso\n{'e' * 64}  x.iso\n"
    with pytest.raises(MediaError, match="2 different SHA-256 values"):
        parse_checksums(twice, "x.iso", source="s")
    with pytest.raises(MediaError, match="no SHA-256 in a format"):
        parse_checksums(f"MD5 (x.iso) = {'a' * 32}\n", "x.iso", source="s")
    with pytest.raises(MediaError, match="no SHA-256 for x.iso"):
        parse_checksums(f"{SHA}  y.iso\n", "x.iso", source="s")  # a bare hash needs no name
    assert parse_checksums(f"  {SHA.upper()}  \n\n", "x.iso", source="s") == SHA


def test_a_checksum_for_another_file_of_the_same_suffix_is_not_taken() -> None:
    with pytest.raises(MediaError):
        parse_checksums(f"{SHA}  my-x.iso\n", "x.iso", source="s")


def test_allowlist_entries_ports_and_wildcards() -> None:
    allow = parse_host_allowlist("a.example.org\nb.example.org:8443  # a mirror\n"
                                 "*.mirrors.example.net\n", source="f")
    assert allow.allows("a.example.org", 443) and allow.allows("A.Example.Org.", 443)
    assert not allow.allows("a.example.org", 8443)
    assert allow.allows("b.example.org", 8443) and not allow.allows("b.example.org", 443)
    assert allow.allows("x.mirrors.example.net", 443)
    assert not allow.allows("mirrors.example.net", 443)  # the domain itself is not below it
    assert not allow.allows("evilmirrors.example.net", 443)
    assert not allow.allows("a.example.org.evil.com", 443)
    for bad in ("*", "http://a.org", "a.org:0", "a.org:http", "bad host", "*.org:x"):
        with pytest.raises(ConfigError, match="f line 1"):
            parse_host_allowlist(bad, source="f")


def test_an_edited_allowlist_is_read_and_a_broken_one_is_a_clean_error(
        secvf_env: Path) -> None:
    config = secvf_env / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "iso-hosts").write_text("cdimage.debian.org\nnot a host\n")
    proc = run_cli("iso", "fetch", "https://cdimage.debian.org/x.iso", "--sha256", SHA)
    assert_clean_error(proc, f"{config / 'iso-hosts'} line 2")
    assert os.stat(config / "iso-hosts").st_size > 0  # left as the user wrote it
