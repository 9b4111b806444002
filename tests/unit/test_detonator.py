"""The guest detonator (``secvf/guest/detonator.py``) on the host: manifest validation, line
bounding, the strace copier and the event sequence, with a temp file as the monitor port,
a directory as the "mounted" medium and no cgroup — and real strace when the host has it."""

from __future__ import annotations

import ast
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from secvf.analysis.medium import build_sample_medium, manifest
from secvf.analysis.monitor_log import parse_monitor_log
from secvf.guest import detonator as d

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(STRACE is None, reason="strace is not installed (apt-get "
                                  "install strace; scripts/install-system-deps.sh has it)")


def _manifest(**changes: object) -> bytes:
    return json.dumps({**manifest("a.out"), **changes}).encode()


# ---- the detonator is standard library only -------------------------------------------

def test_detonator_imports_only_the_standard_library() -> None:
    tree = ast.parse(Path(d.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
    assert names - {"__future__"} <= sys.stdlib_module_names


# ---- manifest ----------------------------------------------------------------------------

def test_a_valid_manifest_is_parsed() -> None:
    got = d.parse_manifest(_manifest(args=["-x", "ü"], user="root", timeout_s=2.5, pid_limit=9))
    assert got == d.Manifest("a.out", ("-x", "ü"), "root", 2.5, 9)


@pytest.mark.parametrize("change", [
    {"format": 2}, {"format": True}, {"format": "1"},
    {"sample": "../etc/passwd"}, {"sample": "a/b"}, {"sample": ""}, {"sample": ".."},
    {"sample": "manifest.json"}, {"sample": "x" * 256}, {"sample": 3},
    {"args": "x"}, {"args": [1]}, {"args": ["a\0b"]}, {"args": ["x"] * 257},
    {"args": ["x" * 4097]},
    {"user": "nobody"}, {"user": None},
    {"timeout_s": 0}, {"timeout_s": -1}, {"timeout_s": True}, {"timeout_s": "5"},
    {"timeout_s": 86401},
    {"pid_limit": 1}, {"pid_limit": 2.0}, {"pid_limit": 65537}, {"pid_limit": False},
    {"extra": 1},
])  # fmt: skip
def test_a_bad_manifest_is_refused(change: dict) -> None:
    with pytest.raises(d.ManifestError):
        d.parse_manifest(_manifest(**change))


@pytest.mark.parametrize("data", [
    b"[]", b"not json", b"\xff\xfe", b'{"format": NaN}', b"{" * 100000,
    b'{"format":1,"format":1,"sample":"a","args":[],"user":"root","timeout_s":1,"pid_limit":2}',
    b" " * (d.MANIFEST_MAX_BYTES + 1),
])  # fmt: skip
def test_malformed_manifest_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(d.ManifestError):
        d.parse_manifest(data)


def test_missing_keys_are_refused() -> None:
    with pytest.raises(d.ManifestError, match="missing"):
        d.parse_manifest(b'{"format": 1}')


def test_read_manifest_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real.json").write_bytes(_manifest())
    (tmp_path / "manifest.json").symlink_to(tmp_path / "real.json")
    with pytest.raises(d.ManifestError, match="cannot open"):
        d.read_manifest(tmp_path)


# ---- lines -------------------------------------------------------------------------------

def test_lines_are_bounded_to_4096_bytes_with_their_newline() -> None:
    line = d.bound_line(b"S ", b"x" * 10000)
    assert len(line) == d.MAX_LINE_BYTES and line.endswith(b"\n") and line.count(b"\n") == 1
    assert d.bound_line(b"S ", b"a\nb\r") == b"S a b\n"


def test_event_lines_are_compact_json_with_event_first_and_time() -> None:
    line = d.event_line("exit", 12.5, code=0, signal=None)
    assert line == b'E {"event":"exit","code":0,"signal":null,"time":12.5}\n'
    huge = d.event_line("medium", 1.0, files=[{"name": "x" * 300, "size": 1}] * 100)
    assert len(huge) <= d.MAX_LINE_BYTES
    assert json.loads(huge[2:])["event"] == "medium"


def test_the_splitter_cuts_long_lines_and_drops_their_rest() -> None:
    splitter = d.LineSplitter(limit=8)
    out = list(splitter.feed(b"short\n0123456789abcdef"))
    out += list(splitter.feed(b"ghij\nnext\npart"))
    out += list(splitter.flush())
    assert out == [b"short", b"01234567", b"next", b"part"]


@pytest.mark.parametrize(("line", "expected"), [
    (b'412 17:00:00.000001 openat(AT_FDCWD, "/media/sample/x", O_WRONLY|O_CREAT|O_TRUNC, 0666)'
     b" = -1 EROFS (Read-only file system)", ("/media/sample/x", 412)),
    (b'7 17:00:00.000001 mkdir("/media/sample/d", 0777) = -1 EROFS (Read-only file system)',
     ("/media/sample/d", 7)),
    (b'7 17:00:00.000001 <... openat resumed>"/media/sample/y", O_RDWR) = -1 EACCES (Perm)',
     ("/media/sample/y", 7)),
    (b'7 17:00:00.000001 openat(AT_FDCWD, "/media/sample/x", O_RDONLY) = -1 EACCES (Perm)', None),
    (b'7 17:00:00.000001 openat(AT_FDCWD, "/tmp/x", O_WRONLY|O_CREAT, 0666) = -1 EROFS (R)', None),
    (b'7 17:00:00.000001 openat(AT_FDCWD, "/media/sample/x", O_WRONLY) = 3', None),
    (b'7 17:00:00.000001 unlink("/media/samplex") = -1 EROFS (R)', None),
])  # fmt: skip
def test_denied_medium_writes_are_recognised(line: bytes, expected: tuple | None) -> None:
    assert d.denied_medium_write(line) == expected


def test_the_monitor_log_counts_write_errors_instead_of_raising(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "port", os.O_RDONLY | os.O_CREAT)
    log = d.MonitorLog(fd)
    log.event("hello", format=1)
    os.close(fd)
    assert log.write_errors == 1 and log.events == ["hello"]


def test_strace_argv_keeps_the_contract_options_and_drops_privileges(tmp_path: Path) -> None:
    argv = d.strace_argv(tmp_path / "f", d.Manifest("s", ("a",), "analyst", 1, 5), "/m/s")
    assert argv[:9] == [d.STRACE, "-f", "-tt", "-s", "256", "-e", "trace=process,file,network",
                        "-o", str(tmp_path / "f")]
    assert argv[9:12] == ["--", d.SETPRIV, "--reuid=1000"] and argv[-3:] == ["--", "/m/s", "a"]
    root = d.strace_argv(tmp_path / "f", d.Manifest("s", (), "root", 1, 5), "/m/s")
    assert root[9:] == ["--", "/m/s"]


def test_a_missing_cgroup_is_reported_and_not_fatal(tmp_path: Path) -> None:
    cgroups = d.Cgroups(tmp_path / "nothing" / "here")
    cgroups._mount = lambda: None  # type: ignore[method-assign]
    cgroups.setup(10)
    assert not cgroups.usable and "no cgroup" in cgroups.problem
    assert cgroups.pids() == [] and cgroups.max_events() == 0
    cgroups.kill()


# ---- the event sequence (fake medium, fake mount, temp-file port) -------------------------

class _Run:
    def __init__(self, tmp_path: Path) -> None:
        self.port = tmp_path / "ttyS1"
        self.fd = d.open_monitor_port(str(self.port.touch() or self.port))
        self.log = d.MonitorLog(self.fd)
        self.medium = tmp_path / "medium"
        self.medium.mkdir()
        self.tmp = tmp_path

    def runner(self, log: d.MonitorLog) -> d.Runner:
        return d.Runner(log, d.Cgroups(self.tmp / "no-cgroup"), self.tmp / "run",
                        medium=str(self.medium), strace=STRACE or "strace",
                        setpriv=shutil.which("setpriv") or "setpriv", cwd=str(self.tmp))

    def go(self, mount_error: str | None = None, clock_problem: str | None = None,
           ) -> tuple[d.RunResult | None, list[dict]]:
        result = d.run_medium(self.log, self.medium, mount=lambda: mount_error,
                              runner=self.runner, settle_clock=lambda: clock_problem)
        self.log.event("done")
        os.close(self.fd)
        events = [json.loads(line[2:]) for line in self.port.read_text().splitlines()
                  if line.startswith("E ")]
        return result, events

    def text(self) -> str:
        return self.port.read_text()


def test_a_mount_failure_gives_error_then_done(tmp_path: Path) -> None:
    run = _Run(tmp_path)
    result, events = run.go(mount_error="no medium")
    assert result is None
    assert [e["event"] for e in events] == ["error", "done"]
    assert "no medium" in events[0]["message"]


def test_a_clock_that_was_not_stepped_is_noted_in_the_log(tmp_path: Path) -> None:
    run = _Run(tmp_path)
    run.go(mount_error="no medium", clock_problem="the clock is -3600 s off the RTC")
    assert "# the clock is -3600 s off the RTC" in run.text()


def test_the_sample_waits_until_the_clock_agrees_with_the_rtc() -> None:
    readings = iter([-86400.0, -86400.0, 0.4])  # restored, not yet stepped, stepped
    assert d.wait_for_clock(lambda: next(readings), wait_s=5) is None
    assert next(readings, "used up") == "used up"


def test_a_clock_that_stays_off_or_no_rtc_is_reported() -> None:
    assert "+7200 s off" in (d.wait_for_clock(lambda: 7200.0, wait_s=0) or "")
    assert "no readable RTC" in (d.wait_for_clock(lambda: None, wait_s=5) or "")


def test_clock_skew_reads_the_rtc_file(tmp_path: Path) -> None:
    import time
    rtc = tmp_path / "since_epoch"
    rtc.write_text(f"{int(time.time()) - 100}\n")
    assert 99 <= (d.clock_skew(str(rtc)) or 0) <= 200
    assert d.clock_skew(str(tmp_path / "missing")) is None


def test_a_bad_manifest_gives_medium_error_done(tmp_path: Path) -> None:
    run = _Run(tmp_path)
    (run.medium / "manifest.json").write_text('{"format": 7}')
    _, events = run.go()
    assert [e["event"] for e in events] == ["medium", "error", "done"]
    assert events[0]["files"] == [{"name": "manifest.json", "size": 13}]


def test_a_manifest_naming_a_missing_sample_gives_an_error(tmp_path: Path) -> None:
    run = _Run(tmp_path)
    (run.medium / "manifest.json").write_bytes(_manifest(sample="gone"))
    _, events = run.go()
    assert [e["event"] for e in events] == ["medium", "error", "done"]
    assert "gone" in events[1]["message"]


def _sample(run: _Run, script: str, **meta: object) -> None:
    sample = run.medium / "s.sh"
    sample.write_text(script)
    sample.chmod(0o755)
    (run.medium / "manifest.json").write_text(json.dumps(
        {**manifest("s.sh"), "user": "root", "timeout_s": 30, **meta}))


@needs_strace
def test_real_strace_run_copies_lines_that_the_host_parser_reads(tmp_path: Path) -> None:
    run = _Run(tmp_path)
    _sample(run, f'#!/bin/sh\necho x > "{run.medium}/written"\nls /nonexistent\nexit 4\n',
            args=["one"])
    result, events = run.go()
    assert [e["event"] for e in events] == ["medium", "start", "exit", "done"]
    assert result is not None and (result.code, result.signal) == (4, None)
    assert events[1]["argv"] == [str(run.medium / "s.sh"), "one"]
    assert events[2]["code"] == 4
    parsed = parse_monitor_log(run.port.read_bytes())
    assert parsed.complete and parsed.garbage_lines == 0, parsed.garbage_samples
    assert parsed.strace_lines > 5
    assert f'execve("{run.medium}/s.sh"' in run.text()


@needs_strace
def test_a_sample_that_cannot_be_executed_shows_the_failed_execve(tmp_path: Path) -> None:
    run = _Run(tmp_path)
    (run.medium / "s.sh").write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\x02\x00\xb7\x00")
    (run.medium / "s.sh").chmod(0o755)  # an aarch64 ELF header: not for this machine
    (run.medium / "manifest.json").write_text(json.dumps(
        {**manifest("s.sh"), "user": "root", "timeout_s": 30}))
    result, events = run.go()
    assert [e["event"] for e in events] == ["medium", "start", "exit", "done"]
    assert result is not None and result.code not in (0, None)
    assert "ENOEXEC" in run.text()
    (run.medium / "s.sh").chmod(0o644)


@needs_strace
def test_a_sample_that_sleeps_is_killed_at_the_timeout(tmp_path: Path) -> None:
    run = _Run(tmp_path)
    _sample(run, "#!/bin/sh\nsleep 600 &\nsleep 600\n", timeout_s=1.5)
    result, events = run.go()
    assert [e["event"] for e in events] == ["medium", "start", "timeout", "exit", "done"]
    assert events[2]["after_s"] >= 1.5
    assert events[3]["signal"] == "SIGKILL"
    assert result is not None and result.timed_out  # (no cgroup here: strace was killed too)


@needs_strace
def test_a_sample_that_kills_strace_is_reported_as_monitor_died(tmp_path: Path) -> None:
    run = _Run(tmp_path)
    _sample(run, "#!/bin/sh\nkill -9 $PPID\nsleep 600\n", timeout_s=3)
    result, events = run.go()
    names = [e["event"] for e in events]
    assert names[:3] == ["medium", "start", "monitor_died"]
    assert events[2]["signal"] == "SIGKILL"
    assert names[-2:] == ["timeout", "done"]
    assert result is not None and result.monitor_died and result.timed_out


@needs_strace
def test_a_sample_that_kills_strace_and_ends_is_still_monitor_died(tmp_path: Path) -> None:
    # nothing of the sample is left when strace is found dead: only the log shows that
    # strace never wrote how the sample's process ended
    run = _Run(tmp_path)
    _sample(run, "#!/bin/sh\nkill -9 $PPID\n", timeout_s=30)
    result, events = run.go()
    assert [e["event"] for e in events] == ["medium", "start", "monitor_died", "exit", "done"]
    assert result is not None and result.monitor_died and not result.timed_out
    assert "kill(" in run.text()  # the unfinished last line is in the log too


@pytest.mark.parametrize(("lines", "missing"), [
    ([], False),  # strace traced nothing (it could not start the sample)
    ([b"7  10:00:00.1 execve(...) = 0", b"7  10:00:00.2 +++ exited with 0 +++"], False),
    ([b"7  10:00:00.1 execve(...) = 0", b"7  10:00:00.2 +++ killed by SIGKILL +++"], False),
    ([b"7  10:00:00.1 execve(...) = 0", b"8  10:00:00.2 +++ exited with 0 +++"], True),
    ([b"7  10:00:00.1 execve(...) = 0", b"7  10:00:00.2 kill(6, SIGKILL"], True),
    ([b"7  10:00:00.1 execve(...) = 0", b"7  10:00:00.2 write(1, \"+++ exited with 0 +++\""],
     True),
    ([b"strace: garbage", b"7  10:00:00.2 +++ exited with 0 +++"], False),
])
def test_a_missing_end_of_the_sample_process_is_noticed(lines: list[bytes],
                                                        missing: bool) -> None:
    result = d.RunResult()
    for line in lines:
        d.note_traced_end(line, result)
    assert result.end_missing is missing


def test_the_medium_builder_writes_a_rock_ridge_iso(tmp_path: Path) -> None:
    pycdlib = pytest.importorskip("pycdlib")
    sample = tmp_path / "evil name.sh"
    sample.write_text("#!/bin/sh\n")
    iso = build_sample_medium(sample, manifest("evil name.sh", timeout_s=5), tmp_path / "m.iso")
    reader = pycdlib.PyCdlib()
    reader.open(str(iso))
    try:
        names = {c.rock_ridge.name().decode() for c in reader.list_children(rr_path="/")
                 if c.rock_ridge is not None and not c.is_dot() and not c.is_dotdot()}
        assert names == {"manifest.json", "evil name.sh"}
        record = reader.get_record(rr_path="/evil name.sh")
        assert record.rock_ridge.get_file_mode() & 0o111
        import io

        out = io.BytesIO()
        reader.get_file_from_iso_fp(out, rr_path="/manifest.json")
    finally:
        reader.close()
    assert d.parse_manifest(out.getvalue()) == d.Manifest("evil name.sh", (), "analyst", 5, 256)
