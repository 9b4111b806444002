"""A running AI sandbox without QEMU, for tests of what users run against a VM name.

:class:`RunningSandbox` puts a real VM bundle (an ``ai-sandbox`` ``vm.json``) in the
test's library and makes it look running the way a supervisor does: it holds the
bundle's ``run.lock``, publishes a runtime record, and serves the real exec bridge
(:mod:`secvf.exec.bridge`, on its own asyncio loop) in front of a fake hybrid-vsock
backend joined to the real guest agent (:class:`~secvf.testing.agent.AgentProcess`).
So ``secvf vm exec NAME``, ``Sandbox.from_vm(NAME)`` and the API find the VM by name
and go through every host-side layer a real sandbox has::

    with RunningSandbox(tmp_path, "agent1") as box:
        run_cli("vm", "exec", "agent1", "--", "true")

``agent_listening=False`` is a VM still booting: the bridge is up, but nothing listens
on guest port 2222 yet, so the bridge answers ``agent_unavailable`` until
:meth:`RunningSandbox.agent_starts_listening`.

``guest_root=True`` runs the agent in a root directory of its own (:class:`GuestRoot`),
so commands that write to ``/workspace`` or ``/root`` touch the test's directory, not
the host's.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from secvf.exec import bridge, protocol
from secvf.model.config import VMConfig, new_mac, now_iso, parse_config, save_config
from secvf.model.runtime import RuntimeRecord, Transition, VmState
from secvf.store.bundle import RuntimeFiles
from secvf.store.library import bundle_for
from secvf.store.locks import FileLock
from secvf.store.runstate import write_runtime_state
from secvf.testing.agent import AgentProcess
from secvf.testing.vsock_backend import FakeVsockBackend

CURRENT_USER = pwd.getpwuid(os.geteuid()).pw_name
IS_ROOT = os.geteuid() == 0
#: For tests that switch users (the host agent acts as another account only as root).
needs_root = pytest.mark.skipif(not IS_ROOT, reason="switching users needs root")
#: Generous bound for waits on background work; reaching it fails the test, nothing is timed.
WAIT_S = 60.0

T = TypeVar("T")


def wait_for(condition: Callable[[], T]) -> T:
    """Poll ``condition`` until it returns something true (at most WAIT_S); return that."""
    deadline = time.monotonic() + WAIT_S
    while not (value := condition()):
        assert time.monotonic() < deadline, "background work did not happen"
        time.sleep(0.02)
    return value


def sandbox_config(name: str = "sbx") -> VMConfig:
    """A valid ``ai-sandbox`` config named ``name`` with a fresh UUID."""
    return parse_config({
        "id": str(uuid.uuid4()), "name": name, "kind": "ai-sandbox", "cpus": 1,
        "memory_mib": 512, "disk_bytes": 1 << 30, "network": "none", "mac": new_mac(),
        "boot": {"type": "image", "image": "sandbox", "recipe_hash": "0" * 16},
        "channels": {}, "created_at": now_iso(), "updated_at": now_iso(),
    }, source="test")


class BridgeLoop:
    """Runs one VM's :class:`~secvf.exec.bridge.ExecBridge` on an asyncio loop in a thread,
    as the supervisor does, so blocking clients can talk to it from the test thread."""

    def __init__(self, vm: VMConfig) -> None:
        self.vm = vm
        self.files = RuntimeFiles(vm.id)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.bridge: bridge.ExecBridge | None = None

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    def start(self) -> bridge.ExecBridge:
        self.bridge = self.call(bridge.start_bridge(self.vm, self.files))
        assert self.bridge is not None
        return self.bridge

    def close(self) -> None:
        self.call(bridge.stop_bridge(self.vm.id))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)
        self.loop.close()


def mounts_work() -> str | None:
    """Why :class:`GuestRoot` cannot work here, or None if it can."""
    if shutil.which("unshare") is None or shutil.which("chroot") is None:
        return "needs unshare(1) and chroot(8) (util-linux, coreutils)"
    return None


class GuestRoot:
    """A root directory for the agent: the host's /usr, /etc (read-only), /dev and /proc,
    and empty /workspace, /root, /home and /tmp of its own, in a private mount namespace.

    :meth:`wrap` turns an :class:`AgentProcess` into one that runs there; its files
    (the zipapp, the socket, the log) are in the root, so the host sees them too.
    """

    BIND = ("usr", "etc", "dev", "proc")
    READ_ONLY = ("usr", "etc")
    LINKS = ("bin", "lib", "lib64", "sbin")  # a merged-/usr system's links into /usr
    OWN = ("workspace", "root", "home", "tmp")

    def __init__(self, path: Path) -> None:
        self.path = path
        for name in (*self.BIND, *self.OWN):
            (path / name).mkdir(parents=True, exist_ok=True)
        (path / "tmp").chmod(0o1777)
        for name in self.LINKS:
            if Path("/", name).is_symlink():
                (path / name).symlink_to(os.readlink(Path("/", name)))

    def wrap(self, agent: AgentProcess) -> None:
        """Make ``agent`` (whose workdir is this root) start inside the root as root."""
        inside = [_inside(arg, self.path) for arg in agent.argv]
        script = "".join(f'mount --rbind /{d} "$0/{d}" && ' for d in self.BIND)
        script += "".join(f'mount -o remount,bind,ro "$0/{d}" && ' for d in self.READ_ONLY)
        script += 'exec chroot "$0" "$@"'
        user_ns = [] if os.geteuid() == 0 else ["--map-root-user"]
        agent.argv = ["unshare", "--mount", *user_ns, "--", "sh", "-c", script,
                      str(self.path), *inside]


def _inside(arg: str, root: Path) -> str:
    """``arg`` as the path seen inside ``root`` if it lies under it."""
    path = Path(arg)
    return "/" + str(path.relative_to(root)) if path.is_relative_to(root) else arg


class RunningSandbox:
    """An AI sandbox VM named ``name`` that the library sees running (see the module).

    Attributes: ``config``, ``files`` (its runtime paths), ``agent``, ``vsock`` (the fake
    backend: ``requests`` and ``refused`` show what reached the "guest"), ``bridge``.
    """

    def __init__(self, workdir: Path, name: str, *, agent_listening: bool = True,
                 guest_root: bool = False) -> None:
        self.name = name
        self.config = sandbox_config(name)
        self.files = RuntimeFiles(self.config.id)
        self.bundle = bundle_for(name)
        root = workdir / f"guest-{name}"
        self.agent = AgentProcess(root, default_user="root" if guest_root else CURRENT_USER,
                                  keepalive_interval_s=0.5)
        self.guest_root = GuestRoot(root) if guest_root else None
        if self.guest_root is not None:
            self.guest_root.wrap(self.agent)
        self._agent_listening = agent_listening
        self.vsock = FakeVsockBackend(self.files.vsock_socket, {})
        self.bridge = BridgeLoop(self.config)
        self._run_lock = FileLock(self.bundle.run_lock, "test supervisor")
        self._stopped = False

    def __enter__(self) -> RunningSandbox:
        self.bundle.path.mkdir(parents=True)
        save_config(self.bundle.config_file, self.config)
        self._run_lock.acquire()
        write_runtime_state(self.files, RuntimeRecord(
            state=VmState.RUNNING, name=self.name, id=self.config.id, kind=self.config.kind,
            supervisor_pid=os.getpid(), started_at=now_iso(),
            transitions=[Transition(VmState.RUNNING, now_iso())], guest_ready=True,
            exec_socket=str(self.files.exec_socket)))
        self.agent.start()
        if self._agent_listening:
            self.agent_starts_listening()
        self.vsock.start()
        self.bridge.start()
        return self

    def agent_starts_listening(self) -> None:
        """The guest agent is up: the backend joins guest port 2222 to it from now on."""
        self.vsock.ports[protocol.AGENT_VSOCK_PORT] = self.agent.socket_path

    def stop_bridge(self) -> None:
        """Remove the exec socket, as before the supervisor started the bridge."""
        self.bridge.call(bridge.stop_bridge(self.config.id))

    def stop(self) -> None:
        """The supervisor is gone: no bridge, no agent, no record, ``run.lock`` free
        (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self.bridge.close()
        self.vsock.close()
        self.agent.stop()
        self.files.state_file.unlink(missing_ok=True)
        self._run_lock.release()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
