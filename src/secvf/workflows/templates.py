"""Sandbox templates: a booted sandbox guest saved at "agent ready", restored per session.

Building one (:func:`build_template`) boots a throw-away AI-sandbox VM with the
template machine (:data:`~secvf.machine.plan.RunMode.TEMPLATE`: spare PCIe root ports,
no channel device, since QEMU 7.2 cannot save vhost-user devices); its supervisor saves
the guest's device state and RAM once the guest reports ready and quits. The VM's disk
is frozen into a layer that every session's overlay then sits on.

A template is keyed (:func:`template_key`) by everything a restore depends on: the image
build, the QEMU version, CPU model, vCPUs, memory, accelerator, devices, network and
disk size. A session whose key has no template boots cold; one whose family (image,
vCPUs, memory, network, disk) has only templates with other keys has a **stale**
template: it boots cold, says so once, and a rebuild starts in the background.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from secvf.errors import CorruptRecord, NotFound, SecVFError, SnapshotError
from secvf.machine import build_machine
from secvf.machine.plan import RunMode
from secvf.machine.sandbox import SPARE_PORTS
from secvf.model.config import ImageBoot, SandboxChannels, VMConfig, VMKind, now_iso
from secvf.model.enums import NetworkMode
from secvf.model.savedstate import SAVED_STATE_FORMAT, MachineShape, SavedState, TemplateInfo
from secvf.model.sizes import format_size
from secvf.runtime import control
from secvf.runtime.accel import accel_for_vm
from secvf.store import events as seclog
from secvf.store import library, paths
from secvf.store import templates as store
from secvf.store.bundle import RuntimeFiles
from secvf.store.layers import LAYER_SUFFIX, layers_dir, using_layers
from secvf.store.locks import is_locked, locked
from secvf.store.runstate import is_running, read_last_run
from secvf.store.savedstate import SAVED_RECORD
from secvf.workflows import vms
from secvf.workflows.create import build_config

log = logging.getLogger(__name__)

#: How long a template build may take (a cold boot under TCG, loaded host: ~5-20 s).
BUILD_TIMEOUT_S = 300.0
BUILD_POLL_S = 0.1
#: Marks a stale template whose staleness was reported (reported once).
STALE_NOTED = ".stale-noted"

#: Callers hear build progress as short lines.
Progress = Callable[[str], None]


@dataclass(frozen=True)
class TemplateChoice:
    """What :func:`choose_template` found for a session."""

    template: TemplateInfo | None  # the one to restore, if any
    note: str | None = None  # something to tell the user once (a stale template)


def template_shape(config: VMConfig, accel: str) -> MachineShape:
    """The machine shape of ``config``'s template machine under ``accel``."""
    plan = build_machine(config, library.bundle_for(config.name), RuntimeFiles(config.id),
                         accel, RunMode.TEMPLATE)
    return plan.shape()


def template_key(config: VMConfig, shape: MachineShape) -> str:
    """The template ID for sessions like ``config`` on a machine of ``shape``."""
    boot = _image_boot(config)
    described = {"format": SAVED_STATE_FORMAT, "image": boot.image,
                 "recipe_hash": boot.recipe_hash, "network": config.network_summary,
                 "disk_bytes": config.disk_bytes, "spare_ports": SPARE_PORTS,
                 "shape": shape.model_dump()}
    canonical = json.dumps(described, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def key_for(config: VMConfig) -> tuple[str, MachineShape, str]:
    """The template ID, machine shape and accelerator for sessions like ``config``."""
    _image_boot(config)  # a template needs a SecVF image
    accel = accel_for_vm(config).accel
    shape = template_shape(config, accel)
    return template_key(config, shape), shape, accel


def choose_template(config: VMConfig) -> TemplateChoice:
    """The template a new session like ``config`` can be restored from, if any.

    A stale template of the same family is reported once (and a rebuild started in the
    background); a session with more shares than the spare slots boots cold.
    """
    if any(nic.mode is NetworkMode.ISOLATED for nic in config.nics):
        return TemplateChoice(None, "a session on an isolated network boots cold (templates "
                                    "are saved with --network nat or none)")
    shares = len(config.channels.shares) if config.channels else 0
    if shares > SPARE_PORTS - 1:
        return TemplateChoice(None, f"{shares} shares do not fit a template session (at most "
                                    f"{SPARE_PORTS - 1}); booting cold")
    key, _, _ = key_for(config)
    try:
        return TemplateChoice(store.get_template(key))
    except NotFound:
        pass
    except CorruptRecord as exc:
        return TemplateChoice(None, f"{exc}; booting cold")
    stale = [t for t in _sandbox_templates() if _same_family(t, config)]
    if not stale:
        return TemplateChoice(None)
    note = None
    marker = store.template_dir(stale[0].id) / STALE_NOTED
    if not marker.exists():
        with contextlib.suppress(OSError):
            marker.touch()
        note = (f"template {stale[0].id[:12]} is stale ({_why_stale(stale[0], config)}); "
                "this session boots cold and the template is being rebuilt in the background")
    start_background_rebuild(config)
    return TemplateChoice(None, note)


def build_template(*, image: str = "sandbox", cpus: int = 1, memory: str = "1G",
                   network: str = "nat", disk_size: str = "8G", accel: str = "auto",
                   progress: Progress | None = None) -> TemplateInfo:
    """Build (or rebuild) the template for sessions of this shape; returns its record.
    Older templates of the same family are removed once the new one is in place.

    Raises:
        NotFound: the image is not built.
        LockBusy: a build of this family is already running.
        SnapshotError: the guest did not become ready or could not be saved.
    """
    probe = build_config(name="template-build", kind=VMKind.AI_SANDBOX, cpus=cpus,
                         memory=memory, disk_size=disk_size, image=image, networks=[network],
                         accel=accel, channels=SandboxChannels())
    info = save_booted_guest(probe, "template-build", progress)
    for old in _sandbox_templates():
        if old.id != info.id and _same_family(old, probe):
            store.remove_template(old.id)
    seclog.write_event("template_built", template=info.id, image=image, build_s=info.build_s)
    return info


def save_booted_guest(probe: VMConfig, prefix: str, progress: Progress | None = None,
                      keep: Callable[[VMConfig, Path], None] | None = None, *,
                      purpose: Literal["sandbox", "clean-state"] = "sandbox") -> TemplateInfo:
    """Boot a throw-away VM like ``probe`` (its name becomes ``<prefix>-<family>-<n>``),
    save it once its guest is ready, freeze its disk into a layer and record the result
    as a template (``probe``'s key) for ``purpose``. ``keep(config, directory)`` may add
    files to the template's directory before it is committed (the build VM's config, for
    instance).

    Raises:
        NotFound, LockBusy (a build of this family runs), SnapshotError.
    """
    say = progress or (lambda _line: None)
    family = f"{prefix}-{_family_digest(probe)[:8]}-"
    name = f"{family}{uuid.uuid4().hex[:8]}"
    config = probe.model_copy(update={"name": name})
    key, shape, chosen = key_for(config)
    image = _image_boot(config).image
    began = time.monotonic()
    with _family_lock(config), store.TemplateStaging() as staging:
        _remove_leftover_build_vms(family)
        say(f"booting {'an' if image[:1] in 'aeiou' else 'a'} {image} guest ({config.cpus} vCPU, "
            f"{format_size(config.memory_mib << 20)}, {chosen}) to save")
        vms.create_vm(config)
        try:
            control.start_vm(name, accel=chosen, save_template=staging.path)
            saved = _wait_saved(name, staging.path)
            if saved.shape != shape:
                raise SnapshotError(f"the template was saved from machine {saved.shape}, not "
                                    f"the expected {shape}")
            say(f"saved {format_size(saved.ram_allocated_bytes)} of RAM in {saved.pause_s} s")
            if keep is not None:
                keep(config, staging.path)
            with using_layers():
                layer = _freeze(library.get_bundle(name).disk)
                info = TemplateInfo(
                    id=key, purpose=purpose, image=image,
                    recipe_hash=_image_boot(config).recipe_hash,
                    network=config.network_summary, disk_bytes=config.disk_bytes,
                    spare_ports=SPARE_PORTS, layer=str(layer), state=saved,
                    created_at=now_iso(), build_s=round(time.monotonic() - began, 2))
                staging.commit(info)
        finally:
            with contextlib.suppress(Exception):
                library.delete_vm(name)
    return info


def list_templates() -> list[TemplateInfo]:
    """Every sandbox template, newest first (broken ones are left out; see the log;
    analysis clean states are not sandbox templates)."""
    store.sweep()
    found, problems = store.list_templates()
    for problem in problems:
        log.warning("%s", problem)
    return [t for t in found if t.purpose == "sandbox"]


def _sandbox_templates() -> list[TemplateInfo]:
    return [t for t in store.list_templates()[0] if t.purpose == "sandbox"]


def resolve_template_id(prefix: str) -> str:
    """The full ID of the one sandbox template whose ID starts with ``prefix``.

    Raises:
        NotFound: none or several do.
    """
    ids = [i for i in (store.find_template_ids(prefix) if prefix else [])
           if _purpose(i) != "clean-state"]  # a broken one can be removed
    if len(ids) != 1:
        what = "no template" if not ids else f"{len(ids)} templates"
        raise NotFound(f"{what} with an ID starting '{prefix}' (see: secvf sandbox template "
                       "list)")
    return ids[0]


def _purpose(template_id: str) -> str | None:
    try:
        return store.get_template(template_id).purpose
    except (NotFound, CorruptRecord):
        return None


def remove_template(prefix: str) -> str:
    """Remove the template ``prefix`` names; returns its full ID. Sessions made from it
    keep working (their disks read through its layer, which ``secvf gc`` keeps while
    they exist).

    Raises:
        NotFound: no (single) template has that ID.
    """
    template_id = resolve_template_id(prefix)
    store.remove_template(template_id)
    seclog.write_event("template_removed", template=template_id)
    return template_id


def start_background_rebuild(config: VMConfig) -> None:
    """Start ``secvf sandbox template build`` for ``config``'s family as a detached
    process (its output goes to the log directory), unless one runs already."""
    if _family_busy(config):
        return
    boot = _image_boot(config)
    argv = [sys.executable, "-m", "secvf", "sandbox", "template", "build",
            "--image", boot.image, "--cpus", str(config.cpus),
            "--memory", f"{config.memory_mib}M", "--network", config.network_summary,
            "--disk", f"{config.disk_bytes >> 20}M", "--accel", str(config.accel)]
    with (paths.logs_dir() / "template-build.log").open("ab") as out:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                         start_new_session=True, close_fds=True)


def _wait_saved(name: str, directory: Path) -> SavedState:
    """Wait until the build VM's supervisor has saved and quit; return what it saved.

    Raises:
        SnapshotError: it ended without saving (why, from its last run).
    """
    bundle = library.get_bundle(name)
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while is_running(bundle):
        if time.monotonic() > deadline:
            control.stop_vm(name, force=True)
            raise SnapshotError(f"the template guest did not become ready within "
                                f"{BUILD_TIMEOUT_S:.0f} s; see {bundle.serial_log}")
        time.sleep(BUILD_POLL_S)
    record = directory / SAVED_RECORD
    if not record.exists():
        last = read_last_run(bundle)
        raise SnapshotError(f"the template guest was not saved: "
                            f"{last.reason if last else 'no record of the run'}")
    return SavedState.model_validate_json(record.read_bytes())


def _freeze(disk: Path) -> Path:
    """Move the build VM's disk into the layers directory, read-only."""
    layer = layers_dir() / f"{uuid.uuid4()}{LAYER_SUFFIX}"
    os.rename(disk, layer)
    layer.chmod(0o400)
    return layer


def _image_boot(config: VMConfig) -> ImageBoot:
    if not isinstance(config.boot, ImageBoot):
        raise NotFound(f"VM '{config.name}' does not boot a SecVF image: no template fits it")
    return config.boot


def _family(image: str, cpus: int, memory_mib: int, network: str, disk_bytes: int) -> str:
    return f"{image}-{cpus}-{memory_mib}-{network}-{disk_bytes}"


def _config_family(config: VMConfig) -> str:
    return _family(_image_boot(config).image, config.cpus, config.memory_mib,
                   config.network_summary, config.disk_bytes)


def _same_family(template: TemplateInfo, config: VMConfig) -> bool:
    return _family(template.image, template.state.shape.cpus, template.state.shape.memory_mib,
                   template.network, template.disk_bytes) == _config_family(config)


def _why_stale(template: TemplateInfo, config: VMConfig) -> str:
    if template.recipe_hash != _image_boot(config).recipe_hash:
        return "the image was rebuilt"
    _, shape, _ = key_for(config)
    return template.state.shape.mismatch(shape) or "it was saved in another format"


def _family_digest(config: VMConfig) -> str:
    return hashlib.sha256(_config_family(config).encode()).hexdigest()


def _family_lock_path(config: VMConfig) -> Path:
    return paths.templates_dir() / f".build-{_family_digest(config)[:16]}.lock"


def _remove_leftover_build_vms(prefix: str) -> None:
    """Delete the build VMs a killed build of this family left (the family's build lock
    is held, so none of them is in use)."""
    for item in library.list_vms():
        if item.bundle.name.startswith(prefix):
            with contextlib.suppress(SecVFError):
                if is_running(item.bundle):
                    control.stop_vm(item.bundle.name, force=True)
                library.delete_vm(item.bundle.name)


@contextlib.contextmanager
def _family_lock(config: VMConfig) -> Iterator[None]:
    """Hold the build lock of ``config``'s family (one build per family at a time)."""
    with locked(_family_lock_path(config), "the template build for this sandbox shape"):
        yield


def _family_busy(config: VMConfig) -> bool:
    return is_locked(_family_lock_path(config))

