"""Retention on write: by age and by total size, oldest first, never today's file or a
stream's newest, a ``log_rotated`` event that keeps the chain verifiable, and the policy
file ``config/logs.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secvf.errors import ConfigError
from secvf.store import eventlog
from secvf.store.eventlog import EventLog, RetentionPolicy, parse_size
from secvf.store.logquery import LogFilter, query, verify
from tests.unit.logs_helpers import Clock, make_log, write_days


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(autouse=True)
def _fresh_retention_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a new process would: no retention check done yet."""
    monkeypatch.setattr(eventlog, "_last_retention_check", {})


def _names(log: EventLog) -> list[str]:
    return [f.path.name for f in log.files()]


def _rotations(log: EventLog) -> list[dict]:
    return query(log, "security", LogFilter.make(event="log_rotated"))


def test_files_past_the_retention_period_go_when_a_new_day_starts(tmp_path: Path,
                                                                  clock: Clock) -> None:
    log = make_log(tmp_path, clock, RetentionPolicy(retention_days=2, max_total_bytes=None))
    write_days(log, clock, days=4, per_day=2)  # 06-01 .. 06-04: 06-01 went on 06-04
    log.write("exec", stream="exec")
    assert _names(log) == ["security-2026-06-02.jsonl", "security-2026-06-03.jsonl",
                           "exec-2026-06-04.jsonl", "security-2026-06-04.jsonl"]
    kept_before = {f.path: f.path.read_bytes() for f in log.files()}
    clock.advance(days=1)
    log.write("vm_started")  # the first write of 06-05: 06-02 is past now
    assert _names(log) == ["security-2026-06-03.jsonl", "exec-2026-06-04.jsonl",
                           "security-2026-06-04.jsonl", "security-2026-06-05.jsonl"]
    for path, content in kept_before.items():  # nothing kept was edited or cut
        assert not path.exists() or path.read_bytes() == content
    rotations = _rotations(log)
    assert [[(r["file"], r["stream"], r["reason"]) for r in e["removed"]] for e in rotations] \
        == [[("security-2026-06-01.jsonl", "security", "age")],
            [("security-2026-06-02.jsonl", "security", "age")]]
    last = rotations[-1]
    assert last["retention_days"] == 2 and last["max_total_bytes"] is None
    assert last["removed_bytes"] == last["removed"][0]["bytes"] > 0
    assert last["removed"][0]["last_seq"] == 4
    report = verify(log)
    assert report["ok"], report["findings"]


def test_age_limit_exact_days(tmp_path: Path, clock: Clock) -> None:
    """retention_days=2 on 06-10 keeps 06-08 and later; a stream's newest file stays."""
    log = make_log(tmp_path, clock, RetentionPolicy(retention_days=2, max_total_bytes=None))
    for day in (1, 7, 8, 9):
        clock.now = clock.now.replace(day=day)
        log.write("vm_started", day=day)
    clock.now = clock.now.replace(day=2)
    log.write("exec", stream="exec")  # exec's only file: its newest, from 06-02
    clock.now = clock.now.replace(day=10)
    log.write("vm_started", day=10)
    assert _names(log) == ["exec-2026-06-02.jsonl", "security-2026-06-08.jsonl",
                           "security-2026-06-09.jsonl", "security-2026-06-10.jsonl"]


def test_the_size_cap_removes_oldest_first_but_never_the_current_files(tmp_path: Path,
                                                                      clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    write_days(log, clock, days=5, per_day=20)
    write_days(log, Clock(clock.now), days=1, per_day=5, stream="exec")
    sizes = {f.path.name: f.size for f in log.files()}
    day_size = sizes["security-2026-06-01.jsonl"]
    cap = sum(sizes.values()) - 2 * day_size + 10  # two oldest files must go, not a third
    log._policy = RetentionPolicy(retention_days=None, max_total_bytes=cap)
    removed = log.enforce_retention()
    assert [(r["file"], r["reason"]) for r in removed] == [
        ("security-2026-06-01.jsonl", "size"), ("security-2026-06-02.jsonl", "size")]
    assert sum(f.size for f in log.files()) <= cap + 2 * day_size  # + the log_rotated line

    log._policy = RetentionPolicy(retention_days=None, max_total_bytes=1)
    log.enforce_retention()
    assert _names(log) == ["exec-2026-06-05.jsonl", "security-2026-06-05.jsonl"]
    report = verify(log)
    assert report["ok"], report["findings"]
    first = next(s for s in report["streams"] if s["stream"] == "security")["first_seq"]
    assert first == 81


def test_retention_runs_when_a_file_crosses_a_size_step(tmp_path: Path, clock: Clock,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    log = make_log(tmp_path, clock)
    write_days(log, clock, days=2, per_day=3)
    log._policy = RetentionPolicy(retention_days=None, max_total_bytes=1)
    calls: list[int] = []
    real = EventLog.enforce_retention

    def spy(self: EventLog) -> list:
        calls.append(self.path().stat().st_size)
        return real(self)

    monkeypatch.setattr(EventLog, "enforce_retention", spy)
    monkeypatch.setattr(eventlog, "RETENTION_CHECK_BYTES", 4096)
    eventlog._last_retention_check[log.directory] = clock.now  # checked just now
    while not calls:
        log.write("vm_started", pad="z" * 200)
    assert 4096 <= calls[0] < 4096 + 1024
    assert "security-2026-06-01.jsonl" not in _names(log)


def test_retention_runs_at_most_hourly_without_another_trigger(
        tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    log = make_log(tmp_path, clock)
    log.write("vm_started")
    calls: list[object] = []
    monkeypatch.setattr(EventLog, "enforce_retention", lambda self: calls.append(1))
    log.write("vm_started")
    assert calls == []
    clock.advance(minutes=59)
    log.write("vm_started")
    assert calls == []
    eventlog._last_retention_check[log.directory] = clock.now - eventlog.RETENTION_CHECK_INTERVAL
    log.write("vm_started")
    assert calls == [1]


def test_retention_is_skipped_while_another_process_holds_it(tmp_path: Path,
                                                             clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    write_days(log, clock, days=3, per_day=1)
    log._policy = RetentionPolicy(retention_days=1, max_total_bytes=None)
    with log.locked("retention"):
        assert log.enforce_retention() == []
    assert [r["file"] for r in log.enforce_retention()] == ["security-2026-06-01.jsonl"]


# ---- the policy file ------------------------------------------------------------------


def _config(log: EventLog, text: str) -> Path:
    path = log.config_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_policy_file_is_read_beside_the_log_directory(tmp_path: Path,
                                                          clock: Clock) -> None:
    log = EventLog(make_log(tmp_path).directory, clock=clock)  # no policy override
    assert log.config_path == tmp_path / "home" / "config" / "logs.json"
    assert log.policy() == RetentionPolicy(90, 1 << 30)
    _config(log, json.dumps({"retention_days": 1, "max_total_size": "10M"}))
    assert log.policy() == RetentionPolicy(1, 10 << 20)
    _config(log, json.dumps({"retention_days": None, "max_total_size": None}))
    assert log.policy() == RetentionPolicy(None, None)
    write_days(log, clock, days=3, per_day=1)
    _config(log, json.dumps({"retention_days": 1}))
    clock.advance(days=1)
    log.write("vm_started")
    assert _names(log) == ["security-2026-06-03.jsonl", "security-2026-06-04.jsonl"]


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "is not valid JSON"),
    ("[]", "expected a JSON object"),
    ('{"retention": 3}', "unknown setting(s) retention; allowed: retention_days"),
    ('{"retention_days": 0}', "retention_days must be a whole number of days, 1 or more"),
    ('{"retention_days": "30"}', "retention_days must be"),
    ('{"retention_days": true}', "retention_days must be"),
    ('{"retention_days": 1.5}', "retention_days must be"),
    ('{"max_total_size": "lots"}', 'max_total_size must be a number of bytes or a size'),
    ('{"max_total_size": 0}', "max_total_size must be more than 0"),
    ('{"max_total_size": -5}', "max_total_size must be more than 0")])
def test_a_bad_policy_file_is_a_clear_config_error(tmp_path: Path, text: str,
                                                   message: str) -> None:
    log = EventLog(make_log(tmp_path).directory)
    path = _config(log, text)
    with pytest.raises(ConfigError) as caught:
        log.policy()
    assert message in str(caught.value) and str(path) in str(caught.value)


def test_a_bad_policy_file_removes_nothing_and_says_so(tmp_path: Path, clock: Clock,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    log = EventLog(make_log(tmp_path).directory, clock=clock)
    _config(log, json.dumps({"retention_days": 1}))
    write_days(log, clock, days=2, per_day=1)
    _config(log, json.dumps({"retention_days": -1}))
    clock.advance(days=5)
    log.write("vm_started")  # a write never fails for it
    assert len(log.files()) == 3
    assert "log retention not enforced (nothing removed)" in capfd.readouterr().err


@pytest.mark.parametrize(("value", "size"), [
    (1, 1), ("512", 512), ("10K", 10 << 10), ("5m", 5 << 20), ("2G", 2 << 30), ("1T", 1 << 40),
    ("3 MiB", 3 << 20), ("4GB", 4 << 30)])
def test_sizes(value: object, size: int) -> None:
    assert parse_size(value, "x") == size


def test_an_unremovable_file_is_reported_and_nothing_raises(tmp_path: Path, clock: Clock,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capfd: pytest.CaptureFixture[str]
                                                            ) -> None:
    log = make_log(tmp_path, clock)
    write_days(log, clock, days=2, per_day=1)
    log._policy = RetentionPolicy(retention_days=None, max_total_bytes=1)

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refuse)
    assert log.enforce_retention() == []
    assert "log retention could not remove" in capfd.readouterr().err
    assert len(log.files()) == 2 and _rotations(log) == []


def test_verify_shows_the_policy_or_why_it_is_invalid(tmp_path: Path) -> None:
    log = EventLog(make_log(tmp_path).directory)
    assert verify(log)["retention"] == {"retention_days": 90, "max_total_bytes": 1 << 30}
    _config(log, '{"retention_days": 0}')
    assert "retention_days must be" in verify(log)["retention"]["error"]
