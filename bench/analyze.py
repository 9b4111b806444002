"""Detonation benchmark: SecVF's overhead per sample, and samples per minute, restoring
clean states beside cold-booting the same VMs per sample.

The sample is a shell script that resolves a name through the fake internet, fetches a
URL from it, writes a file and sleeps ``--sample-s`` seconds. Each detonation runs
through :func:`secvf.api.analyze` in this process (``--network fakenet``, so two VMs
per sample: the analysis guest and the fake-internet gateway, on their own isolated
network), after one warm-up detonation that builds the clean states (not timed).

* **overhead per sample** = the detonation's wall time minus the sample's own run time
  (the guest's ``start`` → ``exit`` events in the monitor log), ``--runs`` times with
  ``--jobs 1``; p50 and the worst.
* **samples per minute** with ``--jobs 1/2/4`` over ``--batch`` samples.
* Baseline, same run: the same detonations with ``cold=True`` — both VMs booted from
  their images per sample, the sample delivered once the detonator is ready (fewer runs:
  each costs a cold boot).

    .venv/bin/python bench/analyze.py [--runs N] [--batch N] [--sample-s S]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import benchlib as bl

from secvf import api
from secvf.image import build_image

SAMPLE = """#!/bin/sh
test -e "/tmp/uptime-start-$(cut -d' ' -f1 /proc/uptime)"
nslookup bench.secvf-test.example >/dev/null 2>&1
busybox wget -q -O /dev/null -T 5 http://bench.secvf-test.example/
echo done > "$HOME/out.txt"
sleep {seconds}
test -e "/tmp/uptime-end-$(cut -d' ' -f1 /proc/uptime)"
"""
#: The sample's own run time comes from the guest's uptime (a monotonic clock: a restored
#: guest's wall clock is stepped by its restore watch, possibly while the sample runs),
#: which the sample puts into two file names strace logs.
UPTIME_MARK = re.compile(r'"/tmp/uptime-(start|end)-([0-9.]+)"')
GOAL_S = 3.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="sequential restored runs (5)")
    parser.add_argument("--cold-runs", type=int, default=3, help="sequential cold runs (3)")
    parser.add_argument("--batch", type=int, default=4, help="samples per --jobs level (4)")
    parser.add_argument("--sample-s", type=float, default=2.0, help="sample's sleep (2 s)")
    args = parser.parse_args()
    rep = bl.Report("Detonation: secvf analyze, restored clean states vs cold boots",
                    f"bench/analyze.py --runs {args.runs} --cold-runs {args.cold_runs} "
                    f"--batch {args.batch} --sample-s {args.sample_s:g}")
    with bl.private_secvf() as root:
        sample = root / "sample.sh"
        sample.write_text(SAMPLE.format(seconds=args.sample_s))
        sample.chmod(0o755)
        run(rep, sample, args)
    rep.print()


def run(rep: bl.Report, sample: Path, args: argparse.Namespace) -> None:
    for image in ("analysis", "fakenet"):
        build_image(image)
    bl.log("warm-up (builds the clean states)")
    began = time.monotonic()
    _detonate(sample, cold=False, jobs=1, count=1)
    rep.facts["clean states built (warm-up detonation)"] = f"{time.monotonic() - began:.1f} s"
    overhead, stages = [], []
    for number in range(args.runs):
        bl.log(f"restored {number + 1}/{args.runs}")
        (result,), _ = _detonate(sample, cold=False, jobs=1, count=1)
        overhead.append(_overhead(result))
        stages.append(result.stages_s)
    cold = []
    for number in range(args.cold_runs):
        bl.log(f"cold {number + 1}/{args.cold_runs}")
        (result,), _ = _detonate(sample, cold=True, jobs=1, count=1)
        cold.append(_overhead(result))
    rep.add(bl.Row("overhead per sample, s (wall − sample's run), --jobs 1",
                   f"p50 {statistics.median(overhead):.2f}, max {max(overhead):.2f} "
                   f"({len(overhead)} runs)", "cold boot per sample",
                   f"p50 {statistics.median(cold):.2f}, max {max(cold):.2f} ({len(cold)} runs)",
                   bl.ratio(statistics.median(overhead), statistics.median(cold)),
                   f"goal ≤ {GOAL_S:g} s: "
                   f"{'met' if statistics.median(overhead) <= GOAL_S else 'MISSED'}"))
    rep.add(bl.Row("restored: median stage times, s", _stage_medians(stages), "-", "-"))
    for jobs in (1, 2, 4):
        bl.log(f"throughput --jobs {jobs}")
        _, restored = _detonate(sample, cold=False, jobs=jobs, count=args.batch)
        baseline = "-"
        ratio = ""
        if jobs <= 2:
            bl.log(f"cold throughput --jobs {jobs}")
            _, cold_rate = _detonate(sample, cold=True, jobs=jobs, count=jobs)
            baseline = f"{cold_rate:.1f} ({jobs} samples)"
            ratio = bl.ratio(restored, cold_rate, higher_is_better=True)
        rep.add(bl.Row(f"samples per minute, --jobs {jobs}",
                       f"{restored:.1f} ({args.batch} samples)", "cold boot per sample",
                       baseline, ratio))
    rep.facts.update({
        "sample": f"shell script: DNS + HTTP through fakenet, writes a file, sleeps "
                  f"{args.sample_s:g} s; --network fakenet (2 VMs per sample), 512 MiB each",
        "driven by": "secvf.api.analyze in this process (no CLI start-up)",
    })
    rep.notes.append("Overhead = wall time minus the sample's own run time, measured in the "
                     "guest by /proc/uptime at its first and last line; everything else — "
                     "the detonator starting and ending it, restoring or "
                     "booting both VMs, delivery, stopping, the disk diff, the report, the "
                     "revert — is SecVF's.")


def _detonate(sample: Path, *, cold: bool, jobs: int, count: int
              ) -> tuple[list[api.DetonationResult], float]:
    requests = [api.DetonationRequest(sample=sample, timeout_s=60, accel="tcg", cold=cold)
                for _ in range(count)]
    began = time.monotonic()
    results = api.analyze(requests, jobs=jobs)
    elapsed = time.monotonic() - began
    failed = [r for r in results if r.verdict != "finished"]
    if failed:
        summary = [(r.id, r.verdict, r.error) for r in failed]
        raise RuntimeError(f"detonations did not finish: {summary}")
    return results, count / elapsed * 60


def _overhead(result: api.DetonationResult) -> float:
    marks = dict(UPTIME_MARK.findall((result.directory / "monitor.log").read_text()))
    own = float(marks["end"]) - float(marks["start"])
    return float(result.stages_s["total"]) - own


def _stage_medians(stages: list[dict[str, float]]) -> str:
    keys = [k for k in stages[0] if k != "total"]
    return ", ".join(f"{k} {statistics.median(s[k] for s in stages):.2f}" for k in keys)


if __name__ == "__main__":
    main()
