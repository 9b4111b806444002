"""Resource warnings: a running VM's disk overlay and the host's free space for
``$SECVF_HOME``, checked by the VM's supervisor, reported once per crossing.

Every :attr:`ResourceConfig.interval_s` (10 s) the supervisor's resource task
(:meth:`ResourceWatch.run`) takes two cheap readings — an ``os.stat`` and an
``os.statvfs``, never on a path that serves the guest:

* ``disk_overlay``: the bytes the VM's top qcow2 file (``disk.qcow2`` in its bundle)
  occupies on the host (``st_blocks * 512``) against the VM's virtual disk size
  (``disk_bytes`` in ``vm.json``); bad when high. The overlay can pass 100 %: qcow2
  metadata and internal snapshots take room of their own.
* ``host_free_space``: the bytes available to unprivileged users on the filesystem of
  ``$SECVF_HOME`` (``f_bavail * f_frsize``) against its size; bad when low.

Each reading is judged against two marks, ``warning`` and ``critical``, by a pure
:class:`ThresholdTracker` with hysteresis: a mark fires once when the value crosses it
the bad way (a ``resource_warning`` event, WARNING), then stays quiet however long the
value stays there; it clears (``resource_cleared``, INFO) only when the value is back
past the mark by the clear margin, and only then can it fire again. The warnings in
force are in the runtime record (``resource_warnings``), which ``vm status`` shows.

The thresholds are ``$SECVF_HOME/config/resources.json`` (all keys optional; a
resource set to ``null`` is not checked)::

    {"interval_s": 10,
     "disk_overlay": {"warning_percent": 80, "critical_percent": 95,
                      "clear_margin_percent": 5},
     "host_free_space": {"warning_percent": 10, "critical_percent": 5,
                         "critical_size": "2G", "clear_margin_percent": 2}}

Free space is ``critical`` below 5 % of the filesystem **or** below 2 GiB, whichever is
more. The file is read when the supervisor starts watching; an invalid one is a
:class:`~secvf.errors.ConfigError` naming the file and the setting, which the supervisor
logs (``supervisor.log``) before it watches with the defaults.

Guest memory pressure is not watched: it would need a virtio-balloon device (or a
guest console protocol) in every VM, which docs/runtime.md explains against.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from secvf.errors import ConfigError, SecVFError
from secvf.model.config import now_iso
from secvf.model.runtime import ResourceAlert, read_settings
from secvf.model.sizes import InvalidSize, format_size, parse_size
from secvf.store import events as seclog
from secvf.store import paths
from secvf.store.events import Severity

#: The thresholds file's name in ``$SECVF_HOME/config``.
RESOURCES_FILE = "resources.json"
#: Seconds between two checks, unless ``interval_s`` says otherwise.
DEFAULT_INTERVAL_S = 10.0

log = logging.getLogger("secvf.runtime.resources")


class Resource(StrEnum):
    """What is measured."""

    DISK_OVERLAY = "disk_overlay"  # the VM's top qcow2 file against its virtual size
    HOST_FREE_SPACE = "host_free_space"  # free space on $SECVF_HOME's filesystem


class Level(StrEnum):
    """How far a reading went: each level is a mark of its own."""

    WARNING = "warning"
    CRITICAL = "critical"


#: What each resource is called in messages.
_LABELS = {Resource.DISK_OVERLAY: "disk overlay", Resource.HOST_FREE_SPACE: "host free space"}


# ---- the tracker (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class Mark:
    """One threshold of a reading: entered at ``threshold``, left past ``clear``.

    For a reading that is bad when high, the mark fires at ``value >= threshold`` and
    clears at ``value < clear``; for one that is bad when low, at ``value <= threshold``
    and ``value > clear``. ``clear`` lies on the good side of ``threshold`` (the
    hysteresis); equal, the mark simply follows the value.
    """

    level: Level
    threshold: int
    clear: int


@dataclass(frozen=True)
class Reading:
    """One measurement of a resource and the marks it is judged against."""

    resource: Resource
    value: int  # bytes: the overlay's allocation, or the free space
    total: int  # bytes: the virtual disk size, or the filesystem's size
    path: str  # what was measured
    rising: bool  # True: high values are bad (the overlay); False: low ones (free space)
    marks: tuple[Mark, ...]

    def past(self, bound: int) -> bool:
        """Whether the value is at or beyond ``bound`` on the bad side."""
        return self.value >= bound if self.rising else self.value <= bound


@dataclass(frozen=True)
class Change:
    """A mark that fired (``raised``) or cleared, with the reading that did it."""

    raised: bool
    resource: Resource
    level: Level
    value: int
    threshold: int  # the mark's threshold (also for a clear)
    total: int
    path: str
    rising: bool

    @property
    def event(self) -> str:
        """The event this change writes."""
        return "resource_warning" if self.raised else "resource_cleared"

    def message(self) -> str:
        """One line for people: what, how much, and the mark."""
        what = "allocated" if self.rising else "free"
        if self.raised:
            mark = f"{self.level.value}: {'at or above' if self.rising else 'at or below'}"
        else:
            mark = f"back {'below' if self.rising else 'above'} the {self.level.value} mark"
        return (f"{_LABELS[self.resource]} {self.path}: {format_size(self.value)} {what}, "
                f"{_percent(self.value, self.total)} of {format_size(self.total)} "
                f"({mark} {format_size(self.threshold)}, "
                f"{_percent(self.threshold, self.total)})")


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole > 0 else "?%"


class ThresholdTracker:
    """Which marks are in force; turns readings into :class:`Change` lists.

    Pure: no I/O and no clock, so it is fed readings by hand in tests. Each
    (resource, level) is tracked on its own: a reading past both marks at once fires
    both, warning first; one back below both clears both.
    """

    def __init__(self) -> None:
        self._active: dict[tuple[Resource, Level], Change] = {}

    def __repr__(self) -> str:
        return f"ThresholdTracker(active={sorted(f'{r}:{lv}' for r, lv in self._active)})"

    @property
    def active(self) -> list[Change]:
        """The marks in force (the change that raised each), in the order they fired."""
        return list(self._active.values())

    def observe(self, reading: Reading) -> list[Change]:
        """Judge ``reading``; return the marks it raised or cleared (usually none)."""
        changes = []
        for mark in reading.marks:
            key = (reading.resource, mark.level)
            held = key in self._active
            if not held and reading.past(mark.threshold):
                change = self._change(True, reading, mark)
                self._active[key] = change
            elif held and not reading.past(mark.clear):
                change = self._change(False, reading, mark)
                del self._active[key]
            else:
                continue
            changes.append(change)
        return changes

    @staticmethod
    def _change(raised: bool, reading: Reading, mark: Mark) -> Change:
        return Change(raised, reading.resource, mark.level, reading.value, mark.threshold,
                      reading.total, reading.path, reading.rising)


# ---- the thresholds file -----------------------------------------------------------------


def _size_setting(value: object) -> object:
    """A ``critical_size`` setting: bytes, or ``"2G"``-style text."""
    if isinstance(value, str):
        try:
            return parse_size(value)
        except InvalidSize as exc:
            raise ValueError(str(exc)) from None
    return value


Size = Annotated[int, BeforeValidator(_size_setting), Field(ge=0, strict=True)]
Percent = Annotated[float, Field(ge=0, le=1000, strict=True, allow_inf_nan=False)]
Margin = Annotated[Percent, Field(gt=0, le=50)]


class _Levels(BaseModel):
    """The two marks of a resource and their clear margin, in percent of its total."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    warning_percent: Percent
    critical_percent: Percent
    clear_margin_percent: Margin

    def marks(self, total: int, *, rising: bool) -> tuple[Mark, ...]:
        """The :class:`Mark` pair for a resource of ``total`` bytes."""
        margin = total * self.clear_margin_percent / 100
        step = -margin if rising else margin  # the clear mark lies on the good side
        marks = []
        for level in (Level.WARNING, Level.CRITICAL):
            threshold = self._bytes(level, total)
            marks.append(Mark(level, round(threshold), round(threshold + step)))
        return tuple(marks)

    def _bytes(self, level: Level, total: int) -> float:
        percent = self.warning_percent if level is Level.WARNING else self.critical_percent
        return total * percent / 100


class OverlayThresholds(_Levels):
    """``disk_overlay``: percent of the VM's virtual disk size; bad when high."""

    warning_percent: Percent = 80.0
    critical_percent: Percent = 95.0
    clear_margin_percent: Margin = 5.0

    @model_validator(mode="after")
    def _ordered(self) -> OverlayThresholds:
        if self.critical_percent <= self.warning_percent:
            raise ValueError("critical_percent must be more than warning_percent")
        if self.clear_margin_percent >= self.warning_percent:
            raise ValueError("clear_margin_percent must be less than warning_percent")
        return self


class FreeSpaceThresholds(_Levels):
    """``host_free_space``: percent of the filesystem's size free; bad when low. The
    critical mark is also reached below ``critical_size`` bytes, whichever is more."""

    warning_percent: Annotated[Percent, Field(le=100)] = 10.0
    critical_percent: Annotated[Percent, Field(le=100)] = 5.0
    critical_size: Size = 2 << 30
    clear_margin_percent: Margin = 2.0

    @model_validator(mode="after")
    def _ordered(self) -> FreeSpaceThresholds:
        if self.critical_percent >= self.warning_percent:
            raise ValueError("critical_percent must be less than warning_percent")
        if self.warning_percent + self.clear_margin_percent >= 100:
            raise ValueError("warning_percent + clear_margin_percent must be less than 100")
        return self

    def _bytes(self, level: Level, total: int) -> float:
        base = super()._bytes(level, total)
        return max(base, self.critical_size) if level is Level.CRITICAL else base


class ResourceConfig(BaseModel):
    """``$SECVF_HOME/config/resources.json``: how often, and the marks (null: off)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval_s: Annotated[float, Field(ge=1, le=3600, strict=True,
                                       allow_inf_nan=False)] = DEFAULT_INTERVAL_S
    disk_overlay: OverlayThresholds | None = OverlayThresholds()
    host_free_space: FreeSpaceThresholds | None = FreeSpaceThresholds()

    @classmethod
    def load(cls, path: Path) -> ResourceConfig:
        """The thresholds in ``path``, or the defaults if it does not exist.

        Raises:
            ConfigError: the file cannot be read, is not JSON, or a setting is invalid
                (the message names the file and the setting).
        """
        return read_settings(cls, path)


def config_path() -> Path:
    """``$SECVF_HOME/config/resources.json``."""
    return paths.config_dir() / RESOURCES_FILE


# ---- measurements ------------------------------------------------------------------------


def overlay_allocated(disk: Path) -> int:
    """Bytes ``disk`` (a VM's top qcow2 file) occupies on the host: its blocks, not its
    apparent size, so holes are free.

    Raises:
        OSError: it cannot be stat'ed.
    """
    return os.stat(disk).st_blocks * 512


def free_space(directory: Path) -> tuple[int, int]:
    """``(available, size)`` in bytes of the filesystem holding ``directory``; available
    is what an unprivileged user may still write (the root reserve left out).

    Raises:
        OSError: it cannot be stat'ed.
    """
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


# ---- the supervisor's task ---------------------------------------------------------------

Sleep = Callable[[float], Awaitable[None]]


class ResourceWatch:
    """One VM's resource checks: read, judge, log each change, publish what is in force.

    Args:
        config: the thresholds.
        disk: the VM's top qcow2 file.
        virtual_size: the VM's virtual disk size in bytes.
        home: ``$SECVF_HOME`` (its filesystem's free space is watched).
        vm, vm_id: who the events are about.
        publish: called with the warnings in force after every change (the supervisor
            puts them in its runtime record); what it raises is logged, not fatal.
        clock: when a warning began (RFC 3339).
    """

    def __init__(self, config: ResourceConfig, *, disk: Path, virtual_size: int, home: Path,
                 vm: str, vm_id: str, publish: Callable[[list[ResourceAlert]], object],
                 clock: Callable[[], str] = now_iso) -> None:
        self.config = config
        self.disk = disk
        self.virtual_size = virtual_size
        self.home = home
        self.vm = vm
        self.vm_id = vm_id
        self.publish = publish
        self.clock = clock
        self.tracker = ThresholdTracker()
        self._since: dict[tuple[Resource, Level], str] = {}
        self._failing: set[Resource] = set()  # measurements that failed last time

    def __repr__(self) -> str:
        return f"ResourceWatch(vm={self.vm!r}, {self.tracker!r})"

    @classmethod
    def for_vm(cls, *, disk: Path, virtual_size: int, vm: str, vm_id: str,
               publish: Callable[[list[ResourceAlert]], object]) -> ResourceWatch:
        """The watch for a VM with the thresholds file's settings (its defaults, logged,
        if the file is invalid)."""
        try:
            config = ResourceConfig.load(config_path())
        except ConfigError as exc:
            log.error("%s; resource warnings use the default thresholds", exc)
            config = ResourceConfig()
        return cls(config, disk=disk, virtual_size=virtual_size, home=paths.secvf_home(),
                   vm=vm, vm_id=vm_id, publish=publish)

    @property
    def warnings(self) -> list[ResourceAlert]:
        """The warnings in force, as the runtime record holds them."""
        return [ResourceAlert(resource=c.resource.value, level=c.level.value, value=c.value,
                              threshold=c.threshold, total=c.total, path=c.path,
                              since=self._since[(c.resource, c.level)], message=c.message())
                for c in self.tracker.active]

    def readings(self) -> list[Reading]:
        """Measure every resource that is switched on; one that cannot be measured now is
        left out (its warnings stay as they are) and logged when it starts failing."""
        found = []
        for resource, measure, levels in (
                (Resource.DISK_OVERLAY, self._overlay, self.config.disk_overlay),
                (Resource.HOST_FREE_SPACE, self._free, self.config.host_free_space)):
            if levels is None:
                continue
            try:
                value, total, path = measure()
            except OSError as exc:
                if resource not in self._failing:
                    log.warning("cannot measure %s: %s", _LABELS[resource], exc)
                self._failing.add(resource)
                continue
            self._failing.discard(resource)
            rising = resource is Resource.DISK_OVERLAY
            found.append(Reading(resource, value, total, path, rising,
                                 levels.marks(total, rising=rising)))
        return found

    def _overlay(self) -> tuple[int, int, str]:
        return overlay_allocated(self.disk), self.virtual_size, str(self.disk)

    def _free(self) -> tuple[int, int, str]:
        return (*free_space(self.home), str(self.home))

    def check(self) -> list[Change]:
        """One round: measure, judge, write an event per change and publish if anything
        changed. Returns the changes."""
        changes = [c for reading in self.readings() for c in self.tracker.observe(reading)]
        for change in changes:
            self._record(change)
        if changes:
            try:
                self.publish(self.warnings)
            except (OSError, SecVFError) as exc:
                log.error("could not publish the resource warnings: %s", exc)
        return changes

    def _record(self, change: Change) -> None:
        key = (change.resource, change.level)
        if change.raised:
            self._since[key] = self.clock()
            log.warning("%s", change.message())
        else:
            self._since.pop(key, None)
            log.info("%s", change.message())
        seclog.write_event("resource_warning" if change.raised else "resource_cleared",
                           severity=Severity.WARNING if change.raised else Severity.INFO,
                           vm=self.vm, vm_id=self.vm_id, resource=change.resource.value,
                           level=change.level.value, value=change.value,
                           threshold=change.threshold, total=change.total, path=change.path)

    async def run(self, *, sleep: Sleep = asyncio.sleep) -> None:
        """Check now, then every :attr:`ResourceConfig.interval_s`, until cancelled."""
        while True:
            self.check()
            await sleep(self.config.interval_s)
