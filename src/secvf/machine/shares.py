"""virtio-fs shares of AI-sandbox VMs: validation, uid mapping, and the virtiofsd launch.

Threat model: root in the guest is hostile. Two host-side guarantees follow:

* **Read-only is enforced on the host.** Each share's ``virtiofsd`` runs in its own
  user and mount namespace; its source directory is a ``nosuid,nodev`` bind mount
  there, and for a read-only share the bind is remounted ``ro``. A guest remount
  or raw FUSE requests cannot make it writable: neither the guest nor virtiofsd's
  sandboxed worker can remount.
* **No host-root files from the guest.** virtiofsd passes uids through, so guest
  uids are mapped to an unprivileged host range. When SecVF runs as root it uses
  root's ranges from ``/etc/subuid`` and ``/etc/subgid`` (default ``100000``, 65536 ids;
  the install script adds them), so guest root is host uid 100000 and the guest ``agent`` user
  (uid 1000) is host uid 101000 — the workspace directory SecVF creates is owned
  by that uid. A non-root user with a ``/etc/subuid`` range gets the same scheme
  on their range; without one, ``unshare -r`` maps guest root to the user (other
  guest uids then cannot own files: the agent runs file operations as root).
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from secvf.errors import ConfigError
from secvf.model.config import Share
from secvf.model.names import validate_name
from secvf.store import paths

VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd",
                        "/usr/lib/virtiofsd")
WORKSPACE_TAG = "workspace"
WORKSPACE_GUEST_PATH = "/workspace"
GUEST_AGENT_UID = 1000
UID_RANGE_COUNT = 65536
MAX_TAG_BYTES = 36


class ShareError(ConfigError):
    """A share cannot be used as asked (bad path, overlap, unsafe directory)."""


@dataclass(frozen=True)
class UidMap:
    """How guest uids and gids map onto host ids for one virtiofsd."""

    host_base: int | None  # first host uid of the range; None = map guest root to caller only
    host_gid_base: int | None = None  # first host gid of the range (/etc/subgid)

    def host_uid(self, guest_uid: int) -> int:
        """The host uid that guest uid ``guest_uid`` owns files as."""
        if self.host_base is None:
            return os.getuid()
        return self.host_base + guest_uid

    def host_gid(self, guest_gid: int) -> int:
        """The host gid that guest gid ``guest_gid`` owns files as."""
        if self.host_gid_base is None:
            return os.getgid()
        return self.host_gid_base + guest_gid

    def unshare_args(self) -> list[str]:
        """``unshare`` options that create the user namespace with this map."""
        if self.host_base is None or self.host_gid_base is None:
            return ["--map-root-user"]
        return [f"--map-users={self.host_base},0,{UID_RANGE_COUNT}",
                f"--map-groups={self.host_gid_base},0,{UID_RANGE_COUNT}",
                "--setuid=0", "--setgid=0"]


def uid_map() -> UidMap:
    """The id map for the current user, from its ``/etc/subuid`` and ``/etc/subgid`` ranges."""
    uid_base = _subordinate_base(Path("/etc/subuid"))
    gid_base = _subordinate_base(Path("/etc/subgid"))
    if uid_base is not None and gid_base is not None:
        return UidMap(uid_base, gid_base)
    if os.getuid() == 0:
        raise ShareError("root has no /etc/subuid and /etc/subgid range for sandbox shares; "
                         "run scripts/install-system-deps.sh (it adds one)")
    return UidMap(None)


def _subordinate_base(path: Path) -> int | None:
    """First id of the current user's range of at least 65536 ids in ``path``, if any."""
    user = pwd.getpwuid(os.getuid()).pw_name
    for line in _read_lines(path):
        parts = line.split(":")
        if len(parts) == 3 and parts[0] in (user, str(os.getuid())):
            if parts[1].isdigit() and parts[2].isdigit() and int(parts[2]) >= UID_RANGE_COUNT:
                return int(parts[1])
    return None


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return []


def virtiofsd_path() -> str:
    """Path of the installed virtiofsd, or raise a ShareError saying how to get one."""
    for candidate in VIRTIOFSD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("virtiofsd")
    if found:
        return found
    raise ShareError("virtiofsd is not installed (run scripts/install-system-deps.sh)")


def default_workspace(name: str) -> Path:
    """``$SECVF_HOME/sandboxes/<name>/workspace``."""
    return paths.secvf_home() / "sandboxes" / validate_name(name) / "workspace"


def prepare_workspace(path: Path, *, created_by_secvf: bool) -> None:
    """Create the workspace dir if needed and let the guest's agent user own it."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o755)
        created_by_secvf = True
    if created_by_secvf:
        mapping = uid_map()
        owner = mapping.host_uid(GUEST_AGENT_UID)
        if owner != os.getuid():
            os.chown(path, owner, mapping.host_gid(GUEST_AGENT_UID))


def check_host_dir(raw: str | Path, what: str) -> Path:
    """Validate a host directory for sharing and return its resolved path.

    Refuses: missing paths, non-directories, symlinks, ``/``, the user's home
    directory itself, and system directories.
    """
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if path.is_symlink():
        raise ShareError(f"{what} {path} is a symlink; give the real directory")
    if not path.exists():
        raise ShareError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise ShareError(f"{what} {path} is not a directory")
    resolved = path.resolve(strict=True)
    if resolved != Path(os.path.normpath(path)):
        raise ShareError(f"{what} {path} goes through a symlink (to {resolved})")
    forbidden = {Path("/"), Path.home().resolve(), *(Path(p) for p in (
        "/etc", "/usr", "/bin", "/sbin", "/lib", "/boot", "/dev", "/proc", "/sys", "/root",
        "/var", "/run"))}
    if resolved in forbidden:
        raise ShareError(f"refusing to share {resolved} as {what}: too broad or a system dir")
    return resolved


def parse_share_spec(spec: str, index: int) -> Share:
    """Parse ``HOSTDIR:GUESTPATH:ro`` (only read-only extra shares are allowed)."""
    parts = spec.rsplit(":", 2)
    if len(parts) != 3 or parts[2] != "ro":
        raise ShareError(f"--share {spec!r}: expected HOSTDIR:GUESTPATH:ro")
    host, guest, _ = parts
    guest_path = _check_guest_path(guest)
    return Share(tag=f"ro{index}", host_path=str(check_host_dir(host, "share")),
                 guest_path=guest_path, read_only=True)


def _check_guest_path(guest: str) -> str:
    norm = os.path.normpath(guest)
    if not guest.startswith("/") or norm in ("/", "/proc", "/sys", "/dev") or ".." in guest:
        raise ShareError(f"guest path {guest!r} must be an absolute, non-system directory")
    if any(c in guest for c in ", :\n\t"):
        raise ShareError(f"guest path {guest!r} must not contain ',', ':' or whitespace")
    return norm


def check_no_overlap(shares: Sequence[Share]) -> None:
    """Refuse shares whose host or guest paths overlap (one inside another).

    A read-only share inside the writable workspace would be writable through
    the workspace mount, so overlap is always an error.
    """
    for i, a in enumerate(shares):
        for b in shares[i + 1:]:
            for attr in ("host_path", "guest_path"):
                pa, pb = Path(getattr(a, attr)), Path(getattr(b, attr))
                if pa == pb or pa in pb.parents or pb in pa.parents:
                    where = attr.replace("_", " ")
                    raise ShareError(f"shares '{a.tag}' and '{b.tag}' overlap ({where}: {pa}"
                                     f" and {pb}); shares must not contain each other")
    for share in shares:
        if len(share.tag.encode()) > MAX_TAG_BYTES:
            raise ShareError(f"share tag {share.tag!r} is longer than {MAX_TAG_BYTES} bytes")


#: Runs in a private mount namespace: pin the source with an fd, cover /tmp with a small
#: tmpfs (so the staging path is reachable by the unprivileged uid range even when the
#: source sits under a 0700 home), bind the source there with the share's flags, exec.
_STAGE_SCRIPT = (
    'set -e; exec 3<"$0"; mount -t tmpfs -o mode=0755,size=64k secvf-share /tmp; '
    "mkdir /tmp/share; mount --no-canonicalize --bind /proc/self/fd/3 /tmp/share; "
    'mount --no-canonicalize -o remount,bind,{flags} /tmp/share; exec 3<&-; exec "$@"'
)
STAGED_SOURCE = "/tmp/share"


def virtiofsd_argv(share: Share) -> tuple[str, ...]:
    """The command that serves ``share``: virtiofsd on a ``nosuid,nodev`` (and, for a
    read-only share, ``ro``) bind of the source, in a private mount namespace, running
    in a user namespace that maps guest uids to an unprivileged host range.

    The listening socket is handed over with ``--fd=N`` (appended by the supervisor).
    """
    flags = "nosuid,nodev" + (",ro" if share.read_only else "")
    mapping = uid_map()
    if mapping.host_base is None:
        outer = ("unshare", *mapping.unshare_args(), "--mount", "--propagation", "private")
        inner: tuple[str, ...] = ()
    else:
        outer = ("unshare", "--mount", "--propagation", "private")
        inner = ("unshare", *mapping.unshare_args(), "--")
    binary = virtiofsd_path()
    return (
        *outer, "--", "sh", "-c", _STAGE_SCRIPT.format(flags=flags), share.host_path,
        *inner, binary, *virtiofsd_options(binary),
    )


def virtiofsd_options(binary: str) -> tuple[str, ...]:
    """Options for the installed virtiofsd: QEMU's C one (Debian 12) takes ``-o`` options,
    the Rust one (its own package on Debian 13) takes long options."""
    if _is_rust_virtiofsd(binary):
        return ("--shared-dir", STAGED_SOURCE, "--sandbox", "namespace", "--cache", "auto",
                "--log-level", "warn")
    return ("-o", f"source={STAGED_SOURCE}", "-o", "sandbox=namespace", "-o", "cache=auto",
            "-o", "log_level=warn")


@functools.cache
def _is_rust_virtiofsd(binary: str) -> bool:
    try:
        proc = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--shared-dir" in proc.stdout + proc.stderr


def guest_share_param(shares: Sequence[Share]) -> str:
    """The ``secvf_shares=`` kernel parameter the guest init mounts shares from."""
    return "secvf_shares=" + ",".join(
        f"{s.tag}:{s.guest_path}:{'ro' if s.read_only else 'rw'}" for s in shares)
