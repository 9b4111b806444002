"""``secvf logs security|exec|mcp``: query and follow the event log; ``secvf logs verify``:
check its hash chain (docs/logs.md, the events in docs/events.md)."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

import click

from secvf import api
from secvf.errors import SecVFError
from secvf.faces.cli.app import SecVFGroup, format_time
from secvf.faces.cli.common import escape, new_table, note, out, print_json

#: Fields the table shows in their own columns, or not at all (the chain, the writer).
_NOT_DETAILS = frozenset({"time", "severity", "event", "vm", "vm_id", "pid", "uid",
                          "seq", "prev", "hash"})

#: How a severity looks in the table.
_STYLE = {"WARNING": "yellow", "ERROR": "red", "CRITICAL": "bold red"}

#: Records ``--follow`` shows first when neither ``--since`` nor ``--limit`` is given.
FOLLOW_BACKLOG = 10


class LogTime(click.ParamType[datetime]):
    """``--since``/``--until``: ``2h``, ``30m``, ``7d`` before now, or an ISO 8601 time."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> datetime:
        """Return the time ``value`` means, or fail with a usage error saying what works."""
        if isinstance(value, datetime):
            return value
        try:
            return api.parse_log_time(str(value))
        except SecVFError as exc:
            self.fail(str(exc), param, ctx)


class LogSeverity(click.ParamType[str]):
    """``--severity``: a minimum, ``warning`` or ``warning+`` (any case)."""

    name = "severity"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        """Return the severity's name, or fail with a usage error listing them."""
        try:
            return api.parse_log_severity(str(value))
        except SecVFError as exc:
            self.fail(str(exc), param, ctx)


@click.group("logs", cls=SecVFGroup)
def logs() -> None:
    """Query, follow and verify SecVF's event logs (security, exec, mcp)."""


def _stream_command(stream: str) -> click.Command:
    """The ``secvf logs STREAM`` command."""

    @click.command(stream, help=f"Show the {stream} log: a table, or JSON Lines with --json.")
    @click.option("--since", type=LogTime(), help="From this time: 2h, 30m, 7d ago, or ISO "
                  "8601 (local time unless it has a zone).")
    @click.option("--until", type=LogTime(), help="Up to this time (as --since).")
    @click.option("--severity", type=LogSeverity(), help="At least this severity: "
                  + ", ".join(s.lower() for s in api.LOG_SEVERITIES) + " (warning+ works too).")
    @click.option("--vm", help="Only events of this VM (name or id).")
    @click.option("--event", help="Only this event (see docs/events.md).")
    @click.option("--limit", "-n", type=click.IntRange(min=1),
                  help="Only the newest N matching events.")
    @click.option("--follow", "-f", is_flag=True, help="Keep printing events as they are "
                  f"written (first the last {FOLLOW_BACKLOG}, or all since --since).")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
    def command(since: datetime | None, until: datetime | None, severity: str | None,
                vm: str | None, event: str | None, limit: int | None, follow: bool,
                as_json: bool) -> None:
        filters: dict[str, Any] = {"severity": severity, "vm": vm, "event": event}
        if follow:
            if until is not None:
                raise click.UsageError("--until cannot be used with --follow")
            backlog = limit if limit is not None else (None if since else FOLLOW_BACKLOG)
            _follow(api.follow_logs(stream, since=since, backlog=backlog, **filters), as_json)
            return
        records = api.query_logs(stream, since=since, until=until, limit=limit, **filters)
        if as_json:
            for record in records:
                print_json(record, one_line=True)
        elif records:
            out.print(_table(records))
        else:
            note(f"no {stream} events match")

    return command


def _follow(records: Any, as_json: bool) -> None:
    """Print each record of the ``follow_logs`` iterator as it comes, until ^C."""
    try:
        for record in records:
            if as_json:
                print_json(record, one_line=True)
            else:
                out.print("  ".join(_row(record)))
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        records.close()


def _row(record: dict[str, Any]) -> list[str]:
    """TIME, SEVERITY, EVENT, VM and DETAILS of one record, as markup."""
    severity = str(record.get("severity", "?"))
    style = _STYLE.get(severity)
    shown = escape(severity)
    return [escape(format_time(str(record.get("time", "")))),
            f"[{style}]{shown}[/]" if style else shown,
            escape(str(record.get("event", "?"))),
            escape(str(record.get("vm") or "-")),
            escape(_details(record))]


def _details(record: dict[str, Any]) -> str:
    """The record's own fields as ``key=value``, space-separated."""
    return " ".join(f"{key}={value}" for key, value in record.items()
                    if key not in _NOT_DETAILS and value not in (None, "", [], {}))


def _table(records: list[dict[str, Any]]) -> Any:
    table = new_table("TIME", "SEVERITY", "EVENT", "VM", "DETAILS")
    for record in records:
        table.add_row(*_row(record))
    return table


for _stream in api.LOG_STREAMS:
    logs.add_command(_stream_command(_stream))


@logs.command("verify")
@click.option("--stream", type=click.Choice(api.LOG_STREAMS), help="Only this stream.")
@click.option("--json", "as_json", is_flag=True)
def verify(stream: str | None, as_json: bool) -> None:
    """Check the logs' hash chains; list every removed, edited, reordered or corrupt
    line with its file and line; exit 1 if there is any."""
    report = api.verify_logs(stream)
    if as_json:
        print_json(report)
    else:
        for summary in report["streams"]:
            seqs = (f", seq {summary['first_seq']} to {summary['last_seq']}"
                    if summary["lines"] else "")
            verdict = ("[green]chain intact[/]" if not summary["findings"]
                       else f"[red]{summary['findings']} finding(s)[/]")
            out.print(f"{escape(summary['stream'])}: {summary['lines']} lines in "
                      f"{summary['files']} file(s){seqs}: {verdict}")
        if not report["streams"]:
            note(f"no log files in {report['directory']}")
        if "error" in report["retention"]:
            note(f"retention is not enforced: {report['retention']['error']}")
        for finding in report["findings"]:
            out.print(f"[red]{escape(finding['kind'])}[/] "
                      f"{escape(finding['file'])}:{finding['line']}: "
                      f"{escape(finding['message'])}")
    sys.exit(0 if report["ok"] else 1)
