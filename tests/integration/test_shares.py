"""Shares in a real guest: your own private files work, privileged files never reach the host.

One sandbox serves every test here: a 0700 workspace with 0600 files and a 0700
read-only share, both made by the test the way ``mktemp -d`` would.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from secvf.errors import ExitCode
from secvf.machine.share_settings import load_settings as load_share_settings
from secvf.machine.shares import uid_map
from secvf.store.bundle import get_bundle
from tests.helpers import run_cli

pytestmark = pytest.mark.vm

NAME = "shares"
SECRET = "only the owner may read this\n"


@dataclass(frozen=True)
class Sandbox:
    workspace: Path  # host side of /workspace
    reference: Path  # host side of /data/ref (read-only)


def sh(script: str, *, root: bool = False) -> subprocess.CompletedProcess[str]:
    """``script`` in the sandbox; when the channel itself fails (exit 125), its stderr
    gains the tails of the VM's supervisor and serial logs, so a failure says why."""
    proc = run_cli("vm", "exec", NAME, *(["--root"] if root else []), "-c", script)
    if proc.returncode == ExitCode.SECVF_ERROR:
        bundle = get_bundle(NAME)
        for log in (bundle.supervisor_log, bundle.serial_log):
            lines = log.read_text(errors="replace").splitlines()[-30:]
            proc.stderr += f"--- last lines of {log.name} ---\n" + "\n".join(lines) + "\n"
    return proc


def refused(proc: subprocess.CompletedProcess[str]) -> bool:
    """The command ran in the guest and failed: not 0, and not exit 125 (that is the exec
    channel failing, which would make an attack look refused without ever running it)."""
    return proc.returncode not in (0, ExitCode.SECVF_ERROR)


def private_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="secvf-share-"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    return path


def write_private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


@pytest.fixture(scope="module")
def sandbox(vm_library: Path) -> Iterator[Sandbox]:
    ws, ref = private_dir(), private_dir()
    write_private(ws / "notes.txt", SECRET)
    (ws / "src").mkdir(mode=0o700)
    # a private module the guest imports and runs: it reads the private notes (0600)
    write_private(ws / "src" / "test_one.py",
                  "def test_one():\n"
                  "    with open('/workspace/notes.txt') as fh:\n"
                  f"        assert fh.read().startswith({SECRET!r})\n")
    write_private(ref / "data.txt", SECRET)
    (ref / "deep").mkdir(mode=0o700)
    write_private(ref / "deep" / "more.txt", "more\n")
    try:
        run_cli("sandbox", "create", NAME, "--memory", "512M", "--workspace", str(ws),
                "--share", f"{ref}:/data/ref:ro", check=True)
        run_cli("sandbox", "start", NAME, check=True)
        yield Sandbox(ws, ref)
    finally:
        run_cli("sandbox", "stop", NAME)
        run_cli("sandbox", "rm", NAME, "--purge", "--force")
        shutil.rmtree(ws, ignore_errors=True)
        shutil.rmtree(ref, ignore_errors=True)


def tree_facts(root: Path) -> dict[str, tuple[int, int, int, int, bytes]]:
    """Mode, owner, group, mtime and content of everything under ``root``."""
    facts = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        body = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        facts[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid,
                                              st.st_mtime_ns, body)
    return facts


def privileged_files(root: Path) -> list[str]:
    """Everything under ``root`` that is setuid, setgid, a device node or has file
    capabilities."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if mode & (stat.S_ISUID | stat.S_ISGID) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            found.append(f"{path} {stat.filemode(mode)}")
        if "security.capability" in os.listxattr(path, follow_symlinks=False):
            found.append(f"{path} has file capabilities")
    return found


def test_agent_owns_your_private_files(sandbox: Sandbox) -> None:
    listing = sh("stat -c '%u:%g %a %n' /workspace /workspace/notes.txt /workspace/src "
                 "/data/ref /data/ref/data.txt")
    assert listing.returncode == 0, listing.stderr
    assert [line.split()[:2] for line in listing.stdout.splitlines()] == [
        ["1000:1000", "700"], ["1000:1000", "600"], ["1000:1000", "700"],
        ["1000:1000", "700"], ["1000:1000", "600"]]
    read = sh("cat /workspace/notes.txt /data/ref/data.txt /data/ref/deep/more.txt")
    assert read.returncode == 0 and read.stdout == SECRET + SECRET + "more\n", read.stderr


def test_agent_writes_and_the_files_are_yours_on_the_host(sandbox: Sandbox) -> None:
    proc = sh("echo appended >> /workspace/notes.txt && mkdir /workspace/src/pkg && "
              "echo made > /workspace/src/pkg/new.txt && cd /workspace/src && "
              "python3 -c 'import test_one; test_one.test_one()'")
    assert proc.returncode == 0, proc.stderr
    assert (sandbox.workspace / "notes.txt").read_text() == SECRET + "appended\n"
    for path in (sandbox.workspace / "src" / "pkg", sandbox.workspace / "src" / "pkg" / "new.txt"):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), path
    # editable on the host as yourself, and the guest sees the edit
    (sandbox.workspace / "src" / "pkg" / "new.txt").write_text("edited on the host\n")
    assert sh("cat /workspace/src/pkg/new.txt").stdout == "edited on the host\n"


def test_guest_root_creates_files_as_the_vms_own_ids(sandbox: Sandbox) -> None:
    assert sh("echo r > /workspace/by-root", root=True).returncode == 0
    st = (sandbox.workspace / "by-root").stat()
    jail = json.loads(run_cli("vm", "status", NAME, "--json", check=True).stdout)["jail"]
    # as root: the first id of the VM's jail block; otherwise your /etc/subuid range
    ids = uid_map(jail["uid"] if jail and jail["slot"] is not None else None)
    assert (st.st_uid, st.st_gid) == (ids.host_uid(0), ids.host_gid(0))
    assert st.st_uid not in (0, os.getuid())


#: Every way (as a shell or a program) to make a setuid/setgid file or a device node.
ATTACKS = {
    "chmod u+s": "echo x > {p}u && chmod u+s {p}u",
    "chmod g+s": "echo x > {p}g && chmod g+s {p}g",
    "chmod 6755": "echo x > {p}6 && chmod 6755 {p}6",
    "chmod g+s dir": "mkdir {p}dg && chmod g+s {p}dg",
    "mkdir -m 2755": "mkdir -m 2755 {p}dm && stat -c %a {p}dm | grep -q 2755",
    "install -m 4755": "install -m 4755 /bin/true {p}inst",
    "cp -p setuid su": "cp -p /bin/su {p}su && test -u {p}su",
    "create with 04755": ("python3 -c \"import os; "
                          "os.open('{p}o', os.O_CREAT | os.O_RDWR, 0o4755)\""),
    "create with 02755": ("python3 -c \"import os; "
                          "os.open('{p}g', os.O_CREAT | os.O_RDWR, 0o2755)\""),
    "mknod char": "mknod {p}null c 1 3",
    "mknod block": "mknod {p}loop b 7 0",
    "mknod whiteout": "mknod {p}wo c 0 0",
    "rename whiteout": ("touch {p}ws && python3 -c \"import ctypes; l = ctypes.CDLL(None); "
                        "exit(l.syscall(316, -100, b'{p}ws', -100, b'{p}wd', 4) != 0)\""),
    "chown to you then u+s": "echo x > {p}c && chown 1000:1000 {p}c && chmod 4755 {p}c",
    "chown to root then u+s": "echo x > {p}c0 && chown 0:0 {p}c0 && chmod 4755 {p}c0",
    "file capability": ("echo x > {p}cap && python3 -c \"import os; os.setxattr('{p}cap', "
                        "'security.capability', bytes([1, 0, 0, 2]) + bytes([255] * 16))\""),
}


@pytest.mark.parametrize("root", [False, True], ids=["agent", "root"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_no_privileged_file_reaches_the_host(sandbox: Sandbox, attack: str, root: bool) -> None:
    prefix = f"/workspace/{'root' if root else 'agent'}-{attack.replace(' ', '_')}-"
    proc = sh(ATTACKS[attack].format(p=prefix), root=root)
    assert refused(proc), f"{attack} succeeded: {proc.returncode} {proc.stdout}{proc.stderr}"
    assert privileged_files(sandbox.workspace) == []


def test_read_only_share_resists_guest_root(sandbox: Sandbox) -> None:
    before = tree_facts(sandbox.reference)
    attacks = [
        "echo pwned > /data/ref/data.txt", "echo pwned >> /data/ref/deep/more.txt",
        "touch /data/ref/new", "mkdir /data/ref/d", "chmod 777 /data/ref/data.txt",
        "chmod u+s /data/ref/data.txt", "chown 0:0 /data/ref/data.txt", "rm /data/ref/data.txt",
        "mv /data/ref/data.txt /data/ref/moved", "mknod /data/ref/null c 1 3",
        "ln -s /etc/passwd /data/ref/link",
        "mount -o remount,rw /data/ref && echo pwned > /data/ref/data.txt",
        "umount /data/ref; mount -t virtiofs ro0 /data/ref && echo pwned > /data/ref/data.txt",
    ]
    for attack in attacks:
        for root in (False, True):
            proc = sh(attack, root=root)
            assert refused(proc), (attack, root, proc.returncode, proc.stderr)
    assert tree_facts(sandbox.reference) == before
    assert sh("cat /data/ref/data.txt", root=True).stdout == SECRET


def test_start_refuses_a_hand_edited_share(sandbox: Sandbox, vm_library: Path) -> None:
    run_cli("sandbox", "create", "edited", "--memory", "512M", "--workspace",
            str(sandbox.reference), check=True)
    try:
        config_file = vm_library / "vms" / "edited" / "vm.json"
        config = json.loads(config_file.read_text())
        config["channels"]["shares"][0]["guest_path"] = "/etc"
        config_file.write_text(json.dumps(config))
        proc = run_cli("sandbox", "start", "edited")
        assert proc.returncode != 0 and "would hide the guest's own /etc" in proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
    finally:
        run_cli("sandbox", "rm", "edited", "--purge", "--force", check=True)


def test_the_workspace_has_the_tools_agents_run(sandbox: Sandbox) -> None:
    """git and venv with a bundled pip, used on the share (bench/shares.py times them)."""
    proc = sh("cd /workspace && git init -q -b main repo && cd repo && echo hi > f && "
              "git add f && git -c user.name=a -c user.email=a@example.invalid commit -q -m x "
              "&& git status --porcelain && python3 -c 'import ensurepip; "
              "print(ensurepip.version())'")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().split(".")[0].isdigit(), proc.stdout  # pip's version, no diff
    assert (sandbox.workspace / "repo" / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"

# ---- coherence: what one side writes, the other sees (docs/sandbox.md, "Speed") ----------


def _seen_within(script: str, seconds: float) -> subprocess.CompletedProcess[str]:
    """Poll ``script`` in the guest every 0.1 s until it succeeds, for at most ``seconds``
    of guest sleep (so a slow guest only makes the check more lenient)."""
    tries = int(seconds / 0.1) + 1
    return sh(f"i=0; until {script}; do i=$((i+1)); [ $i -ge {tries} ] && exit 1; "
              "sleep 0.1; done; echo $i")


def test_host_writes_reach_the_guest_within_the_documented_bound(sandbox: Sandbox) -> None:
    bound = load_share_settings().effective_timeout_s
    assert bound is not None and 0 < bound <= 10, "docs/sandbox.md documents this bound"
    ws = sandbox.workspace
    # a name the guest looked up and did not find: not cached as missing
    assert sh("test ! -e /workspace/late.txt").returncode == 0
    write_private(ws / "late.txt", "made on the host\n")
    assert sh("cat /workspace/late.txt").stdout == "made on the host\n"
    # a file the guest has read, rewritten longer: the next open reads all of it
    write_private(ws / "grown.txt", "v1\n")
    assert sh("cat /workspace/grown.txt").stdout == "v1\n"
    write_private(ws / "grown.txt", "version two, longer\n")
    assert sh("cat /workspace/grown.txt").stdout == "version two, longer\n"
    # what only stat shows (size, existence) may be cached for the bound, not longer
    assert sh("stat -c %s /workspace/grown.txt").stdout.strip() == "20"
    with open(ws / "grown.txt", "a") as fh:
        fh.write("appended on the host\n")
    assert _seen_within("[ $(stat -c %s /workspace/grown.txt) = 41 ]", bound + 3).returncode == 0
    (ws / "late.txt").unlink()
    assert _seen_within("! stat /workspace/late.txt 2>/dev/null", bound + 3).returncode == 0


def test_guest_writes_are_on_the_host_when_the_write_returns(sandbox: Sandbox) -> None:
    proc = sh("echo from the guest > /workspace/out.txt && mv /workspace/out.txt "
              "/workspace/moved.txt")
    assert proc.returncode == 0, proc.stderr
    assert (sandbox.workspace / "moved.txt").read_text() == "from the guest\n"
    assert not (sandbox.workspace / "out.txt").exists()


def test_no_share_setting_weakens_the_share_rules(vm_library: Path) -> None:
    """The loosest-sounding config/shares.json: the read-only share still resists guest
    root, and no setuid or capability file reaches the host."""
    ws, ref = private_dir(), private_dir()
    write_private(ref / "data.txt", SECRET)
    config = vm_library / "config" / "shares.json"
    config.parent.mkdir(exist_ok=True)
    config.write_text(json.dumps({"cache": "always", "timeout_s": 3600, "xattr": True,
                                  "writeback": True, "thread_pool_size": 4,
                                  "readdirplus": False}))
    name = "loose"
    try:
        run_cli("sandbox", "create", name, "--memory", "512M", "--workspace", str(ws),
                "--share", f"{ref}:/data/ref:ro", check=True)
        run_cli("sandbox", "start", name, check=True)
        config.unlink()  # read when the share servers start; other tests get the defaults
        before = tree_facts(ref)
        for attack in ("echo pwned > /data/ref/data.txt", "chmod u+s /data/ref/data.txt",
                       "mount -o remount,rw /data/ref && touch /data/ref/new",
                       *(ATTACKS[a].format(p="/workspace/x-") for a in
                         ("chmod u+s", "mknod char", "file capability"))):
            proc = run_cli("vm", "exec", name, "--root", "-c", attack)
            assert refused(proc), (attack, proc.returncode, proc.stderr)
        assert tree_facts(ref) == before
        assert privileged_files(ws) == []
        assert run_cli("vm", "exec", name, "-c", "cat /data/ref/data.txt").stdout == SECRET
    finally:
        config.unlink(missing_ok=True)
        run_cli("sandbox", "rm", name, "--purge", "--force")
        shutil.rmtree(ws, ignore_errors=True)
        shutil.rmtree(ref, ignore_errors=True)
