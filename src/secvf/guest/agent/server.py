"""The listening agent: accepts connections and serves each on a worker thread of its own."""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

from secvf.exec import protocol
from secvf.guest.agent import AGENT_VERSION
from secvf.guest.agent.detached import DetachedRegistry
from secvf.guest.agent.identity import login_users
from secvf.guest.agent.restore import Restorer
from secvf.guest.agent.session import Session
from secvf.guest.agent.spawner import Spawners
from secvf.guest.agent.workers import Workers

DEFAULT_USER = "agent"
MAX_SESSIONS = 64
#: Seconds between attempts to listen on vsock while that fails (no vsock module yet).
LISTEN_RETRY_S = 1.0

log = logging.getLogger("secvf.agent")


class Agent:
    """The listening agent: accepts connections and runs one Session on a worker each."""

    def __init__(
        self,
        listener: socket.socket,
        *,
        default_user: str = DEFAULT_USER,
        keepalive_interval_s: float = protocol.KEEPALIVE_INTERVAL_S,
        max_sessions: int = MAX_SESSIONS,
        restorer: Restorer | None = None,
    ) -> None:
        self.listener = listener
        #: Applies ``restore`` requests (disabled unless given: see Restorer.for_agent).
        self.restorer = restorer or Restorer(enabled=False, why_not="restore is not enabled")
        self.default_user = default_user
        #: One spawner per account commands run as (other than the agent's own).
        self.spawners = Spawners()
        #: Background processes (exec ``detach``): they outlive the sessions.
        self.detached = DetachedRegistry()
        #: The threads sessions, commands and transfers run on (reused).
        self.workers = Workers()
        self.keepalive_interval_s = keepalive_interval_s
        self.started_at = time.monotonic()
        self._slots = threading.BoundedSemaphore(max_sessions)
        self._count = 0

    def serve_forever(self) -> None:
        """Accept connections until the listener is closed."""
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                if self.listener.fileno() < 0:
                    return
                raise
            self._count += 1
            if not self._slots.acquire(blocking=False):
                self._refuse(sock)
                continue
            self.workers.run(functools.partial(self._run_session, sock, self._count))

    def _refuse(self, sock: socket.socket) -> None:
        try:
            sock.sendall(protocol.encode_error_frame("busy", "too many sessions; retry later"))
        except OSError:
            pass
        sock.close()

    def _run_session(self, sock: socket.socket, number: int) -> None:
        try:
            Session(self, sock, number).serve()
        except Exception:  # a bug must end one session, never the agent
            log.exception("session %d crashed", number)
        finally:
            self._slots.release()

    def describe(self, generation: int) -> dict[str, Any]:
        """Return the ``agent_info`` payload."""
        return {
            "agent_version": AGENT_VERSION,
            "generation": generation,
            "hostname": socket.gethostname(),
            "uptime_s": round(_system_uptime_s(), 3),
            "users": login_users(),
            "default_user": self.default_user,
            "python": sys.version.split()[0],
            "kernel": os.uname().release,
        }


def _system_uptime_s() -> float:
    try:
        with open("/proc/uptime") as fh:
            return float(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def listen_vsock(port: int) -> socket.socket:
    """Return a listening AF_VSOCK socket on ``port`` for any CID."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.bind((socket.VMADDR_CID_ANY, port))
    sock.listen(64)
    return sock


def listen_vsock_retrying(port: int, retry_s: float = LISTEN_RETRY_S) -> socket.socket:
    """Like :func:`listen_vsock`, but retry every ``retry_s`` while it fails.

    Binding to VMADDR_CID_ANY needs no vsock *device*: the agent listens from boot, and
    a device hot-plugged later (a restored sandbox session) reaches it at once. It does
    need the ``vsock`` module (AF_VSOCK); until that is there, this keeps trying and
    says so once.
    """
    warned = False
    while True:
        try:
            return listen_vsock(port)
        except OSError as exc:
            if not warned:
                log.warning(
                    "cannot listen on vsock port %d yet (%s); retrying every %.0f s",
                    port,
                    exc,
                    retry_s,
                )
                warned = True
            time.sleep(retry_s)


def listen_unix(path: str) -> socket.socket:
    """Return a listening Unix socket at ``path`` (an existing socket file is replaced)."""
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    return sock
