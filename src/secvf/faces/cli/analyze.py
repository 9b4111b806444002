"""``secvf analyze`` and ``secvf analyses …``: detonate samples without a control
channel, and browse the results."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import click

from secvf import api
from secvf.faces.cli.app import Seconds, SecVFGroup
from secvf.faces.cli.common import err, escape, new_table, note, out, print_json


@click.command("analyze")
@click.argument("samples", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--timeout", type=Seconds(), default=60.0, show_default=True,
              help="How long the sample may run.")
@click.option("--network", default="fakenet", show_default=True, metavar="NET",
              help="fakenet (a fake-internet gateway VM), none (no NIC), or isolated:NAME.")
@click.option("--args", "sample_args", default="", metavar="ARGS",
              help="Arguments for the sample (split like a shell does).")
@click.option("--user", type=click.Choice(["analyst", "root"]), default="analyst",
              show_default=True, help="Who runs the sample in the guest.")
@click.option("--jobs", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Samples at once (each in its own VMs and network).")
@click.option("--yara", "yara", multiple=True, type=click.Path(path_type=Path),
              metavar="RULES", help="YARA rules to run over the sample.")
@click.option("--memory-dump", is_flag=True,
              help="Write the guest's memory to memory.elf at the end (for Volatility).")
@click.option("--log-limit", default="8M", show_default=True, metavar="SIZE",
              help="Where the guest's console and monitor logs are cut on the host.")
@click.option("--capture-limit", default="64M", show_default=True, metavar="SIZE",
              help="Where the network capture stops.")
@click.option("--accel", type=click.Choice([a.value for a in api.Accel]), default="auto",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def analyze(samples: tuple[Path, ...], timeout: float, network: str, sample_args: str,
            user: str, jobs: int, yara: tuple[Path, ...], memory_dump: bool, log_limit: str,
            capture_limit: str, accel: str, as_json: bool) -> None:
    """Detonate SAMPLE... each in a malware-analysis VM restored from a clean state, with
    no host-guest channel; results go to $SECVF_HOME/analyses/ID/ (see: secvf analyses).

    Ctrl-C stops every running analysis at its next step and removes its VMs."""
    import shlex

    requests = [api.DetonationRequest(sample=s, timeout_s=timeout, network=network,
                                      args=tuple(shlex.split(sample_args)), user=user,
                                      yara=yara, accel=accel, memory_dump=memory_dump,
                                      log_max_bytes=api.parse_size(log_limit),
                                      capture_max_bytes=api.parse_size(capture_limit))
                for s in samples]
    lock = threading.Lock()

    def progress(analysis_id: str, stage: str) -> None:
        with lock:
            err.print(f"[bold]{analysis_id}[/] {escape(stage)}", highlight=False)

    try:
        results = api.analyze(requests, jobs=jobs, progress=None if as_json else progress)
    except KeyboardInterrupt:
        err.print("interrupted: the running analyses were stopped and their VMs removed")
        raise SystemExit(130) from None
    if as_json:
        print_json([_result_json(r) for r in results])
    else:
        for result in results:
            _print_result(result)
    if any(r.verdict in ("failed", "interrupted") for r in results):
        raise SystemExit(1)


def _result_json(result: Any) -> dict[str, Any]:
    return {"id": result.id, "directory": str(result.directory), "verdict": result.verdict,
            "error": result.error, "stages_s": result.stages_s,
            "summary": _summary(result.report) if result.report else None}


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """A few counts from a report (docs/analysis-report.md)."""
    network = report.get("network") or {}
    disk = report.get("disk_diff") or {}
    return {"outcome": (report.get("run") or {}).get("outcome"),
            "processes": report.get("process_count"),
            "dns_queries": len(network.get("dns") or []),
            "http_requests": len(network.get("http") or []),
            "files_created": len(disk.get("created") or []),
            "files_deleted": len(disk.get("deleted") or [])}


def _print_result(result: Any) -> None:
    if result.error:
        out.print(f"[red]{result.id}[/] failed: {escape(result.error)}", highlight=False)
        return
    total = result.stages_s.get("total")
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in _summary(result.report).items())
    out.print(f"[bold]{result.id}[/] {result.verdict} in {total} s ({escape(counts)}): "
              f"{escape(str(result.directory))}/report.html", highlight=False)


@click.group(cls=SecVFGroup)
def analyses() -> None:
    """Browse the results of secvf analyze."""


@analyses.command("list")
@click.option("--json", "as_json", is_flag=True)
def analyses_list(as_json: bool) -> None:
    """List analyses, oldest first."""
    rows = api.list_analyses()
    if as_json:
        print_json(rows)
        return
    if not rows:
        note("no analyses yet; run: secvf analyze SAMPLE")
        return
    table = new_table("ID", "STATE", "VERDICT", "SAMPLE", "NETWORK", "STARTED")
    for row in rows:
        table.add_row(row["id"], "running" if row["running"] else str(row["state"]),
                      str(row["verdict"] or "-"), escape(str(row["sample_name"])),
                      str(row["network"]), str(row["started_at"]))
    out.print(table)


@analyses.command("show")
@click.argument("analysis_id")
@click.option("--json", "as_json", is_flag=True)
def analyses_show(analysis_id: str, as_json: bool) -> None:
    """Show an analysis's report (JSON with --json; the page is report.html)."""
    report = api.show_analysis(analysis_id)
    if as_json:
        print_json(report)
        return
    directory = api.analysis_dir(analysis_id)
    out.print(f"[bold]{directory.name}[/] {escape(str(directory))}", highlight=False)
    for key in ("verdict", "sample", "run", "notes"):
        if key in report:
            out.print(f"  {key}: {escape(str(report[key]))[:2000]}", highlight=False)
    if (directory / "report.html").exists():
        out.print(f"  page: {escape(str(directory / 'report.html'))}", highlight=False)


@analyses.command("rm")
@click.argument("analysis_id")
def analyses_rm(analysis_id: str) -> None:
    """Remove an analysis's results."""
    path = api.remove_analysis(analysis_id)
    out.print(f"removed {escape(str(path))}", highlight=False)


@analyses.command("export")
@click.argument("analysis_id")
@click.argument("out_file", type=click.Path(path_type=Path))
def analyses_export(analysis_id: str, out_file: Path) -> None:
    """Write an analysis's results to OUT_FILE (.tar.gz)."""
    path = api.export_analysis(analysis_id, out_file)
    out.print(f"wrote {escape(str(path))}", highlight=False)
