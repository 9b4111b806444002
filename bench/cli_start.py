"""CLI start benchmark: how long `secvf` takes to start, beside a bare Python start.

Issue 11 asks for ``secvf --help`` ≤ 120 ms and for ``secvf vm exec NAME -- true`` to
cost at most 60 ms more than the SDK's round trip: the CLI must import only what a
command needs. Timed here, wall clock around the installed ``secvf`` script (``python
-m secvf`` where there is none), without any VM:

* ``secvf --help``: the command tree and its help;
* ``secvf vm list`` in an empty library: the library code (pydantic) is loaded;
* ``secvf vm exec NOSUCH -- true``: the exec path up to the VM lookup, which fails with
  "no VM named 'NOSUCH'" (exit 125): the lean start without click, the exec client
  loaded, the error line written without rich. The exec round trip itself (and so the
  overhead target) needs a running sandbox: ``bench/exec.py``.

Baseline, same run: ``python -c pass`` with the same interpreter, the start-up every
CLI number includes. The commands run round-robin (baseline first), after two untimed
warm-up runs of each; the exit status of every run is checked. Bytecode is cached as in
an installed package: the runs get ``PYTHONPYCACHEPREFIX`` in the private directory
(filled by the warm-up) and no ``PYTHONDONTWRITEBYTECODE``.

    .venv/bin/python bench/cli_start.py [--runs N]     (default 30)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import benchlib as bl

WARMUP_RUNS = 2
HELP_TARGET_MS = 120
EXEC_OVERHEAD_TARGET_MS = 60

#: The command line of ``secvf``: the installed script beside this interpreter if any.
SCRIPT = Path(sys.executable).with_name("secvf")
SECVF = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "secvf"]

#: label -> (argv, the exit status it must end with).
COMMANDS: dict[str, tuple[list[str], int]] = {
    "python": ([sys.executable, "-c", "pass"], 0),
    "help": ([*SECVF, "--help"], 0),
    "list": ([*SECVF, "vm", "list"], 0),
    "exec": ([*SECVF, "vm", "exec", "NOSUCH", "--", "true"], 125),
}


def run_env(root: Path) -> dict[str, str]:
    """This process's environment (the private SecVF home) with bytecode cached in
    ``root``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    return env


def timed_run(label: str, env: dict[str, str], flags: list[str]) -> float:
    """Run command ``label`` once; its wall time in seconds. A wrong exit status is
    added to ``flags``."""
    argv, expected = COMMANDS[label]
    begin = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=60, check=False)
    elapsed = time.perf_counter() - begin
    if proc.returncode != expected:
        flags.append(f"{label}: exit {proc.returncode}, not {expected}: "
                     f"{proc.stderr.decode(errors='replace').strip()[-200:]}")
    return elapsed


def measure(runs: int, env: dict[str, str], flags: list[str]) -> dict[str, list[float]]:
    """Every command ``runs`` times, round-robin, after the warm-up."""
    for _ in range(WARMUP_RUNS):
        for label in COMMANDS:
            timed_run(label, env, flags)
    times: dict[str, list[float]] = {label: [] for label in COMMANDS}
    for _ in range(runs):
        for label, values in times.items():
            values.append(timed_run(label, env, flags))
    return times


def add_rows(rep: bl.Report, times: dict[str, list[float]]) -> None:
    """One row per command, beside ``python -c pass``."""
    base = bl.median(times["python"])
    notes = {
        "help": f"issue 11 target ≤ {HELP_TARGET_MS} ms",
        "list": "empty library; loads the library code and pydantic",
        "exec": "fails at the VM lookup (exit 125), without click or rich. Target: "
                f"≤ {EXEC_OVERHEAD_TARGET_MS} ms over the SDK round trip (bench/exec.py)",
    }
    for label, note in notes.items():
        values = times[label]
        shown = " ".join(COMMANDS[label][0][len(SECVF):])
        ms = [v * 1000 for v in values]
        rep.add(bl.Row(f"`secvf {shown}` median (n={len(values)})", bl.spread(ms, "ms", 1),
                       "`python -c pass`", f"{base * 1000:.1f} ms",
                       bl.ratio(bl.median(values), base),
                       f"+{(bl.median(values) - base) * 1000:.0f} ms over the interpreter; "
                       + note))


def main() -> None:
    args = bl.parse_args(__doc__.splitlines()[0], 30)
    rep = bl.Report("CLI start: secvf commands vs a bare Python start",
                    f"bench/cli_start.py --runs {args.runs}")
    flags: list[str] = []
    with bl.private_secvf() as root:
        bl.log(f"{WARMUP_RUNS} warm-up + {args.runs} runs of {', '.join(COMMANDS)}")
        times = measure(args.runs, run_env(root), flags)
    rep.facts.update({
        "accelerator": "none: no VM is started",
        "interpreter": f"{sys.executable} (Python {sys.version.split()[0]})",
        "CLI": " ".join(SECVF),
        "bytecode": f"cached in a private PYTHONPYCACHEPREFIX, filled by {WARMUP_RUNS} "
                    "warm-up runs of each command",
        "flagged runs": f"{len(flags)}: " + " | ".join(flags[:5]) if flags
                        else "none: every run ended with its expected exit status",
    })
    add_rows(rep, times)
    rep.notes += ["Ratios: the command's time against a bare `python -c pass`."]
    rep.print()


if __name__ == "__main__":
    main()
