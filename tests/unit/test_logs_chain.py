"""The hash chain: what a line holds, cheap appends, concurrent writers in several
processes, and ``verify`` finding each kind of tampering at its file and line."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from secvf.store import eventlog
from secvf.store import events as seclog
from secvf.store.eventlog import GENESIS_HASH, EventLog, LineKind, last_link, parse_line
from secvf.store.logquery import LogFilter, query, verify
from tests.helpers import run_cli
from tests.unit.logs_helpers import Clock, lines, make_log, write_days


def _findings(log: EventLog) -> list[tuple[str, str, int]]:
    return [(f["kind"], f["file"], f["line"]) for f in verify(log)["findings"]]


def _rewrite(path: Path, new_lines: list[bytes]) -> None:
    """What an attacker does (SecVF never rewrites a log)."""
    path.write_bytes(b"".join(new_lines))


def _resealed(raw: bytes, **changes: object) -> bytes:
    """``raw`` edited and given a correct hash of its own (a careful attacker)."""
    record = json.loads(raw)
    record.update(changes)
    record.pop("hash")
    text = json.dumps(record, separators=(",", ":")).encode()
    return text[:-1] + b',"hash":"' + hashlib.sha256(text).hexdigest().encode() + b'"}\n'


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_each_line_hashes_itself_and_chains_to_the_one_before(tmp_path: Path,
                                                              clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    first = log.write("vm_started", vm="web", n=1)
    second = log.write("vm_stopped", vm="web", seq="mine")  # a field named like the chain's
    raw1, raw2 = (raw.rstrip(b"\n") for raw in lines(log.path()))
    assert json.loads(raw1) == first and json.loads(raw2) == second
    assert (first["seq"], first["prev"]) == (1, GENESIS_HASH)
    assert (second["seq"], second["prev"]) == (2, first["hash"])
    assert second["event_seq"] == "mine"
    body = raw2[:raw2.rindex(b',"hash":')] + b"}"
    assert hashlib.sha256(body).hexdigest() == second["hash"]
    assert list(json.loads(raw2))[-3:] == ["seq", "prev", "hash"]
    assert verify(log)["ok"]


def test_a_files_first_line_chains_to_the_previous_files_last(tmp_path: Path,
                                                              clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    write_days(log, clock, days=3, per_day=2)
    clock.advance(days=2)  # a day without events in between
    log.write("vm_started")
    files = log.files("security")
    assert len(files) == 4
    for older, newer in zip(files, files[1:], strict=False):
        last = parse_line(lines(older.path)[-1].rstrip(b"\n"))
        first = parse_line(lines(newer.path)[0].rstrip(b"\n"))
        assert (first.prev, first.seq) == (last.hash, last.seq + 1)
    report = verify(log)
    assert report["ok"] and report["streams"] == [
        {"stream": "security", "files": 4, "lines": 7, "first_seq": 1, "last_seq": 7,
         "findings": 0}]


def test_a_clock_that_steps_back_does_not_fork_the_chain(tmp_path: Path, clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    write_days(log, clock, days=2, per_day=2)
    clock.advance(days=-1)  # an NTP step back past midnight
    log.write("vm_started", late=True)
    assert [f.path.name for f in log.files()] == ["security-2026-06-01.jsonl",
                                                  "security-2026-06-02.jsonl"]
    assert len(lines(log.files()[0].path)) == 2
    assert parse_line(lines(log.files()[1].path)[-1].rstrip(b"\n")).seq == 5
    assert verify(log)["ok"]


def test_streams_have_chains_of_their_own(tmp_path: Path, clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    log.write("vm_started")
    log.write("exec", stream="exec")
    assert [(r["seq"], r["prev"]) for r in query(log, "exec", LogFilter())] == [
        (1, GENESIS_HASH)]


def test_the_last_link_is_read_from_the_files_tail(tmp_path: Path, clock: Clock,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    log = make_log(tmp_path, clock)
    for i in range(3000):
        log.write("exec", stream="exec", payload="x" * 200, i=i)
    path = log.path("exec")
    assert path.stat().st_size > 10 * eventlog.TAIL_CHUNK_BYTES
    read: list[int] = []
    real_pread = os.pread

    def pread(fd: int, size: int, offset: int) -> bytes:
        read.append(size)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(eventlog.os, "pread", pread)
    record = log.write("exec", stream="exec", i=3000)
    # one chunk of the log file's end, and the newest file's name from the lock file
    assert record["seq"] == 3001 and sum(read) <= eventlog.TAIL_CHUNK_BYTES + 256


def test_a_last_line_longer_than_a_chunk_is_still_found(tmp_path: Path, clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    log.write("exec", stream="exec", i=0)
    big = log.write("exec", stream="exec", payload="y" * (3 * eventlog.TAIL_CHUNK_BYTES))
    assert last_link(log.path("exec"))[0] == eventlog.Link(2, big["hash"])
    assert log.write("exec", stream="exec")["prev"] == big["hash"]
    assert verify(log)["ok"]


def test_a_torn_last_line_is_ended_and_skipped_not_rewritten(tmp_path: Path,
                                                             clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    good = log.write("vm_started", n=1)
    path = log.path()
    with path.open("ab") as fh:  # a writer killed in the middle of its line
        fh.write(b'{"time":"2026-06-01T12:00:00.000Z","severity":"INFO","ev')
    before = path.read_bytes()
    after = log.write("vm_started", n=2)
    assert path.read_bytes().startswith(before)  # appended to, never edited
    assert after["prev"] == good["hash"] and after["seq"] == 2
    assert [r.get("n") for r in query(log, "security", LogFilter())] == [1, 2]
    assert _findings(log) == [("corrupt", path.name, 2)]


def test_a_torn_line_at_the_end_is_reported(tmp_path: Path, clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    log.write("vm_started")
    with log.path().open("ab") as fh:
        fh.write(b'{"time":')
    assert _findings(log) == [("torn", log.path().name, 2)]


def test_lines_that_are_not_chained_or_not_json_are_reported(tmp_path: Path,
                                                             clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    path = log.path()
    path.write_bytes(b'{"event":"from_an_old_version"}\n')  # written before the chain
    log.write("vm_started")
    with path.open("ab") as fh:
        fh.write(b"not json\n[1, 2]\n")
    log.write("vm_stopped")
    assert parse_line(b"[1, 2]").kind is LineKind.CORRUPT
    assert _findings(log) == [("unchained", path.name, 1), ("corrupt", path.name, 3),
                              ("corrupt", path.name, 4)]
    assert verify(log)["streams"][0]["lines"] == 2


# ---- tampering ------------------------------------------------------------------------


def _one_day(tmp_path: Path, clock: Clock, count: int = 6) -> tuple[EventLog, Path]:
    log = make_log(tmp_path, clock)
    for i in range(count):
        log.write("vm_started", i=i)
    return log, log.path()


def test_a_removed_line_is_reported_where_it_was(tmp_path: Path, clock: Clock) -> None:
    log, path = _one_day(tmp_path, clock)
    content = lines(path)
    _rewrite(path, content[:2] + content[3:])
    report = verify(log)
    assert not report["ok"]
    assert _findings(log) == [("removed", path.name, 3)]
    assert "1 line missing before this one (seq 3)" in report["findings"][0]["message"]


def test_several_removed_lines_are_one_finding_with_their_count(tmp_path: Path,
                                                                clock: Clock) -> None:
    log, path = _one_day(tmp_path, clock)
    content = lines(path)
    _rewrite(path, content[:1] + content[4:])
    assert verify(log)["findings"][0]["message"].startswith("3 lines missing before this "
                                                             "one (seq 2 to 4)")


def test_an_edited_line_is_reported_whether_or_not_its_hash_was_redone(
        tmp_path: Path, clock: Clock) -> None:
    log, path = _one_day(tmp_path, clock)
    content = lines(path)
    crude = content[:]
    crude[2] = content[2].replace(b'"i":2', b'"i":7')
    _rewrite(path, crude)
    assert _findings(log) == [("edited", path.name, 3)]

    careful = content[:]
    careful[2] = _resealed(content[2].rstrip(b"\n"), vm="someone-else")
    _rewrite(path, careful)
    findings = verify(log)["findings"]
    assert [(f["kind"], f["line"]) for f in findings] == [("edited", 3)]
    assert "next line" in findings[0]["message"]


def test_reordered_lines_are_reported(tmp_path: Path, clock: Clock) -> None:
    log, path = _one_day(tmp_path, clock)
    content = lines(path)
    content[2], content[3] = content[3], content[2]
    _rewrite(path, content)
    report = verify(log)
    assert [(f["kind"], f["line"]) for f in report["findings"]] == [("reordered", 4)]
    assert "seq 3 comes after seq 4" in report["findings"][0]["message"]


def test_a_duplicated_line_is_reported(tmp_path: Path, clock: Clock) -> None:
    log, path = _one_day(tmp_path, clock)
    content = lines(path)
    _rewrite(path, [*content, content[1]])
    assert _findings(log) == [("duplicate", path.name, 7)]


def test_a_file_from_another_log_spliced_in_is_reported(tmp_path: Path, clock: Clock) -> None:
    ours = make_log(tmp_path / "ours", clock)
    their_clock = Clock(clock.now)
    theirs = make_log(tmp_path / "theirs", their_clock)
    write_days(ours, clock, days=3, per_day=2)
    # another host's log: the same days and seqs, other lines
    write_days(theirs, their_clock, days=3, per_day=2, vm="db")
    middle = ours.files("security")[1].path
    middle.write_bytes(theirs.files("security")[1].path.read_bytes())
    last = ours.files("security")[2].path.name
    assert _findings(ours) == [("spliced", middle.name, 1), ("spliced", last, 1)]


def test_a_removed_file_is_reported_at_the_next_files_first_line(tmp_path: Path,
                                                                 clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    write_days(log, clock, days=3, per_day=2)
    files = log.files("security")
    files[1].path.unlink()
    assert _findings(log) == [("removed", files[2].path.name, 1)]


def test_a_removed_start_without_a_log_rotated_event_is_reported(tmp_path: Path,
                                                                 clock: Clock) -> None:
    log = make_log(tmp_path, clock)
    write_days(log, clock, days=2, per_day=2)
    first = log.files("security")[0].path
    first.unlink()
    report = verify(log)
    assert [(f["kind"], f["line"]) for f in report["findings"]] == [("removed", 1)]
    assert "no log_rotated event" in report["findings"][0]["message"]


def test_cli_verify_exits_non_zero_with_the_position(secvf_env: Path) -> None:
    for i in range(4):
        seclog.write_event("vm_started", i=i)
    assert run_cli("logs", "verify", check=True).stdout.startswith(
        "security: 4 lines in 1 file(s), seq 1 to 4: chain intact")
    path = seclog.log_path()
    content = lines(path)
    _rewrite(path, content[:1] + content[2:])
    proc = run_cli("logs", "verify")
    assert proc.returncode == 1
    assert f"removed {path.name}:2: 1 line missing" in proc.stdout
    as_json = run_cli("logs", "verify", "--json")
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 1 and report["ok"] is False
    assert report["findings"][0] | {"message": ""} == {
        "stream": "security", "kind": "removed", "file": path.name, "line": 2, "message": ""}


# ---- several writers ------------------------------------------------------------------

WRITER = """\
import sys
from secvf.store import events
sys.stdin.readline()  # start together
for i in range(int(sys.argv[1])):
    events.write_event("exec", stream="exec", writer=sys.argv[2], i=i, pad="p" * 300)
"""


def test_writers_in_several_processes_keep_one_valid_chain(secvf_env: Path) -> None:
    per_writer, writers = 150, 4
    seclog.write_event("exec", stream="exec", writer="first")  # the directory exists
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(per_writer), str(n)],
                              stdin=subprocess.PIPE, env=os.environ.copy())
             for n in range(writers)]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
    assert [proc.wait(timeout=120) for proc in procs] == [0] * writers
    log = seclog.default_log()
    report = verify(log, ["exec"])
    assert report["ok"], report["findings"][:5]
    assert report["streams"][0]["lines"] == 1 + per_writer * writers
    records = query(log, "exec", LogFilter())
    assert [r["seq"] for r in records] == list(range(1, 2 + per_writer * writers))
    assert len({r["pid"] for r in records}) == 1 + writers  # they really interleaved files


def test_files_are_private(secvf_env: Path) -> None:
    seclog.write_event("vm_started")
    seclog.write_event("exec", stream="exec")
    directory = seclog.default_log().directory
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    entries = sorted(p.name for p in directory.iterdir())
    assert ".security.lock" in entries and ".exec.lock" in entries
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in directory.iterdir()} == {"0o600"}
