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

from secvf.errors import ConfigError, ForbiddenDevice
from secvf.machine.common import add_boot_and_disks, add_platform_devices, base_plan
from secvf.machine.network import add_nics
from secvf.machine.plan import HelperSpec, HotplugDevice, MachinePlan, RunMode
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
from secvf.store.bundle import Bundle, RuntimeFiles

VSOCK_DEVICE = "vhost-user-vsock-pci"
#: Empty PCIe root ports of a template's machine: the vsock device and up to three shares.
SPARE_PORTS = 4
#: The PCIe root port a cold-booted sandbox's vsock device sits on.
VSOCK_PORT = "rpv"
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
    config: VMConfig, bundle: Bundle, files: RuntimeFiles, accel: str,
    mode: RunMode = RunMode.COLD, *, id_base: int | None = None,
) -> MachinePlan:
    """Return the plan for an AI-sandbox VM: the generic machine plus vsock and shares
    (their servers map guest ids into the block at ``id_base``, see
    :func:`~secvf.machine.plan.build_machine`).

    A cold boot has the channel devices from the start. A template run has
    :data:`SPARE_PORTS` empty PCIe root ports and no channel at all (QEMU 7.2 cannot save
    the state of vhost-user devices), and a restore of a template has the same machine,
    with the channel devices hot-plugged onto those ports once the guest runs.

    Raises:
        ForbiddenDevice: the config is not an AI sandbox.
        ShareError: a share breaks a rule (a directory changed, or vm.json was edited).
        ConfigError: a restore with more shares than spare ports.
    """
    if config.kind is not VMKind.AI_SANDBOX or config.channels is None:
        raise ForbiddenDevice("kind", str(config.kind), "only ai-sandbox VMs get channels")
    validate_shares(config)
    channels = config.channels
    plan = base_plan(config, bundle, files, accel, mode)
    if mode is RunMode.COLD:
        add_vsock(plan, channels, files, config)
        for share in channels.shares:
            add_virtiofs_share(plan, share, files, id_base=id_base)
        if channels.shares:
            plan.kernel_params.append(guest_share_param(channels.shares))
    else:
        ports = add_spare_ports(plan)
        if mode is RunMode.RESTORE:
            check_fits_ports(config)
            add_vsock(plan, channels, files, config, bus=ports[0])
            for share, port in zip(channels.shares, ports[1:], strict=False):
                add_virtiofs_share(plan, share, files, bus=port, id_base=id_base)
    add_boot_and_disks(plan, config, bundle)
    add_nics(plan, config)
    add_platform_devices(plan)
    return plan


def add_spare_ports(plan: MachinePlan) -> list[str]:
    """The empty PCIe root ports a template's channel devices are hot-plugged onto."""
    ports = [f"rp{i}" for i in range(SPARE_PORTS)]
    for i, port in enumerate(ports):
        plan.add_device("pcie-root-port", port, "spare PCIe slot (channel hot-plug)",
                        chassis=str(i + 1), slot=str(i + 1))
    return ports


def check_fits_ports(config: VMConfig) -> None:
    """Refuse a sandbox with more shares than a template's spare ports can take.

    Raises:
        ConfigError: it has more than ``SPARE_PORTS - 1`` shares (the vsock takes one).
    """
    shares = len(config.channels.shares) if config.channels else 0
    if shares > SPARE_PORTS - 1:
        raise ConfigError(f"sandbox '{config.name}' has {shares} shares; a session restored "
                          f"from a template takes at most {SPARE_PORTS - 1} (boot it cold)")


def add_vsock(plan: MachinePlan, channels: SandboxChannels, files: RuntimeFiles,
              config: VMConfig, *, bus: str | None = None) -> None:
    """The vsock device and its per-VM userspace backend; hot-plugged onto ``bus`` if
    given, else on a root port of its own. Either way the supervisor can unplug and plug
    it again (:attr:`MachinePlan.replug`) to recover a channel the guest broke."""
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
              "--log-dir", str(files.helper_events)),
        ready_fd_arg="--ready-fd",
        for_hotplug=bus is not None,
    ))
    purpose = "vsock (exec channel)"
    if bus is None:  # a cold boot: the device on a slot of its own, so it can be replugged
        bus = VSOCK_PORT
        plan.add_device("pcie-root-port", bus, "PCIe slot of the vsock device",
                        chassis=str(SPARE_PORTS + 1), slot=str(SPARE_PORTS + 1))
        plan.add_backend("-chardev", f"socket,id=vsock0,path={files.vhost_vsock_socket}")
        plan.add_device(VSOCK_DEVICE, "vsock0", purpose, chardev="vsock0", bus=bus)
    else:
        plan.add_hotplug(_hotplug(VSOCK_DEVICE, "vsock0", files.vhost_vsock_socket, bus,
                                  purpose))
    plan.replug["vsock"] = _hotplug(VSOCK_DEVICE, "vsock0", files.vhost_vsock_socket, bus,
                                    purpose)


def add_virtiofs_share(plan: MachinePlan, share: Share, files: RuntimeFiles, *,
                       bus: str | None = None, id_base: int | None = None) -> None:
    """One virtio-fs device and the virtiofsd that serves it (``share`` is validated);
    hot-plugged onto ``bus`` if given."""
    sock = files.virtiofs_socket(share.tag)
    plan.helpers.append(HelperSpec(name=f"virtiofsd-{share.tag}",
                                   argv=virtiofsd_argv(share, id_base), listen_socket=sock,
                                   fd_arg="--fd={fd}", for_hotplug=bus is not None))
    mode = "ro" if share.read_only else "rw"
    purpose = f"virtio-fs share {share.host_path} -> {share.guest_path} ({mode})"
    dev_id = f"fs-{share.tag}"
    if bus is not None:
        plan.add_hotplug(_hotplug(VIRTIOFS_DEVICE, dev_id, sock, bus, purpose, tag=share.tag))
        return
    plan.add_backend("-chardev", f"socket,id={dev_id},path={sock}")
    plan.add_device(VIRTIOFS_DEVICE, dev_id, purpose, chardev=dev_id, tag=share.tag)


def _hotplug(driver: str, dev_id: str, socket_path: Path, bus: str, purpose: str,
             **props: str) -> HotplugDevice:
    """A vhost-user device whose chardev connects to ``socket_path``, for ``device_add``."""
    chardev = {"id": dev_id, "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": str(socket_path)}}, "server": False}}}
    return HotplugDevice(device={"driver": driver, "id": dev_id, "chardev": dev_id, "bus": bus,
                                 **props},
                         chardev=chardev, purpose=purpose)
