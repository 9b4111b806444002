"""Share validation, the id map and the seccomp filter (no VM needed: refused before boot)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from secvf.machine.sandbox import build_sandbox_machine, sandbox_channels
from secvf.machine.seccomp import ARCHES, assemble, install_share_filter
from secvf.machine.shares import (
    ShareError,
    UidMap,
    default_workspace,
    guest_share_param,
    parse_share_spec,
    prepare_default_workspace,
    uid_map,
    validate_shares,
    virtiofsd_argv,
)
from secvf.model.config import Share, new_mac, now_iso, parse_config
from secvf.store.bundle import Bundle, RuntimeFiles
from tests.helpers import run_cli

AS_ROOT = pytest.mark.skipif(os.getuid() != 0, reason="chowns to another user")


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("ws", "ref", "other"):
        out[name] = tmp_path / name
        out[name].mkdir(mode=0o700)
    (out["ws"] / "inner").mkdir()
    (tmp_path / "link").symlink_to(out["ref"])
    out["link"] = tmp_path / "link"
    world = tmp_path / "world"
    world.mkdir()
    world.chmod(0o1777)
    out["world"] = world
    return out


def share(host: Path | str, guest: str, *, tag: str = "ro0", read_only: bool = True) -> Share:
    return Share(tag=tag, host_path=str(host), guest_path=guest, read_only=read_only)


def workspace(host: Path | str) -> Share:
    return share(host, "/workspace", tag="workspace", read_only=False)


# ---- --share syntax --------------------------------------------------------------------------


def test_workspace_and_read_only_shares(dirs: dict[str, Path]) -> None:
    ch = sandbox_channels("s1", workspace=dirs["ws"], shares=[f"{dirs['ref']}:/ref:ro"])
    assert [(s.tag, s.guest_path, s.read_only) for s in ch.shares] == [
        ("workspace", "/workspace", False), ("ro0", "/ref", True)]
    assert guest_share_param(ch.shares) == "secvf_shares=workspace:/workspace:rw,ro0:/ref:ro"


def test_share_mode_is_optional_read_only_by_default_and_rw_is_accepted(dirs) -> None:
    ch = sandbox_channels("s1", workspace=dirs["ws"],
                          shares=[f"{dirs['ref']}:/data/ref", f"{dirs['other']}:/data/out:rw"])
    assert [(s.tag, s.guest_path, s.read_only) for s in ch.shares[1:]] == [
        ("ro0", "/data/ref", True), ("rw1", "/data/out", False)]


@pytest.mark.parametrize("spec", ["{ref}", "{ref}:ro", "{ref}:/x:rx", "{ref}:relative",
                                  ":/x:ro", "{ref}:/x:"])
def test_bad_share_syntax(dirs: dict[str, Path], spec: str) -> None:
    with pytest.raises(ShareError, match=r"HOSTDIR:GUESTPATH\[:ro\|:rw\]"):
        parse_share_spec(spec.format(**dirs), 0)


def test_host_dir_may_contain_a_colon(tmp_path: Path) -> None:
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_share_spec(f"{odd}:/data/x:rw", 0).host_path == str(odd)


# ---- host paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "word"), [
    ("{ws}/inner:/x:ro", "overlap"),          # a ro share inside the writable workspace
    ("{ref}:/workspace/ref:ro", "overlap"),  # mounted inside /workspace in the guest
    ("{ref}:relative:ro", "absolute"),
    ("{link}:/x:ro", "symlink"),
    ("{ws}/missing:/x:ro", "does not exist"),
    ("/:/x:ro", "too broad"),
    ("/etc:/x:ro", "too broad"),
    ("/usr:/x:ro", "too broad"),
    ("/home:/x:ro", "too broad"),
    ("/proc/sys:/x:ro", "kernel and device"),
    ("/sys/kernel:/x:ro", "kernel and device"),
    ("/usr/share:/x:rw", "system tree /usr"),
    ("/var/lib:/x:rw", "system tree /var"),
    ("{world}:/x:rw", "world-writable"),
])
def test_bad_shares_are_refused(dirs: dict[str, Path], spec: str, word: str) -> None:
    with pytest.raises(ShareError, match=word):
        sandbox_channels("s2", workspace=dirs["ws"], shares=[spec.format(**dirs)])


@pytest.mark.parametrize(("path", "word"), [
    ("/usr/local", "system tree /usr"),
    ("/opt", "too broad"),
    ("/etc/ssh", "system tree /etc"),
    ("/var/tmp", "system tree /var"),
    ("/tmp", "world-writable|overlaps|too broad"),  # too broad when $HOME is in it
    ("/home", "too broad"),
])
def test_system_trees_and_world_writable_dirs_are_not_workspaces(path: str, word: str) -> None:
    if not Path(path).is_dir():
        pytest.skip(f"{path} does not exist here")
    with pytest.raises(ShareError, match=word):
        sandbox_channels("s2", workspace=Path(path))


def test_system_trees_may_be_shared_read_only_below_their_top(dirs) -> None:
    ch = sandbox_channels("s2", workspace=dirs["ws"], shares=["/usr/share:/data/share"])
    assert ch.shares[1].read_only and ch.shares[1].host_path == "/usr/share"


def test_world_writable_dir_is_refused_read_write_but_not_read_only(dirs) -> None:
    with pytest.raises(ShareError, match="world-writable"):
        sandbox_channels("s2", workspace=dirs["world"])
    sandbox_channels("s2", workspace=dirs["ws"], shares=[f"{dirs['world']}:/data/w:ro"])


def test_home_and_what_contains_it_are_too_broad(tmp_path, monkeypatch) -> None:
    home = tmp_path / "users" / "me"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    for path in (home, home.parent):
        with pytest.raises(ShareError, match="too broad"):
            sandbox_channels("s4", workspace=path)
        with pytest.raises(ShareError, match="too broad"):
            sandbox_channels("s4", shares=[f"{path}:/data/h:ro"])


def test_dot_directories_of_home_are_refused_read_write(tmp_path, monkeypatch) -> None:
    home = tmp_path / "me"
    (home / ".config" / "tool").mkdir(parents=True, mode=0o700)
    (home / "project").mkdir(mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SECVF_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ShareError, match=r"\.config"):
        sandbox_channels("s4", workspace=home / ".config" / "tool")
    ch = sandbox_channels("s4", workspace=home / "project",
                          shares=[f"{home / '.config' / 'tool'}:/data/cfg:ro"])
    assert ch.shares[1].read_only


def test_secvf_state_is_never_shared(secvf_env: Path, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SECVF_CACHE", str(cache))
    prepare_default_workspace("other")
    (cache / "images" / "x").mkdir(parents=True)
    refused = [secvf_env, secvf_env / "sandboxes", default_workspace("other"), cache,
               cache / "images" / "x", Path(os.environ["SECVF_RUNTIME_DIR"]), tmp_path]
    for path in refused:
        with pytest.raises(ShareError, match="overlaps"):
            sandbox_channels("s7", workspace=path)
        with pytest.raises(ShareError, match="overlaps"):
            sandbox_channels("s7", shares=[f"{path}:/data/x:ro"])


def test_own_default_workspace_is_the_one_allowed_path_in_secvf_home(secvf_env: Path) -> None:
    ch = sandbox_channels("mine")
    ws = Path(ch.shares[0].host_path)
    assert ws == default_workspace("mine") and ws.is_relative_to(secvf_env)
    st = ws.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (os.getuid(), os.getgid(), 0o700)
    validate_shares(ch.shares, name="mine")
    with pytest.raises(ShareError, match="overlaps"):  # imported or renamed as someone else
        validate_shares(ch.shares, name="thief")
    with pytest.raises(ShareError, match="overlaps"):  # only as the workspace
        validate_shares([share(ws, "/data/ws", tag="ro0")], name="mine")


def test_default_workspace_in_the_default_library_under_dot_local(tmp_path, monkeypatch) -> None:
    """With no $SECVF_HOME the library is ~/.local/share/secvf: the sandbox's own default
    workspace there is allowed read-write; another directory of ~/.local still is not."""
    home = tmp_path / "me"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SECVF_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("SECVF_CACHE", str(tmp_path / "cache"))
    ch = sandbox_channels("mine")
    ws = Path(ch.shares[0].host_path)
    assert ws.is_relative_to(home / ".local") and not ch.shares[0].read_only
    elsewhere = home / ".local" / "state" / "tool"
    elsewhere.mkdir(parents=True, mode=0o700)
    with pytest.raises(ShareError, match=r"\.local, where programs keep settings"):
        sandbox_channels("other", workspace=elsewhere)


@AS_ROOT
def test_directories_the_share_server_cannot_open_are_refused(dirs) -> None:
    foreign = dirs["other"]
    os.chown(foreign, 1234, 1234)
    with pytest.raises(ShareError, match="owned by uid 1234, not by you"):
        sandbox_channels("s8", workspace=foreign)
    with pytest.raises(ShareError, match="cannot be opened by the share server"):
        sandbox_channels("s8", workspace=dirs["ws"], shares=[f"{foreign}:/data/f"])
    foreign.chmod(0o755)  # world-readable: served, shown as nobody in the guest
    sandbox_channels("s8", workspace=dirs["ws"], shares=[f"{foreign}:/data/f"])
    os.chown(dirs["ref"], os.getuid(), 4321)  # yours, but a group the server has no map for
    with pytest.raises(ShareError, match="cannot be opened by the share server"):
        sandbox_channels("s8", workspace=dirs["ref"])


# ---- guest paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("guest", [
    "/", "/etc", "/etc/ssh", "/usr", "/usr/local/lib", "/bin", "/sbin", "/lib", "/lib64",
    "/var", "/var/lib/x", "/proc", "/sys", "/dev", "/run", "/boot", "/root", "/home",
    "/home/agent", "/home/agent/.ssh", "/tmp", "/tmp/x"])
def test_guest_system_dirs_cannot_be_shadowed(dirs: dict[str, Path], guest: str) -> None:
    with pytest.raises(ShareError, match="would hide the guest's own"):
        sandbox_channels("s9", workspace=dirs["ws"], shares=[f"{dirs['ref']}:{guest}:ro"])


@pytest.mark.parametrize("guest", ["//etc", "/data/../etc", "/data/./x", "/data x",
                                   "/data,x", "/da*ta", "/data$x"])
def test_odd_guest_paths_are_refused(guest: str, dirs: dict[str, Path]) -> None:
    with pytest.raises(ShareError, match="guest path"):
        validate_shares([workspace(dirs["ws"]), share(dirs["ref"], guest)])


@pytest.mark.parametrize("guest", ["/mnt/ref", "/srv/ref", "/data/ref", "/ref", "/opt/ref",
                                   "/media/cd", "/mnt"])
def test_add_on_locations_are_fine_guest_paths(dirs: dict[str, Path], guest: str) -> None:
    sandbox_channels("s9", workspace=dirs["ws"], shares=[f"{dirs['ref']}:{guest}"])


# ---- hand-edited configs: the start check ----------------------------------------------------


def sandbox_config(shares: list[Share]):
    return parse_config({
        "id": str(uuid.uuid4()), "name": "edited", "kind": "ai-sandbox", "cpus": 1,
        "memory_mib": 256, "disk_bytes": 1 << 30,
        "boot": {"type": "image", "image": "sandbox", "recipe_hash": "0" * 12},
        "network": "none", "mac": new_mac(), "created_at": now_iso(), "updated_at": now_iso(),
        "channels": {"shares": [s.model_dump() for s in shares]},
    }, source="test")


@pytest.mark.parametrize(("edit", "word"), [
    (lambda d: [workspace(d["ws"]), share(d["ref"], "/etc")], "would hide"),
    (lambda d: [workspace("/usr/local")], "system tree"),
    (lambda d: [workspace(d["ws"]), share(d["ref"], "/x", tag="a,b=c")], "share tag"),
    (lambda d: [workspace(d["ws"]), share(d["ref"], "/x", tag="workspace")], "tags must be"),
    (lambda d: [workspace(d["ws"]), share("relative/dir", "/x")], "resolved"),
    (lambda d: [workspace(d["ws"]), share(d["ws"] / "inner", "/x")], "overlap"),
    (lambda d: [workspace(d["world"])], "world-writable"),
])
def test_start_refuses_a_hand_edited_config(dirs, tmp_path, monkeypatch, edit, word) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "relative" / "dir").mkdir(parents=True)
    config = sandbox_config(edit(dirs))
    with pytest.raises(ShareError, match=word):
        validate_shares(config)
    with pytest.raises(ShareError, match=word):
        build_sandbox_machine(config, Bundle(tmp_path / "vm"), RuntimeFiles(config.id), "tcg")


def test_a_valid_config_passes(dirs: dict[str, Path]) -> None:
    validate_shares(sandbox_config([workspace(dirs["ws"]), share(dirs["ref"], "/data/ref")]))
    validate_shares(sandbox_config([]))


def test_refusals_reach_the_cli_as_one_line(dirs: dict[str, Path]) -> None:
    for args in (["--share", f"{dirs['ws']}/inner:/data:ro"], ["--share", f"{dirs['ref']}:/etc:ro"],
                 ["--share", f"{dirs['world']}:/data/w:rw"]):
        proc = run_cli("sandbox", "create", "ov", "--workspace", str(dirs["ws"]), *args)
        assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr


# ---- the id map and the launch command -------------------------------------------------------


def test_guest_agent_is_the_invoking_user_and_others_the_subordinate_range() -> None:
    ids = UidMap(owner_uid=4000, owner_gid=4001, sub_uid_base=300000, sub_gid_base=500000)
    assert (ids.host_uid(1000), ids.host_gid(1000)) == (4000, 4001)
    assert (ids.host_uid(0), ids.host_gid(0), ids.host_uid(1001)) == (300000, 500000, 301001)
    args = ids.launcher_args()
    assert args == ["--uid-map", "0:300000:1000", "--uid-map", "1000:4000:1",
                    "--uid-map", "1001:301001:64535", "--gid-map", "0:500000:1000",
                    "--gid-map", "1000:4001:1", "--gid-map", "1001:501001:64535"]


def test_subordinate_ranges_are_read_per_file(tmp_path: Path) -> None:
    import pwd

    from secvf.machine.shares import _subordinate_base

    me = pwd.getpwuid(os.getuid()).pw_name
    ranges = tmp_path / "subuid"
    ranges.write_text(f"alice:100000:65536\n{me}:200000:1000\n{me}:300000:65536\n")
    assert _subordinate_base(ranges) == 300000  # the first range big enough
    ranges.write_text("alice:100000:65536\n")
    assert _subordinate_base(ranges) is None


def test_no_subordinate_range_is_refused_at_create(dirs, monkeypatch) -> None:
    from secvf.machine import shares

    monkeypatch.setattr(shares, "_subordinate_base", lambda path: None)
    with pytest.raises(ShareError, match="/etc/subuid"):
        sandbox_channels("s10", workspace=dirs["ws"])


def test_read_only_share_is_a_read_only_nosuid_bind_under_the_launcher(dirs) -> None:
    ch = sandbox_channels("s5", workspace=dirs["ws"], shares=[f"{dirs['ref']}:/ref:ro"])
    ro_argv = " ".join(virtiofsd_argv(ch.shares[1]))
    rw_argv = " ".join(virtiofsd_argv(ch.shares[0]))
    assert "remount,bind,nosuid,nodev,ro " in ro_argv
    assert "remount,bind,nosuid,nodev " in rw_argv and ",ro " not in rw_argv
    launcher = f"-m secvf.machine.share_launcher {' '.join(uid_map().launcher_args())} -- "
    assert launcher in ro_argv and launcher in rw_argv
    assert f"--uid-map 1000:{os.getuid()}:1" in ro_argv


@pytest.mark.skipif(os.getuid() != 0, reason="the in-place stage is the root order")
def test_as_root_nothing_the_launcher_needs_is_covered_before_it_starts(dirs) -> None:
    """Real root stages before the launcher starts, so that stage may not mount over
    /tmp (or anything but the source itself): SecVF's Python may live under /tmp."""
    ch = sandbox_channels("s6", workspace=dirs["ws"])
    argv = virtiofsd_argv(ch.shares[0])
    script = argv[argv.index("-c") + 1]
    assert argv.index("-c") < argv.index(sys.executable)
    assert "tmpfs" not in script and "/tmp" not in script
    assert argv[argv.index("-c") + 2] == ch.shares[0].host_path
    assert f"source={ch.shares[0].host_path}" in argv


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


@pytest.mark.skipif(shutil.which("newuidmap") is None, reason="needs newuidmap")
def test_launcher_maps_ids_and_installs_the_filter(tmp_path: Path) -> None:
    try:
        ids = uid_map()
    except ShareError as exc:
        pytest.skip(str(exc))
    probe = "cat /proc/self/uid_map /proc/self/gid_map; grep -E '^(Uid|Seccomp):' /proc/self/status"
    proc = subprocess.run([sys.executable, "-m", "secvf.machine.share_launcher",
                           *ids.launcher_args(), "--", "sh", "-c", probe],
                          capture_output=True, text=True, timeout=60, check=True)
    lines = [" ".join(line.split()) for line in proc.stdout.splitlines()]
    for owner, base in ((ids.owner_uid, ids.sub_uid_base), (ids.owner_gid, ids.sub_gid_base)):
        assert {f"0 {base} 1000", f"1000 {owner} 1", f"1001 {base + 1001} 64535"} <= set(lines)
    assert "Uid: 0 0 0 0" in lines and "Seccomp: 2" in lines


# ---- the seccomp filter ----------------------------------------------------------------------


def test_filter_jumps_stay_inside_the_program() -> None:
    for arch in ARCHES.values():
        program = assemble(arch)
        for i, (code, jt, jf, _k) in enumerate(program):
            if code & 0x07 == 0x05:  # a jump
                assert i + 1 + max(jt, jf) < len(program)
        assert program[-1][0] == 0x06  # ends in a return


FILTER_PROBE = r"""
import ctypes, os, stat, sys
from secvf.machine.seccomp import install_share_filter
os.chdir(sys.argv[1])
install_share_filter()
libc = ctypes.CDLL(None, use_errno=True)

def attempt(name, call):
    try:
        call()
        print(name, "ok")
    except OSError as exc:
        print(name, exc.errno)

def raw(nr, *args):
    result = libc.syscall(nr, *args)
    if result < 0:
        raise OSError(ctypes.get_errno(), "")
    return result

open("plain", "w").close()
attempt("chmod-u+s", lambda: os.chmod("plain", 0o4755))
attempt("chmod-g+s", lambda: os.chmod("plain", 0o2755))
attempt("chmod-plain", lambda: os.chmod("plain", 0o640))
attempt("fchmod-u+s", lambda: os.fchmod(os.open("plain", os.O_RDONLY), 0o4700))
attempt("create-suid", lambda: os.close(os.open("c1", os.O_CREAT | os.O_WRONLY, 0o4755)))
attempt("create-plain", lambda: os.close(os.open("c2", os.O_CREAT | os.O_WRONLY, 0o755)))
attempt("tmpfile-sgid", lambda: os.close(os.open(".", os.O_TMPFILE | os.O_WRONLY, 0o2755)))
# without O_CREAT the mode argument is ignored by the kernel, and by the filter
attempt("open-mode-ignored", lambda: os.close(raw(257, -100, b"plain", os.O_RDONLY, 0o4755)))
attempt("mknod-whiteout", lambda: os.mknod("wo", stat.S_IFCHR | 0o600, os.makedev(0, 0)))
attempt("mknod-block", lambda: os.mknod("blk", stat.S_IFBLK | 0o600, os.makedev(7, 0)))
attempt("mknod-suid-file", lambda: os.mknod("f", stat.S_IFREG | 0o4755))
attempt("mkfifo", lambda: os.mkfifo("fifo"))
attempt("setxattr", lambda: os.setxattr("plain", "user.x", b"1"))
open("src", "w").close()
attempt("rename-whiteout", lambda: raw(316, -100, b"src", -100, b"dst", 4))
attempt("openat2", lambda: raw(437, -100, b"plain", 0, 0))
attempt("io_uring_setup", lambda: raw(425, 1, 0))
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="probes x86-64 system calls")
def test_filter_refuses_privileged_files_and_nothing_else(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", FILTER_PROBE, str(tmp_path)],
                          capture_output=True, text=True, timeout=60, check=True)
    results = dict(line.split() for line in proc.stdout.splitlines())
    eperm, enosys = str(1), str(38)
    assert results == {
        "chmod-u+s": eperm, "chmod-g+s": eperm, "chmod-plain": "ok", "fchmod-u+s": eperm,
        "create-suid": eperm, "create-plain": "ok", "tmpfile-sgid": eperm,
        "open-mode-ignored": "ok", "mknod-whiteout": eperm, "mknod-block": eperm,
        "mknod-suid-file": eperm, "mkfifo": "ok", "setxattr": eperm,
        "rename-whiteout": eperm, "openat2": enosys, "io_uring_setup": enosys,
    }
    for path in tmp_path.iterdir():
        st = path.lstat()
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), path
        assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)), path


def test_filter_cannot_be_installed_on_an_unknown_architecture(monkeypatch) -> None:
    from secvf.machine import seccomp

    monkeypatch.setattr(seccomp, "native_arch", lambda: None)
    with pytest.raises(OSError, match="no seccomp system-call table"):
        install_share_filter()


@pytest.mark.parametrize("spec_tail", ["/data\n", "/data\n:ro"])
def test_a_trailing_newline_in_a_guest_path_is_refused(dirs: dict[str, Path],
                                                       spec_tail: str) -> None:
    with pytest.raises(ShareError):
        sandbox_channels("nl", workspace=dirs["ws"], shares=[f"{dirs['ref']}:{spec_tail}"])


# ---- the share server's open-files limit --------------------------------------------------


class _Limits:
    """A stand-in for ``resource``'s RLIMIT_NOFILE calls, optionally without
    CAP_SYS_RESOURCE (raising the hard limit fails)."""

    def __init__(self, soft: int, hard: int, *, privileged: bool) -> None:
        self.value, self.privileged = (soft, hard), privileged

    def getrlimit(self, _which: int) -> tuple[int, int]:
        return self.value

    def setrlimit(self, _which: int, value: tuple[int, int]) -> None:
        if value[1] > self.value[1] and not self.privileged:
            raise PermissionError("Operation not permitted")
        self.value = value


@pytest.mark.parametrize(("privileged", "expected"), [(True, (1 << 20, 1 << 20)),
                                                      (False, (20000, 20000))])
def test_share_server_open_files_limit_is_raised(monkeypatch, privileged, expected) -> None:
    from secvf.machine import share_launcher

    limits = _Limits(1024, 20000, privileged=privileged)
    monkeypatch.setattr(share_launcher.resource, "getrlimit", limits.getrlimit)
    monkeypatch.setattr(share_launcher.resource, "setrlimit", limits.setrlimit)
    assert share_launcher.raise_open_file_limit(1 << 20) == expected[0]
    assert limits.value == expected


def test_share_server_open_files_limit_for_real() -> None:
    """The launcher's own process: after the raise the soft limit is the hard limit it
    started with, or, with CAP_SYS_RESOURCE, the wanted one capped by fs.nr_open."""
    code = ("import resource; from secvf.machine import share_launcher as s; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (512, 4096)); "
            "print(s.raise_open_file_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    soft, now_soft, now_hard = map(int, out)
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    assert soft == now_soft
    if _has_capability(24):  # CAP_SYS_RESOURCE (root in a container may lack it)
        assert (now_soft, now_hard) == (min(1 << 20, nr_open),) * 2
    else:
        assert (now_soft, now_hard) == (4096, 4096)


def _has_capability(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False
