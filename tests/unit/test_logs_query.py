"""Querying and following the event log: filters, times, severities, the API and the CLI."""

from __future__ import annotations

import inspect
import json
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path

import pytest

from secvf import api
from secvf.store import events as seclog
from secvf.store.eventlog import Severity
from secvf.store.logquery import (
    SEVERITIES,
    STREAMS,
    LogFilter,
    LogQueryError,
    follow,
    parse_severity,
    parse_time,
    query,
)
from tests.helpers import run_cli
from tests.unit.logs_helpers import START, Clock, make_log
from tests.unit.test_cli_imports import HEAVY, loaded, run_probe


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _mixed(tmp_path: Path, clock: Clock):  # noqa: ANN202 - the log
    """A log with events of every severity, two VMs, over three hours and two days."""
    log = make_log(tmp_path, clock)
    log.write("vm_started", vm="web", vm_id="id-web")
    clock.advance(hours=1)
    log.write("exec_refused", severity=Severity.WARNING, vm="db", vm_id="id-db")
    clock.advance(hours=1)
    log.write("guest_panic", severity=Severity.ERROR, vm="web", vm_id="id-web")
    clock.advance(days=1)
    log.write("forbidden_device", severity=Severity.CRITICAL, vm="db", vm_id="id-db")
    log.write("exec", stream="exec", vm="web", argv=["ls"])
    return log


def _events(records: list[dict]) -> list[str]:
    return [r["event"] for r in records]


def test_filters_by_severity_minimum_vm_event_and_time(tmp_path: Path, clock: Clock) -> None:
    log = _mixed(tmp_path, clock)
    everything = query(log, "security", LogFilter())
    assert _events(everything) == ["vm_started", "exec_refused", "guest_panic",
                                   "forbidden_device"]
    assert _events(query(log, "security", LogFilter.make(severity="warning"))) == [
        "exec_refused", "guest_panic", "forbidden_device"]
    assert _events(query(log, "security", LogFilter.make(severity="ERROR+"))) == [
        "guest_panic", "forbidden_device"]
    assert _events(query(log, "security", LogFilter.make(vm="web"))) == [
        "vm_started", "guest_panic"]
    assert _events(query(log, "security", LogFilter.make(vm="id-db"))) == [
        "exec_refused", "forbidden_device"]
    assert _events(query(log, "security", LogFilter.make(event="guest_panic"))) == [
        "guest_panic"]
    window = LogFilter.make(since=START + timedelta(minutes=30), until=START + timedelta(hours=2))
    assert _events(query(log, "security", window)) == ["exec_refused", "guest_panic"]
    assert _events(query(log, "security", LogFilter.make(since=START + timedelta(days=1)))) \
        == ["forbidden_device"]
    assert _events(query(log, "exec", LogFilter())) == ["exec"]


def test_limit_keeps_the_newest_oldest_first(tmp_path: Path, clock: Clock) -> None:
    log = _mixed(tmp_path, clock)
    assert _events(query(log, "security", LogFilter(), limit=2)) == ["guest_panic",
                                                                    "forbidden_device"]
    with pytest.raises(LogQueryError, match="limit must be 1 or more"):
        query(log, "security", LogFilter(), limit=0)


def test_since_and_until_are_inclusive_and_checked(tmp_path: Path, clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    log.write("vm_started")
    assert len(query(log, "security", LogFilter.make(since=START, until=START))) == 1
    with pytest.raises(LogQueryError, match="ends before it starts"):
        LogFilter.make(since=START, until=START - timedelta(seconds=1))


def test_unknown_streams_and_severities_are_refused_with_the_choices(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    with pytest.raises(LogQueryError, match="streams: security, exec, mcp"):
        query(log, "secrity", LogFilter())
    with pytest.raises(LogQueryError, match="info, warning, error, critical"):
        parse_severity("warn")
    assert [parse_severity(s) for s in ("info", "Warning+", " CRITICAL ")] == [
        Severity.INFO, Severity.WARNING, Severity.CRITICAL]


def test_records_without_a_usable_time_or_severity_fail_those_filters() -> None:
    odd = {"event": "x", "time": "yesterday", "severity": "LOUD"}
    assert LogFilter().matches(odd)
    assert not LogFilter.make(since=START).matches(odd)
    assert not LogFilter.make(severity="info").matches(odd)


@pytest.mark.parametrize(("text", "back"), [
    ("2h", timedelta(hours=2)), ("30m", timedelta(minutes=30)), ("90s", timedelta(seconds=90)),
    ("7d", timedelta(days=7)), ("1w", timedelta(weeks=1)), ("1.5H", timedelta(minutes=90)),
    (" 3 d ", timedelta(days=3)), ("0s", timedelta(0))])
def test_relative_times_count_back_from_now(text: str, back: timedelta) -> None:
    assert parse_time(text, now=START) == START - back


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-06-01T10:00:00Z", datetime(2026, 6, 1, 10, tzinfo=UTC)),
    ("2026-06-01T12:00+02:00", datetime(2026, 6, 1, 10, tzinfo=UTC)),
    ("2026-06-01 10:00:00.250+00:00", datetime(2026, 6, 1, 10, 0, 0, 250000, tzinfo=UTC))])
def test_iso_times_with_a_zone(text: str, expected: datetime) -> None:
    assert parse_time(text) == expected


def test_iso_times_without_a_zone_are_local() -> None:
    assert parse_time("2026-06-01T10:00") == datetime(2026, 6, 1, 10).astimezone(UTC)
    assert parse_time("2026-06-01") == datetime(2026, 6, 1).astimezone(UTC)
    assert parse_time("2026-06-01").tzinfo is UTC


@pytest.mark.parametrize("text", ["2x", "", "yesterday", "-2h", "2h ago", "2026-13-01",
                                  "h", "99999999999w"])
def test_bad_times_say_what_works(text: str) -> None:
    with pytest.raises(LogQueryError, match="30m, 2h or 7d") as caught:
        parse_time(text, now=START)
    assert repr(text) in str(caught.value)


def test_follow_yields_the_backlog_then_new_lines_across_days(tmp_path: Path,
                                                             clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    for i in range(5):
        log.write("vm_started", i=i)
    script = iter([lambda: log.write("vm_stopped", i=5),
                   lambda: (clock.advance(days=1), log.write("vm_stopped", i=6)),
                   lambda: log.write("exec_refused", severity=Severity.WARNING, i=7)])
    naps: list[float] = []

    def sleep(seconds: float) -> None:  # each nap: the next writer's turn
        naps.append(seconds)
        next(script)()

    got = list(islice(follow(log, "security", LogFilter(), backlog=2, poll_s=0.25,
                             sleep=sleep), 5))
    assert [r["i"] for r in got] == [3, 4, 5, 6, 7]
    assert naps == [0.25, 0.25, 0.25]
    assert got[3]["time"].startswith("2026-06-02")


def test_follow_applies_the_filter_and_backlog_none_means_all(tmp_path: Path,
                                                             clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    for i in range(4):
        log.write("vm_started", severity=Severity.WARNING if i % 2 else Severity.INFO, i=i)

    def sleep(_: float) -> None:
        log.write("vm_started", severity=Severity.WARNING, i=9)

    got = islice(follow(log, "security", LogFilter.make(severity="warning"), backlog=None,
                        sleep=sleep), 3)
    assert [r["i"] for r in got] == [1, 3, 9]


def test_follow_waits_for_a_line_to_be_whole(tmp_path: Path, clock: Clock) -> None:
    """A writer's line arrives in pieces (as a reader may see a large write): only the
    whole line is yielded, once."""
    log = make_log(tmp_path, clock)
    log.write("vm_started", i=0)
    path = log.path()
    line = (json.dumps({"event": "written_by_hand", "i": 1}) + "\n").encode()
    pieces = iter([line[:10], line[10:]])

    def sleep(_: float) -> None:
        with path.open("ab") as fh:
            fh.write(next(pieces))

    got = next(follow(log, "security", LogFilter(), sleep=sleep))
    assert got == {"event": "written_by_hand", "i": 1}


def test_follow_refuses_bad_arguments_when_it_starts(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    with pytest.raises(LogQueryError, match="backlog"):
        next(follow(log, "security", LogFilter(), backlog=-1))
    with pytest.raises(LogQueryError, match="no log stream"):
        next(follow(log, "nope", LogFilter()))


# ---- the API --------------------------------------------------------------------------


def test_the_api_keeps_the_signature_the_mcp_server_calls() -> None:
    params = inspect.signature(api.query_logs).parameters
    assert [(p.name, p.kind, p.default) for p in params.values()] == [
        ("stream", inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.empty),
        *((name, inspect.Parameter.KEYWORD_ONLY, None)
          for name in ("since", "until", "severity", "vm", "event", "limit"))]


def test_the_api_constants_are_the_query_modules() -> None:
    assert api.LOG_STREAMS == STREAMS
    assert api.LOG_SEVERITIES == SEVERITIES == tuple(str(s) for s in Severity)


def test_api_query_logs_reads_the_default_log(secvf_env: Path) -> None:
    seclog.write_event("vm_started", vm="web")
    seclog.write_event("guest_panic", severity=Severity.ERROR, vm="web")
    seclog.write_event("mcp.tool_call", stream="mcp", tool="vm_list")
    got = api.query_logs("security", severity="WARNING", vm="web",
                         since=datetime.now(UTC) - timedelta(hours=1))
    assert _events(got) == ["guest_panic"]
    assert _events(api.query_logs("mcp", event="mcp.tool_call", limit=5)) == ["mcp.tool_call"]
    records = api.follow_logs("security", backlog=1)
    assert next(records)["event"] == "guest_panic"
    records.close()


# ---- the CLI --------------------------------------------------------------------------


def test_cli_json_lines_and_table(secvf_env: Path) -> None:
    seclog.write_event("vm_started", vm="web", kind="generic")
    seclog.write_event("forbidden_device", severity=Severity.CRITICAL, vm="[red]x[/]",
                       kind="generic", devices=["vhost-vsock-pci"])
    proc = run_cli("logs", "security", "--severity", "warning+", "--json", check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert _events(rows) == ["forbidden_device"] and rows[0]["seq"] == 2
    table = run_cli("logs", "security", "--since", "1h", check=True).stdout
    assert "vm_started" in table and "forbidden_device" in table and "[red]x[/]" in table
    assert "kind=generic" in table and "hash" not in table
    empty = run_cli("logs", "exec", check=True)
    assert empty.stdout == "" and "no exec events match" in empty.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("--since", "2x"), "'2x' is not a time"),
    (("--severity", "loud"), "no severity 'loud'"),
    (("--follow", "--until", "1h"), "--until cannot be used with --follow"),
    (("--limit", "0"), "--limit")])
def test_cli_bad_arguments_are_usage_errors(secvf_env: Path, args: tuple[str, ...],
                                            message: str) -> None:
    proc = run_cli("logs", "security", *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_range_that_ends_before_it_starts_is_a_clean_error(secvf_env: Path) -> None:
    proc = run_cli("logs", "security", "--since", "1h", "--until", "2h", "--json")
    assert proc.returncode == 1 and "ends before it starts" in proc.stderr
    assert json.loads(proc.stdout)["error"]["type"] == "LogQueryError"


@pytest.mark.parametrize("args", [("logs", "--help"), ("logs", "security", "--help")])
def test_logs_help_stays_lean(args: tuple[str, ...]) -> None:
    proc, modules = run_probe(*args)
    assert proc.returncode == 0 and "Usage:" in proc.stdout, proc.stderr
    assert loaded(modules, (*HEAVY, "rich", "secvf.store", "secvf.workflows")) == []
