"""virtio-fs shares of AI-sandbox VMs: validation, the id map, and the virtiofsd launch.

Threat model: root in the guest is hostile. The host-side guarantees:

* **Read-only is enforced on the host.** Each share's ``virtiofsd`` runs in its own
  mount namespace, where its source directory is a ``nosuid,nodev`` bind mount, and
  for a read-only share the bind is remounted ``ro``. A guest remount or raw FUSE
  requests cannot make it writable: neither the guest nor virtiofsd's sandboxed worker
  can remount.
* **The guest works as you, never as host root by accident.** virtiofsd passes uids
  through, so it runs in a user namespace (:mod:`secvf.machine.share_launcher`) where
  guest uid and gid 1000 (the image's ``agent`` user) are the invoking host user and
  group, and every other guest id, guest root included, is an id of the user's
  subordinate range from ``/etc/subuid`` and ``/etc/subgid``. Files you own show as
  the agent's in the guest; files the agent creates are yours on the host.
* **No setuid, setgid or device files on the host.** Guest root has capabilities over
  your files inside that namespace, so virtiofsd runs under the seccomp filter of
  :mod:`secvf.machine.seccomp`, which refuses to set ``S_ISUID``/``S_ISGID``, to make
  device nodes, and to set extended attributes (file capabilities).
* **Shares cannot reach what they must not:** :func:`validate_shares` refuses system
  trees and world-writable directories for writable shares, SecVF's own state, your
  home and what contains it, and guest mount points over the guest's system
  directories. Create, import and start all run it.
"""

from __future__ import annotations

import functools
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from secvf.errors import ConfigError
from secvf.machine.seccomp import native_arch
from secvf.machine.share_settings import ShareSettings, load_settings, settings_path
from secvf.model.config import Share, VMConfig
from secvf.model.names import validate_name
from secvf.store import paths

VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd",
                        "/usr/lib/virtiofsd")
WORKSPACE_TAG = "workspace"
WORKSPACE_GUEST_PATH = "/workspace"
GUEST_AGENT_ID = 1000  # uid and gid of the sandbox image's ``agent`` user
ID_RANGE_COUNT = 65536  # guest ids 0..65535 are mapped
MAX_TAG_BYTES = 36  # virtio-fs limit
DEFAULT_SHARE_MODE = "ro"  # for ``--share HOSTDIR:GUESTPATH`` without a mode

#: Host trees the OS lives in: never shared read-write; the trees themselves are never
#: shared at all (a read-only share of a directory below them is fine).
HOST_SYSTEM_TREES = tuple(Path(p) for p in (
    "/bin", "/boot", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/opt", "/run", "/sbin",
    "/snap", "/usr", "/var"))
#: Kernel and device filesystems: nothing in them is ever shared.
HOST_KERNEL_TREES = tuple(Path(p) for p in ("/dev", "/proc", "/sys"))
#: Guest directories a share must not be mounted on or below (they hold the guest's OS,
#: its users' homes and its scratch space; ``/home`` covers ``/home/agent``).
GUEST_SYSTEM_DIRS = ("bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32",
                     "proc", "root", "run", "sbin", "sys", "tmp", "usr", "var")
_GUEST_PATH_CHARS = re.compile(r"^[A-Za-z0-9._@+/-]+$")
_TAG = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class ShareError(ConfigError):
    """A share cannot be used as asked (bad path, overlap, unsafe directory)."""


# ---- the id map --------------------------------------------------------------------------


@dataclass(frozen=True)
class UidMap:
    """How guest uids and gids map onto host ids for one virtiofsd.

    Guest id 1000 is the invoking user (``owner_uid``/``owner_gid``); every other guest
    id ``g`` in 0..65535 is ``sub_uid_base + g`` (``sub_gid_base + g``).
    """

    owner_uid: int  # host uid the guest's agent user is
    owner_gid: int  # host gid the guest's agent group is
    sub_uid_base: int  # first host uid of the subordinate range (/etc/subuid)
    sub_gid_base: int  # first host gid of the subordinate range (/etc/subgid)

    def host_uid(self, guest_uid: int) -> int:
        """The host uid that guest uid ``guest_uid`` owns files as."""
        return self.owner_uid if guest_uid == GUEST_AGENT_ID else self.sub_uid_base + guest_uid

    def host_gid(self, guest_gid: int) -> int:
        """The host gid that guest gid ``guest_gid`` owns files as."""
        return self.owner_gid if guest_gid == GUEST_AGENT_ID else self.sub_gid_base + guest_gid

    def launcher_args(self) -> list[str]:
        """The ``--uid-map``/``--gid-map`` options of the share launcher for this map."""
        args: list[str] = []
        for option, owner, base in (("--uid-map", self.owner_uid, self.sub_uid_base),
                                    ("--gid-map", self.owner_gid, self.sub_gid_base)):
            after = GUEST_AGENT_ID + 1
            for inside, outside, count in ((0, base, GUEST_AGENT_ID), (GUEST_AGENT_ID, owner, 1),
                                           (after, base + after, ID_RANGE_COUNT - after)):
                args += [option, f"{inside}:{outside}:{count}"]
        return args


def uid_map(id_base: int | None = None) -> UidMap:
    """The id map for the current user, from its ``/etc/subuid`` and ``/etc/subgid`` ranges
    — or, as root with a VM's jail identity block starting at ``id_base``, into that
    block (root writes the maps itself; no ``/etc/subuid`` range is needed).

    Raises:
        ShareError: the user has no usable range, or ``newuidmap`` is missing.
    """
    if id_base is not None and os.getuid() == 0:
        return UidMap(os.getuid(), os.getgid(), id_base, id_base)
    user = pwd.getpwuid(os.getuid()).pw_name
    uid_base = _subordinate_base(Path("/etc/subuid"))
    gid_base = _subordinate_base(Path("/etc/subgid"))
    if uid_base is None or gid_base is None:
        raise ShareError(
            f"sandbox shares need a range of {ID_RANGE_COUNT} ids for user {user} in "
            "/etc/subuid and /etc/subgid (guest root and other guest users become those "
            "ids); run scripts/install-system-deps.sh, or as root: usermod "
            f"--add-subuids 100000-165535 --add-subgids 100000-165535 {user}")
    for own, base, table in ((os.getuid(), uid_base, "subuid"), (os.getgid(), gid_base, "subgid")):
        if base <= own < base + ID_RANGE_COUNT:
            raise ShareError(f"your id {own} lies inside your own /etc/{table} range "
                             f"{base}-{base + ID_RANGE_COUNT - 1}; give {user} a range "
                             "that does not contain it")
    for tool in ("newuidmap", "newgidmap"):
        if shutil.which(tool) is None:
            raise ShareError(f"sandbox shares need {tool} (install the uidmap package)")
    return UidMap(os.getuid(), os.getgid(), uid_base, gid_base)


def _subordinate_base(path: Path) -> int | None:
    """First id of the current user's range of at least 65536 ids in ``path``, if any."""
    user = pwd.getpwuid(os.getuid()).pw_name
    for line in _read_lines(path):
        parts = line.split(":")
        if len(parts) == 3 and parts[0] in (user, str(os.getuid())):
            if parts[1].isdigit() and parts[2].isdigit() and int(parts[2]) >= ID_RANGE_COUNT:
                return int(parts[1])
    return None


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except OSError:
        return []


# ---- validation --------------------------------------------------------------------------


def default_workspace(name: str) -> Path:
    """``$SECVF_HOME/sandboxes/<name>/workspace``."""
    return paths.secvf_home() / "sandboxes" / validate_name(name) / "workspace"


def prepare_default_workspace(name: str) -> Path:
    """Create sandbox ``name``'s default workspace (yours, mode 0700) if needed; return it."""
    path = default_workspace(name)
    path.mkdir(parents=True, mode=0o700, exist_ok=True)
    return path


def parse_share_spec(spec: str, index: int) -> Share:
    """Parse ``HOSTDIR:GUESTPATH[:ro|:rw]`` (read-only when no mode is given).

    Only the syntax and the host directory (:func:`check_host_dir`) are checked here;
    :func:`validate_shares` judges the share.
    """
    head, _, mode = spec.rpartition(":")
    if mode.startswith("/"):
        head, mode = spec, DEFAULT_SHARE_MODE
    host, _, guest = head.rpartition(":")
    if mode not in ("ro", "rw") or not host or not guest:
        raise ShareError(f"--share {spec!r}: expected HOSTDIR:GUESTPATH[:ro|:rw] with an "
                         "absolute GUESTPATH")
    return Share(tag=f"{mode}{index}", host_path=str(check_host_dir(host, "share")),
                 guest_path=os.path.normpath(guest), read_only=mode == "ro")


def check_host_dir(raw: str | Path, what: str) -> Path:
    """Return the resolved path of an existing real directory that may be shared at all.

    Refuses: missing paths, non-directories, symlinks anywhere on the path, ``/``,
    ``/home``, your home and any directory containing it, the system trees themselves
    (``/etc``, ``/usr``, …) and anything in ``/dev``, ``/proc`` or ``/sys``.
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
    home = Path.home().resolve()
    if resolved in (Path("/"), Path("/home"), *HOST_SYSTEM_TREES) or _within(home, resolved):
        raise ShareError(f"refusing to share {resolved} as {what}: too broad (/, /home, a "
                         "system tree, or it contains your home); share a project "
                         "directory instead")
    if any(_within(resolved, tree) for tree in HOST_KERNEL_TREES):
        raise ShareError(f"refusing to share {resolved} as {what}: kernel and device "
                         "filesystems (/dev, /proc, /sys) are never shared")
    return resolved


def validate_shares(config_or_shares: VMConfig | Sequence[Share], *,
                    name: str | None = None) -> None:
    """Check every share of an AI sandbox; create, import and start all call this.

    ``config_or_shares`` is a VM's config (its name is used) or its list of shares
    (then pass the sandbox's ``name``, which allows its own default workspace under
    ``$SECVF_HOME``). A config without shares passes.

    Raises:
        ShareError: the first rule a share breaks, in one line saying why and what to do.
    """
    if isinstance(config_or_shares, VMConfig):
        name = config_or_shares.name
        shares = list(config_or_shares.channels.shares) if config_or_shares.channels else []
    else:
        shares = list(config_or_shares)
    if not shares:
        return
    _check_servable()
    tags: set[str] = set()
    for share in shares:
        _check_tag(share.tag, tags)
        what = "workspace" if share.tag == WORKSPACE_TAG else f"share '{share.tag}'"
        _check_guest_path(share.guest_path, what)
        host = check_host_dir(share.host_path, what)
        if str(host) != share.host_path:
            raise ShareError(f"{what} host path {share.host_path!r} is not an absolute, "
                             f"resolved path (it is {host})")
        own_workspace = _is_default_workspace(host, share, name)
        if not own_workspace:
            _check_outside_secvf_state(host, what)
        if not share.read_only:
            _check_writable(host, what, in_home_dotdir_ok=own_workspace)
        _check_reachable(host, what)
    check_no_overlap(shares)


def _check_servable() -> None:
    """Refuse shares where this host cannot serve them safely (no id range, no
    ``newuidmap``, no virtiofsd, no seccomp table for this CPU architecture)."""
    uid_map()
    virtiofsd_path()
    if native_arch() is None:
        raise ShareError(f"sandbox shares are not supported on {os.uname().machine}: SecVF "
                         "has no seccomp filter for it; create the sandbox without shares")


def _check_tag(tag: str, seen: set[str]) -> None:
    if not _TAG.fullmatch(tag) or len(tag.encode()) > MAX_TAG_BYTES:
        raise ShareError(f"share tag {tag!r} must be a letter then letters, digits, '_' or "
                         f"'-', at most {MAX_TAG_BYTES} bytes")
    if tag in seen:
        raise ShareError(f"two shares are tagged {tag!r}; tags must be unique")
    seen.add(tag)


def _check_guest_path(guest: str, what: str) -> None:
    """A guest mount point: absolute, plain characters, off the guest's system dirs."""
    parts = guest.split("/")
    if guest != "/" and (parts[0] or any(p in ("", ".", "..") for p in parts[1:])):
        raise ShareError(f"{what}: guest path {guest!r} must be absolute and normalised "
                         "(no '.', '..' or empty components)")
    if not _GUEST_PATH_CHARS.fullmatch(guest):
        raise ShareError(f"{what}: guest path {guest!r} may only contain letters, digits "
                         "and . _ @ + - /")
    top = parts[1]
    if guest == "/" or top in GUEST_SYSTEM_DIRS:
        raise ShareError(f"{what}: guest path {guest!r} would hide the guest's own /{top} "
                         "(shares may not be mounted on /, /etc, /usr, /home, /tmp, /var and "
                         "the like); use /workspace, /mnt/..., /srv/..., /data/... or a new "
                         "top-level directory")


def _is_default_workspace(host: Path, share: Share, name: str | None) -> bool:
    """Whether ``share`` is sandbox ``name``'s own default workspace, which SecVF made
    (mode 0700) inside its library: the one share allowed there, and in ``~/.local``
    where the library lives by default."""
    return (name is not None and share.tag == WORKSPACE_TAG
            and host == default_workspace(name).resolve())


def _check_outside_secvf_state(host: Path, what: str) -> None:
    """No share inside or around SecVF's library, image cache or runtime dir."""
    for label, state in (("$SECVF_HOME", paths.secvf_home()), ("the image cache",
                         paths.cache_dir()), ("the runtime dir", paths.runtime_dir())):
        state = state.resolve()
        if _within(host, state) or _within(state, host):
            raise ShareError(f"{what} {host} overlaps {label} {state}: the guest could reach "
                             "SecVF's own files (VM disks, images, other workspaces, "
                             "sockets); share a directory outside it")


def _check_writable(host: Path, what: str, *, in_home_dotdir_ok: bool = False) -> None:
    """Rules for read-write shares: no system tree, no dot-directory of your home (unless
    ``in_home_dotdir_ok``: a sandbox's default workspace), not world-writable, and yours."""
    tree = next((t for t in HOST_SYSTEM_TREES if _within(host, t)), None)
    if tree is not None:
        raise ShareError(f"{what} {host} is in the system tree {tree}: the guest would "
                         "change what the host runs; share it read-only (:ro) or use your "
                         "own directory")
    home = Path.home().resolve()
    below_home = host.relative_to(home).parts if home in host.parents else ()
    if below_home and below_home[0].startswith(".") and not in_home_dotdir_ok:
        dot = home / below_home[0]
        raise ShareError(f"{what} {host} is in {dot}, where programs keep settings and "
                         "state: the guest could change how your programs run; share it "
                         "read-only (:ro) or use a project directory")
    st = host.stat()
    if st.st_mode & stat.S_IWOTH:
        raise ShareError(f"{what} {host} is world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
                         ": other users could plant or swap files in it; use a directory "
                         "only you can write (e.g. from mktemp -d)")
    if st.st_uid != os.getuid():
        raise ShareError(f"{what} {host} is owned by uid {st.st_uid}, not by you (uid "
                         f"{os.getuid()}): the guest writes as you; use your own directory "
                         f"or chown -R {os.getuid()}:{os.getgid()} {host}")


def _check_reachable(host: Path, what: str) -> None:
    """The share server works as you (and as ids of your subordinate range), so it can
    open the directory only if it is yours (user and group) or world-readable."""
    st = host.stat()
    mine = (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    if not mine and st.st_mode & 0o005 != 0o005:
        raise ShareError(f"{what} {host} (uid {st.st_uid}, gid {st.st_gid}, mode "
                         f"{stat.S_IMODE(st.st_mode):04o}) cannot be opened by the share "
                         f"server, which works as you (uid {os.getuid()}, gid {os.getgid()}); "
                         f"chown {os.getuid()}:{os.getgid()} it or make it world-readable")


def _within(path: Path, tree: Path) -> bool:
    """``path`` is ``tree`` or lies below it."""
    return path == tree or tree in path.parents


def check_no_overlap(shares: Sequence[Share]) -> None:
    """Refuse shares whose host or guest paths overlap (one inside another).

    A read-only share inside the writable workspace would be writable through
    the workspace mount, so overlap is always an error.
    """
    for i, a in enumerate(shares):
        for b in shares[i + 1:]:
            for attr in ("host_path", "guest_path"):
                pa, pb = Path(getattr(a, attr)), Path(getattr(b, attr))
                if _within(pa, pb) or _within(pb, pa):
                    where = attr.replace("_", " ")
                    raise ShareError(f"shares '{a.tag}' and '{b.tag}' overlap ({where}: {pa}"
                                     f" and {pb}); shares must not contain each other")


# ---- the virtiofsd command ---------------------------------------------------------------


def virtiofsd_path() -> str:
    """Path of the installed virtiofsd, or raise a ShareError saying how to get one."""
    for candidate in VIRTIOFSD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("virtiofsd")
    if found:
        return found
    raise ShareError("virtiofsd is not installed (run scripts/install-system-deps.sh)")


#: Run by the invoking user inside the id-mapped user namespace, in a private mount
#: namespace: pin the source with an fd, cover /tmp with a small tmpfs (so the staging
#: path is reachable by the mapped ids even when the source sits under a 0700
#: directory), bind the source there with the share's flags, exec. The launcher's
#: Python is already running when /tmp is covered.
_STAGE_IN_TMP = (
    'set -e; exec 3<"$0"; mount -t tmpfs -o mode=0755,size=64k secvf-share /tmp; '
    "mkdir /tmp/share; mount --no-canonicalize --bind /proc/self/fd/3 /tmp/share; "
    'mount --no-canonicalize -o remount,bind,{flags} /tmp/share; exec 3<&-; exec "$@"'
)
STAGED_SOURCE = "/tmp/share"

#: Run by real root before the user namespace, in a private mount namespace: bind the
#: source onto itself with the share's flags, exec. Nothing is covered, so the launcher
#: (a Python that may live anywhere, /tmp included) still starts afterwards.
_STAGE_IN_PLACE = (
    'set -e; mount --no-canonicalize --bind "$0" "$0"; '
    'mount --no-canonicalize -o remount,bind,{flags} "$0"; exec "$@"'
)


def virtiofsd_argv(share: Share, id_base: int | None = None) -> tuple[str, ...]:
    """The command that serves ``share``: virtiofsd on a ``nosuid,nodev`` (and, for a
    read-only share, ``ro``) bind of the source in a private mount namespace, run by the
    share launcher in the id-mapped user namespace under the seccomp filter.

    As root the mount namespace comes first (real root makes the bind, whatever the
    directories above the source allow) and the bind covers the source in place;
    otherwise the user namespace does (mounting needs it) and the bind is staged in a
    private /tmp. The listening socket is handed over with ``--fd=N`` (appended by the
    supervisor). ``id_base``: see :func:`uid_map`.
    """
    flags = "nosuid,nodev" + (",ro" if share.read_only else "")
    as_root = os.getuid() == 0
    script = _STAGE_IN_PLACE if as_root else _STAGE_IN_TMP
    stage = ("unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", script.format(flags=flags), share.host_path)
    launcher = (sys.executable, "-m", "secvf.machine.share_launcher",
                *uid_map(id_base).launcher_args(), "--")
    binary = virtiofsd_path()
    server = (binary, *virtiofsd_options(binary, share.host_path if as_root else STAGED_SOURCE))
    if as_root:
        return (*stage, *launcher, *server)
    return (*launcher, *stage, *server)


def virtiofsd_options(binary: str, source: str = STAGED_SOURCE,
                      settings: ShareSettings | None = None) -> tuple[str, ...]:
    """Options for the installed virtiofsd serving ``source`` with ``settings`` (default:
    ``config/shares.json``): QEMU's C one (Debian 12) takes ``-o`` options, the Rust one
    (its own package on Debian 13) takes long options.

    Raises:
        ShareError: the settings file is invalid, or asks what this virtiofsd cannot do.
    """
    if settings is None:
        try:
            settings = load_settings()
        except ConfigError as exc:
            raise ShareError(str(exc)) from None
    if _is_rust_virtiofsd(binary):
        try:
            tuning = settings.rust_options()
        except ValueError as exc:
            raise ShareError(f"{settings_path()}: {exc} ({binary}); remove it") from None
        return ("--shared-dir", source, "--sandbox", "namespace", *tuning,
                "--log-level", "warn")
    return ("-o", f"source={source}", "-o", "sandbox=namespace", *settings.c_options(),
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
