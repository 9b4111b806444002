"""Console logins of generic VMs, one console at a time, and syncing a sandbox before
a stop: the model, the create options, the password written into a real disk, the
kernel command line, ``vm console`` and ``vm stop`` (no guest boots here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from secvf import api
from secvf.errors import ConfigError, LockBusy, NoExecChannel
from secvf.machine.common import PRE_KERNEL_NS, kernel_params
from secvf.model.config import ConsoleAccess, VMKind, new_mac, now_iso, parse_config, save_config
from secvf.runtime import console, control
from secvf.store.bundle import Bundle
from secvf.store.disks import DiskError
from secvf.store.events import read_events
from secvf.store.library import bundle_for
from secvf.store.locks import FileLock
from secvf.workflows import vms
from secvf.workflows.create import build_config, hash_root_password
from tests.helpers import run_cli
from tests.unit.running_sandbox import RunningSandbox, mounts_work

PASSWORD = "correct horse 9"
SHADOW = ("root:*:19000:0:99999:7:::\n"
          "daemon:*:19000:0:99999:7:::\n"
          "agent:!:19000:0:99999:7:::\n")
SHADOW_GID = 42

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
needs_disk_tools = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse")
    or not all(shutil.which(t) for t in ("qemu-storage-daemon", "debugfs", "mkfs.ext4")),
    reason="needs root, /dev/fuse, qemu-storage-daemon and e2fsprogs")


def raw_config(**over: object) -> dict[str, object]:
    data: dict[str, object] = {
        "id": str(uuid.uuid4()), "name": "vm1", "kind": "generic", "cpus": 1,
        "memory_mib": 512, "disk_bytes": 1 << 30,
        "boot": {"type": "image", "image": "base", "recipe_hash": "0" * 16},
        "network": "nat", "mac": new_mac(), "created_at": now_iso(), "updated_at": now_iso(),
    }
    data.update(over)
    return data


# ---- the model -------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "console"), [
    ("generic", "login"), ("malware-analysis", "output-only"), ("ai-sandbox", "output-only")])
def test_a_config_without_a_console_gets_its_kinds_default(kind: str, console: str) -> None:
    extra: dict[str, object] = {"channels": {}} if kind == "ai-sandbox" else {}
    config = parse_config(raw_config(kind=kind, **extra), source="vm.json")
    assert config.console == console
    assert config.model_dump(mode="json")["console"] == console


@pytest.mark.parametrize("kind", ["malware-analysis", "ai-sandbox"])
@pytest.mark.parametrize("console", ["login", "autologin"])
def test_only_a_generic_vm_may_take_console_input(kind: str, console: str) -> None:
    extra: dict[str, object] = {"channels": {}} if kind == "ai-sandbox" else {}
    with pytest.raises(ConfigError, match=r"field 'console'.*output-only"):
        parse_config(raw_config(kind=kind, console=console, **extra), source="vm.json")


def test_kernel_command_line_carries_the_console_and_the_time() -> None:
    config = parse_config(raw_config(console="autologin"), source="t")
    before = time.time_ns()
    params = dict(p.split("=", 1) for p in kernel_params(config, "tcg"))
    after = time.time_ns()
    assert params["secvf_console"] == "autologin"
    sent = int(params["secvf_time"]) - PRE_KERNEL_NS["tcg"]
    assert before <= sent <= after
    mal = parse_config(raw_config(kind="malware-analysis"), source="t")
    assert "secvf_console=output-only" in kernel_params(mal, "kvm")


# ---- create options ----------------------------------------------------------------------------

@pytest.fixture
def iso(tmp_path: Path) -> Path:
    path = tmp_path / "blank.iso"
    path.write_bytes(b"\0" * 2048)
    return path


@pytest.mark.parametrize(("kind", "why"), [
    (VMKind.MALWARE_ANALYSIS, "its console is output-only"),
    (VMKind.AI_SANDBOX, "use 'secvf vm exec'")])
@pytest.mark.parametrize("login", [{"autologin": True}, {"root_password": PASSWORD}])
def test_console_logins_are_refused_on_other_kinds(iso: Path, kind: VMKind, why: str,
                                                   login: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=f"only for generic VMs.*{why}"):
        build_config(name="x", kind=kind, iso=iso, **login)  # type: ignore[arg-type]


def test_console_logins_need_a_secvf_image(iso: Path) -> None:
    with pytest.raises(ConfigError, match="booted from a SecVF image"):
        build_config(name="x", kind=VMKind.GENERIC, iso=iso, autologin=True)


@pytest.mark.parametrize(("password", "error"), [
    ("", "empty"), ("two\nlines", "one line"), ("nul\0", "one line")])
def test_a_malformed_password_is_refused(password: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        hash_root_password(password)


@needs_openssl
def test_the_password_becomes_a_salted_sha512_crypt_hash() -> None:
    first, second = hash_root_password(PASSWORD), hash_root_password(PASSWORD)
    assert first.startswith("$6$") and first != second  # a random salt each time
    salt = first.split("$")[2]
    again = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"],
                           input=PASSWORD + "\n", capture_output=True, text=True, check=True)
    assert again.stdout.strip() == first


def test_cli_refuses_conflicting_login_options(iso: Path, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    both = run_cli("vm", "create", "x", "--iso", str(iso), "--root-password-file", str(secret),
                   "--ask-root-password")
    assert both.returncode == 2 and "exclude each other" in both.stderr
    auto = run_cli("vm", "create", "x", "--iso", str(iso), "--root-password-file", str(secret),
                   "--autologin")
    assert auto.returncode == 1 and "exclude each other" in auto.stderr
    mal = run_cli("vm", "create", "x", "--kind", "malware-analysis", "--iso", str(iso),
                  "--autologin")
    assert mal.returncode == 1 and "output-only" in mal.stderr
    assert run_cli("vm", "list", "--json", check=True).stdout.strip() == "[]"


# ---- the password on a real disk -------------------------------------------------------------

@pytest.fixture
def fake_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny ext4 "image" with only /etc/shadow, standing in for the built ``base``."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    shadow = tree / "etc" / "shadow"
    shadow.write_text(SHADOW)
    os.chown(shadow, 0, SHADOW_GID)
    shadow.chmod(0o640)
    rootfs = tmp_path / "rootfs.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(rootfs), "32M"], check=True)
    info = SimpleNamespace(name="base", rootfs=rootfs, has_agent=False, recipe_hash="f" * 64)
    monkeypatch.setattr("secvf.image.get_image", lambda name: info)
    monkeypatch.setattr(vms, "get_image", lambda name: info)
    return rootfs


def guest_file(disk: Path, tmp_path: Path, path: str) -> tuple[str, str]:
    """``path``'s content and ``debugfs stat`` from the filesystem in ``disk``."""
    raw = tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)

    def debugfs(command: str) -> str:
        return subprocess.run(["debugfs", "-R", command, str(raw)], capture_output=True,
                              text=True, check=True).stdout

    return debugfs(f"cat {path}"), debugfs(f"stat {path}")


@needs_openssl
@needs_disk_tools
def test_create_writes_only_the_hash_into_the_guests_shadow(fake_image: Path,
                                                            tmp_path: Path) -> None:
    base_before = fake_image.read_bytes()
    config = api.create_vm("pw", memory="256M", disk_size="64M", root_password=PASSWORD)
    assert config.console is ConsoleAccess.LOGIN
    bundle = bundle_for("pw")
    shadow, stat = guest_file(bundle.disk, tmp_path, "/etc/shadow")
    root, *others = shadow.splitlines()
    fields = root.split(":")
    assert fields[0] == "root" and fields[1].startswith("$6$")
    assert fields[2:] == ["19000", "0", "99999", "7", "", "", ""]
    assert others == SHADOW.splitlines()[1:]
    assert "Mode:  0640" in stat and f"Group:    {SHADOW_GID}" in stat
    salt = fields[1].split("$")[2]
    check = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"],
                           input=PASSWORD + "\n", capture_output=True, text=True, check=True)
    assert check.stdout.strip() == fields[1]
    for path in bundle.path.iterdir():  # the password itself is kept nowhere
        assert PASSWORD.encode() not in path.read_bytes(), path
    assert fake_image.read_bytes() == base_before  # the image under the overlay is untouched


@needs_openssl
@needs_disk_tools
def test_a_password_that_cannot_be_written_leaves_no_vm(fake_image: Path,
                                                        tmp_path: Path) -> None:
    tree = tmp_path / "rootless"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "shadow").write_text("daemon:*:19000:0:99999:7:::\n")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(fake_image), "32M"],
                   check=True)
    with pytest.raises(DiskError, match="no root account"):
        api.create_vm("pw", memory="256M", disk_size="64M", root_password=PASSWORD)
    assert not bundle_for("pw").path.exists()


# ---- one console at a time ----------------------------------------------------------------

@pytest.fixture
def running_generic(secvf_env: Path) -> Iterator[Bundle]:
    """A generic VM the library sees running (its run.lock held), without QEMU."""
    bundle = bundle_for("con")
    bundle.path.mkdir(parents=True)
    save_config(bundle.config_file, parse_config(raw_config(name="con"), source="t"))
    lock = FileLock(bundle.run_lock, "test supervisor").acquire()
    yield bundle
    lock.release()


def test_a_second_console_is_refused(running_generic: Bundle) -> None:
    with FileLock(console.console_lock(running_generic), "the first console"):
        with pytest.raises(LockBusy, match="another console is attached to VM 'con'"):
            api.attach_console("con")
        cli = run_cli("vm", "console", "con")
    assert cli.returncode == 1
    assert "another console is attached to VM 'con'" in cli.stderr


def test_a_console_that_cannot_attach_frees_the_lock(running_generic: Bundle) -> None:
    with pytest.raises(NoExecChannel, match="cannot attach to the console of 'con'"):
        api.attach_console("con")  # no console socket: QEMU is not really there
    with FileLock(console.console_lock(running_generic), "the next console"):
        pass


# ---- a sandbox syncs before it stops ------------------------------------------------------------

@pytest.mark.skipif(mounts_work() is not None or os.geteuid() != 0,
                    reason="needs root, unshare and chroot for the agent's root")
@pytest.mark.parametrize("force", [True, False])
def test_stopping_a_sandbox_syncs_through_its_agent_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force: bool) -> None:
    synced_before_stop = []

    def stop(name: str, *, force: bool, timeout: float, **_: object) -> dict[str, object]:
        synced_before_stop.append([(e["argv"], e["user"], e["code"]) for e in read_events("exec")
                                   if e.get("event") == "exec"])
        return {"name": name, "force": force, "timeout": timeout}

    monkeypatch.setattr(control, "stop_vm", stop)
    with RunningSandbox(tmp_path, "box", guest_root=True):
        assert api.stop_vm("box", force=force, timeout=7) == {
            "name": "box", "force": force, "timeout": 7}
    assert synced_before_stop == [[(["sync"], "root", 0)]]


def test_a_sandbox_without_a_reachable_agent_is_stopped_anyway(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stops: list[tuple[str, dict[str, Any]]] = []

    def stop(name: str, *, force: bool, timeout: float, **_: object) -> dict[str, Any]:
        stops.append((name, {"force": force, "timeout": timeout}))
        return {}

    monkeypatch.setattr(control, "stop_vm", stop)
    with RunningSandbox(tmp_path, "deaf", agent_listening=False):
        api.stop_vm("deaf", force=True)
    assert stops == [("deaf", {"force": True, "timeout": 30.0})]
    assert [e for e in read_events("exec") if e.get("argv") == ["sync"]] == []


def test_other_kinds_stop_without_an_exec(running_generic: Bundle,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    stops: list[tuple[str, dict[str, Any]]] = []

    def stop(name: str, *, force: bool, timeout: float, **_: object) -> dict[str, Any]:
        stops.append((name, {"force": force, "timeout": timeout}))
        return {}

    monkeypatch.setattr(control, "stop_vm", stop)
    monkeypatch.setattr(vms, "sync_guest", lambda name: pytest.fail("no exec for a generic VM"))
    api.stop_vm("con", force=True)
    assert stops == [("con", {"force": True, "timeout": 30.0})]

