"""Snapshot benchmark: `vm snapshot create/revert` of a running malware-analysis VM vs a cold boot.

A 1 GiB, 1 vCPU malware-analysis VM from the ``base`` image (``--accel tcg``, network
``none`` as that kind defaults to) is created and booted with ``vm start --wait-ready``
(not counted). Then, every step timed by the wall clock around the CLI (``secvf ...``,
Python start-up included) and, where the command reports it, by its own ``took_s``:

1. ``vm snapshot create mal clean --json`` of the running VM (memory + disk): time, the
   guest's pause, the size of the snapshot's files and the RAM it saved. Repeated
   (``min(runs, 3)`` in all) as further snapshots, which are deleted again (``vm snapshot
   delete`` timed too).
2. ``vm snapshot revert mal clean --json`` of the running VM, ``--runs`` times
   (median/p90): the VM must come back running, restored from the snapshot (its status's
   ``state`` and ``restored_from`` are checked every time, and flagged if not). Same-run
   baseline, interleaved: getting the VM back to a running, ready state without
   snapshots, ``vm stop --force`` + ``vm start --wait-ready`` (a cold boot; at most 5
   runs).
3. The stopped VM: ``vm snapshot create mal disk0 --json`` (a disk snapshot), then ``vm
   snapshot revert mal disk0 --json`` ``--runs`` times. Baselines: ``qemu-img snapshot
   -c`` / ``-a`` on a copy of the VM's disk (what SecVF wraps, without SecVF), and
   getting a clean disk without snapshots: ``vm delete --force`` + ``vm create`` of an
   identical VM.

A reverted guest resumes at the instant it was saved, i.e. after it had reported ready;
it does not print the ready marker again, so "ready" after a revert is the VM running
from that instant (QEMU resumed), not a new marker.

    .venv/bin/python bench/snapshot.py [--runs N]     (default 10)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import benchlib as bl

from secvf.image import build_image
from secvf.store import library

VM = "mal"
FRESH = "malfresh"
MEMORY_MIB = 1024
READY_TIMEOUT_S = "180"
CREATE_MAX_RUNS = 3
COLD_MAX_RUNS = 5
CREATE_ARGS = ("--kind", "malware-analysis", "--image", "base", "--memory", f"{MEMORY_MIB}M",
               "--accel", bl.ACCEL)  # fmt: skip


def filesystem_of(path: Path) -> str:
    """The mount point and filesystem type ``path`` is on (from /proc/mounts)."""
    best = ("/", "?")
    resolved = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best[0]):
            best = (mount, fstype)
    return f"{best[1]} ({best[0]})"


def cli_json(*args: str, timeout: float = 300) -> tuple[float, dict]:
    """``secvf ARGS --json``: (wall s, parsed output)."""
    elapsed, out = bl.secvf(*args, "--json", timeout=timeout)
    return elapsed, json.loads(out)


def timed_run(argv: list[str]) -> float:
    """Wall seconds of a plain command (raises on failure)."""
    begin = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    return time.monotonic() - begin


class Flags:
    """Runs that did not do what they were meant to (flagged, not silently counted)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def check(self, ok: bool, what: str) -> bool:
        """Flag ``what`` unless ``ok``."""
        if not ok:
            self.lines.append(what)
            bl.log(f"FLAG {what}")
        return ok


def memory_snapshots(runs: int, flags: Flags) -> dict:
    """Part 1: memory snapshots of the running VM (the first one, ``clean``, is kept)."""
    made = {"wall": [], "took": [], "pause": [], "size": [], "ram": [], "state": [], "del": []}
    for i in range(min(runs, CREATE_MAX_RUNS)):
        snap = "clean" if i == 0 else f"extra{i}"
        wall, info = cli_json("vm", "snapshot", "create", VM, snap)
        flags.check(
            info["kind"] == "memory" and info["state"] is not None,
            f"snapshot {snap} of the running VM is a {info['kind']} snapshot",
        )
        made["wall"].append(wall)
        made["took"].append(info["took_s"])
        made["size"].append(info["size_bytes"] / 2**20)
        if info["state"]:
            made["pause"].append(info["state"]["pause_s"])
            made["ram"].append(info["state"]["ram_allocated_bytes"] / 2**20)
            made["state"].append(info["state"]["state_bytes"] / 1024)
        bl.log(f"  create {snap}: {wall:.2f} s (took_s {info['took_s']:.2f})")
        if snap != "clean":
            made["del"].append(bl.secvf("vm", "snapshot", "delete", VM, snap)[0])
    return made


def revert_once(flags: Flags, i: int) -> tuple[float, float]:
    """Part 2: ``vm snapshot revert`` of the running VM: (wall s, took_s)."""
    wall, status = cli_json("vm", "snapshot", "revert", VM, "clean")
    flags.check(
        status.get("state") == "running" and bool(status.get("restored_from")),
        f"revert {i}: VM is {status.get('state')}, restored_from {status.get('restored_from')!r}",
    )
    return wall, status["took_s"]


def cold_once(flags: Flags, i: int) -> tuple[float, float]:
    """Part 2 baseline: ``vm stop --force`` + ``vm start --wait-ready``: (stop s, start s)."""
    stop = bl.secvf("vm", "stop", VM, "--force")[0]
    start, status = cli_json("vm", "start", VM, "--wait-ready", READY_TIMEOUT_S, timeout=400)
    flags.check(
        status.get("guest_ready") is True and not status.get("restored_from"),
        f"cold start {i}: guest_ready {status.get('guest_ready')}, restored_from "
        f"{status.get('restored_from')!r}",
    )
    return stop, start


def disk_snapshots(runs: int, workdir: Path, flags: Flags) -> dict:
    """Part 3: disk snapshot of the stopped VM, its reverts, and the baselines."""
    bl.secvf("vm", "stop", VM, "--force")
    out: dict = {"revert": [], "qi_revert": [], "recreate": []}
    out["create"], info = cli_json("vm", "snapshot", "create", VM, "disk0")
    flags.check(info["kind"] == "disk", f"snapshot disk0 of the stopped VM is {info['kind']}")
    for i in range(runs):
        wall, status = cli_json("vm", "snapshot", "revert", VM, "disk0")
        flags.check(status.get("state") == "stopped",
                    f"disk revert {i}: VM is {status.get('state')}")  # fmt: skip
        out["revert"].append(wall)
    copy = workdir / "disk-copy.qcow2"
    shutil.copyfile(library.get_bundle(VM).disk, copy)
    out["qi_create"] = timed_run(["qemu-img", "snapshot", "-c", "bench0", str(copy)])
    out["qi_revert"] = [timed_run(["qemu-img", "snapshot", "-a", "bench0", str(copy)])
                        for _ in range(runs)]  # fmt: skip
    bl.secvf("vm", "create", FRESH, *CREATE_ARGS)
    for _ in range(runs):
        begin = time.monotonic()
        bl.secvf("vm", "delete", FRESH, "--force")
        bl.secvf("vm", "create", FRESH, *CREATE_ARGS)
        out["recreate"].append(time.monotonic() - begin)
    return out


def main() -> None:
    args = bl.parse_args(__doc__.splitlines()[0], 10)
    cold_runs = min(args.runs, COLD_MAX_RUNS)
    base = build_image("base")
    rep = bl.Report("snapshot: running malware-analysis VM, snapshot revert vs cold boot",
                    f"bench/snapshot.py --runs {args.runs}")  # fmt: skip
    flags = Flags()
    with bl.private_secvf() as root:
        workdir = Path(tempfile.mkdtemp(dir=root))
        bl.secvf("vm", "create", VM, *CREATE_ARGS)
        first_boot = bl.secvf("vm", "start", VM, "--wait-ready", READY_TIMEOUT_S, timeout=400)[0]
        bl.log(f"first boot to ready: {first_boot:.1f} s (not counted)")
        bl.log("memory snapshots of the running VM")
        made = memory_snapshots(args.runs, flags)
        bl.log(f"revert × {args.runs}, interleaved with stop --force + start × {cold_runs}")
        reverts, took, stops, starts = [], [], [], []
        for i in range(args.runs):
            wall, took_s = revert_once(flags, i)
            reverts.append(wall)
            took.append(took_s)
            if i < cold_runs:
                stop, start = cold_once(flags, i)
                stops.append(stop)
                starts.append(start)
            cold = f", stop + start {stops[-1] + starts[-1]:.2f} s" if i < cold_runs else ""
            bl.log(f"  run {i + 1}: revert {wall:.2f} s{cold}")
        bl.log(f"disk snapshot of the stopped VM, revert × {args.runs}")
        disk = disk_snapshots(args.runs, workdir, flags)
        home_fs = filesystem_of(root)
        ram_fs = filesystem_of(Path(os.environ["SECVF_RAM_DIR"]))
    colds = [a + b for a, b in zip(stops, starts, strict=True)]
    rep.facts.update({
        "VM": f"malware-analysis, base image {base.short_hash}, 1 vCPU, {MEMORY_MIB} MiB, "
              f"network none, -accel {bl.ACCEL}; kernel {base.kernel_version}",
        "files": f"snapshots in the VM bundle on {home_fs}; guest RAM files on {ram_fs}",
        "first boot to ready (not counted)": f"{first_boot:.2f} s",
        "flagged runs": f"{len(flags.lines)}: " + " | ".join(flags.lines) if flags.lines
                        else "none: every revert came back running and restored, every cold "
                             "start booted to ready",
    })  # fmt: skip
    add_rows(rep, made, reverts, took, stops, starts, colds, disk)
    rep.notes += [f"FLAGGED: {line}" for line in flags.lines]
    rep.print()


def _p50_p90(values: list[float], digits: int = 2) -> str:
    d = digits
    return (f"{bl.median(values):.{d}f} / {bl.percentile(values, 90):.{d}f} s "
            f"(min {min(values):.{d}f}, max {max(values):.{d}f}, n={len(values)})")  # fmt: skip


def add_rows(rep: bl.Report, made: dict, reverts: list[float], took: list[float],
             stops: list[float], starts: list[float], colds: list[float],
             disk: dict) -> None:  # fmt: skip
    """The result rows."""
    none = "(no snapshot-free equivalent)"
    pause = f"guest paused {bl.spread(made['pause'])}" if made["pause"] else "no memory state"
    rep.add(bl.Row("`vm snapshot create` of the running VM (memory + disk)",
                   f"{bl.spread(made['wall'])}; took_s {bl.spread(made['took'])}; {pause}",
                   none, "", "", "CLI wall time; took_s: inside the command"))  # fmt: skip
    if made["ram"]:
        rep.add(bl.Row("  its size", f"{bl.median(made['size']):.0f} MiB of files (RAM saved "
                       f"{bl.median(made['ram']):.0f} MiB of {MEMORY_MIB}, device state "
                       f"{bl.median(made['state']):.0f} KiB)", "", "", "",
                       "the disk snapshot is inside the VM's qcow2, not counted"))  # fmt: skip
    if made["del"]:
        rep.add(bl.Row("`vm snapshot delete` of the running VM", bl.spread(made["del"]),
                       none, "", ""))  # fmt: skip
    rep.add(bl.Row(f"`vm snapshot revert` of the running VM, median / p90 (of {len(reverts)})",
                   _p50_p90(reverts), "`vm stop --force` + `vm start --wait-ready` (cold boot)",
                   _p50_p90(colds), bl.ratio(bl.median(reverts), bl.median(colds)),
                   "CLI wall time; the VM comes back running at the saved instant"))  # fmt: skip
    rep.add(bl.Row("  revert: took_s reported by the command", _p50_p90(took),
                   "  of which `vm start --wait-ready`", _p50_p90(starts),
                   bl.ratio(bl.median(took), bl.median(starts)),
                   f"`vm stop --force` alone: {bl.spread(stops)}"))  # fmt: skip
    rep.add(bl.Row("`vm snapshot create` of the stopped VM (disk only)",
                   f"{disk['create']:.2f} s (n=1)", "`qemu-img snapshot -c` on a copy of its disk",
                   f"{disk['qi_create']:.2f} s (n=1)",
                   bl.ratio(disk["create"], disk["qi_create"])))  # fmt: skip
    rep.add(bl.Row("`vm snapshot revert` of the stopped VM (disk only), median / p90",
                   _p50_p90(disk["revert"]), "`qemu-img snapshot -a` on a copy of its disk",
                   _p50_p90(disk["qi_revert"], 3),
                   bl.ratio(bl.median(disk["revert"]), bl.median(disk["qi_revert"])),
                   "qemu-img: what SecVF wraps, no Python start-up"))  # fmt: skip
    rep.add(bl.Row("", "", "a clean disk without snapshots: `vm delete --force` + `vm create`",
                   _p50_p90(disk["recreate"]),
                   bl.ratio(bl.median(disk["revert"]), bl.median(disk["recreate"]))))  # fmt: skip
    rep.notes += [
        "Every time is the wall clock around a `secvf` CLI process (Python start-up "
        "included) unless it says took_s.",
        "Reverts and cold boots interleave (a revert, then a stop + start), so load drift "
        "hits both; each revert starts from a running VM, as each stop + start does.",
    ]


if __name__ == "__main__":
    main()
