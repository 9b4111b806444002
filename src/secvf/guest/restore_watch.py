"""secvf restore watch: puts a guest's clock and kernel RNG right after a restore or a pause.

Shipped in every SecVF image as ``/usr/lib/secvf/restore-watch.py`` and started by the
guest init (``python3 -I -S -u``). Standard library only, and it imports nothing of SecVF:
it is one file in the image. The guest agent imports its kernel helpers
(:func:`reseed_kernel_rng`, :func:`clock_lock`) from the same module.

Why
===
A guest restored from saved state (a sandbox template, a VM snapshot) resumes with its
clock where it was when the state was saved, and with the kernel RNG state every other
restore of that state has too. A paused VM (QMP ``stop`` … ``cont``) resumes with its
clock behind by the pause. Malware-analysis VMs have no channel the host could fix that
through. QEMU's emulated RTC, however, keeps counting on the host's clock across pauses
and migrations (its state is host time), so the guest can notice and repair it alone.

How it decides (the pure functions below, unit-tested)
=====================================================
The RTC counts whole seconds and ticks at a fixed phase of the host's second (the
fraction of a second at which the QEMU that booted the guest started). Call *d* the
guest's wall clock at an RTC tick minus the RTC's new value (:func:`tick_offset`,
measured by reading ``since_epoch`` every 5 ms until it advances by exactly one). A
clock that is right puts *d* in [0, 1); a clock that is *L* seconds behind lowers *d* by
*L*; the phase is the same in every restore of one saved state.

1. Arming (at start): measure *d*. If it is outside [0, 1) the clock disagrees with the
   RTC (the boot estimate was off by more than the RTC allows) and is nudged just inside
   (:func:`window_step`). *d* and REALTIME − MONOTONIC are the reference. The kernel RNG
   is reseeded once (a guest restored before its watch was armed is not seen as
   restored, but still gets an RNG of its own).
2. About once a second, one cheap sample: the wall clock before and after reading
   ``since_epoch``. :func:`classify` compares it with the reference:
   - REALTIME − MONOTONIC moved: someone *set* the clock (the agent's ``restore``, init,
     ``date -s``): that clock is taken as right, and the reference is measured again.
   - the clock is more than :data:`LAG_MARGIN_S` behind (or ahead of) where the
     reference puts it, while REALTIME − MONOTONIC did not move: guest time stood still
     while host time went on - a restore or a pause. *d* is measured again and the
     clock stepped by (reference *d* − new *d*) (:func:`restore_step`): it is as close to
     the host as it was before the save. Then the kernel RNG is reseeded from
     ``/dev/hwrng`` (virtio-rng, fed by the host) and one ``secvf-init:`` line goes to
     the console.
3. Whoever steps the clock holds :data:`CLOCK_LOCK` (flock) while checking that nobody
   else set it meanwhile, so the agent's exact time is never undone.

Cost under TCG: one sysfs read and three clock reads a second, plus up to a second of 5 ms
polling when a measurement is needed (docs/images.md has the measured CPU time). It
imports only C modules beyond what Python loads at start-up (no argparse, dataclasses or
enum: under TCG those cost ~0.4 s of a boot), so it starts fast beside the agent.
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys
import time

TYPE_CHECKING = False  # typing itself is not imported: it costs start-up time
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

#: The emulated RTC's reading, whole seconds since the epoch.
RTC_SINCE_EPOCH = "/sys/class/rtc/rtc0/since_epoch"
#: virtio-rng (backed by the host's /dev/urandom in SecVF VMs).
HWRNG = "/dev/hwrng"
URANDOM = "/dev/urandom"
#: Held (flock) by whoever steps the clock: this watcher and the guest agent.
CLOCK_LOCK = "/run/secvf/clock.lock"

#: Seconds between two cheap samples.
CHECK_INTERVAL_S = 1.0
#: Seconds between two reads of ``since_epoch`` while measuring a tick.
TICK_POLL_S = 0.005
#: A tick only counts if the two reads around it are at most this far apart.
TICK_MAX_GAP_S = 0.05
#: Longest wait for a tick before a measurement is given up (retried later).
TICK_TIMEOUT_S = 3.0
#: A sample whose RTC read took longer than this says nothing.
SAMPLE_MAX_SPREAD_S = 0.05
#: How far the clock may be off where the reference puts it before it is corrected.
LAG_MARGIN_S = 0.25
#: A change of REALTIME - MONOTONIC larger than this means someone set the clock.
CLOCK_SET_TOLERANCE_S = 0.01
#: How far inside [0, 1) an out-of-window tick offset is nudged at arming.
WINDOW_MARGIN_S = 0.02
#: Bytes read from /dev/hwrng for a reseed.
HWRNG_BYTES = 64
#: Seconds between arming attempts when the RTC does not tick as it should.
REARM_RETRY_S = 10.0

#: linux/random.h: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207

CONSOLE_PREFIX = "secvf-init: "


# --------------------------------------------------------------------------- pure logic


class _Record:
    """A small immutable record (a stand-in for a frozen dataclass, which costs imports)."""

    __slots__: tuple[str, ...] = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Record)
            and type(other) is type(self)
            and (other._values() == self._values())
        )

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Reading(_Record):
    """One read of the RTC, between two reads of the wall clock (seconds)."""

    __slots__ = ("wall_before", "rtc", "wall_after")
    wall_before: float  # time.time() just before reading since_epoch
    rtc: int  # since_epoch
    wall_after: float  # time.time() just after

    def __init__(self, wall_before: float, rtc: int, wall_after: float) -> None:
        object.__setattr__(self, "wall_before", wall_before)
        object.__setattr__(self, "rtc", rtc)
        object.__setattr__(self, "wall_after", wall_after)


class Sample(_Record):
    """A cheap look at the clocks: one RTC reading and REALTIME - MONOTONIC."""

    __slots__ = ("reading", "wall_minus_mono")
    reading: Reading
    wall_minus_mono: float  # CLOCK_REALTIME - CLOCK_MONOTONIC, seconds

    def __init__(self, reading: Reading, wall_minus_mono: float) -> None:
        object.__setattr__(self, "reading", reading)
        object.__setattr__(self, "wall_minus_mono", wall_minus_mono)


class Reference(_Record):
    """What a steady clock looks like against the RTC."""

    __slots__ = ("tick_offset", "wall_minus_mono")
    tick_offset: float  # d: wall clock at an RTC tick minus the RTC's new value
    wall_minus_mono: float  # REALTIME - MONOTONIC when d was measured

    def __init__(self, tick_offset: float, wall_minus_mono: float) -> None:
        object.__setattr__(self, "tick_offset", tick_offset)
        object.__setattr__(self, "wall_minus_mono", wall_minus_mono)


class Verdict:
    """What one sample says about the clock (plain strings: no enum import)."""

    STEADY = "steady"  # as the reference predicts
    CLOCK_SET = "clock_set"  # someone set the clock: measure the reference again
    BEHIND = "behind"  # guest time stood still while the RTC went on: restored or paused
    AHEAD = "ahead"  # the clock ran ahead of the RTC
    UNSURE = "unsure"  # the sample took too long to mean anything


def tick_offset(before: Reading, after: Reading, max_gap_s: float = TICK_MAX_GAP_S) -> float | None:
    """Return *d* (wall clock at the tick minus the RTC's new value) if the RTC ticked by
    exactly one second between ``before`` and ``after``, else None.

    The tick happened between the two RTC reads; each read happened somewhere between its
    two wall-clock reads, so the middle of the two middles is the best estimate. A jump by
    more than one (a restore between the reads) or reads too far apart do not count.
    """
    if after.rtc != before.rtc + 1 or after.wall_after - before.wall_before > max_gap_s:
        return None
    first = (before.wall_before + before.wall_after) / 2
    second = (after.wall_before + after.wall_after) / 2
    return (first + second) / 2 - after.rtc


def classify(
    sample: Sample,
    reference: Reference,
    *,
    margin_s: float = LAG_MARGIN_S,
    set_tolerance_s: float = CLOCK_SET_TOLERANCE_S,
    max_spread_s: float = SAMPLE_MAX_SPREAD_S,
) -> str:
    """Compare one sample with the reference.

    A steady clock reads ``wall - rtc`` in [d, d + 1) (the RTC counts whole seconds); a
    clock that fell behind by L reads it L lower. Only a reading outside that window by
    more than ``margin_s`` counts, and only if REALTIME - MONOTONIC did not move (if it
    did, the clock was set on purpose and wins). Returns a :class:`Verdict` value.
    """
    reading = sample.reading
    if reading.wall_after - reading.wall_before > max_spread_s:
        return Verdict.UNSURE
    if abs(sample.wall_minus_mono - reference.wall_minus_mono) > set_tolerance_s:
        return Verdict.CLOCK_SET
    if reading.wall_after - reading.rtc < reference.tick_offset - margin_s:
        return Verdict.BEHIND
    if reading.wall_before - reading.rtc >= reference.tick_offset + 1 + margin_s:
        return Verdict.AHEAD
    return Verdict.STEADY


def window_step(offset: float, margin_s: float = WINDOW_MARGIN_S) -> float:
    """Seconds to step a clock whose tick offset is ``offset`` so the RTC agrees with it.

    A right clock has its tick offset in [0, 1). Below that the clock is behind by at
    least ``-offset``; above, ahead by at least ``offset - 1``. It is moved as little as
    possible, into [``margin_s``, 1 - ``margin_s``] (the margin covers the measurement's
    own error, so the clock ends up less than a second from the host's); inside that it
    stays (0.0).
    """
    target = min(max(offset, margin_s), 1 - margin_s)
    return target - offset


def restore_step(reference: Reference, offset_now: float) -> float:
    """Seconds to step the clock forward so it is where it was against the RTC before
    guest time stood still (negative: back)."""
    return reference.tick_offset - offset_now


def rand_pool_info(entropy: bytes) -> bytes:
    """``struct rand_pool_info`` for RNDADDENTROPY: the entropy credited in full (bits),
    its size in bytes, then the bytes."""
    return struct.pack("ii", 8 * len(entropy), len(entropy)) + entropy


def describe_step(step_s: float) -> str:
    """``'12.345 s behind'`` / ``'0.500 s ahead of'`` for the console line."""
    return f"{step_s:.3f} s behind" if step_s >= 0 else f"{-step_s:.3f} s ahead of"


# --------------------------------------------------------------------------- the kernel


def reseed_kernel_rng(entropy: bytes, urandom: str = URANDOM) -> None:
    """Mix ``entropy`` into the kernel's input pool (credited in full, RNDADDENTROPY), then
    make the CRNG reseed from it at once (RNDRESEEDCRNG). Needs CAP_SYS_ADMIN.

    Raises:
        OSError: the device cannot be opened or an ioctl failed (EPERM unprivileged).
    """
    fd = os.open(urandom, os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, rand_pool_info(entropy))
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def read_hwrng(size: int = HWRNG_BYTES, path: str = HWRNG) -> bytes:
    """Read ``size`` bytes from the hardware RNG.

    Raises:
        OSError: no hardware RNG, or it failed or ran dry.
    """
    data = b""
    with open(path, "rb", buffering=0) as fh:
        while len(data) < size:
            chunk = fh.read(size - len(data))
            if not chunk:
                raise OSError(f"{path} returned no data")
            data += chunk
    return data


class clock_lock:  # noqa: N801 - used like a function: ``with clock_lock():``
    """Hold the lock every clock stepper in the guest takes (best effort: without
    ``/run/secvf`` there is nobody to race with)."""

    def __init__(self, path: str = CLOCK_LOCK) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def step_clock(delta_ns: int) -> None:
    """Step CLOCK_REALTIME by ``delta_ns`` (relative, so time spent before the call is kept).

    Raises:
        OSError: not permitted (EPERM without CAP_SYS_TIME).
    """
    now = time.clock_gettime_ns(time.CLOCK_REALTIME)
    time.clock_settime_ns(time.CLOCK_REALTIME, now + delta_ns)


def wall_minus_mono() -> float:
    """CLOCK_REALTIME - CLOCK_MONOTONIC, in seconds."""
    first = time.monotonic()
    wall = time.time()
    second = time.monotonic()
    return wall - (first + second) / 2


class RtcReader:
    """Reads the RTC's ``since_epoch`` between two reads of the wall clock (one open fd,
    ``pread`` at offset 0: sysfs makes each read afresh)."""

    def __init__(self, path: str = RTC_SINCE_EPOCH) -> None:
        self.path = path
        self.fd: int | None = None

    def read(self) -> Reading:
        """One reading.

        Raises:
            OSError, ValueError: the RTC cannot be read.
        """
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        before = time.time()
        data = os.pread(self.fd, 32, 0)
        after = time.time()
        return Reading(before, int(data), after)


# --------------------------------------------------------------------------- the watcher


def say(message: str) -> None:
    """One line on the console (init sends our stdout there)."""
    print(CONSOLE_PREFIX + message, flush=True)


class Watcher:
    """The loop: arm, then sample once a second and correct the clock when it must."""

    def __init__(
        self,
        *,
        rtc: str = RTC_SINCE_EPOCH,
        hwrng: str = HWRNG,
        interval_s: float = CHECK_INTERVAL_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rtc = RtcReader(rtc)
        self.hwrng = hwrng
        self.interval_s = interval_s
        self.sleep = sleep
        self.reference: Reference | None = None
        self._warned = False

    def measure(self) -> Reference | None:
        """Measure *d* at the RTC's next clean tick; None if none came within
        :data:`TICK_TIMEOUT_S`. A clock set meanwhile (the agent's restore) restarts the
        measurement on the new clock."""
        start = wall_minus_mono()
        deadline = time.monotonic() + TICK_TIMEOUT_S
        before = self.rtc.read()
        while time.monotonic() < deadline:
            self.sleep(TICK_POLL_S)
            after = self.rtc.read()
            offset = tick_offset(before, after)
            now = wall_minus_mono()
            if abs(now - start) > CLOCK_SET_TOLERANCE_S:  # set between the reads: again
                start, before = now, self.rtc.read()
                continue
            if offset is not None:
                return Reference(offset, now)
            before = after
        return None

    def arm(self, *, check_window: bool) -> bool:
        """Measure the reference; at start-up also bring the clock into the RTC's window.
        Returns False if no reference could be measured."""
        reference = self.measure()
        if reference is None:
            return False
        step = window_step(reference.tick_offset) if check_window else 0.0
        if step:
            with clock_lock():
                moved = abs(wall_minus_mono() - reference.wall_minus_mono) > CLOCK_SET_TOLERANCE_S
                if not moved:
                    step_clock(round(step * 1e9))
                    reference = Reference(reference.tick_offset + step, wall_minus_mono())
            if moved:  # someone set the clock meanwhile: that clock wins
                return self.arm(check_window=False)
            say(f"clock was {describe_step(step)} the RTC's second: stepped {step:+.3f} s")
        self.reference = reference
        return True

    def check(self) -> str:
        """Take one sample and act on it; returns what it saw (a :class:`Verdict` value)."""
        assert self.reference is not None
        try:
            sample = Sample(self.rtc.read(), wall_minus_mono())
        except (OSError, ValueError):
            return Verdict.UNSURE
        verdict = classify(sample, self.reference)
        if verdict is Verdict.CLOCK_SET:
            self.arm(check_window=False)
        elif verdict in (Verdict.BEHIND, Verdict.AHEAD):
            self.correct(sample)
        return verdict

    def correct(self, sample: Sample) -> None:
        """Step the clock back to where the reference puts it, then reseed the RNG."""
        assert self.reference is not None
        now = self.measure()
        if now is None:
            return  # retried at the next sample
        step = restore_step(self.reference, now.tick_offset)
        with clock_lock():
            moved = abs(wall_minus_mono() - sample.wall_minus_mono) > CLOCK_SET_TOLERANCE_S
            if not moved:
                step_clock(round(step * 1e9))
                self.reference = Reference(self.reference.tick_offset, wall_minus_mono())
        if moved:  # the agent (or someone) set the clock since the sample: it wins
            self.arm(check_window=False)
            return
        say(
            f"clock was {describe_step(step)} the RTC (restored or paused): stepped "
            f"{step:+.3f} s; {self.reseed()}"
        )

    def reseed(self) -> str:
        """Reseed the kernel RNG from the hardware RNG; return what happened, for the console."""
        try:
            reseed_kernel_rng(read_hwrng(HWRNG_BYTES, self.hwrng))
        except OSError as exc:
            return f"kernel RNG NOT reseeded ({exc})"
        return f"kernel RNG reseeded from {self.hwrng}"

    def start(self) -> bool:
        """Arm at start-up (the clock brought into the RTC's window), reseed the RNG and say
        so on the console; False if there is no reference yet (retried).

        The reseed covers a guest restored before its watch was armed (state saved within
        a second of boot): such a restore is not seen as one, but its RNG is made its own.
        """
        try:
            armed = self.arm(check_window=True)
        except (OSError, ValueError) as exc:
            self._warn_once(f"restore watch: cannot read the RTC ({exc}); retrying")
            return False
        if not armed:
            self._warn_once("restore watch: the RTC did not tick as expected; retrying")
            return False
        assert self.reference is not None
        say(
            f"restore watch armed (the RTC ticks {self.reference.tick_offset:.3f} s into the "
            f"clock's second); {self.reseed()}"
        )
        return True

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            say(message)
            self._warned = True

    def run(self) -> int:
        """Arm, then watch forever."""
        armed = self.start()
        while True:
            if not armed:
                self.sleep(REARM_RETRY_S)
                armed = self.start()
                continue
            self.sleep(self.interval_s)
            self.check()


USAGE = "usage: restore-watch.py [--rtc PATH]"


def parse_args(argv: list[str]) -> dict[str, str]:
    """``--rtc PATH`` (argparse costs start-up time).

    Raises:
        SystemExit: an unknown option (status 2, as argparse), or ``--help`` (status 0).
    """
    options = {"--rtc": RTC_SINCE_EPOCH}
    words = list(argv)
    while words:
        word = words.pop(0)
        if word in ("-h", "--help"):
            print(USAGE + "\nSecVF guest restore watch: steps the clock after a restore.")
            raise SystemExit(0)
        if word not in options or not words:
            print(USAGE, file=sys.stderr)
            raise SystemExit(2)
        options[word] = words.pop(0)
    return options


def main(argv: list[str] | None = None) -> int:
    """Entry point; exits 0 at once without an RTC (nothing to watch)."""
    rtc = parse_args(sys.argv[1:] if argv is None else argv)["--rtc"]
    if not os.path.exists(rtc):
        say(f"restore watch: no RTC ({rtc}): restores will not be noticed")
        return 0
    return Watcher(rtc=rtc).run()


if __name__ == "__main__":
    sys.exit(main())
