"""Jail cost benchmark: a sandbox's cold start and its exec round trip, jailed (the
default) beside unjailed (``config/jail.json``: ``{"enabled": false}``), in the same run.

Each round creates one sandbox of each mode (512 MiB, default workspace), times
``secvf sandbox start --cold`` until exec works, then ``true`` round trips over a fresh
SDK connection (``ExecClient``), interleaved between the two VMs so load drift hits both,
then deletes both. The jailed VM's cgroup use after boot is reported too.

    .venv/bin/python bench/jail.py [--runs N]     (rounds, default 3; 200 round trips each)
"""

from __future__ import annotations

import json

import benchlib as bl

from secvf.exec.client import ExecClient
from secvf.jail.settings import settings_path
from secvf.workflows.vm_exec import exec_socket_for

ROUND_TRIPS = 200


def _jails(enabled: bool) -> None:
    path = settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"enabled": enabled}))


def _start(name: str, jailed: bool) -> float:
    bl.secvf("sandbox", "create", name, "--memory", "512M")
    _jails(jailed)
    return bl.secvf("sandbox", "start", name, "--cold")[0]


def _rtt(name: str) -> float:
    with ExecClient.connect(exec_socket_for(name)) as client:
        return bl.timed(lambda: client.run(["true"]))


def main() -> None:
    args = bl.parse_args(__doc__.splitlines()[0], default_runs=3)
    report = bl.Report("jail cost", f"bench/jail.py --runs {args.runs}")
    starts: dict[bool, list[float]] = {True: [], False: []}
    rtts: dict[bool, list[float]] = {True: [], False: []}
    memory: list[int] = []
    with bl.private_secvf():
        for index in range(args.runs):
            names = {True: f"jailed{index}", False: f"open{index}"}
            for jailed in (index % 2 == 0, index % 2 == 1):  # alternate which goes first
                starts[jailed].append(_start(names[jailed], jailed))
                bl.log(f"round {index}: {'jailed' if jailed else 'unjailed'} start "
                       f"{starts[jailed][-1]:.2f} s")
            status = json.loads(bl.secvf("vm", "status", names[True], "--json")[1])
            memory.append(status["jail"]["usage"]["memory_bytes"])
            for _ in range(ROUND_TRIPS):
                for jailed in (True, False):
                    rtts[jailed].append(_rtt(names[jailed]))
            for name in names.values():
                bl.secvf("sandbox", "rm", "--purge", "--force", name)
    report.facts["rounds"] = f"{args.runs} (each: one jailed and one unjailed sandbox)"
    report.facts["jailed VM cgroup memory after boot"] = ", ".join(
        f"{m >> 20} MiB" for m in memory) + " (512 MiB guest + 512 MiB overhead allowed)"
    for metric, values, unit in (("sandbox start --cold (median)", starts, "s"),
                                 ("exec true RTT, fresh connection (p50)", rtts, "ms")):
        scale = 1000 if unit == "ms" else 1
        jailed = bl.median(values[True]) * scale
        plain = bl.median(values[False]) * scale
        report.add(bl.Row(metric, f"{jailed:.2f} {unit}", "unjailed", f"{plain:.2f} {unit}",
                          bl.ratio(jailed, plain), bl.spread([v * scale for v in values[True]],
                                                             unit)))
    p99 = {j: bl.percentile(rtts[j], 99) * 1000 for j in (True, False)}
    report.add(bl.Row("exec true RTT (p99)", f"{p99[True]:.2f} ms", "unjailed",
                      f"{p99[False]:.2f} ms", bl.ratio(p99[True], p99[False]), ""))
    report.print()


if __name__ == "__main__":
    main()
