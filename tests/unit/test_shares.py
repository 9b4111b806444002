"""Share validation for AI sandboxes (no VM needed: refused before anything boots)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from secvf.machine.sandbox import sandbox_channels
from secvf.machine.shares import ShareError, guest_share_param, uid_map, virtiofsd_argv
from tests.helpers import run_cli


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("ws", "ref", "other"):
        out[name] = tmp_path / name
        out[name].mkdir()
    (out["ws"] / "inner").mkdir()
    (tmp_path / "link").symlink_to(out["ref"])
    out["link"] = tmp_path / "link"
    return out


def test_workspace_and_read_only_shares(dirs: dict[str, Path]) -> None:
    ch = sandbox_channels("s1", workspace=dirs["ws"], shares=[f"{dirs['ref']}:/ref:ro"])
    assert [(s.tag, s.guest_path, s.read_only) for s in ch.shares] == [
        ("workspace", "/workspace", False), ("ro0", "/ref", True)]
    assert guest_share_param(ch.shares) == "secvf_shares=workspace:/workspace:rw,ro0:/ref:ro"


@pytest.mark.parametrize(("spec", "word"), [
    ("{ws}/inner:/x:ro", "overlap"),          # a ro share inside the writable workspace
    ("{ref}:/workspace/ref:ro", "overlap"),  # mounted inside /workspace in the guest
    ("{ref}:/x:rw", "HOSTDIR:GUESTPATH:ro"),  # extra shares are read-only only
    ("{ref}:relative:ro", "absolute"),
    ("{ref}:/proc:ro", "absolute"),
    ("{link}:/x:ro", "symlink"),
    ("{ws}/missing:/x:ro", "does not exist"),
    ("/:/x:ro", "too broad"),
    ("/etc:/x:ro", "too broad"),
])
def test_bad_shares_are_refused(dirs: dict[str, Path], spec: str, word: str) -> None:
    with pytest.raises(ShareError, match=word):
        sandbox_channels("s2", workspace=dirs["ws"], shares=[spec.format(**dirs)])


def test_two_read_only_shares_may_not_nest(dirs: dict[str, Path]) -> None:
    nested = dirs["ref"] / "sub"
    nested.mkdir()
    with pytest.raises(ShareError, match="overlap"):
        sandbox_channels("s3", workspace=dirs["ws"],
                         shares=[f"{dirs['ref']}:/a:ro", f"{nested}:/b:ro"])


def test_home_itself_cannot_be_the_workspace() -> None:
    with pytest.raises(ShareError, match="too broad"):
        sandbox_channels("s4", workspace=Path.home())


def test_overlap_is_refused_through_the_cli(dirs: dict[str, Path]) -> None:
    proc = run_cli("sandbox", "create", "ov", "--workspace", str(dirs["ws"]),
                   "--share", f"{dirs['ws']}/inner:/data:ro")
    assert proc.returncode != 0 and "overlap" in proc.stderr
    assert proc.stderr.count("\n") == 1


@pytest.mark.skipif(os.getuid() != 0, reason="the root uid range applies when run as root")
def test_read_only_share_is_a_read_only_nosuid_bind_in_a_user_namespace(dirs) -> None:
    ch = sandbox_channels("s5", workspace=dirs["ws"], shares=[f"{dirs['ref']}:/ref:ro"])
    ro_argv = " ".join(virtiofsd_argv(ch.shares[1]))
    rw_argv = " ".join(virtiofsd_argv(ch.shares[0]))
    assert "remount,bind,nosuid,nodev,ro " in ro_argv
    assert "remount,bind,nosuid,nodev " in rw_argv and ",ro " not in rw_argv
    base = uid_map().host_base
    assert base and f"--map-users={base},0,65536" in ro_argv
    # the default workspace is owned by the guest agent's mapped uid, never host root
    ch_default = sandbox_channels("s6")
    assert Path(ch_default.shares[0].host_path).stat().st_uid == base + 1000


def test_options_follow_the_installed_virtiofsd(tmp_path: Path) -> None:
    from secvf.machine.shares import STAGED_SOURCE, virtiofsd_options

    rust = tmp_path / "virtiofsd-rust"
    rust.write_text("#!/bin/sh\necho 'Usage: virtiofsd [OPTIONS] --shared-dir <DIR>'\n")
    rust.chmod(0o755)
    c_style = tmp_path / "virtiofsd-c"
    c_style.write_text("#!/bin/sh\necho '    -o source=PATH    shared directory tree'\n")
    c_style.chmod(0o755)
    assert virtiofsd_options(str(rust))[:2] == ("--shared-dir", STAGED_SOURCE)
    assert virtiofsd_options(str(c_style))[:2] == ("-o", f"source={STAGED_SOURCE}")


def test_subordinate_ranges_are_read_per_file(tmp_path: Path) -> None:
    import pwd

    from secvf.machine.shares import UidMap, _subordinate_base

    me = pwd.getpwuid(os.getuid()).pw_name
    ranges = tmp_path / "subuid"
    ranges.write_text(f"alice:100000:65536\n{me}:200000:1000\n{me}:300000:65536\n")
    assert _subordinate_base(ranges) == 300000  # the first range big enough
    ranges.write_text("alice:100000:65536\n")
    assert _subordinate_base(ranges) is None
    args = UidMap(300000, 165536).unshare_args()
    assert "--map-users=300000,0,65536" in args and "--map-groups=165536,0,65536" in args
    assert UidMap(300000, 165536).host_gid(1000) == 166536
