"""Sandbox benchmark: end-to-end ``sandbox run --rm`` and N concurrent sessions vs plain QEMU.

1. ``secvf sandbox run --rm --accel tcg -- true`` end to end (create, boot, exec, stop,
   delete), ``--runs`` times. Baseline: ``qemu-img create`` + plain QEMU of the Debian
   systemd guest (same kernel/initrd) until ``ssh root@ true`` works, then kill and delete
   (at most 3 runs: each takes ~20-30 s on TCG).
2. N concurrent sessions (``--sessions``, default 1,2,4), guest RAM 512 MiB each: sessions
   are created first (not timed), then all ``secvf sandbox start`` + ``secvf vm exec --
   true`` are launched at once; the time is until the last one succeeded. Host memory per
   session while all run: RSS of supervisor + vsock backend + virtiofsd + QEMU, each
   without its mapping of guest RAM (vhost-user helpers map guest RAM too), i.e. the host's
   cost beyond the guest's own memory; guest RAM resident in QEMU is shown separately.
   Baseline: N plain QEMUs of the systemd guest started at once, until all answer
   ``ssh root@ true``; memory = QEMU RSS without its guest-RAM mapping.

    .venv/bin/python bench/sandbox.py [--runs N] [--sessions 1,2,4,8]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import baseline_image
import benchlib as bl

from secvf.image import build_image

SESSION_MIB = 512
BASELINE_E2E_MAX_RUNS = 3


def parse_args() -> argparse.Namespace:
    """``--runs`` and ``--sessions``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="sandbox run --rm repetitions")
    parser.add_argument("--sessions", default="1,2,4", help="concurrency levels, e.g. 1,2,4,8")
    return parser.parse_args()


def run_rm_once() -> float:
    """Wall time of ``secvf sandbox run --rm -- true``."""
    return bl.secvf("sandbox", "run", "--rm", "--accel", bl.ACCEL, "--", "true")[0]


class Baseline:
    """Plain-QEMU systemd guests reached over SSH."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.base = build_image("base")
        self.disk = baseline_image.systemd_disk(self.base, progress=bl.log)
        self.append = f"{self.base.cmdline} " + baseline_image.authkey_param(
            bl.SSH.make_key(workdir)
        )

    def boot(self, memory_mib: int) -> bl.PlainVM:
        """Start one guest (overlay created by ``PlainVM``)."""
        return bl.PlainVM(self.workdir, self.base.kernel, self.base.initrd, self.disk.rootfs,
                          append=self.append, forwards=(22,), memory_mib=memory_mib)  # fmt: skip

    def run_rm_once(self) -> float:
        """Overlay + boot + first ``ssh true`` + kill + delete."""
        begin = time.monotonic()
        with self.boot(bl.GUEST_MEMORY_MIB) as vm:
            bl.SSH(self.workdir, vm.ports[22]).wait_true(300, begin)
        return time.monotonic() - begin


def in_parallel(jobs: list) -> list[float]:
    """Run callables in threads at once; each one's finish time from the common start."""
    begin = time.monotonic()
    done: list[float] = [0.0] * len(jobs)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            jobs[i]()
            done[i] = time.monotonic() - begin
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return done


def overhead_kib(pid: int, guest_mib: int) -> tuple[int, int]:
    """(RSS without the guest-RAM mapping, resident guest RAM) of ``pid`` in KiB."""
    ram = bl.guest_ram_resident_kib(pid, guest_mib)
    return bl.rss_kib(pid) - ram, ram


def secvf_sessions(n: int) -> dict[str, float]:
    """N concurrent sandboxes: time until all exec, and memory per session by role."""
    names = [f"c{n}s{i}" for i in range(n)]
    for name in names:
        bl.secvf("sandbox", "create", name, "--accel", bl.ACCEL, "--memory", f"{SESSION_MIB}M")

    def start_and_exec(name: str) -> None:
        bl.secvf("sandbox", "start", name, "--timeout", "600", timeout=700)
        bl.secvf("vm", "exec", name, "--", "true")

    done = in_parallel([lambda nm=name: start_and_exec(nm) for name in names])
    kib = {"supervisor": 0, "vsock": 0, "virtiofsd": 0, "qemu": 0, "guest_ram": 0}
    for name in names:
        for role, pids in bl.vm_processes(name).items():
            for pid in pids:
                extra, ram = overhead_kib(pid, SESSION_MIB)
                kib[role] += extra
                kib["guest_ram"] += ram if role == "qemu" else 0
    for name in names:
        bl.secvf("sandbox", "rm", name, "--purge")
    return {"all_exec_s": max(done)} | {k: v / n / 1024 for k, v in kib.items()}


def baseline_sessions(baseline: Baseline, n: int) -> dict[str, float]:
    """N concurrent plain-QEMU systemd guests: time until all answer ``ssh true``."""
    vms: list[bl.PlainVM] = []
    try:
        begin = time.monotonic()
        # Started from this (the main) thread: PR_SET_PDEATHSIG follows the forking thread.
        vms += [baseline.boot(SESSION_MIB) for _ in range(n)]
        ssh = [bl.SSH(baseline.workdir, vm.ports[22]) for vm in vms]
        in_parallel([lambda s=s: s.wait_true(600, begin) for s in ssh])
        all_exec = time.monotonic() - begin
        qemu = ram = 0
        for vm in vms:
            extra, resident = overhead_kib(vm.proc.pid, SESSION_MIB)
            qemu, ram = qemu + extra, ram + resident
    finally:
        for vm in vms:
            vm.stop()
    return {"all_exec_s": all_exec, "qemu": qemu / n / 1024, "guest_ram": ram / n / 1024}


def main() -> None:
    args = parse_args()
    levels = [int(x) for x in args.sessions.split(",")]
    rep = bl.Report("sandbox: end-to-end runs and concurrent sessions",
                    f"bench/sandbox.py --runs {args.runs} --sessions {args.sessions}")  # fmt: skip
    sandbox_image = build_image("sandbox")
    with bl.private_secvf() as root:
        baseline = Baseline(Path(tempfile.mkdtemp(dir=root)))
        bl.log(f"secvf sandbox run --rm -- true × {args.runs}")
        e2e = [run_rm_once() for _ in range(args.runs)]
        bl.log(f"baseline boot + ssh true × {min(args.runs, BASELINE_E2E_MAX_RUNS)}")
        base_e2e = [baseline.run_rm_once() for _ in range(min(args.runs, BASELINE_E2E_MAX_RUNS))]
        conc = {}
        for n in levels:
            bl.log(f"{n} concurrent sessions: SecVF, then baseline")
            conc[n] = (secvf_sessions(n), baseline_sessions(baseline, n))
            bl.log(f"  SecVF {conc[n][0]['all_exec_s']:.1f} s, baseline "
                   f"{conc[n][1]['all_exec_s']:.1f} s")  # fmt: skip
    rep.facts.update({
        "guests": f"1 vCPU each, -cpu max, q35; {bl.GUEST_MEMORY_MIB} MiB for part 1, "
                  f"{SESSION_MIB} MiB for the concurrent sessions; kernel "
                  f"{sandbox_image.kernel_version}",
        "images": f"sandbox {sandbox_image.short_hash}; baseline systemd-{baseline.disk.short} "
                  f"(vmlinuz + initrd.img of base {baseline.base.short_hash})",
    })  # fmt: skip
    add_rows(rep, e2e, base_e2e, conc)
    rep.print()


def add_rows(rep: bl.Report, e2e: list[float], base_e2e: list[float], conc: dict) -> None:
    """The result rows."""
    p90 = bl.percentile(e2e, 90)
    rep.add(bl.Row(f"`sandbox run --rm -- true` median / p90 (n={len(e2e)})",
                   f"{bl.median(e2e):.2f} / {p90:.2f} s (min {min(e2e):.2f}, max {max(e2e):.2f})",
                   "plain QEMU systemd guest: overlay, boot, first `ssh true`, kill",
                   bl.spread(base_e2e), bl.ratio(bl.median(e2e), bl.median(base_e2e)),
                   f"baseline only n={len(base_e2e)}: ~20-30 s per run on TCG"))  # fmt: skip
    for n, (sec, base) in conc.items():
        rep.add(bl.Row(f"{n} concurrent: all sessions can exec", f"{sec['all_exec_s']:.1f} s",
                       f"{n} plain QEMU systemd guests: all `ssh true` OK",
                       f"{base['all_exec_s']:.1f} s",
                       bl.ratio(sec["all_exec_s"], base["all_exec_s"])))  # fmt: skip
        host = sec["supervisor"] + sec["vsock"] + sec["virtiofsd"] + sec["qemu"]
        rep.add(bl.Row(f"{n} concurrent: host MiB per session beyond guest RAM",
                       f"{host:.0f} MiB (supervisor {sec['supervisor']:.0f}, vsock backend "
                       f"{sec['vsock']:.0f}, virtiofsd {sec['virtiofsd']:.0f}, QEMU "
                       f"{sec['qemu']:.0f})", "QEMU process beyond guest RAM",
                       f"{base['qemu']:.0f} MiB",
                       bl.ratio(host, base["qemu"], words=("less", "more")),
                       "RSS: shared library pages counted in every process"))  # fmt: skip
        rep.add(bl.Row(f"{n} concurrent: guest RAM resident per session",
                       f"{sec['guest_ram']:.0f} MiB", "same, systemd guest",
                       f"{base['guest_ram']:.0f} MiB",
                       bl.ratio(sec["guest_ram"], base["guest_ram"], words=("less", "more")),
                       f"of {SESSION_MIB} MiB; pages the guest has touched"))  # fmt: skip
    rep.notes += [
        "2 host cores: N guests share them, so 'all can exec' grows with N for both columns.",
        "The baseline guest is the Debian systemd + sshd disk (the sandbox image has no sshd), "
        "with the same kernel and initramfs; plain QEMU, no SecVF processes.",
    ]


if __name__ == "__main__":
    main()
