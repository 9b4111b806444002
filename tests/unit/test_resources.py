"""Resource warnings (secvf.runtime.resources): the threshold tracker, the thresholds file,
the measurements on real files, the supervisor's task with a fake sleep, and what
``vm status`` shows. No VM boots; no assert depends on time."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from secvf.errors import ConfigError
from secvf.model.runtime import ResourceAlert, VmState
from secvf.runtime import resources
from secvf.runtime.resources import (
    FreeSpaceThresholds,
    Level,
    Mark,
    OverlayThresholds,
    Reading,
    Resource,
    ResourceConfig,
    ResourceWatch,
    ThresholdTracker,
)
from secvf.runtime.supervisor import Supervisor
from secvf.store import events as seclog
from secvf.store import paths
from secvf.store.locks import FileLock
from tests.helpers import run_cli
from tests.unit import fake_vm

GIB = 1 << 30


# ---- the tracker ---------------------------------------------------------------------------

def overlay(value: int, total: int = 100) -> Reading:
    """An overlay reading judged by the default marks (80 %/95 %, clear 5 points lower)."""
    return Reading(Resource.DISK_OVERLAY, value, total, "disk.qcow2", True,
                   OverlayThresholds().marks(total, rising=True))


def free(value: int, total: int = 100 * GIB) -> Reading:
    return Reading(Resource.HOST_FREE_SPACE, value, total, "/home", False,
                   FreeSpaceThresholds().marks(total, rising=False))


def fired(tracker: ThresholdTracker, *readings: Reading) -> list[tuple[str, str]]:
    """Feed ``readings`` in order; return every change as (event, level)."""
    return [(c.event, c.level.value) for r in readings for c in tracker.observe(r)]


def test_a_mark_fires_once_per_crossing_not_on_every_check() -> None:
    tracker = ThresholdTracker()
    assert fired(tracker, overlay(10), overlay(79)) == []
    assert fired(tracker, overlay(80)) == [("resource_warning", "warning")]
    assert fired(tracker, overlay(85), overlay(90), overlay(80)) == []
    assert [(c.level, c.value, c.threshold) for c in tracker.active] == [
        (Level.WARNING, 80, 80)]


def test_a_mark_clears_only_past_its_margin_and_fires_again_only_after() -> None:
    tracker = ThresholdTracker()
    fired(tracker, overlay(82))
    # back under the mark but inside the margin (75..80): neither clear nor fire again
    assert fired(tracker, overlay(79), overlay(75), overlay(84)) == []
    assert fired(tracker, overlay(74)) == [("resource_cleared", "warning")]
    assert tracker.active == []
    assert fired(tracker, overlay(78)) == []  # below the mark: nothing to fire
    assert fired(tracker, overlay(81)) == [("resource_warning", "warning")]


def test_a_jump_past_both_marks_fires_both_and_each_clears_on_its_own() -> None:
    tracker = ThresholdTracker()
    assert fired(tracker, overlay(97)) == [("resource_warning", "warning"),
                                           ("resource_warning", "critical")]
    assert fired(tracker, overlay(91)) == []  # inside the critical margin (90..95)
    assert fired(tracker, overlay(89)) == [("resource_cleared", "critical")]
    assert [c.level for c in tracker.active] == [Level.WARNING]
    assert fired(tracker, overlay(10)) == [("resource_cleared", "warning")]


def test_free_space_is_bad_when_low_and_critical_at_the_size_floor() -> None:
    # 100 GiB: warning at 10 GiB free, critical at max(5 GiB, 2 GiB); clears 2 GiB higher
    tracker = ThresholdTracker()
    assert fired(tracker, free(50 * GIB), free(11 * GIB)) == []
    assert fired(tracker, free(10 * GIB)) == [("resource_warning", "warning")]
    assert fired(tracker, free(4 * GIB)) == [("resource_warning", "critical")]
    assert fired(tracker, free(6 * GIB), free(7 * GIB)) == []  # 7 GiB is the clear mark
    assert fired(tracker, free(7 * GIB + 1)) == [("resource_cleared", "critical")]
    assert fired(tracker, free(13 * GIB)) == [("resource_cleared", "warning")]
    # a small filesystem: 5 % of 10 GiB is 512 MiB, so 2 GiB is the critical mark
    marks = {m.level: m for m in FreeSpaceThresholds().marks(10 * GIB, rising=False)}
    assert marks[Level.CRITICAL].threshold == 2 * GIB
    assert marks[Level.WARNING] == Mark(Level.WARNING, GIB, GIB + round(0.2 * GIB))


def test_resources_are_tracked_apart() -> None:
    tracker = ThresholdTracker()
    fired(tracker, overlay(90), free(GIB))
    assert fired(tracker, overlay(10)) == [("resource_cleared", "warning")]
    assert {(c.resource, c.level) for c in tracker.active} == {
        (Resource.HOST_FREE_SPACE, Level.WARNING), (Resource.HOST_FREE_SPACE, Level.CRITICAL)}


# ---- the thresholds file -------------------------------------------------------------------

def write_config(data: object) -> Path:
    path = resources.config_path()
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_no_file_means_the_defaults() -> None:
    config = ResourceConfig.load(resources.config_path())
    assert config == ResourceConfig()
    assert config.interval_s == 10
    assert config.disk_overlay == OverlayThresholds(warning_percent=80, critical_percent=95,
                                                    clear_margin_percent=5)
    assert config.host_free_space is not None
    assert (config.host_free_space.warning_percent, config.host_free_space.critical_percent,
            config.host_free_space.critical_size) == (10, 5, 2 * GIB)


def test_a_file_sets_thresholds_sizes_and_switches_a_resource_off() -> None:
    path = write_config({"interval_s": 30, "disk_overlay": None,
                         "host_free_space": {"critical_size": "512M", "warning_percent": 20}})
    config = ResourceConfig.load(path)
    assert config.interval_s == 30 and config.disk_overlay is None
    assert config.host_free_space == FreeSpaceThresholds(
        warning_percent=20, critical_percent=5, critical_size=512 << 20,
        clear_margin_percent=2)


@pytest.mark.parametrize(("data", "setting", "says"), [
    ({"disk_overlay": {"warning_percent": 2000}}, "disk_overlay.warning_percent",
     "less than or equal to 1000"),
    ({"disk_overlay": {"warning_percent": "80"}}, "disk_overlay.warning_percent",
     "valid number"),
    ({"disk_overlay": {"critical_percent": 70}}, "disk_overlay",
     "critical_percent must be more than warning_percent"),
    ({"host_free_space": {"critical_percent": 20}}, "host_free_space",
     "critical_percent must be less than warning_percent"),
    ({"host_free_space": {"critical_size": "lots"}}, "host_free_space.critical_size",
     "cannot parse size"),
    ({"host_free_space": {"clear_margin_percent": 0}}, "host_free_space.clear_margin_percent",
     "greater than 0"),
    ({"interval_s": 0.1}, "interval_s", "greater than or equal to 1"),
    ({"intervall_s": 10}, "intervall_s", "Extra inputs are not permitted"),
])
def test_an_invalid_setting_is_a_config_error_naming_file_and_setting(
        data: object, setting: str, says: str) -> None:
    path = write_config(data)
    with pytest.raises(ConfigError) as err:
        ResourceConfig.load(path)
    assert str(err.value).startswith(f"{path}: field '{setting}': ")
    assert says in str(err.value)


def test_a_file_that_is_not_json_is_a_config_error() -> None:
    path = write_config("{interval_s: 10")
    with pytest.raises(ConfigError, match=f"{path} is not valid JSON"):
        ResourceConfig.load(path)


# ---- the measurements on real files --------------------------------------------------------

def test_the_overlay_measure_counts_allocated_blocks_not_the_apparent_size(
        tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.qcow2"
    with sparse.open("wb") as fh:
        fh.truncate(64 << 20)
    written = tmp_path / "written.qcow2"
    with written.open("wb") as fh:
        fh.write(os.urandom(4 << 20))
        fh.flush()
        os.fsync(fh.fileno())
    assert sparse.stat().st_size == 64 << 20
    assert resources.overlay_allocated(sparse) < 1 << 20
    assert resources.overlay_allocated(written) >= 4 << 20
    with pytest.raises(FileNotFoundError):
        resources.overlay_allocated(tmp_path / "gone.qcow2")


def test_the_free_space_measure_is_the_filesystems(tmp_path: Path) -> None:
    available, size = resources.free_space(tmp_path)
    assert size == shutil.disk_usage(tmp_path).total
    assert 0 <= available <= size


# ---- the watch -----------------------------------------------------------------------------

class Published:
    """The ``publish`` callback: keeps every list it was given."""

    def __init__(self) -> None:
        self.calls: list[list[ResourceAlert]] = []

    def __call__(self, warnings: list[ResourceAlert]) -> None:
        self.calls.append(warnings)


def security_events(*names: str) -> list[dict]:
    return [e for e in seclog.read_events() if e["event"] in names]


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    """A 1 MiB file of real data (its allocation: 1 MiB, or a little more)."""
    path = tmp_path / "disk.qcow2"
    with path.open("wb") as fh:
        fh.write(os.urandom(1 << 20))
        os.fsync(fh.fileno())
    return path


def overlay_watch(disk: Path, published: Published, **config: object) -> ResourceWatch:
    """A watch of ``disk`` only, as a VM whose virtual size makes 1 MiB 80 %."""
    settings = ResourceConfig.model_validate({"host_free_space": None, **config})
    return ResourceWatch(settings, disk=disk, virtual_size=resources.overlay_allocated(disk)
                         * 100 // 80, home=disk.parent, vm="box", vm_id="id-1",
                         publish=published, clock=lambda: "2026-06-01T12:00:00Z")


def test_a_watch_writes_one_event_per_crossing_and_publishes_the_warnings(
        disk: Path) -> None:
    published = Published()
    watch = overlay_watch(disk, published)
    assert [c.event for c in watch.check()] == ["resource_warning"]
    assert watch.check() == [] and watch.check() == []
    [event] = security_events("resource_warning")
    assert (event["severity"], event["vm"], event["vm_id"]) == ("WARNING", "box", "id-1")
    assert {k: event[k] for k in ("resource", "level", "path")} == {
        "resource": "disk_overlay", "level": "warning", "path": str(disk)}
    assert event["value"] == resources.overlay_allocated(disk) and \
        event["threshold"] <= event["value"] < event["total"]
    [[warning]] = published.calls  # published once, not on every check
    assert (warning.resource, warning.level, warning.since) == (
        "disk_overlay", "warning", "2026-06-01T12:00:00Z")
    assert warning.message.startswith(f"disk overlay {disk}: 1M allocated, ")
    assert "(warning: at or above" in warning.message

    disk.unlink()  # unmeasurable for a moment: skipped, the warning stays
    assert watch.check() == [] and [w.level for w in watch.warnings] == ["warning"]
    with disk.open("wb") as fh:  # back as a hole: cleared, published empty
        fh.truncate(1 << 20)
    assert [c.event for c in watch.check()] == ["resource_cleared"]
    [cleared] = security_events("resource_cleared")
    assert cleared["severity"] == "INFO" and cleared["level"] == "warning"
    assert published.calls[-1] == [] and len(published.calls) == 2


def test_a_watch_judges_the_real_free_space(disk: Path) -> None:
    # a critical floor no filesystem here reaches: the real statvfs reading is past it
    published = Published()
    settings = ResourceConfig.model_validate({"disk_overlay": None, "host_free_space": {
        "critical_size": 1 << 60}})
    watch = ResourceWatch(settings, disk=disk, virtual_size=1 << 30, home=disk.parent,
                          vm="box", vm_id="id-1", publish=published)
    assert "critical" in [c.level for c in watch.check()]
    assert [e["path"] for e in security_events("resource_warning")
            if e["level"] == "critical"] == [str(disk.parent)]
    assert watch.check() == []


def test_a_failing_publish_is_logged_not_fatal(disk: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    def publish(_warnings: list[ResourceAlert]) -> None:
        raise OSError(28, "No space left on device")

    watch = overlay_watch(disk, Published())
    watch.publish = publish
    with caplog.at_level(logging.ERROR, "secvf.runtime.resources"):
        assert len(watch.check()) == 1
    assert "could not publish the resource warnings" in caplog.text


def test_the_task_checks_at_once_then_every_interval(disk: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake sleep drives the loop: the overlay grows and shrinks across rounds."""
    published = Published()
    watch = overlay_watch(disk, published, interval_s=7)
    watch.virtual_size = 1000
    values: Iterator[int] = iter([100, 850, 900, 960, 800, 100])
    monkeypatch.setattr(resources, "overlay_allocated", lambda _disk: next(values))
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 6:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(watch.run(sleep=sleep))
    assert slept == [7] * 6  # six checks: one at once, one after each sleep but the last
    assert [(e["event"], e["level"], e["value"]) for e in security_events(
        "resource_warning", "resource_cleared")] == [
        ("resource_warning", "warning", 850), ("resource_warning", "critical", 960),
        ("resource_cleared", "critical", 800), ("resource_cleared", "warning", 100)]
    assert [[w.level for w in call] for call in published.calls] == [
        ["warning"], ["warning", "critical"], ["warning"], []]


# ---- the supervisor and vm status ----------------------------------------------------------

def test_the_supervisors_watch_fills_the_runtime_record_and_vm_status() -> None:
    """The supervisor's watch (config file included) puts the warnings where ``vm status``
    and ``vm status --json`` read them; a VM that is not running shows none."""
    config = fake_vm.make_vm("full", paths.ensure_private_dir(paths.secvf_home() / "files"))
    write_config({"host_free_space": None, "disk_overlay": {
        "warning_percent": 0.01, "critical_percent": 99, "clear_margin_percent": 0.005}})
    supervisor = Supervisor("full")
    watch = supervisor._resource_watch()
    assert watch.disk == supervisor.bundle.disk and watch.virtual_size == config.disk_bytes
    with FileLock(supervisor.bundle.run_lock, "VM 'full'"):
        supervisor.lifecycle.transition(VmState.STARTING, supervisor_pid=os.getpid(),
                                        started_at="2026-06-01T12:00:00Z")
        supervisor.lifecycle.transition(VmState.RUNNING)
        assert [c.level for c in watch.check()] == [Level.WARNING]
        record = supervisor.lifecycle.record
        assert record is not None and [w.level for w in record.resource_warnings] == [
            "warning"]
        status = json.loads(run_cli("vm", "status", "full", "--json").stdout)
        [shown] = status["resource_warnings"]
        assert (shown["resource"], shown["path"]) == ("disk_overlay",
                                                      str(supervisor.bundle.disk))
        text = run_cli("vm", "status", "full").stdout
        assert "resource warning: disk overlay" in text and shown["since"] in text
    assert json.loads(run_cli("vm", "status", "full", "--json").stdout)[
        "resource_warnings"] == []


def test_an_invalid_file_is_logged_and_the_defaults_apply(
        caplog: pytest.LogCaptureFixture) -> None:
    path = write_config({"disk_overlay": {"warning_percent": -1}})
    with caplog.at_level(logging.ERROR, "secvf.runtime.resources"):
        watch = ResourceWatch.for_vm(disk=Path("/nonexistent"), virtual_size=1, vm="x",
                                     vm_id="y", publish=Published())
    assert watch.config == ResourceConfig()
    assert f"{path}: field 'disk_overlay.warning_percent'" in caplog.text
    assert "default thresholds" in caplog.text
