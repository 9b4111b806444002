"""The analysis report: one JSON document (schema version 1) and its HTML page.

:func:`build_report` combines what a detonation left behind — the sample, the monitor
log, the serial console log, the capture, the disk diff, the files the sample dropped,
YARA — into the dict ``docs/analysis-report.md`` specifies; :func:`write_report` writes
it as ``report.json`` and ``report.html``. Building never raises because of an input's
content or absence: what could not be read becomes a line in ``notes``.

Usage::

    report = build_report(ReportInputs(analysis_id="a1", sample=Path("a.out"),
                                       monitor_log=result / "monitor.log",
                                       serial_log=result / "serial.log",
                                       capture=result / "net.pcapng",
                                       disk_diff=diff.to_json()))
    write_report(report, result)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from secvf.analysis import monitor_log as _monitor
from secvf.analysis.network_summary import summarize_capture
from secvf.analysis.yara_scan import scan as yara_scan

__all__ = ["ReportInputs", "build_report", "write_report", "describe_sample",
           "read_serial_log", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
MAX_SERIAL_BYTES = 8 << 20  # serial console bytes read
MAX_PANIC_LINES = 20
MAX_ZIP_MEMBERS = 1000  # dropped zip entries listed, in all
MAX_ZIP_ARCHIVES = 50  # dropped zips opened
MAX_NAME_CHARS = 1024  # the sample's name as shown
FILE_TIMEOUT_S = 10
HASH_CHUNK_BYTES = 1 << 20
GUEST_ARCH = "x86-64"

ELF_MACHINES = {2: "sparc", 3: "i386", 8: "mips", 20: "powerpc", 21: "powerpc64", 22: "s390",
                40: "arm", 43: "sparcv9", 50: "ia64", 62: "x86-64", 183: "aarch64",
                243: "riscv", 258: "loongarch"}
PE_MACHINES = {0x14C: "i386", 0x8664: "x86-64", 0xAA64: "aarch64", 0x1C0: "arm",
               0x1C4: "arm", 0x200: "ia64", 0xEBC: "efi-bytecode"}

_PANIC = re.compile(r"Kernel panic|kernel BUG at|Oops:|BUG: unable to handle|general protection")


@dataclass
class ReportInputs:
    """Everything a report is built from; every path may be missing or None."""

    analysis_id: str  # the detonation's id
    sample: Path | None = None  # the sample on the host
    sample_name: str | None = None  # its name as the user gave it (default: sample's name)
    monitor_log: Path | None = None  # the second serial port's output
    monitor_log_truncated: bool = False  # the host's reader stopped at its limit
    monitor_max_bytes: int = _monitor.DEFAULT_MAX_BYTES  # how much of it to read
    medium_path: str | None = None  # the medium's mount point in the guest, if known
    serial_log: Path | None = None  # the serial console's output
    capture: Path | None = None  # the isolated network's pcapng
    disk_diff: dict[str, Any] | None = None  # DiskDiff.to_json()
    dropped_files: Sequence[tuple[str, Path]] = ()  # (guest path, host copy) of dropped files
    yara_rules: Sequence[Path] = ()  # YARA rule files
    timeout_s: float | None = None  # the run's timeout, when the monitor log lacks it
    notes: Sequence[str] = ()  # the caller's own notes (e.g. "no capture: network none")
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the top level


def build_report(inputs: ReportInputs) -> dict[str, Any]:
    """Build the report dict (schema version 1) from ``inputs``. Never raises on input
    content; unreadable inputs become ``notes``."""
    notes: list[str] = list(inputs.notes)
    sample = describe_sample(inputs.sample, inputs.sample_name, notes)
    log = _read_monitor(inputs, notes)
    mon = log.to_json()
    run: dict[str, Any] = mon["run"]
    if run["timeout_s"] is None:
        run["timeout_s"] = inputs.timeout_s
    serial = read_serial_log(inputs.serial_log, notes)
    run["kernel_panic"] = serial["kernel_panic"]
    network = _network(inputs.capture, notes)
    diff = _disk_diff(inputs.disk_diff, notes)
    targets: list[tuple[str, Path]] = []
    if inputs.sample is not None and sample["size"] is not None:
        targets.append(("sample", inputs.sample))
    targets.extend(inputs.dropped_files)
    yara = yara_scan(list(inputs.yara_rules), targets)
    if yara["note"] and yara["enabled"]:
        notes.append(f"YARA: {yara['note']}")
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "analysis_id": str(inputs.analysis_id),
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "sample": sample,
        "run": run,
        "processes": mon["processes"],
        "process_count": mon["process_count"],
        "timeline": mon["timeline"],
        "timeline_truncated": mon["timeline_truncated"],
        "files": mon["files"],
        "network_syscalls": mon["network_syscalls"],
        "network": network,
        "disk_diff": diff,
        "dropped_zip": _zip_members(inputs.dropped_files, notes),
        "yara": yara,
        "monitor": mon["monitor"],
        "serial": serial,
        "notes": notes,
    }
    _monitor_notes(report, notes)
    report.update({k: v for k, v in inputs.extra.items() if k not in report})
    return report


def write_report(report: dict[str, Any], result_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` (sorted keys, indent 2) and ``report.html`` into
    ``result_dir``, each atomically. Returns their paths.

    Raises:
        OSError: the directory cannot be written.
    """
    from secvf.analysis.report_html import render_html

    result_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = result_dir / "report.json", result_dir / "report.html"
    text = json.dumps(report, sort_keys=True, indent=2, ensure_ascii=False,
                      allow_nan=False, default=str) + "\n"
    _atomic_write(json_path, text)
    _atomic_write(html_path, render_html(report))
    return json_path, html_path


# -- sample ------------------------------------------------------------------------


def describe_sample(path: Path | None, name: str | None,
                    notes: list[str] | None = None) -> dict[str, Any]:
    """The report's ``sample`` section: name, size, hashes, file type, architecture."""
    notes = notes if notes is not None else []
    shown = (name if name is not None else (path.name if path is not None else ""))
    out: dict[str, Any] = {"name": shown[:MAX_NAME_CHARS], "size": None, "sha256": None,
                           "sha1": None, "md5": None, "file_type": "unknown",
                           "file_type_source": "magic", "format": "other",
                           "architecture": None, "runnable_here": None,
                           "architecture_note": None}
    if path is None:
        notes.append("no sample file given")
        return out
    try:
        head, size, digests = _hash_file(path)
    except OSError as exc:
        notes.append(f"sample {path.name} could not be read: {exc.strerror or exc}")
        return out
    out.update(size=size, **digests)
    sniffed = sniff(head)
    out.update(sniffed)
    described = _file_brief(path)
    if described:
        out["file_type"], out["file_type_source"] = described, "file"
    return out


def sniff(head: bytes) -> dict[str, Any]:
    """File type from the first bytes: ``file_type``, ``format``, ``architecture``,
    ``runnable_here``, ``architecture_note``."""
    out: dict[str, Any] = {"file_type": "data", "format": "other", "architecture": None,
                           "runnable_here": None, "architecture_note": None}
    if head[:4] == b"\x7fELF" and len(head) >= 20:
        order: Literal["little", "big"] = "little" if head[5] != 2 else "big"
        bits = "64-bit" if head[4] == 2 else "32-bit"
        machine = int.from_bytes(head[18:20], order)
        arch = ELF_MACHINES.get(machine, f"machine {machine}")
        out.update(file_type=f"ELF {bits} {arch}", format="elf", architecture=arch,
                   runnable_here=arch == GUEST_ARCH)
        if arch != GUEST_ARCH:
            out["architecture_note"] = f"not for this architecture: ELF for {arch}"
    elif head[:2] == b"MZ":
        out.update(file_type="MS-DOS executable", format="pe", runnable_here=False,
                   architecture_note="not for this architecture: Windows PE")
        off = int.from_bytes(head[0x3C:0x40], "little") if len(head) >= 0x40 else 0
        if 0 < off <= len(head) - 26 and head[off:off + 4] == b"PE\0\0":
            machine = int.from_bytes(head[off + 4:off + 6], "little")
            magic = int.from_bytes(head[off + 24:off + 26], "little")
            arch = PE_MACHINES.get(machine, f"machine 0x{machine:x}")
            kind = "PE32+ executable" if magic == 0x20B else "PE32 executable"
            out.update(file_type=f"{kind} ({arch})", architecture=arch)
    elif head[:2] == b"#!":
        interp = head[2:].split(b"\n", 1)[0].strip()[:128].decode("utf-8", "replace")
        out.update(file_type=f"script ({interp})", format="script", runnable_here=True)
    elif head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        out.update(file_type="Zip archive", format="zip")
    return out


def _hash_file(path: Path) -> tuple[bytes, int, dict[str, str]]:
    sha256, sha1, md5 = hashlib.sha256(), hashlib.sha1(), hashlib.md5()
    size = 0
    head = b""
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK_BYTES):
            if not head:
                head = chunk[:4096]
            size += len(chunk)
            sha256.update(chunk)
            sha1.update(chunk)
            md5.update(chunk)
    return head, size, {"sha256": sha256.hexdigest(), "sha1": sha1.hexdigest(),
                        "md5": md5.hexdigest()}


def _file_brief(path: Path) -> str | None:
    tool = shutil.which("file")
    if tool is None:
        return None
    try:
        proc = subprocess.run([tool, "--brief", "--", str(path)], capture_output=True,
                              text=True, errors="replace", timeout=FILE_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = proc.stdout.strip()
    return text[:512] if proc.returncode == 0 and text else None


# -- the other inputs --------------------------------------------------------------


def _read_monitor(inputs: ReportInputs, notes: list[str]) -> _monitor.MonitorLog:
    if inputs.monitor_log is None:
        notes.append("no monitor log: no process tree, timeline or syscall activity")
        return _monitor.parse_monitor_log(b"")
    try:
        log = _monitor.read_monitor_log(inputs.monitor_log, max_bytes=inputs.monitor_max_bytes,
                                        medium_path=inputs.medium_path)
    except OSError as exc:
        notes.append(f"monitor log {inputs.monitor_log.name} could not be read: "
                     f"{exc.strerror or exc}")
        return _monitor.parse_monitor_log(b"")
    if inputs.monitor_log_truncated:
        log.truncated = True
    return log


def read_serial_log(path: Path | None, notes: list[str] | None = None) -> dict[str, Any]:
    """The report's ``serial`` section: line count and kernel panic / oops lines."""
    out: dict[str, Any] = {"lines": 0, "kernel_panic": False, "oops": False,
                           "panic_lines": []}
    if path is None:
        return out
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SERIAL_BYTES + 1)
    except OSError as exc:
        if notes is not None:
            notes.append(f"serial log {path.name} could not be read: {exc.strerror or exc}")
        return out
    if len(data) > MAX_SERIAL_BYTES and notes is not None:
        notes.append(f"serial log: only the first {MAX_SERIAL_BYTES} bytes were read")
    text = data[:MAX_SERIAL_BYTES].decode("utf-8", "replace")
    lines = text.splitlines()
    out["lines"] = len(lines)
    for line in lines:
        if not _PANIC.search(line):
            continue
        if "Kernel panic" in line:
            out["kernel_panic"] = True
        else:
            out["oops"] = True
        if len(out["panic_lines"]) < MAX_PANIC_LINES:
            out["panic_lines"].append(_monitor.printable_text(line[:300]))
    return out


def _network(path: Path | None, notes: list[str]) -> dict[str, Any] | None:
    if path is None:
        notes.append("no network capture")
        return None
    summary = summarize_capture(path)
    if summary["error"]:
        notes.append(f"capture: {summary['error']}")
    if summary["truncated"]:
        notes.append("capture summary truncated (packet or row limit)")
    return summary


def _disk_diff(diff: dict[str, Any] | None, notes: list[str]) -> dict[str, Any] | None:
    if diff is None:
        notes.append("no disk diff")
        return None
    if not isinstance(diff, dict):
        notes.append("disk diff is not an object; left out")
        return None
    if diff.get("truncated"):
        notes.append("disk diff truncated")
    return diff


def _zip_members(dropped: Sequence[tuple[str, Path]], notes: list[str]) -> list[dict[str, Any]]:
    members: list[dict[str, Any]] = []
    opened = 0
    for label, path in dropped:
        if len(members) >= MAX_ZIP_MEMBERS:
            notes.append(f"dropped zip listing cut at {MAX_ZIP_MEMBERS} entries")
            break
        try:
            with open(path, "rb") as fh:
                if fh.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):
                    continue
            if opened >= MAX_ZIP_ARCHIVES:
                notes.append(f"only the first {MAX_ZIP_ARCHIVES} dropped zips were listed")
                break
            opened += 1
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if len(members) >= MAX_ZIP_MEMBERS:
                        break
                    members.append({"archive": label, "name": info.filename[:MAX_NAME_CHARS],
                                    "size": info.file_size,
                                    "compressed_size": info.compress_size,
                                    "encrypted": bool(info.flag_bits & 0x1)})
        except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
            notes.append(f"dropped zip {label[:200]} could not be listed: {exc}"[:400])
    return members


def _monitor_notes(report: dict[str, Any], notes: list[str]) -> None:
    mon = report["monitor"]
    if mon["truncated"]:
        notes.append("monitor log truncated: the guest wrote more than the host keeps")
    if mon["garbage_lines"]:
        notes.append(f"monitor log: {mon['garbage_lines']} unreadable lines skipped")
    if mon["lines"] and not mon["complete"]:
        notes.append("monitor log has no 'done' event: the run may have been cut short")
    if report["timeline_truncated"]:
        notes.append(f"timeline cut at {_monitor.MAX_TIMELINE} events")
    if report["process_count"] > _monitor.MAX_PROCESSES:
        notes.append(f"process tree holds the first {_monitor.MAX_PROCESSES} processes of "
                     f"{report['process_count']}")
    if report["files"]["truncated"]:
        notes.append("file activity lists truncated")
    if report["network_syscalls"]["truncated"]:
        notes.append("network syscall lists truncated")
    if report["run"]["monitor_died"]:
        notes.append("the monitor (strace) died before the sample ended: later activity is "
                     "not traced")
    if report["run"]["pid_limit_hit"]:
        notes.append("the sample hit the pid limit")
    if report["sample"]["architecture_note"]:
        notes.append(report["sample"]["architecture_note"])


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
