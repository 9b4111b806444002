"""``secvf analyze`` end to end: real samples (shell and Python scripts written here, no
real malware) detonated in malware-analysis VMs restored from clean states, with the
fake-internet gateway; the reports, captures and disk diffs are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.vm

SECVF = os.path.join(os.path.dirname(sys.executable), "secvf")

BEHAVIOUR = """#!/usr/bin/python3
import os, socket, subprocess, urllib.request
home = os.path.expanduser("~")
with open(os.path.join(home, "marker.txt"), "w") as fh:
    fh.write("first analysis was here\\n")
with open(os.path.join(home, "dropped.bin"), "wb") as fh:
    fh.write(b"\\x7fELF-not-really" * 64)
os.chmod(os.path.join(home, "dropped.bin"), 0o755)
with open(os.path.join(home, "gone.txt"), "w") as fh:
    fh.write("short-lived")
os.unlink(os.path.join(home, "gone.txt"))
subprocess.run(["/bin/sh", "-c", "echo child; sleep 0.1"], check=False)
try:
    open("/media/sample/overwrite", "w")
except OSError as exc:
    print("medium write refused:", exc)
print("channels:", [p for p in ("/dev/vsock", "/dev/virtio-ports", "/dev/vhost-vsock")
                    if os.path.exists(p)])
print("resolved", socket.gethostbyname("c2.secvf-test.example"))
body = urllib.request.urlopen("http://c2.secvf-test.example/beacon?id=42", timeout=10).read()
print("fetched", len(body))
"""

CHECK_CLEAN = """#!/bin/sh
test ! -e "$HOME/marker.txt" && echo clean
"""


def sample(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def analyze(*args: str, timeout: float = 600) -> list[dict]:
    result = subprocess.run([SECVF, "analyze", "--json", *args], capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def report_of(result: dict) -> dict:
    return json.loads((Path(result["directory"]) / "report.json").read_text())


@pytest.fixture(scope="module")
def behaviour(analysis_images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("samples")
    rules = tmp / "rules.yar"
    rules.write_text('rule dropped_marker { strings: $a = "ELF-not-really" condition: $a }\n')
    (result,) = analyze(str(sample(tmp, "behave.py", BEHAVIOUR)), "--timeout", "60",
                        "--yara", str(rules))
    assert result["verdict"] == "finished", result
    yield result


def test_the_report_lists_dns_http_files_children_and_the_medium_write(behaviour: dict) -> None:
    report = report_of(behaviour)
    names = {q["name"] for q in report["network"]["dns"]}
    assert "c2.secvf-test.example" in names, report["network"]["dns"]
    http = [(h["host"], h["path"]) for h in report["network"]["http"]]
    assert ("c2.secvf-test.example", "/beacon?id=42") in http, http
    created = {f["path"]: f for f in report["disk_diff"]["created"]}
    marker = created["/home/analyst/marker.txt"]
    assert marker["sha256"] and marker["size"] == len("first analysis was here\n")
    assert "/home/analyst/gone.txt" not in created  # created and deleted within the run
    assert any(p["argv"] and p["argv"][0].endswith("sh") for p in _walk(report["processes"]))
    assert report["run"]["medium_write_attempts"], report["run"]
    monitor = (Path(behaviour["directory"]) / "monitor.log").read_text(errors="replace")
    looks = [line for line in monitor.splitlines()
             if '"/dev/vsock"' in line or '"/dev/virtio-ports"' in line]
    assert looks and all("ENOENT" in line for line in looks), looks  # no channel inside


def test_dropped_files_are_in_the_infected_zip_not_executable_on_the_host(
        behaviour: dict) -> None:
    directory = Path(behaviour["directory"])
    with zipfile.ZipFile(directory / "dropped.zip") as archive:
        names = archive.namelist()
        member = next(n for n in names if n.endswith("dropped.bin"))
        assert archive.read(member, pwd=b"infected") == b"\x7fELF-not-really" * 64
        with pytest.raises(RuntimeError):
            archive.read(member, pwd=b"wrong")
        assert (archive.getinfo(member).external_attr >> 16) & 0o111 == 0
    for path in directory.rglob("*"):
        assert not (path.is_file() and path.stat().st_mode & 0o111), path
    assert not list(directory.glob("work-*"))  # the staged copies went with the work dir


def test_yara_scans_the_dropped_files(behaviour: dict) -> None:
    yara = report_of(behaviour)["yara"]
    assert yara["enabled"], yara
    targets = {(m["target"], m["rule"]) for m in yara["matches"]}
    assert ("/home/analyst/dropped.bin", "dropped_marker") in targets, yara["matches"]
    assert ("sample", "dropped_marker") in targets  # the sample holds the string too


def test_the_capture_holds_the_dns_query(behaviour: dict) -> None:
    capture = Path(behaviour["directory"]) / "capture.pcapng"
    shown = subprocess.run(["tcpdump", "-nn", "-r", str(capture)], capture_output=True,
                           text=True)
    assert shown.returncode == 0 and "c2.secvf-test.example" in shown.stdout


def test_a_second_analysis_starts_from_a_clean_state(behaviour: dict, tmp_path: Path) -> None:
    (result,) = analyze(str(sample(tmp_path, "check.sh", CHECK_CLEAN)), "--network", "none",
                        "--timeout", "30")
    report = report_of(result)
    assert report["run"]["exit_code"] == 0, report["run"]  # the marker is gone
    assert report["network"] is None  # no NIC, no capture


def test_a_fork_bomb_hits_the_pid_limit_and_the_run_still_ends(analysis_images: None,
                                                               tmp_path: Path) -> None:
    bomb = sample(tmp_path, "bomb.sh", "#!/bin/sh\nb() { b | b & }; b\n")
    (result,) = analyze(str(bomb), "--network", "none", "--timeout", "15")
    report = report_of(result)
    assert report["run"]["pid_limit_hit"] or report["run"]["timed_out"], report["run"]
    assert result["verdict"] in ("finished", "timeout")


def test_a_sample_that_kills_the_monitor_is_reported_as_monitor_died(analysis_images: None,
                                                             tmp_path: Path) -> None:
    killer = sample(tmp_path, "killer.sh", "#!/bin/sh\nkill -9 $PPID; sleep 300\n")
    (result,) = analyze(str(killer), "--network", "none", "--timeout", "10", "--user", "root")
    run = report_of(result)["run"]
    assert run["monitor_died"], run  # whether or not the sample outlived strace
    assert run["outcome"] in ("timeout", "killed"), run


def test_two_jobs_run_at_once_on_separate_networks(analysis_images: None,
                                                   tmp_path: Path) -> None:
    quick = [sample(tmp_path, f"q{i}.sh", "#!/bin/sh\nhostname\n") for i in range(2)]
    results = analyze(*map(str, quick), "--jobs", "2", "--timeout", "20")
    assert [r["verdict"] for r in results] == ["finished", "finished"], results
    assert len({r["id"] for r in results}) == 2
    nets = json.loads(run_cli("net", "list", "--json", check=True).stdout)
    assert not [n for n in nets if n["name"].startswith("an-")]  # reverted


def test_bad_samples_are_refused_before_anything_starts(analysis_images: None,
                                                        tmp_path: Path) -> None:
    result = run_cli("analyze", str(tmp_path / "missing"))
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = run_cli("analyze", str(tmp_path))
    assert result.returncode == 1 and "not a regular file" in result.stderr


def _walk(processes: list[dict]) -> Iterator[dict]:
    for process in processes:
        yield process
        yield from _walk(process.get("children") or [])


def test_a_sample_that_cannot_run_here_is_reported(analysis_images: None,
                                                   tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\xb7\x00" + bytes(64))
    blob.chmod(0o755)  # an aarch64 ELF header: not for this guest
    (result,) = analyze(str(blob), "--network", "none", "--timeout", "15")
    report = report_of(result)
    assert report["sample"]["runnable_here"] is False, report["sample"]
    assert report["run"]["exit_code"] not in (0, None), report["run"]
    failed = [e for e in report["timeline"] if e["kind"] == "execve" and not e["ok"]]
    assert failed, report["timeline"][:10]


def test_a_serial_flood_is_cut_on_the_host_and_the_run_still_ends(analysis_images: None,
                                                                 tmp_path: Path) -> None:
    from secvf.runtime.logcap import CUT_MARK

    flood = sample(tmp_path, "flood.sh",
                   "#!/bin/sh\nhead -c 20000000 /dev/zero | tr '\\0' A > /dev/ttyS0\n")
    (result,) = analyze(str(flood), "--network", "none", "--timeout", "15", "--user", "root",
                        "--log-limit", "256K")
    assert result["verdict"] == "finished", result  # the done event came on the monitor port
    data = (Path(result["directory"]) / "serial.log").read_bytes()
    assert CUT_MARK in data[-4096:]
    assert len(data) < (256 << 10) + (2 << 20)  # the limit plus what one check let through
    assert any(n.startswith("serial.log: the guest wrote more than the VM's log limit")
               for n in report_of(result)["notes"])


def test_a_memory_dump_is_an_elf_core_of_guest_ram(analysis_images: None,
                                                    tmp_path: Path) -> None:
    import struct

    holder = sample(tmp_path, "hold.sh", "#!/bin/sh\nsleep 1\n")
    (result,) = analyze(str(holder), "--network", "none", "--timeout", "10", "--memory-dump")
    report = report_of(result)
    dump = Path(result["directory"]) / "memory.elf"
    assert report["memory_dump"]["file"] == "memory.elf", report.get("memory_dump")
    assert dump.stat().st_mode & 0o777 == 0o600
    assert report["memory_dump"]["bytes"] == dump.stat().st_size
    with dump.open("rb") as fh:
        header = fh.read(64)
        assert header[:4] == b"\x7fELF" and struct.unpack_from("<H", header, 16)[0] == 4
        phoff, = struct.unpack_from("<Q", header, 32)
        phnum, = struct.unpack_from("<H", header, 56)
        fh.seek(phoff)
        loads = 0
        for _ in range(phnum):
            kind, _flags, _off, _va, _pa, filesz = struct.unpack("<IIQQQQ", fh.read(56)[:40])
            loads += filesz if kind == 1 else 0
    assert loads >= 500 << 20  # the analysis guest has 512 MiB of RAM
    import mmap
    with dump.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mem:
        assert mem.find(b"Linux version ") >= 0  # the guest kernel's banner is in its RAM
    assert "memory_dump" in report["stages_s"]


def test_a_kernel_panic_ends_the_analysis_and_the_report_says_so(analysis_images: None,
                                                                 tmp_path: Path) -> None:
    panic = sample(tmp_path, "panic.sh", "#!/bin/sh\necho c > /proc/sysrq-trigger\n")
    (result,) = analyze(str(panic), "--network", "none", "--timeout", "30", "--user", "root",
                        "--memory-dump")
    report = report_of(result)
    assert result["verdict"] == "guest-stopped", result
    assert report["run"]["kernel_panic"] is True, report["serial"]
    assert any("the guest stopped before the detonator finished" in n
               for n in report["notes"]), report["notes"]
    assert report["memory_dump"] is None
    assert "no memory dump: the guest had already stopped" in report["notes"]


def test_a_sample_that_fills_the_guest_disk_is_diffed_and_the_host_keeps_little(
        analysis_images: None, tmp_path: Path) -> None:
    filler = sample(tmp_path, "fill.sh", """#!/bin/sh
avail=$(df --output=avail -B1 / | tail -n 1)
fallocate -l "$avail" /var/tmp/fill  # ENOSPC near the end: the file takes what is left
if dd if=/dev/zero of=/var/tmp/more bs=1M count=64 2>/dev/null; then exit 4; fi
exit 0
""")
    (result,) = analyze(str(filler), "--network", "none", "--timeout", "30")
    report = report_of(result)
    assert result["verdict"] == "finished", result
    assert report["run"]["exit_code"] == 0, report["run"]  # full: dd could not write
    created = {c["path"]: c for c in report["disk_diff"]["created"]}
    assert created["/var/tmp/fill"]["size"] > 1 << 30, created.get("/var/tmp/fill")
    skipped = {s["path"] for s in report["disk_diff"]["dropped_zip"]["skipped"]}
    assert "/var/tmp/fill" in skipped  # too big for the zip: listed, not extracted
    kept = sum(f.stat().st_size for f in Path(result["directory"]).rglob("*") if f.is_file())
    assert kept < 32 << 20, kept  # the result holds a report, not the guest's disk


def test_a_network_flood_is_bounded_in_the_capture(analysis_images: None,
                                                   tmp_path: Path) -> None:
    flooder = sample(tmp_path, "flood.py", """#!/usr/bin/python3
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end, sent = time.monotonic() + 8, 0
while time.monotonic() < end:
    try:
        s.sendto(b"F" * 1400, ("10.13.37.1", 9)); sent += 1
    except OSError:
        pass
print("sent", sent)
""")
    (result,) = analyze(str(flooder), "--timeout", "20", "--capture-limit", "1M")
    report = report_of(result)
    assert result["verdict"] == "finished", result
    capture = Path(result["directory"]) / "capture.pcapng"
    assert capture.stat().st_size <= (1 << 20) + (64 << 10)
    assert any(n.startswith("the capture stopped at 1048576 bytes") for n in report["notes"])


def _analyze_until_running(sample_path: Path) -> subprocess.Popen[str]:
    """``secvf analyze`` started in the background, returned once its sample runs."""
    proc = subprocess.Popen([SECVF, "analyze", str(sample_path), "--network", "fakenet",
                             "--timeout", "120"], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if " running (timeout" in line:
            return proc
    raise AssertionError(f"secvf analyze ended before its sample ran: {proc.wait()}")


def _nothing_left(analysis_id: str) -> None:
    vms = json.loads(run_cli("vm", "list", "--json", check=True).stdout)
    assert not [v for v in vms if v["name"].startswith(f"an-{analysis_id}")], vms
    nets = json.loads(run_cli("net", "list", "--json", check=True).stdout)
    assert not [n for n in nets if n["name"] == f"an-{analysis_id}"], nets
    (listed,) = [a for a in json.loads(run_cli("analyses", "list", "--json",
                                               check=True).stdout) if a["id"] == analysis_id]
    assert listed["verdict"] == "interrupted", listed
    assert not list((Path(os.environ["SECVF_HOME"]) / "analyses" / analysis_id).glob("work-*"))


def _newest_analysis() -> str:
    listed = json.loads(run_cli("analyses", "list", "--json", check=True).stdout)
    return max(listed, key=lambda a: a["started_at"] or "")["id"]


def test_ctrl_c_reverts_the_running_analysis(analysis_images: None, tmp_path: Path) -> None:
    import signal

    proc = _analyze_until_running(sample(tmp_path, "slow.sh", "#!/bin/sh\nsleep 100\n"))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: the running analyses were stopped" in err
    _nothing_left(_newest_analysis())


def test_a_killed_analyze_leaves_nothing_after_the_next_command(analysis_images: None,
                                                                tmp_path: Path) -> None:
    proc = _analyze_until_running(sample(tmp_path, "slow.sh", "#!/bin/sh\nsleep 100\n"))
    proc.kill()  # SIGKILL: no clean-up of its own
    proc.wait(timeout=30)
    analysis_id = _newest_analysis()  # the next command sweeps what it left
    _nothing_left(analysis_id)
