"""Guest accounts a request runs as: lookup, the default cwd, and acting as a user."""

from __future__ import annotations

import errno
import os
import pwd
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from secvf.guest.agent.errors import RequestFailed
from secvf.guest.agent.spawner import Account

DEFAULT_WORKSPACE = "/workspace"


@dataclass(frozen=True)
class Identity:
    """A guest account a request runs as."""

    name: str  # login name
    uid: int  # numeric user id
    gid: int  # primary group id
    groups: tuple[int, ...]  # supplementary groups (initgroups equivalent)
    home: str  # home directory from passwd
    shell: str  # login shell from passwd

    @property
    def account(self) -> Account:
        """The credentials a spawner for this identity runs with."""
        return Account(self.uid, self.gid, self.groups)

    @property
    def is_self(self) -> bool:
        """True if this is the identity the agent already runs as (no switch needed)."""
        return self.uid == os.geteuid()


def resolve_identity(name: str) -> Identity:
    """Look up ``name`` and check the agent may act as it.

    A look-up is kept while :data:`ACCOUNT_FILES` are unchanged (same inode, size,
    modification and change times), so an account added, changed or removed in the
    guest is seen by the next request; SecVF's images take accounts from those files
    only (NSS ``files``).

    Raises:
        RequestFailed: unknown account (``unknown_user``), or the agent is not root and
            ``name`` is another account (``permission_denied``, stage ``switch_user``).
    """
    files = _account_files_state()
    cached = _looked_up.get(name)
    if files is not None and cached is not None and cached[0] == files:
        identity = cached[1]
    else:
        identity = _look_up(name)
        if files is not None:
            _looked_up[name] = (files, identity)
    if not identity.is_self and os.geteuid() != 0:
        raise RequestFailed(
            "permission_denied",
            f"the agent runs unprivileged and cannot act as {name!r}",
            errno.EPERM,
            "switch_user",
        )
    return identity


#: What an account look-up reads (see :func:`resolve_identity`).
ACCOUNT_FILES = ("/etc/passwd", "/etc/group")
_looked_up: dict[str, tuple[tuple[tuple[int, ...], ...], Identity]] = {}


def _account_files_state() -> tuple[tuple[int, ...], ...] | None:
    try:
        return tuple((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                     for st in map(os.stat, ACCOUNT_FILES))
    except OSError:
        return None  # nothing to compare with: look up every time


def _look_up(name: str) -> Identity:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise RequestFailed(
            "unknown_user", f"no such user: {name!r}", stage="switch_user"
        ) from None
    return Identity(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)),
        home=entry.pw_dir,
        shell=entry.pw_shell or "/bin/sh",
    )


def default_cwd(identity: Identity) -> str:
    """Return /workspace if it exists, else the user's home, else /."""
    for candidate in (DEFAULT_WORKSPACE, identity.home):
        if os.path.isdir(candidate):
            return candidate
    return "/"


def login_users() -> list[str]:
    """Return root and the regular accounts (uid >= 1000, not nobody)."""
    return sorted(e.pw_name for e in pwd.getpwall() if e.pw_uid == 0 or 1000 <= e.pw_uid < 65534)


def call_as(identity: Identity, action: Callable[[], int | None]) -> int | None:
    """Run ``action`` with ``identity``'s credentials; return the fd it returns, if any.

    When a switch is needed a child is forked: it drops to the identity, runs
    ``action`` and passes the resulting descriptor back over a socketpair. The child
    only calls async-signal-safe-in-spirit OS functions (no locks, no logging).

    Raises:
        OSError: ``action`` failed in the child (errno preserved).
    """
    if identity.is_self:
        return action()
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked child
        _run_child_action(identity, action, child)
    child.close()
    try:
        reply, fds, _, _ = socket.recv_fds(parent, 8, 1)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    if reply[:1] == b"E":
        err = struct.unpack(">i", reply[1:5])[0]
        raise OSError(err, os.strerror(err))
    return fds[0] if fds else None


def _run_child_action(
    identity: Identity, action: Callable[[], int | None], sock: socket.socket
) -> None:
    code = 0
    try:
        os.setgroups(list(identity.groups))
        os.setgid(identity.gid)
        os.setuid(identity.uid)
        fd = action()
        socket.send_fds(sock, [b"K"], [fd] if fd is not None else [])
    except OSError as exc:
        sock.sendall(b"E" + struct.pack(">i", exc.errno or errno.EIO))
    except BaseException:  # noqa: BLE001 - the child must never return into the agent
        code = 1
    finally:
        os._exit(code)
