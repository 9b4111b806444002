"""The jail launcher on real processes: identity, capabilities, namespaces, file view,
exit status and signals (root here and in CI; the user-namespace path as nobody)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secvf.jail.spec import Bind, JailSpec
from secvf.jail.view import DEVICES, JAIL_NAMESPACES, jailed_argv, python_binds

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jail launcher as root")

UID = 2_000_000_000 + 7 * 65536

#: Run in the jail: what the process is and sees, as JSON.
PROBE = r"""
import json, os, sys
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
def can(path, mode):
    try:
        open(path, mode).close(); return True
    except OSError as e:
        return e.strerror
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "pid": os.getpid(),
    "cap_eff": status["CapEff"].strip(), "cap_bnd": status["CapBnd"].strip(),
    "nnp": status["NoNewPrivs"].strip(), "seccomp": status["Seccomp"].strip(),
    "ns": {n: os.readlink(f"/proc/self/ns/{n}") for n in ("mnt", "pid", "ipc", "net")},
    "root": sorted(os.listdir("/")), "dev": sorted(os.listdir("/dev")),
    "read_ro": can(sys.argv[1], "r"), "write_ro": can(sys.argv[1], "a"),
    "write_rw": can(sys.argv[2], "a"), "hidden": can(sys.argv[3], "r"),
    "etc_shadow": can("/etc/shadow", "r"),
    "root_dir": sorted(os.listdir("/root")) if os.path.isdir("/root") else [],
}))
"""


@pytest.fixture
def tree() -> Iterator[dict[str, Path]]:
    # under a directory every uid can pass through: the unprivileged test's launcher
    # resolves these paths as nobody
    tmp_path = Path(tempfile.mkdtemp(prefix="secvf-jail-test-"))
    try:
        yield _make_tree(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _make_tree(tmp_path: Path) -> dict[str, Path]:
    ro, rw, hidden = tmp_path / "ro", tmp_path / "rw", tmp_path / "hidden"
    for d in (ro, rw, hidden):
        d.mkdir()
    (ro / "f").write_text("ro")
    (ro / "f").chmod(0o666)  # only the read-only bind stops a write
    (rw / "f").write_text("rw")
    (hidden / "f").write_text("secret")
    os.chown(rw, UID, UID)
    os.chown(rw / "f", UID, UID)
    tmp_path.chmod(0o755)
    root = tmp_path / "jail-root"
    root.mkdir()
    return {"ro": ro, "rw": rw, "hidden": hidden, "root": root}


def _spec(tree: dict[str, Path], **changes: object) -> JailSpec:
    fields: dict[str, object] = dict(
        name="probe", uid=UID, gid=UID, namespaces=list(JAIL_NAMESPACES),
        root=str(tree["root"]), devices=list(DEVICES),
        binds=[Bind(str(tree["ro"]), str(tree["ro"])),
               Bind(str(tree["rw"]), str(tree["rw"]), writable=True), *python_binds()])
    fields.update(changes)
    return JailSpec(**fields)  # type: ignore[arg-type]


def _probe(spec: JailSpec, tree: dict[str, Path]) -> dict[str, object]:
    argv = jailed_argv(spec, [sys.executable, "-c", PROBE, str(tree["ro"] / "f"),
                              str(tree["rw"] / "f"), str(tree["hidden"] / "f")])
    # under the supervisor's umask: the tree must still be passable by the jailed uid
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          preexec_fn=lambda: os.umask(0o077))
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_jailed_process_has_its_identity_no_capabilities_and_its_own_namespaces(tree):
    seen = _probe(_spec(tree), tree)
    assert (seen["uid"], seen["gid"], seen["groups"]) == (UID, UID, [])
    assert seen["cap_eff"] == seen["cap_bnd"] == "0000000000000000"
    assert seen["nnp"] == "1"
    assert seen["pid"] == 1  # the init of its own PID namespace
    host = {n: os.readlink(f"/proc/self/ns/{n}") for n in ("mnt", "pid", "ipc", "net")}
    assert all(seen["ns"][n] != host[n] for n in host), (seen["ns"], host)  # type: ignore[index]


def test_jail_shows_only_its_binds_devices_and_system_trees(tree):
    seen = _probe(_spec(tree), tree)
    assert seen["read_ro"] is True
    assert seen["write_ro"] == "Read-only file system"
    assert seen["write_rw"] is True
    assert seen["hidden"] == "No such file or directory"
    assert seen["etc_shadow"] == "No such file or directory"
    assert "home" not in seen["root"]  # type: ignore[operator]
    # /root holds only what the Python binds need (a Python installed under it)
    assert seen["root_dir"] == sorted({Path(b.target).parts[2] for b in python_binds()
                                       if Path(b.target).is_relative_to("/root")})
    assert seen["dev"] == sorted(Path(d).name for d in DEVICES)


def test_helper_filter_is_installed_when_asked(tree):
    assert _probe(_spec(tree), tree)["seccomp"] == "0"
    assert _probe(_spec(tree, seccomp="helper"), tree)["seccomp"] == "2"


def test_exit_status_and_signals_pass_through(tree):
    spec = _spec(tree)
    done = subprocess.run(jailed_argv(spec, ["/bin/sh", "-c", "exit 7"]), check=False,
                          timeout=60)
    assert done.returncode == 7
    proc = subprocess.Popen(jailed_argv(spec, ["/bin/sh", "-c",
                                               "trap 'exit 42' TERM; while :; do sleep 0.1; "
                                               "done"]))
    time.sleep(1.5)  # let the trap be set
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 42


def test_bad_spec_and_relative_program_are_refused(tree):
    launcher = [sys.executable, "-m", "secvf.jail.launcher"]
    done = subprocess.run([*launcher, "--spec", '{"name": "x", "namespaces": ["time"]}', "--",
                           "/bin/true"], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "unknown namespaces" in done.stderr
    done = subprocess.run([*launcher, "--spec", _spec(tree).to_json(), "--", "true"],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "not an absolute path" in done.stderr


def test_bind_outside_the_root_is_refused(tree):
    spec = _spec(tree, binds=[Bind(str(tree["ro"]), "/../../etc")])
    done = subprocess.run(jailed_argv(spec, ["/bin/true"]), capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode != 0 and "not a clean absolute path" in done.stderr


def _nobody_can_make_user_namespaces() -> bool:
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "unshare", "--user", "true"], capture_output=True, check=False)
    return done.returncode == 0


@pytest.mark.skipif(shutil.which("setpriv") is None or not _nobody_can_make_user_namespaces(),
                    reason="this kernel refuses user namespaces to unprivileged users")
def test_unprivileged_jail_is_a_user_namespace_with_no_capabilities(tree):
    os.chown(tree["rw"], 65534, 65534)
    os.chown(tree["rw"] / "f", 65534, 65534)
    spec = _spec(tree, uid=None, gid=None, user_namespace=True,
                 binds=[Bind(str(tree["ro"]), str(tree["ro"])),
                        Bind(str(tree["rw"]), str(tree["rw"]), writable=True)])
    script = ('id -u; grep CapEff /proc/self/status; echo $$; echo x >> "$1" && echo wrote; '
              'cat "$2" 2>&1 || true')
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            *jailed_argv(spec, ["/bin/sh", "-c", script, "sh", str(tree["rw"] / "f"),
                                str(tree["hidden"] / "f")])]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    uid, caps, pid, wrote, hidden = done.stdout.splitlines()
    assert uid == "65534" and caps.split()[1] == "0000000000000000" and pid == "1"
    assert wrote == "wrote" and "No such file or directory" in hidden
