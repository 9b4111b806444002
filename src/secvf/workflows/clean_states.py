"""The clean saved states ``secvf analyze`` restores: a booted ``analysis`` guest whose
detonator waits for a sample medium, and a booted ``fakenet`` gateway whose services
listen.

Each is a template (:func:`secvf.workflows.templates.save_booted_guest`): the guest saved
once it reported ready, its disk frozen into a layer. Both were built on the analysis
network's addresses — the analysis guest at ``.2`` with the gateway ``.1`` as its
router and DNS, the gateway at ``.1`` — so every detonation, on its own isolated
network with that same subnet, restores them unchanged (the networks never meet, so the
same addresses and MACs in each are fine). The build VM's ``vm.json`` is kept beside
the state (``build-vm.json``): a session's VM repeats its machine and its NIC's MAC
(QEMU restores the NIC with the MAC it had, and the switch pins a port to its MAC).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from secvf.errors import AlreadyExists, NotFound, SecVFError
from secvf.model.config import VMConfig, VMKind, parse_config, write_json_atomic
from secvf.model.savedstate import TemplateInfo
from secvf.store import networks
from secvf.store import templates as store
from secvf.workflows import templates
from secvf.workflows.create import build_config

#: The subnet of every analysis network, and the addresses the clean states were saved with.
ANALYSIS_SUBNET = "10.13.37.0/24"
GATEWAY_ADDRESS = "10.13.37.1"
GUEST_ADDRESS = "10.13.37.2"
#: The network the clean states are built on (kept; never has a running VM otherwise).
BUILD_NETWORK = "secvf-analysis"
BUILD_CONFIG_FILE = "build-vm.json"
CLEAN_MEMORY = "512M"


class Role(StrEnum):
    """Which clean state: the detonation guest or the fake-internet gateway."""

    GUEST = "analysis"
    GATEWAY = "fakenet"


@dataclass(frozen=True)
class CleanState:
    """A clean saved state and the VM config it was saved from."""

    role: Role
    template: TemplateInfo
    config: VMConfig  # the build VM's: machine, image build, NIC MAC and address

    @property
    def directory(self) -> Path:
        """The saved state's directory (what a restore starts from)."""
        return store.template_dir(self.template.id)


def probe_config(role: Role, *, with_nic: bool, accel: str = "auto") -> VMConfig:
    """The config of a VM like the one ``role``'s clean state is saved from.

    Raises:
        NotFound: the image is not built (the message says how to build it).
    """
    nic = ([f"isolated:{BUILD_NETWORK},router"] if role is Role.GATEWAY
           else [f"isolated:{BUILD_NETWORK},ip={GUEST_ADDRESS}"]) if with_nic else ["none"]
    return build_config(name=f"clean-{role}", kind=VMKind.MALWARE_ANALYSIS,
                        memory=CLEAN_MEMORY, image=str(role), networks=nic, accel=accel)


def ensure_clean_state(role: Role, *, with_nic: bool, accel: str = "auto",
                       progress: templates.Progress | None = None) -> CleanState:
    """The clean state of ``role`` (with or without its NIC), built first if there is none
    for the current image build, QEMU and accelerator.

    Raises:
        NotFound: the image is not built. SnapshotError: the guest could not be saved.
        LockBusy: another command is building it right now.
    """
    _ensure_build_network()
    with networks.networks_lock():
        probe = probe_config(role, with_nic=with_nic, accel=accel)
    key, _, _ = templates.key_for(probe)
    try:
        return _load(role, store.get_template(key))
    except NotFound:
        pass
    info = templates.save_booted_guest(probe, f"clean-{role}", progress, keep=_keep_config,
                                       purpose="clean-state")
    return _load(role, info)


def _keep_config(config: VMConfig, directory: Path) -> None:
    write_json_atomic(directory / BUILD_CONFIG_FILE, config.model_dump(mode="json"))


def _load(role: Role, info: TemplateInfo) -> CleanState:
    path = store.template_dir(info.id) / BUILD_CONFIG_FILE
    try:
        config = parse_config(json.loads(path.read_text()), source=str(path))
    except (OSError, ValueError) as exc:
        raise SecVFError(f"the clean {role} state {info.id[:12]} lacks its build config "
                         f"({exc}); remove it: secvf sandbox template rm {info.id[:12]}"
                         ) from None
    return CleanState(role, info, config)


def _ensure_build_network() -> None:
    """Create the network the clean states are built on, unless it exists."""
    try:
        networks.load_network(BUILD_NETWORK)
    except NotFound:
        with contextlib.suppress(AlreadyExists):  # another command made it meanwhile
            networks.create_network(BUILD_NETWORK, subnet=ANALYSIS_SUBNET, analysis=True)
