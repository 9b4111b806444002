"""Sandbox benchmark: sessions restored from a template beside cold boots and plain QEMU.

0. Templates: ``secvf sandbox template build --accel tcg --memory M --json`` for the two
   shapes used below (1024 MiB for parts 1-2, 512 MiB for part 3), timed by the wall
   clock around the CLI; the record's build time, guest pause and saved RAM are shown too.
1. ``secvf sandbox run --rm --accel tcg -- true`` end to end (create, restore or boot,
   exec, stop, delete), ``--runs`` times, restored from the 1024 MiB template. Same-run
   baselines: the same command with ``--cold`` (a cold boot; at most 5 runs, interleaved
   with the restored ones), the same restored with ``SECVF_SUPERVISOR_START=exec`` (the
   supervisor a fresh interpreter instead of forked from the CLI; as many runs as
   ``--cold``, interleaved), and ``qemu-img create`` + plain QEMU of the Debian systemd
   guest (same kernel/initrd) until ``ssh root@ true`` works, then kill and delete (at
   most 3 runs: each takes ~20-30 s on TCG).
2. Restore → first successful exec, in this process: ``api.create_sandbox`` (not timed),
   then ``api.start_sandbox`` + the first ``api.run_command(name, ["true"])`` timed,
   ``--runs`` times; p50/p99. Baseline: the same with ``cold=True`` (at most 5 runs,
   interleaved).
3. N concurrent sessions (``--sessions``, default 1,2,4,8), guest RAM 512 MiB each: the
   sessions are created first (not timed), then all ``secvf sandbox start --json`` +
   ``secvf vm exec -- true`` are launched at once; the time is until the last one
   succeeded. Restored sessions, then the same with ``--cold``, then N plain QEMUs of the
   systemd guest started at once until all answer ``ssh root@ true``. Also the restored
   sessions through the SDK (``start_sandbox`` + ``run_command`` in threads of this
   process), which leaves out the CLI's Python start-up (2 processes per session).
   Host memory per session while all run, restored beside cold: RSS of supervisor +
   vsock backend + virtiofsd + QEMU, each without its mapping of guest RAM (vhost-user
   helpers map guest RAM too), i.e. the host's cost beyond the guest's own memory; guest
   RAM is shown separately as what QEMU's mapping has resident and what the guest's RAM
   file occupies on tmpfs (a restore copies the template's RAM file, so that is the
   host's real cost for guest memory). Baseline memory: QEMU RSS without its guest-RAM
   mapping, and that mapping's resident size.

How every session actually started is checked, never assumed: ``start_mode`` of
``start_sandbox``/``sandbox start --json``, and for ``sandbox run --rm`` the
``vm_started`` event's ``restored_from`` in the private home's security log. A session
meant to be restored that booted cold (or the reverse) is flagged in the table, the
conditions and the notes; flagged end-to-end and first-exec runs are left out of the
restored statistics (a concurrent level cannot be split: its time includes them).

    .venv/bin/python bench/sandbox.py [--runs N] [--sessions 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import baseline_image
import benchlib as bl

from secvf import api
from secvf.image import build_image
from secvf.store.bundle import RuntimeFiles

SESSION_MIB = 512
BASELINE_E2E_MAX_RUNS = 3
COLD_MAX_RUNS = 5
RESTORED, BOOTED = "restored", "booted"
#: The CLI's environment for the baseline of a forked supervisor: a fresh interpreter.
EXEC_START = {"SECVF_SUPERVISOR_START": "exec"}


def parse_args() -> argparse.Namespace:
    """``--runs`` and ``--sessions``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="repetitions of parts 1 and 2")
    parser.add_argument("--sessions", default="1,2,4,8", help="concurrency levels, e.g. 1,2,4,8")
    return parser.parse_args()


class Modes:
    """How every session actually started, by part of the benchmark; mismatches flagged."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = {}
        self.flagged: list[str] = []

    def check(self, part: str, name: str, expected: str, actual: str, why: str = "") -> bool:
        """Count ``actual``; flag it if it is not ``expected``. True if as expected."""
        self.counts.setdefault(part, Counter())[actual] += 1
        if actual == expected:
            return True
        line = f"{part}: session {name} {actual}, expected {expected}"
        line += f" ({why})" if why else ""
        self.flagged.append(line)
        bl.log(f"FLAG {line}")
        return False

    def summary(self) -> str:
        """``part: 10 restored; part: 5 booted`` ..."""
        return "; ".join(
            f"{part}: " + ", ".join(f"{n} {mode}" for mode, n in sorted(c.items()))
            for part, c in self.counts.items()
        )


def _notes_text(*parts: object) -> str:
    return "; ".join(str(p).strip() for p in parts if p and str(p).strip())


# ---- 0. templates --------------------------------------------------------------------------


def build_template(memory_mib: int) -> tuple[float, dict]:
    """``secvf sandbox template build`` for sessions of ``memory_mib``: (wall s, record)."""
    elapsed, out = bl.secvf("sandbox", "template", "build", "--accel", bl.ACCEL,
                            "--memory", f"{memory_mib}M", "--json", timeout=900)  # fmt: skip
    return elapsed, json.loads(out)


def template_ids() -> set[str]:
    """IDs of the templates in the private home."""
    return {t["id"] for t in json.loads(bl.secvf("sandbox", "template", "list", "--json")[1])}


# ---- 1. sandbox run --rm ------------------------------------------------------------------


def run_rm_once(name: str, *, cold: bool, env: dict[str, str] | None = None
                ) -> tuple[float, str, str]:
    """``secvf sandbox run --rm [--cold] -- true`` (``env`` added to the CLI's
    environment): (wall s, start mode, CLI notes)."""
    elapsed, _, err = bl.secvf_full("sandbox", "run", "--rm", "--name", name,
                                    "--accel", bl.ACCEL, "--memory", f"{bl.GUEST_MEMORY_MIB}M",
                                    *(["--cold"] if cold else []), "--", "true",
                                    env=env)  # fmt: skip
    events = bl.start_events(name)
    if not events:
        return elapsed, "unknown (no vm_started event)", err
    return elapsed, RESTORED if events[-1].get("restored_from") else BOOTED, err


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


# ---- 2. restore → first exec ----------------------------------------------------------------


def first_exec_once(name: str, *, cold: bool) -> tuple[float, float, str, str]:
    """Create (not timed), then ``start_sandbox`` + first ``run_command(['true'])`` timed:
    (seconds, start_sandbox's boot_s, start mode, notes)."""
    notes: list[str] = []
    config = api.create_sandbox(name, memory=f"{bl.GUEST_MEMORY_MIB}M", accel=bl.ACCEL,
                                cold=cold, notes=notes)  # fmt: skip
    if not cold and (config.channels is None or config.channels.template is None):
        notes.append("no template was chosen at create")
    try:
        begin = time.perf_counter()
        status = api.start_sandbox(name, cold=cold)
        result = api.run_command(name, ["true"])
        elapsed = time.perf_counter() - begin
        if result.exit_code != 0:
            raise RuntimeError(f"`true` in {name} exited {result.exit_code}: {result.stderr!r}")
    finally:
        api.remove_sandbox(name, purge=True, force=True)
    return elapsed, status["boot_s"], status["start_mode"], _notes_text(*notes, *status["notes"])


# ---- 3. concurrent sessions ------------------------------------------------------------------


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


def session_memory(names: list[str], statuses: dict[str, dict]) -> dict[str, float]:
    """MiB per session by role while all of ``names`` run, plus guest RAM (resident in
    QEMU's mapping, and the RAM file's allocation on tmpfs)."""
    kib = dict.fromkeys(("supervisor", "vsock", "virtiofsd", "qemu", "guest_ram", "ram_file"), 0)
    for name in names:
        for role, pids in bl.vm_processes(name).items():
            for pid in pids:
                extra, ram = overhead_kib(pid, SESSION_MIB)
                kib[role] += extra
                kib["guest_ram"] += ram if role == "qemu" else 0
        kib["ram_file"] += bl.allocated_kib(RuntimeFiles(statuses[name]["id"]).ram_file)
    return {k: v / len(names) / 1024 for k, v in kib.items()}


def cli_sessions(n: int, modes: Modes, *, cold: bool) -> dict:
    """N concurrent sandboxes through the CLI: time until all exec, memory per session."""
    flag = ["--cold"] if cold else []
    part = f"{n} concurrent, {'cold' if cold else 'restored'} (CLI)"
    names = [f"{'c' if cold else 'r'}{n}s{i}" for i in range(n)]
    for name in names:
        bl.secvf("sandbox", "create", name, "--accel", bl.ACCEL, "--memory", f"{SESSION_MIB}M",
                 *flag)  # fmt: skip
    statuses: dict[str, dict] = {}

    def start_and_exec(name: str) -> None:
        out = bl.secvf("sandbox", "start", name, "--timeout", "600", "--json", *flag,
                       timeout=700)[1]  # fmt: skip
        statuses[name] = json.loads(out)
        bl.secvf("vm", "exec", name, "--", "true")

    try:
        done = in_parallel([lambda nm=name: start_and_exec(nm) for name in names])
        memory = session_memory(names, statuses)
    finally:
        for name in names:
            bl.secvf("sandbox", "rm", name, "--purge", "--force")
    wrong = 0
    for name in names:
        status = statuses[name]
        why = _notes_text(*status.get("notes", []))
        wrong += not modes.check(part, name, BOOTED if cold else RESTORED,
                                 status.get("start_mode", "?"), why)  # fmt: skip
    return {"all_exec_s": max(done), "wrong_mode": wrong} | memory


def sdk_sessions(n: int, modes: Modes) -> dict:
    """N concurrent restored sandboxes through the SDK, in threads of this process."""
    part = f"{n} concurrent, restored (SDK)"
    names = [f"k{n}s{i}" for i in range(n)]
    for name in names:
        api.create_sandbox(name, memory=f"{SESSION_MIB}M", accel=bl.ACCEL)
    statuses: dict[str, dict] = {}

    def start_and_exec(name: str) -> None:
        statuses[name] = api.start_sandbox(name, timeout=600)
        result = api.run_command(name, ["true"])
        if result.exit_code != 0:
            raise RuntimeError(f"`true` in {name} exited {result.exit_code}")

    try:
        done = in_parallel([lambda nm=name: start_and_exec(nm) for name in names])
    finally:
        for name in names:
            api.remove_sandbox(name, purge=True, force=True)
    wrong = 0
    for name in names:
        why = _notes_text(*statuses[name]["notes"])
        wrong += not modes.check(part, name, RESTORED, statuses[name]["start_mode"], why)
    return {"all_exec_s": max(done), "wrong_mode": wrong}


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


# ---- the run ----------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    levels = [int(x) for x in args.sessions.split(",")]
    cold_runs = min(args.runs, COLD_MAX_RUNS)
    rep = bl.Report("sandbox: restored sessions, cold boots and plain QEMU",
                    f"bench/sandbox.py --runs {args.runs} --sessions {args.sessions}")  # fmt: skip
    sandbox_image = build_image("sandbox")
    modes = Modes()
    r: dict = {"e2e": [], "e2e_cold": [], "e2e_exec": [], "first": [], "first_boot": [],
               "first_cold": []}
    with bl.private_secvf() as root:
        baseline = Baseline(Path(tempfile.mkdtemp(dir=root)))
        templates = {}
        for mib in (bl.GUEST_MEMORY_MIB, SESSION_MIB):
            bl.log(f"secvf sandbox template build --memory {mib}M")
            templates[mib] = build_template(mib)
            bl.log(f"  {templates[mib][0]:.1f} s, template {templates[mib][1]['id'][:12]}")
        built = template_ids()

        bl.log(f"secvf sandbox run --rm -- true × {args.runs} restored, × {cold_runs} --cold")
        for i in range(args.runs):
            elapsed, mode, err = run_rm_once(f"e2e-r{i}", cold=False)
            if modes.check("run --rm, restored", f"e2e-r{i}", RESTORED, mode, err):
                r["e2e"].append(elapsed)
            if i < cold_runs:
                elapsed, mode, err = run_rm_once(f"e2e-c{i}", cold=True)
                modes.check("run --rm --cold", f"e2e-c{i}", BOOTED, mode, err)
                r["e2e_cold"].append(elapsed)
                elapsed, mode, err = run_rm_once(f"e2e-x{i}", cold=False, env=EXEC_START)
                if modes.check("run --rm, restored, exec'd supervisor", f"e2e-x{i}",
                               RESTORED, mode, err):
                    r["e2e_exec"].append(elapsed)
        base_runs = min(args.runs, BASELINE_E2E_MAX_RUNS)
        bl.log(f"baseline boot + ssh true × {base_runs}")
        base_e2e = [baseline.run_rm_once() for _ in range(base_runs)]

        bl.log(f"start_sandbox + first run_command × {args.runs} restored, × {cold_runs} cold")
        for i in range(args.runs):
            elapsed, boot_s, mode, why = first_exec_once(f"fx-r{i}", cold=False)
            if modes.check("first exec, restored (SDK)", f"fx-r{i}", RESTORED, mode, why):
                r["first"].append(elapsed)
                r["first_boot"].append(boot_s)
            if i < cold_runs:
                elapsed, _, mode, why = first_exec_once(f"fx-c{i}", cold=True)
                modes.check("first exec, cold (SDK)", f"fx-c{i}", BOOTED, mode, why)
                r["first_cold"].append(elapsed)

        conc = {}
        for n in levels:
            bl.log(f"{n} concurrent sessions: restored (CLI, SDK), cold (CLI), baseline")
            conc[n] = {
                "restored": cli_sessions(n, modes, cold=False),
                "sdk": sdk_sessions(n, modes),
                "cold": cli_sessions(n, modes, cold=True),
                "base": baseline_sessions(baseline, n),
            }
            bl.log("  " + ", ".join(f"{k} {v['all_exec_s']:.1f} s" for k, v in conc[n].items()))
        after = template_ids()
    rep.facts.update({
        "guests": f"1 vCPU each, -cpu max, q35; {bl.GUEST_MEMORY_MIB} MiB for parts 1-2, "
                  f"{SESSION_MIB} MiB for the concurrent sessions; kernel "
                  f"{sandbox_image.kernel_version}",
        "images": f"sandbox {sandbox_image.short_hash}; baseline systemd-{baseline.disk.short} "
                  f"(vmlinuz + initrd.img of base {baseline.base.short_hash})",
        "templates": ", ".join(f"{mib} MiB {rec['id'][:12]}"
                               for mib, (_, rec) in templates.items())
                     + ("" if after == built else
                        f"; CHANGED during the run (a rebuild?): {sorted(after)}"),
        "start modes (checked per session)": modes.summary(),
        "flagged sessions": f"{len(modes.flagged)}: " + " | ".join(modes.flagged)
                            if modes.flagged else "none: every session started as intended",
    })  # fmt: skip
    add_rows(rep, args.runs, templates, r, base_e2e, conc)
    rep.notes += [f"FLAGGED: {line}" for line in modes.flagged]
    rep.print()


# ---- the table --------------------------------------------------------------------------


def _p50_p90(values: list[float]) -> str:
    if not values:
        return "none"
    return (f"{bl.median(values):.2f} / {bl.percentile(values, 90):.2f} s "
            f"(min {min(values):.2f}, max {max(values):.2f}, n={len(values)})")  # fmt: skip


def _p50_p99(values: list[float]) -> str:
    if not values:
        return "none"
    return (f"{bl.median(values):.2f} / {bl.percentile(values, 99):.2f} s "
            f"(min {min(values):.2f}, n={len(values)})")  # fmt: skip


def _ratio(secvf_values: list[float], baseline_values: list[float]) -> str:
    if not secvf_values or not baseline_values:
        return "n/a"
    return bl.ratio(bl.median(secvf_values), bl.median(baseline_values))


def _excluded(wanted: int, got: list[float]) -> str:
    missing = wanted - len(got)
    return f"FLAG: {missing} of {wanted} did not restore (left out; see notes)" if missing else ""


def _host(m: dict) -> str:
    total = m["supervisor"] + m["vsock"] + m["virtiofsd"] + m["qemu"]
    return (f"{total:.0f} MiB (supervisor {m['supervisor']:.0f}, vsock backend "
            f"{m['vsock']:.0f}, virtiofsd {m['virtiofsd']:.0f}, QEMU {m['qemu']:.0f})")  # fmt: skip


def _host_mib(m: dict) -> float:
    return m["supervisor"] + m["vsock"] + m["virtiofsd"] + m["qemu"]


def add_rows(rep: bl.Report, runs: int, templates: dict, r: dict, base_e2e: list[float],
             conc: dict) -> None:  # fmt: skip
    """The result rows."""
    e2e, cold, first, first_cold = r["e2e"], r["e2e_cold"], r["first"], r["first_cold"]
    cold_name = "same command with `--cold` (cold boot)"
    for mib, (wall, rec) in templates.items():
        state = rec["state"]
        saved_mib = state["ram_allocated_bytes"] / 2**20
        rep.add(bl.Row(f"template build, {mib} MiB (`sandbox template build`)",
                       f"{wall:.1f} s (record: build {rec['build_s']:.1f} s, guest paused "
                       f"{state['pause_s']:.2f} s; RAM saved {saved_mib:.0f} MiB of "
                       f"{state['ram_bytes'] / 2**20:.0f}, device state "
                       f"{state['state_bytes'] / 1024:.0f} KiB)",
                       "one cold `sandbox run --rm --cold -- true` (median, part 1)",
                       f"{bl.median(cold):.2f} s" if cold else "n/a", "",
                       "one-time cost per session shape (CLI wall time)"))  # fmt: skip
    rep.add(bl.Row(f"`sandbox run --rm -- true` restored, median / p90 (of {runs})",
                   _p50_p90(e2e), cold_name, _p50_p90(cold), _ratio(e2e, cold),
                   _excluded(runs, e2e)))  # fmt: skip
    rep.add(bl.Row("", "", "the same, restored, the supervisor a fresh interpreter "
                   "(`SECVF_SUPERVISOR_START=exec`, as before it was forked)",
                   _p50_p90(r["e2e_exec"]), _ratio(e2e, r["e2e_exec"]),
                   _excluded(min(runs, COLD_MAX_RUNS), r["e2e_exec"])))  # fmt: skip
    rep.add(bl.Row("", "", "plain QEMU systemd guest: overlay, boot, first `ssh true`, kill",
                   bl.spread(base_e2e), _ratio(e2e, base_e2e),
                   f"baseline only n={len(base_e2e)}: ~20-30 s per run on TCG"))  # fmt: skip
    rep.add(bl.Row("`sandbox run --rm --cold -- true` median / p90", _p50_p90(cold),
                   "plain QEMU systemd guest (row above)", bl.spread(base_e2e),
                   _ratio(cold, base_e2e), "the cold boot against plain QEMU"))  # fmt: skip
    first_note = "p99 of n < 100 is the maximum"
    if r["first_boot"]:
        first_note += f"; start_sandbox alone p50 {bl.median(r['first_boot']):.2f} s"
    rep.add(bl.Row(f"restore → first exec p50 / p99 (SDK in-process, of {runs})",
                   _p50_p99(first),
                   "cold: start_sandbox(cold=True) + first run_command",
                   _p50_p99(first_cold), _ratio(first, first_cold),
                   _notes_text(first_note, _excluded(runs, first))))  # fmt: skip
    for n, c in conc.items():
        res, sdk, cold_n, base = c["restored"], c["sdk"], c["cold"], c["base"]
        flag = "; ".join(f"FLAG: {x['wrong_mode']} of {n} {what} not as intended (counted)"
                         for what, x in (("restored", res), ("SDK restored", sdk),
                                         ("cold", cold_n)) if x["wrong_mode"])  # fmt: skip
        rep.add(bl.Row(f"{n} concurrent restored: all can exec (CLI `sandbox start` + `vm exec`)",
                       f"{res['all_exec_s']:.1f} s", f"{n} cold sessions (`--cold`), same commands",
                       f"{cold_n['all_exec_s']:.1f} s",
                       bl.ratio(res["all_exec_s"], cold_n["all_exec_s"]), flag))  # fmt: skip
        rep.add(bl.Row("", "", f"{n} plain QEMU systemd guests: all `ssh true` OK",
                       f"{base['all_exec_s']:.1f} s",
                       bl.ratio(res["all_exec_s"], base["all_exec_s"])))  # fmt: skip
        rep.add(bl.Row(f"{n} concurrent restored via the SDK (threads in one process)",
                       f"{sdk['all_exec_s']:.1f} s", "same sessions via the CLI (row above)",
                       f"{res['all_exec_s']:.1f} s",
                       bl.ratio(sdk["all_exec_s"], res["all_exec_s"]),
                       "no per-session Python start-up"))  # fmt: skip
        rep.add(bl.Row(f"{n} concurrent: host MiB per session beyond guest RAM, restored",
                       _host(res), "cold-booted session", _host(cold_n),
                       bl.ratio(_host_mib(res), _host_mib(cold_n), words=("less", "more")),
                       "RSS: shared library pages counted in every process"))  # fmt: skip
        rep.add(bl.Row("", "", "plain QEMU process beyond guest RAM", f"{base['qemu']:.0f} MiB",
                       bl.ratio(_host_mib(res), base["qemu"], words=("less", "more"))))  # fmt: skip
        rep.add(bl.Row(f"{n} concurrent: guest RAM per session, restored: RAM file on tmpfs "
                       "/ resident in QEMU",
                       f"{res['ram_file']:.0f} / {res['guest_ram']:.0f} MiB",
                       "cold-booted session (same two)",
                       f"{cold_n['ram_file']:.0f} / {cold_n['guest_ram']:.0f} MiB",
                       bl.ratio(res["ram_file"], cold_n["ram_file"], words=("less", "more")),
                       f"of {SESSION_MIB} MiB; the RAM file is what the host holds"))  # fmt: skip
        rep.add(bl.Row("", "", "plain QEMU: guest RAM resident (anonymous memory)",
                       f"{base['guest_ram']:.0f} MiB",
                       bl.ratio(res["ram_file"], base["guest_ram"],
                                words=("less", "more"))))  # fmt: skip
    rep.notes += [
        "Restored = the session's start restored a template (start_mode / the vm_started "
        "event's restored_from); each session's mode was checked, see 'flagged sessions'.",
        "2 host cores: N guests share them, so 'all can exec' grows with N for every column.",
        "The baseline guest is the Debian systemd + sshd disk (the sandbox image has no sshd), "
        "with the same kernel and initramfs; plain QEMU, no SecVF processes.",
        "CLI times include Python start-up of each `secvf` process (2 per concurrent session).",
    ]


if __name__ == "__main__":
    main()
