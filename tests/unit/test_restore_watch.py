"""The restore watch's decisions (pure functions over clock readings), its kernel
structures, its command line and its start-up cost."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secvf.guest import restore_watch as rw
from secvf.guest.restore_watch import Reading, Reference, Sample, Verdict
from secvf.testing.agent import GUEST_LIKE_PYTHON

WATCH = Path(rw.__file__)
H0 = 1_800_000_000.0  # host time at the start of a simulated run


class SimulatedVM:
    """A guest whose wall clock lags the host by ``lag`` and whose RTC ticks at ``phase``
    of the host's second (QEMU's RTC: host time minus the fraction it started at)."""

    def __init__(self, phase: float, lag: float) -> None:
        self.phase, self.lag, self.host = phase, lag, H0

    def rtc(self) -> int:
        return math.floor(self.host - self.phase)

    def reading(self, read_s: float = 0.0002) -> Reading:
        before = self.host - self.lag
        value = self.rtc()
        return Reading(before, value, before + read_s)

    def sample(self) -> Sample:
        # REALTIME - MONOTONIC: only a deliberate clock step changes it
        return Sample(self.reading(), -self.lag_set)

    lag_set = 0.0

    def measure(self, poll_s: float = 0.005) -> float:
        """What the watcher measures: d at the next tick, polling every ``poll_s``."""
        before = self.reading()
        while True:
            self.host += poll_s
            after = self.reading()
            offset = rw.tick_offset(before, after)
            if offset is not None:
                return offset
            before = after

    def pause(self, seconds: float) -> None:
        """Guest time stands still while host time goes on (QMP stop/cont, a restore)."""
        self.host += seconds
        self.lag += seconds

    def step(self, seconds: float) -> None:
        self.lag -= seconds


# ---- tick offsets -----------------------------------------------------------------------------


def test_a_tick_gives_the_clock_at_the_tick_minus_the_new_value():
    before, after = Reading(100.300, 99, 100.302), Reading(100.304, 100, 100.306)
    assert rw.tick_offset(before, after) == pytest.approx(0.303)


@pytest.mark.parametrize("after", [
    Reading(100.304, 99, 100.306),  # no tick yet
    Reading(100.304, 105, 100.306),  # a jump: restored between the two reads
    Reading(100.304, 98, 100.306),  # backwards
    Reading(100.500, 100, 100.502),  # reads too far apart to say when it ticked
])
def test_anything_but_one_clean_tick_gives_nothing(after):
    assert rw.tick_offset(Reading(100.300, 99, 100.302), after) is None


@given(phase=st.floats(0, 0.999), lag=st.floats(-0.99, 0.99))
def test_the_measured_offset_is_phase_minus_lag(phase, lag):
    vm = SimulatedVM(phase, lag)
    assert vm.measure() == pytest.approx(phase - lag, abs=0.004)


# ---- classifying samples ----------------------------------------------------------------------


def _reference(offset: float = 0.4, wall_minus_mono: float = 0.0) -> Reference:
    return Reference(offset, wall_minus_mono)


@pytest.mark.parametrize(("wall", "rtc", "verdict"), [
    (H0 + 0.40, H0, Verdict.STEADY),  # at the tick
    (H0 + 1.39, H0, Verdict.STEADY),  # just before the next tick
    (H0 + 0.20, H0, Verdict.STEADY),  # within the margin below
    (H0 + 0.10, H0, Verdict.BEHIND),
    (H0 - 4.60, H0, Verdict.BEHIND),  # a 5 s pause
    (H0 + 1.60, H0, Verdict.STEADY),  # within the margin above
    (H0 + 1.70, H0, Verdict.AHEAD),
])
def test_samples_against_the_window(wall, rtc, verdict):
    sample = Sample(Reading(wall - 0.0001, int(rtc), wall), 0.0)
    assert rw.classify(sample, _reference()) == verdict


def test_a_moved_realtime_minus_monotonic_means_someone_set_the_clock():
    sample = Sample(Reading(H0 - 100, int(H0), H0 - 100), 100.0)
    assert rw.classify(sample, _reference()) == Verdict.CLOCK_SET
    small = Sample(Reading(H0 + 0.5, int(H0), H0 + 0.5), 0.005)
    assert rw.classify(small, _reference()) == Verdict.STEADY


def test_a_slow_sample_says_nothing():
    sample = Sample(Reading(H0 - 10, int(H0), H0 - 9.9), 0.0)
    assert rw.classify(sample, _reference()) == Verdict.UNSURE


# ---- corrections ------------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "step"), [
    (0.02, 0.0), (0.5, 0.0), (0.98, 0.0),  # inside: left alone
    (0.0, 0.02), (-0.3, 0.32), (-5.0, 5.02),  # behind: moved forward, just inside
    (0.999, -0.019), (1.0, -0.02), (1.4, -0.42),  # ahead: moved back, just inside
])
def test_the_arming_check_moves_the_clock_into_the_rtcs_window(offset, step):
    assert rw.window_step(offset) == pytest.approx(step)
    assert 0 < offset + rw.window_step(offset) < 1


def test_the_restore_step_puts_the_tick_offset_back():
    assert rw.restore_step(Reference(0.4, 0.0), -29.6) == pytest.approx(30.0)
    assert rw.restore_step(Reference(0.4, 0.0), 0.9) == pytest.approx(-0.5)


@settings(max_examples=200)
@given(phase=st.floats(0, 0.999), boot_lag=st.floats(-3, 3),
       pause=st.floats(rw.LAG_MARGIN_S + 1.01, 86400))
def test_after_a_pause_the_clock_is_as_close_to_the_host_as_before(phase, boot_lag, pause):
    vm = SimulatedVM(phase, boot_lag)
    # arming: measured, nudged into the RTC's window, so it is within a second of the host
    offset = vm.measure()
    vm.step(rw.window_step(offset))
    reference = Reference(vm.measure(), 0.0)
    armed_lag = vm.lag
    assert abs(armed_lag) < 1.0
    for _ in range(3):  # steady samples while nothing happens
        vm.host += 1.0
        assert rw.classify(vm.sample(), reference) == Verdict.STEADY
    vm.pause(pause)
    verdict = rw.classify(vm.sample(), reference)
    assert verdict == Verdict.BEHIND
    vm.step(rw.restore_step(reference, vm.measure()))
    assert vm.lag == pytest.approx(armed_lag, abs=0.006)
    vm.host += 1.0
    assert rw.classify(vm.sample(), reference) == Verdict.STEADY


def test_short_pauses_are_caught_once_they_pass_the_margin_plus_the_rtcs_second():
    # a lag change of more than margin + 1 s is always seen, whatever the phase
    for phase in (0.0, 0.3, 0.7, 0.99):
        vm = SimulatedVM(phase, 0.0)
        reference = Reference(vm.measure(), 0.0)
        for fraction in range(10):
            vm.host += 0.1 * fraction
            vm.pause(rw.LAG_MARGIN_S + 1.01)
            assert rw.classify(vm.sample(), reference) == Verdict.BEHIND
            vm.step(rw.restore_step(reference, vm.measure()))


# ---- the kernel ---------------------------------------------------------------------------------


def test_rand_pool_info_is_bits_bytes_then_the_buffer():
    data = bytes(range(64))
    packed = rw.rand_pool_info(data)
    assert struct.unpack("ii", packed[:8]) == (512, 64) and packed[8:] == data


def test_the_ioctl_numbers_are_linux_randoms():
    # _IOW('R', 0x03, int[2]) and _IO('R', 0x07) from <linux/random.h>
    assert rw.RNDADDENTROPY == (1 << 30) | (8 << 16) | (ord("R") << 8) | 0x03
    assert rw.RNDRESEEDCRNG == (ord("R") << 8) | 0x07


@pytest.mark.skipif(os.geteuid() == 0, reason="as root the ioctls would reseed the host's RNG")
def test_reseeding_needs_privileges(tmp_path):
    with pytest.raises(OSError):
        rw.reseed_kernel_rng(os.urandom(32))


def test_the_clock_lock_is_exclusive(tmp_path):
    lock = str(tmp_path / "clock.lock")
    order: list[str] = []
    with rw.clock_lock(lock):
        thread = threading.Thread(target=lambda: (rw.clock_lock(lock).__enter__(),
                                                  order.append("second")))
        thread.start()
        thread.join(0.2)
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]


def test_without_a_run_directory_the_lock_is_a_no_op(tmp_path):
    with rw.clock_lock(str(tmp_path / "missing" / "clock.lock")):
        pass


# ---- readiness, command line, start-up ------------------------------------------------------


def test_without_an_rtc_it_says_so_and_exits_0(tmp_path):
    proc = subprocess.run([GUEST_LIKE_PYTHON, "-I", "-S", str(WATCH), "--rtc",
                           str(tmp_path / "no-rtc")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"secvf-init: restore watch: no RTC ({tmp_path}/no-rtc): restores " \
                          "will not be noticed\n"


@pytest.mark.parametrize("argv", [["--bogus"], ["--rtc"]])
def test_a_bad_command_line_exits_2(argv):
    proc = subprocess.run([GUEST_LIKE_PYTHON, "-I", "-S", str(WATCH), *argv],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr


def test_it_starts_without_the_costly_modules():
    # under TCG argparse, dataclasses, enum and typing cost ~0.4 s of every boot
    proc = subprocess.run([GUEST_LIKE_PYTHON, "-I", "-S", "-X", "importtime", str(WATCH), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "restore watch" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()}
    assert imported.isdisjoint({"argparse", "dataclasses", "enum", "typing", "inspect"})


def test_it_is_one_file_the_image_carries():
    from secvf.image.recipe import RECIPES, RESTORE_WATCH_GUEST_PATH

    for recipe in RECIPES.values():
        (watch,) = [f for f in recipe.files if f.dest == RESTORE_WATCH_GUEST_PATH]
        assert watch.content() == WATCH.read_bytes() and watch.build is None
    assert sys.modules["secvf.guest.restore_watch"].__file__ == str(WATCH)


# ---- the watcher's measurement, with a scripted RTC -------------------------------------------


class ScriptedRtc:
    """Readings from a :class:`SimulatedVM` that advance ``poll_s`` of host time per read."""

    def __init__(self, vm: SimulatedVM, poll_s: float = 0.005) -> None:
        self.vm, self.poll_s, self.reads = vm, poll_s, 0
        self.on_read: dict[int, object] = {}  # read number -> action before it

    def read(self) -> Reading:
        self.reads += 1
        action = self.on_read.get(self.reads)
        if callable(action):
            action()
        self.vm.host += self.poll_s
        return self.vm.reading()


def _watcher(monkeypatch, vm: SimulatedVM) -> tuple[rw.Watcher, ScriptedRtc]:
    watcher = rw.Watcher(sleep=lambda s: None)
    rtc = ScriptedRtc(vm)
    watcher.rtc = rtc  # type: ignore[assignment]
    monkeypatch.setattr(rw, "wall_minus_mono", lambda: -vm.lag_set)
    return watcher, rtc


def test_measure_finds_the_next_tick(monkeypatch):
    vm = SimulatedVM(phase=0.3, lag=0.1)
    watcher, _ = _watcher(monkeypatch, vm)
    reference = watcher.measure()
    assert reference is not None and reference.tick_offset == pytest.approx(0.2, abs=0.004)


def test_a_clock_set_during_a_measurement_restarts_it_on_the_new_clock(monkeypatch):
    vm = SimulatedVM(phase=0.3, lag=100.0)  # restored, far behind

    def agent_sets_the_clock() -> None:
        vm.lag, vm.lag_set = 0.0, 100.0  # the agent's restore: exact time, a deliberate set

    watcher, rtc = _watcher(monkeypatch, vm)
    rtc.on_read[20] = agent_sets_the_clock
    reference = watcher.measure()
    assert reference is not None
    assert reference.tick_offset == pytest.approx(0.3, abs=0.004)  # measured on the new clock
    assert reference.wall_minus_mono == -100.0


def test_no_clean_tick_within_the_timeout_gives_none(monkeypatch):
    vm = SimulatedVM(phase=0.3, lag=0.0)
    watcher, rtc = _watcher(monkeypatch, vm)
    rtc.poll_s = 0.0  # the RTC never ticks
    monkeypatch.setattr(rw, "TICK_TIMEOUT_S", 0.05)
    assert watcher.measure() is None
