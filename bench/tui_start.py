"""TUI start benchmark: how long `secvf tui` takes to its first paint, beside `secvf vm
list` and a bare Python start.

``secvf tui`` runs on a pseudo-terminal of 80x24 (``pty.fork``) in an empty private
library; the clock stops when the terminal has received the first frame with the VM
table's header and the footer's ``Help`` (what a user sees first), then ``q`` ends it
and its exit status is checked. ``secvf vm list`` (the same library, the same
interpreter) and ``python -c pass`` are timed in the same run, round-robin, after two
untimed warm-up runs of each; bytecode is cached as in ``bench/cli_start.py``.

    .venv/bin/python bench/tui_start.py [--runs N]     (default 20)
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time

import benchlib as bl
from cli_start import SECVF, WARMUP_RUNS, run_env

#: What the first paint holds (the VM table's header, the footer's help key).
FIRST_PAINT = (b"NAME", b"Help")
#: Seconds a run may take before it is flagged and killed.
RUN_LIMIT_S = 60.0


def paint_time(env: dict[str, str], flags: list[str]) -> float:
    """Start ``secvf tui`` on an 80x24 pty; seconds until its first paint."""
    begin = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:  # the child: the TUI on the pty
        os.execve(SECVF[0], [*SECVF, "tui"], {**env, "TERM": "xterm-256color"})
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    seen = b""
    elapsed = float("nan")
    deadline = begin + RUN_LIMIT_S
    try:
        while time.perf_counter() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
            if all(marker in seen for marker in FIRST_PAINT):
                elapsed = time.perf_counter() - begin
                break
        else:
            flags.append("tui: no first paint within the limit")
        os.write(fd, b"q")
        status = _wait(pid, deadline + 10)
        if status != 0:
            flags.append(f"tui: exit status {status}")
    finally:
        os.close(fd)
    return elapsed


def _wait(pid: int, deadline: float) -> int | None:
    while time.perf_counter() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


def wall_time(argv: list[str], env: dict[str, str], flags: list[str]) -> float:
    """Seconds ``argv`` takes (exit status 0 expected)."""
    begin = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=RUN_LIMIT_S, check=False)
    elapsed = time.perf_counter() - begin
    if proc.returncode != 0:
        flags.append(f"{' '.join(argv[-2:])}: exit {proc.returncode}")
    return elapsed


def measure(runs: int, env: dict[str, str], flags: list[str]) -> dict[str, list[float]]:
    """Every command ``runs`` times, round-robin, after the warm-up."""
    commands = {
        "python": lambda: wall_time([sys.executable, "-c", "pass"], env, flags),
        "list": lambda: wall_time([*SECVF, "vm", "list"], env, flags),
        "tui": lambda: paint_time(env, flags),
    }
    for _ in range(WARMUP_RUNS):
        for run in commands.values():
            run()
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, run in commands.items():
            value = run()
            if value == value:  # not NaN: a run without a first paint is flagged, left out
                times[label].append(value)
    return times


def main() -> None:
    args = bl.parse_args(__doc__.splitlines()[0], 20)
    rep = bl.Report("TUI start: secvf tui to first paint vs secvf vm list",
                    f"bench/tui_start.py --runs {args.runs}")
    flags: list[str] = []
    with bl.private_secvf() as root:
        bl.log(f"{WARMUP_RUNS} warm-up + {args.runs} runs of python, vm list, tui")
        times = measure(args.runs, run_env(root), flags)
    rep.facts.update({
        "accelerator": "none: no VM is started (an empty library)",
        "interpreter": f"{sys.executable} (Python {sys.version.split()[0]})",
        "CLI": " ".join(SECVF),
        "terminal": "pty.fork, 80x24, TERM=xterm-256color; first paint: the VM table's "
                    "header and the footer on the pty",
        "flagged runs": f"{len(flags)}: " + " | ".join(flags[:5]) if flags else "none",
    })
    base, listing = bl.median(times["python"]), bl.median(times["list"])
    for label, shown in (("list", "`secvf vm list`"), ("tui", "`secvf tui` to first paint")):
        ms = [v * 1000 for v in times[label]]
        if not ms:
            continue
        rep.add(bl.Row(f"{shown} median (n={len(ms)})", bl.spread(ms, "ms", 1),
                       "`python -c pass`", f"{base * 1000:.1f} ms",
                       bl.ratio(bl.median(times[label]), base),
                       f"+{(bl.median(times[label]) - base) * 1000:.0f} ms over the interpreter"))
    if times["tui"]:
        rep.add(bl.Row("`secvf tui` first paint vs `secvf vm list`",
                       f"{bl.median(times['tui']) * 1000:.1f} ms", "`secvf vm list`",
                       f"{listing * 1000:.1f} ms", bl.ratio(bl.median(times["tui"]), listing),
                       "the TUI loads Textual and reads the same library"))
    rep.notes += ["Ratios: against the baseline named in the row, same run."]
    rep.print()


if __name__ == "__main__":
    main()
