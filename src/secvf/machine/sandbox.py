"""The AI-sandbox machine builder (the original's ``AISandboxMacVMConfiguration``).

It takes everything the generic builder gives (disk, NIC, serial, RNG, panic
notifier) and adds the host-guest channels an AI sandbox is meant to have:

* one virtio-vsock device, ``vhost-user-vsock-pci``, served by SecVF's own
  userspace backend (``python -m secvf.vsock``) — one backend per VM, started and
  ready before QEMU, reachable only through the VM's private hybrid socket;
* one ``vhost-user-fs-pci`` device per virtio-fs share, each served by its own
  ``virtiofsd`` in a user + mount namespace (see :mod:`secvf.machine.shares`).

**This is the only module in SecVF that constructs vsock or virtio-fs devices.**
A test walks the source tree and fails if any other module does.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from secvf.errors import ForbiddenDevice
from secvf.machine.common import add_boot_and_disks, add_nic, add_platform_devices, base_plan
from secvf.machine.plan import HelperSpec, MachinePlan
from secvf.machine.shares import (
    WORKSPACE_GUEST_PATH,
    WORKSPACE_TAG,
    check_host_dir,
    guest_share_param,
    parse_share_spec,
    prepare_default_workspace,
    validate_shares,
    virtiofsd_argv,
)
from secvf.model.config import SandboxChannels, Share, VMConfig, VMKind
from secvf.store import paths
from secvf.store.bundle import Bundle, RuntimeFiles

VSOCK_DEVICE = "vhost-user-vsock-pci"
VIRTIOFS_DEVICE = "vhost-user-fs-pci"


def sandbox_channels(
    name: str, *, shares: Sequence[str] = (), workspace: Path | None = None
) -> SandboxChannels:
    """Validate sandbox share options and return the VM's channel section.

    The workspace is ``$SECVF_HOME/sandboxes/<name>/workspace`` (created, yours) unless
    given; extra shares are ``HOSTDIR:GUESTPATH[:ro|:rw]``, read-only by default.

    Raises:
        ShareError: a share breaks a rule of :func:`~secvf.machine.shares.validate_shares`.
    """
    if workspace is None:
        ws_path = prepare_default_workspace(name)
    else:
        ws_path = check_host_dir(workspace, "workspace")
    all_shares = [Share(tag=WORKSPACE_TAG, host_path=str(ws_path),
                        guest_path=WORKSPACE_GUEST_PATH, read_only=False)]
    all_shares += [parse_share_spec(spec, i) for i, spec in enumerate(shares)]
    validate_shares(all_shares, name=name)
    return SandboxChannels(shares=all_shares)


def build_sandbox_machine(
    config: VMConfig, bundle: Bundle, files: RuntimeFiles, accel: str
) -> MachinePlan:
    """Return the plan for an AI-sandbox VM: the generic machine plus vsock and shares.

    Raises:
        ForbiddenDevice: the config is not an AI sandbox.
        ShareError: a share breaks a rule (a directory changed, or vm.json was edited).
    """
    if config.kind is not VMKind.AI_SANDBOX or config.channels is None:
        raise ForbiddenDevice("kind", str(config.kind), "only ai-sandbox VMs get channels")
    validate_shares(config)
    channels = config.channels
    plan = base_plan(config, bundle, files, accel)
    add_vsock(plan, channels, files, config)
    for share in channels.shares:
        add_virtiofs_share(plan, share, files)
    if channels.shares:
        plan.kernel_params.append(guest_share_param(channels.shares))
    add_boot_and_disks(plan, config, bundle)
    add_nic(plan, config)
    add_platform_devices(plan)
    return plan


def add_vsock(plan: MachinePlan, channels: SandboxChannels, files: RuntimeFiles,
              config: VMConfig) -> None:
    """The vsock device and its per-VM userspace backend."""
    if channels.vsock_backend != "userspace":
        raise ForbiddenDevice("channels.vsock_backend", str(config.kind),
                              "only the userspace backend is available on this host")
    plan.helpers.append(HelperSpec(
        name="vsock",
        argv=(sys.executable, "-m", "secvf.vsock",
              "--vhost-user-socket", str(files.vhost_vsock_socket),
              "--uds-path", str(files.vsock_socket),
              "--guest-cid", str(channels.guest_cid),
              "--vm-name", config.name, "--vm-id", config.id,
              "--log-dir", str(paths.logs_dir())),
        ready_fd_arg="--ready-fd",
    ))
    plan.add_backend("-chardev", f"socket,id=vsock0,path={files.vhost_vsock_socket}")
    plan.add_device(VSOCK_DEVICE, "vsock0", "vsock (exec channel)", chardev="vsock0")


def add_virtiofs_share(plan: MachinePlan, share: Share, files: RuntimeFiles) -> None:
    """One virtio-fs device and the virtiofsd that serves it (``share`` is validated)."""
    sock = files.virtiofs_socket(share.tag)
    plan.helpers.append(HelperSpec(name=f"virtiofsd-{share.tag}", argv=virtiofsd_argv(share),
                                   listen_socket=sock, fd_arg="--fd={fd}"))
    mode = "ro" if share.read_only else "rw"
    plan.add_backend("-chardev", f"socket,id=fs-{share.tag},path={sock}")
    plan.add_device(VIRTIOFS_DEVICE, f"fs-{share.tag}",
                    f"virtio-fs share {share.host_path} -> {share.guest_path} ({mode})",
                    chardev=f"fs-{share.tag}", tag=share.tag)
