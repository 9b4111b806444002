"""``secvf analyze``: detonate one sample without a control channel, and report.

For each sample, in order (docs/analysis.md):

1. **clean start** — a malware-analysis VM restored from the ``analysis`` clean state
   (:mod:`secvf.workflows.clean_states`) on a fresh overlay; with ``fakenet`` the
   gateway VM restored from the ``fakenet`` state, both on a new isolated network of
   their own. The guest's live device tree is checked: no channel device, or no run;
2. **delivery** — the sample and its manifest on a read-only ISO 9660 medium inserted
   into the guest's empty cdrom drive over QMP; the image's detonator runs it;
3. **observation** — output-only: the serial console, the monitor port (ttyS1), the
   network's capture (pcapng, bounded);
4. **end** — the detonator's done marker or the timeout; the VMs are stopped;
5. **disk diff** of the session overlay against the clean layer (never mounted on the
   host), dropped files into ``dropped.zip`` (password ``infected``);
6. **report** (``report.json``, ``report.html``) and **revert**: the session's VMs and
   network are deleted; the clean state is untouched.

Everything a detonation makes is named after its id and listed in its ``status.json``
before it is made, so a killed ``secvf analyze`` leaves nothing the next one does not
remove (:func:`sweep_interrupted`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secvf.errors import ConfigError, NotFound, SecVFError, StateError
from secvf.model.channels import channel_of
from secvf.model.config import (
    MAX_GUEST_LOG_BYTES,
    MIN_GUEST_LOG_BYTES,
    ImageBoot,
    Nic,
    VMConfig,
    now_iso,
)
from secvf.model.enums import NetworkMode
from secvf.runtime import control
from secvf.runtime.logcap import CUT_MARK
from secvf.store import analyses, library, networks
from secvf.store.digest import sha256_file
from secvf.store.runstate import is_running
from secvf.workflows import vms
from secvf.workflows.capture import CaptureRequest, capture
from secvf.workflows.clean_states import (
    ANALYSIS_SUBNET,
    CleanState,
    Role,
    ensure_clean_state,
)

if TYPE_CHECKING:
    from secvf.analysis.diskdiff import RawImage

#: The largest sample SecVF takes (the medium is built on the host, in the result dir).
MAX_SAMPLE_BYTES = 256 << 20
#: Time after the timeout for the detonator to kill the tree, sync and say it is done.
END_GRACE_S = 20.0
#: Bounds of what is kept from the guest.
CAPTURE_MAX_BYTES = 64 << 20
MIN_CAPTURE_BYTES, MAX_CAPTURE_BYTES = 64 << 10, 64 << 30
LOG_MAX_BYTES = 8 << 20
#: A log copied into the result dir may pass its limit by this much (what the guest
#: wrote between two checks of the supervisor, and the cut note).
COPY_SLACK_BYTES = 4 << 20
DONE_MARKER = b"SECVF-DETONATION-DONE"
#: The detonator's last monitor-log event: the end is seen even when the console was cut.
DONE_EVENT = b'\nE {"event":"done"'
POLL_S = 0.1
USERS = ("analyst", "root")
NETWORK_CHOICES = "fakenet, none or isolated:NAME"
MAX_JOBS = 8
#: The clean layer's raw copy, kept in the clean state's directory (the disk diff reads it).
CLEAN_RAW = "clean.raw"
#: How long a cold boot may take to its ready marker (only with ``cold``).
BOOT_TIMEOUT_S = 180.0

#: Callers hear progress as (analysis id, what is happening now).
Progress = Callable[[str, str], None]


@dataclass(frozen=True)
class DetonationRequest:
    """One sample and how to run it."""

    sample: Path
    timeout_s: float = 60.0
    network: str = "fakenet"  # fakenet | none | isolated:NAME (on the analysis subnet)
    args: tuple[str, ...] = ()
    user: str = "analyst"
    pid_limit: int = 512
    yara: tuple[Path, ...] = ()
    accel: str = "auto"
    # boot the VMs from their images instead of restoring the clean states (the
    # benchmark's baseline; the disk diff then also shows what the boot wrote)
    cold: bool = False
    # write the guest's memory to memory.elf before it is stopped (for Volatility)
    memory_dump: bool = False
    # where the guest's console and monitor logs are cut on the host (bytes)
    log_max_bytes: int = LOG_MAX_BYTES
    # where the network capture stops (bytes)
    capture_max_bytes: int = CAPTURE_MAX_BYTES


@dataclass
class DetonationResult:
    """What one detonation produced."""

    id: str
    directory: Path
    verdict: str  # finished | timeout | failed
    report: dict[str, Any] = field(default_factory=dict)
    stages_s: dict[str, float] = field(default_factory=dict)  # wall time of each stage
    error: str | None = None


def check_request(request: DetonationRequest) -> None:
    """Refuse what cannot run, before anything is made.

    Raises:
        NotFound: no such sample. ConfigError: not a regular file, too big, bad options.
    """
    path = request.sample
    try:
        st = path.stat()
    except FileNotFoundError:
        raise NotFound(f"sample {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read sample {path}: {exc.strerror}") from None
    if not path.is_file():
        raise ConfigError(f"sample {path} is not a regular file")
    if st.st_size > MAX_SAMPLE_BYTES:
        raise ConfigError(f"sample {path} is {st.st_size} bytes; the limit is "
                          f"{MAX_SAMPLE_BYTES >> 20} MiB")
    if request.user not in USERS:
        raise ConfigError(f"--user {request.user!r}: choose analyst or root")
    if not 1 <= request.timeout_s <= 3600:
        raise ConfigError(f"--timeout {request.timeout_s:g}: 1 to 3600 seconds")
    if not MIN_CAPTURE_BYTES <= request.capture_max_bytes <= MAX_CAPTURE_BYTES:
        raise ConfigError(f"capture limit {request.capture_max_bytes} bytes: "
                          f"{MIN_CAPTURE_BYTES >> 10} KiB to {MAX_CAPTURE_BYTES >> 30} GiB")
    if not MIN_GUEST_LOG_BYTES <= request.log_max_bytes <= MAX_GUEST_LOG_BYTES:
        raise ConfigError(f"log limit {request.log_max_bytes} bytes: "
                          f"{MIN_GUEST_LOG_BYTES >> 10} KiB to {MAX_GUEST_LOG_BYTES >> 30} GiB")
    if request.network not in ("fakenet", "none") and not request.network.startswith(
            "isolated:"):
        raise ConfigError(f"--network {request.network!r}: choose {NETWORK_CHOICES}")
    if request.network.startswith("isolated:"):
        network = networks.load_network(request.network.split(":", 1)[1])
        if network.subnet != ANALYSIS_SUBNET:
            raise ConfigError(f"--network {request.network}: the analysis guest is saved with "
                              f"address .2 of {ANALYSIS_SUBNET}; use a network on that subnet "
                              f"(secvf net create NAME --subnet {ANALYSIS_SUBNET})")
    for rules in request.yara:
        if not rules.is_file():
            raise NotFound(f"YARA rules {rules} do not exist")


def medium_name(sample: Path) -> str:
    """The sample's file name on the medium: its own, made safe (a hostile name —
    ``../``, newlines, control or non-ASCII characters — becomes underscores)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", sample.name)[:64].lstrip(".") or "sample"
    return name if name not in ("manifest.json",) else f"_{name}"


class Interrupted(SecVFError):
    """The detonation was cancelled (Ctrl-C); what it made was removed."""


def detonate(request: DetonationRequest, progress: Progress | None = None,
             cancel: threading.Event | None = None) -> DetonationResult:
    """Run one sample end to end (module docstring) and return where its results are.

    A failure after the result directory exists is recorded there (``status.json``,
    ``verdict: failed``) and returned, not raised, so one bad sample does not stop a
    batch; whatever the detonation made is removed either way. Setting ``cancel`` ends
    the detonation at its next step (``verdict: interrupted``).

    Raises:
        NotFound, ConfigError: the request cannot run (nothing was made).
    """
    check_request(request)
    analysis_id, directory, lock = analyses.new_analysis()
    say = (lambda text: progress(analysis_id, text)) if progress else (lambda _text: None)
    session = _Session(analysis_id, directory, request, say, cancel or threading.Event())
    try:
        return session.run()
    finally:
        session.revert()
        lock.release()


class _Session:
    """One detonation's steps and what they made."""

    def __init__(self, analysis_id: str, directory: Path, request: DetonationRequest,
                 say: Callable[[str], None], cancel: threading.Event) -> None:
        self.id, self.dir, self.request, self.say = analysis_id, directory, request, say
        self.cancel = cancel
        self.guest = f"an-{analysis_id}"
        self.gateway = f"an-{analysis_id}-gw" if request.network == "fakenet" else None
        self.network = (f"an-{analysis_id}" if request.network == "fakenet"
                        else request.network.split(":", 1)[1]
                        if request.network.startswith("isolated:") else None)
        self.own_network = request.network == "fakenet"
        self.stages: dict[str, float] = {}
        self.began = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="work-", dir=directory))
        self.capture_stop = threading.Event()
        self.capture_thread: threading.Thread | None = None
        self.capture_error: str | None = None
        self.notes: list[str] = []
        self.memory_dump: dict[str, Any] | None = None
        self.dropped_files: list[tuple[str, Path]] = []

    def run(self) -> DetonationResult:
        analyses.write_status(
            self.dir, id=self.id, state="starting", started_at=now_iso(),
            sample=str(self.request.sample), sample_name=self.request.sample.name,
            sample_sha256=sha256_file(self.request.sample), network=self.request.network,
            timeout_s=self.request.timeout_s, user=self.request.user,
            made={"vms": [v for v in (self.guest, self.gateway) if v],
                  "network": self.network if self.own_network else None})
        try:
            guest_state, gateway_state = self._clean_states()
            self._check_cancel()
            self._start(guest_state, gateway_state)
            self._check_cancel()
            self._deliver()
            verdict = self._wait()
            self._check_cancel()
            if self.request.memory_dump:
                self._dump_memory()
            self._stop()
            self._check_cancel()
            diff = self._diff(guest_state)
            report = self._report(diff, verdict)
        except SecVFError as exc:
            ended = "interrupted" if isinstance(exc, Interrupted) else "failed"
            self.say(f"{ended}: {exc}")
            analyses.write_status(self.dir, state=ended, verdict=ended, error=str(exc),
                                  ended_at=now_iso(), stages_s=self.stages)
            return DetonationResult(self.id, self.dir, ended, stages_s=self.stages,
                                    error=str(exc))
        analyses.write_status(self.dir, state="done", verdict=verdict, ended_at=now_iso(),
                              stages_s=self.stages)
        return DetonationResult(self.id, self.dir, verdict, report, self.stages)

    def _stage(self, name: str, since: float) -> None:
        self.stages[name] = round(time.monotonic() - since, 3)

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Interrupted("cancelled; the session's VMs and network are removed")

    # ---- 1. clean start ------------------------------------------------------------

    def _clean_states(self) -> tuple[CleanState, CleanState | None]:
        began = time.monotonic()
        self.say("clean states")
        with_nic = self.network is not None
        guest = ensure_clean_state(Role.GUEST, with_nic=with_nic, accel=self.request.accel,
                                   progress=self.say)
        gateway = (ensure_clean_state(Role.GATEWAY, with_nic=True, accel=self.request.accel,
                                      progress=self.say) if self.gateway else None)
        self._stage("clean_states", began)
        return guest, gateway

    def _start(self, guest: CleanState, gateway: CleanState | None) -> None:
        began = time.monotonic()
        self.say("restoring")
        analyses.write_status(self.dir, state="running")
        if self.own_network:
            networks.create_network(self.network or "", subnet=ANALYSIS_SUBNET,
                                    analysis=True)
        if gateway is not None and self.gateway:  # the two restores overlap
            with ThreadPoolExecutor(max_workers=2) as pool:
                both = [pool.submit(self._restore, self.gateway, gateway),
                        pool.submit(self._restore, self.guest, guest)]
                for started in both:
                    started.result()
        else:
            self._restore(self.guest, guest)
        self._check_devices()
        if self.network is not None:
            self._start_capture()
        self._stage("restore", began)

    def _restore(self, name: str, state: CleanState) -> None:
        nics = [Nic(mode=NetworkMode.ISOLATED, network=self.network, mac=n.mac,
                    address=n.address, router=n.router) for n in state.config.nics]
        config = state.config.model_copy(update={
            "id": str(uuid.uuid4()), "name": name, "nics": nics, "created_at": now_iso(),
            "updated_at": now_iso(), "guest_log_max_bytes": self.request.log_max_bytes})
        VMConfig.model_validate(config.model_dump(mode="json"))
        accel = state.template.state.shape.accel
        if self.request.cold:
            vms.create_vm(config)
            control.start_vm(name, accel=accel, wait_ready=BOOT_TIMEOUT_S)
            return
        vms.create_vm(config, backing=Path(state.template.layer))
        control.start_vm(name, accel=accel, restore=state.directory)

    def _check_devices(self) -> None:
        """The analysis refuses to run in a guest with any host-guest channel device."""
        status = control.vm_status(self.guest)
        channels = status.get("channels") or []
        forbidden = sorted({d["type"] for d in status["devices"] if channel_of(d["type"])})
        if channels or forbidden:
            found = [d.get("type") for d in channels] or forbidden
            raise SecVFError(f"the analysis VM has host-guest channel devices ({found}); "
                             "refusing to run the sample")
        analyses.write_status(self.dir, devices=[d["type"] for d in status["devices"]])

    def _start_capture(self) -> None:
        request = CaptureRequest(network=self.network or "", path=self.dir / "capture.pcapng",
                                 max_bytes_total=self.request.capture_max_bytes)

        def run() -> None:
            try:
                result = capture(request, stop=self.capture_stop.is_set)
                if result.ended == "size":
                    self.notes.append(f"the capture stopped at {request.max_bytes_total} bytes "
                                      "(the limit); later frames are not in capture.pcapng")
            except SecVFError as exc:
                self.capture_error = str(exc)

        self.capture_thread = threading.Thread(target=run, name="capture", daemon=True)
        self.capture_thread.start()

    # ---- 2. delivery -----------------------------------------------------------------

    def _deliver(self) -> None:
        from secvf.analysis.medium import build_sample_medium

        began = time.monotonic()
        self.say("delivering the sample")
        manifest = {"format": 1, "sample": medium_name(self.request.sample),
                    "args": list(self.request.args), "user": self.request.user,
                    "timeout_s": self.request.timeout_s, "pid_limit": self.request.pid_limit}
        iso = build_sample_medium(self.request.sample, manifest, self.tmp / "medium.iso")
        control.change_medium(self.guest, iso)
        self._stage("deliver", began)

    # ---- 3.-4. observation and end ---------------------------------------------------

    def _wait(self) -> str:
        began = time.monotonic()
        self.say(f"running (timeout {self.request.timeout_s:g} s)")
        bundle = library.get_bundle(self.guest)
        deadline = began + self.request.timeout_s + END_GRACE_S
        verdict = "timeout"
        while time.monotonic() < deadline:
            self._check_cancel()
            if (_has_marker(bundle.serial_log, DONE_MARKER)
                    or _has_marker(bundle.monitor_log, DONE_EVENT)):
                verdict = "finished"
                break
            if not is_running(bundle):
                verdict = "guest-stopped"
                self.notes.append("the guest stopped before the detonator finished "
                                  "(powered off or crashed; see serial.log)")
                break
            time.sleep(POLL_S)
        else:
            self.notes.append(f"the detonator did not finish within the timeout + "
                              f"{END_GRACE_S:g} s; the VM was stopped")
        self._stage("run", began)
        return verdict

    def _dump_memory(self) -> None:
        """The guest's memory as ``memory.elf``, before it is stopped (noted if not)."""
        began = time.monotonic()
        if not is_running(library.get_bundle(self.guest)):
            self.notes.append("no memory dump: the guest had already stopped")
            return
        self.say("dumping memory")
        path = self.dir / "memory.elf"
        try:
            size = control.dump_memory(self.guest, path)
            self.memory_dump = {"file": path.name, "format": "elf", "bytes": size,
                                "sha256": sha256_file(path)}
        except SecVFError as exc:
            self.notes.append(f"memory dump: {exc}")
        self._stage("memory_dump", began)

    def _stop(self) -> None:
        began = time.monotonic()
        self.say("stopping")
        with ThreadPoolExecutor(max_workers=2) as pool:
            for name in (self.guest, self.gateway):
                if name:
                    pool.submit(_stop_quietly, name)
        self.capture_stop.set()
        if self.capture_thread is not None:
            self.capture_thread.join(10)
        if self.capture_error:
            self.notes.append(f"capture: {self.capture_error}")
        bundle = library.get_bundle(self.guest)
        # what the supervisor let through: the limit plus one check's worth and its note
        limit = self.request.log_max_bytes + COPY_SLACK_BYTES
        _copy_bounded(bundle.serial_log, self.dir / "serial.log", self.notes, limit)
        _copy_bounded(bundle.monitor_log, self.dir / "monitor.log", self.notes, limit)
        if self.gateway:
            _copy_bounded(library.get_bundle(self.gateway).serial_log, self.dir / "fakenet.log",
                          self.notes, limit)
        self._stage("stop", began)

    # ---- 5.-6. disk diff, report -------------------------------------------------------

    def _diff(self, state: CleanState) -> dict[str, Any] | None:
        from secvf.analysis.diskdiff import RawImage, diff_raw
        from secvf.analysis.dropped import write_dropped_zip

        began = time.monotonic()
        self.say("disk diff")
        session_disk = library.get_bundle(self.guest).disk
        result: dict[str, Any] | None = None
        try:  # one raw copy of each disk serves the diff and the zip
            with (self._clean_raw(state) as clean,
                  vms.raw_view(session_disk, self.tmp / "session.raw",
                               writable=False) as view):
                # read through the qcow2 chain, not flattened; its backing is the clean disk
                session = RawImage(session_disk, "qcow2", view, clean.source.resolve())
                diff = diff_raw(clean, session, workdir=self.tmp)
                result = diff.to_json()
                try:
                    dropped = write_dropped_zip(diff, session, self.dir / "dropped.zip",
                                                workdir=self.tmp, keep_files=self.tmp / "dropped")
                    result["dropped_zip"] = dropped.to_json()
                    # the staged copies (0644, in the work dir) for YARA and zip listing
                    self.dropped_files = [(m.path, self.tmp / "dropped" / "files" / m.name)
                                          for m in dropped.members]
                except SecVFError as exc:  # the diff stands without its zip
                    self.notes.append(f"dropped files: {exc}")
        except SecVFError as exc:  # DiskDiffError, DiskError
            self.notes.append(f"disk diff: {exc}")
        self._stage("diff", began)
        return result

    def _clean_raw(self, state: CleanState) -> contextlib.AbstractContextManager[RawImage]:
        """What the session's disk is diffed against, as a raw file: the clean layer (its
        raw copy made once and kept beside the clean state), or for a cold boot the
        image's root filesystem."""
        from secvf.analysis.diskdiff import RawImage, raw_image

        if self.request.cold:
            from secvf.machine.common import resolve_image

            boot = state.config.boot
            assert isinstance(boot, ImageBoot)
            return raw_image(resolve_image(boot).rootfs, self.tmp)
        layer = Path(state.template.layer)
        cached = state.directory / CLEAN_RAW
        if not cached.exists():
            with raw_image(layer, self.tmp) as made:
                os.replace(made.raw, cached)  # the context removes only its directory
        return contextlib.nullcontext(RawImage(layer, "qcow2", cached))

    def _report(self, diff: dict[str, Any] | None, verdict: str) -> dict[str, Any]:
        from secvf.analysis.report import ReportInputs, build_report, write_report

        began = time.monotonic()
        self.say("report")
        capture_file = self.dir / "capture.pcapng"
        report = build_report(ReportInputs(
            analysis_id=self.id, sample=self.request.sample,
            sample_name=self.request.sample.name, monitor_log=self.dir / "monitor.log",
            serial_log=self.dir / "serial.log",
            capture=capture_file if capture_file.exists() else None, disk_diff=diff,
            dropped_files=self.dropped_files, yara_rules=self.request.yara,
            timeout_s=self.request.timeout_s,
            notes=self.notes,
            extra={"verdict": verdict, "network_mode": self.request.network,
                   "stages_s": self.stages, "memory_dump": self.memory_dump}))
        write_report(report, self.dir)
        self._stage("report", began)
        return report

    # ---- revert ------------------------------------------------------------------------

    def revert(self) -> None:
        """Delete the session's VMs, its own network and its work files; never raises."""
        for name in (self.guest, self.gateway):
            if name:
                with contextlib.suppress(NotFound, SecVFError):
                    vms.delete_vm(name, force=True)
        if self.own_network and self.network:
            with contextlib.suppress(NotFound, SecVFError):
                networks.remove_network(self.network)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.stages["total"] = round(time.monotonic() - self.began, 3)


def _stop_quietly(name: str) -> None:
    with contextlib.suppress(SecVFError):
        control.stop_vm(name, force=True)


def sweep_interrupted() -> list[str]:
    """Remove what killed detonations left (VMs, networks) and mark them ``interrupted``;
    returns their ids."""
    swept = []
    for item in analyses.interrupted():
        made = item.status.get("made") or {}
        for name in made.get("vms") or []:
            with contextlib.suppress(NotFound, SecVFError):
                vms.delete_vm(str(name), force=True)
        if made.get("network"):
            with contextlib.suppress(NotFound, SecVFError, StateError):
                networks.remove_network(str(made["network"]))
        for work in item.directory.glob("work-*"):
            shutil.rmtree(work, ignore_errors=True)
        analyses.write_status(item.directory, state="interrupted", verdict="interrupted",
                              ended_at=now_iso())
        swept.append(item.id)
    return swept


def _has_marker(path: Path, marker: bytes) -> bool:
    """Whether the guest log at ``path`` holds ``marker`` (read from its end)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - (64 << 10)))
            return marker in fh.read()
    except OSError:
        return False


def _copy_bounded(source: Path, dest: Path, notes: list[str], limit: int) -> None:
    """Copy at most ``limit`` bytes of a guest log, noting a cut (by the copy, or by the
    supervisor's :mod:`~secvf.runtime.logcap`)."""
    try:
        with source.open("rb") as src, os.fdopen(
                os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            kept = src.read(limit)
            out.write(kept)
            if src.read(1):
                out.write(f"\nT truncated after {limit} bytes\n".encode())
                notes.append(f"{dest.name} was cut at {limit} bytes")
            elif CUT_MARK in kept[-4096:]:
                notes.append(f"{dest.name}: the guest wrote more than the VM's log limit; "
                             "the host kept the first part and discarded the rest")
    except FileNotFoundError:
        notes.append(f"no {dest.name}: the guest wrote nothing there")



def detonate_all(requests: list[DetonationRequest], *, jobs: int = 1,
                 progress: Progress | None = None) -> list[DetonationResult]:
    """Detonate ``requests``, ``jobs`` at a time (each in its own VMs and network);
    results in the order of ``requests``.

    Raises:
        NotFound, ConfigError: a request cannot run (checked for all before any runs).
        ConfigError: ``jobs`` is not 1 to 8.
    """
    if not 1 <= jobs <= MAX_JOBS:
        raise ConfigError(f"--jobs {jobs}: 1 to {MAX_JOBS}")
    for request in requests:
        check_request(request)
    shared = [r for r in requests if r.network.startswith("isolated:")]
    if jobs > 1 and shared:
        raise ConfigError(f"--network {shared[0].network} with --jobs {jobs}: every analysis "
                          "guest has the same address and MAC, so samples on one network "
                          "must run one at a time (fakenet gives each its own network)")
    sweep_interrupted()
    cancel = threading.Event()
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="detonation")
    try:
        return list(pool.map(lambda r: detonate(r, progress, cancel), requests))
    except KeyboardInterrupt:  # every running session reverts at its next step
        cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
