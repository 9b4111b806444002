"""The CLI as an experienced user expects it, through the real CLI: whole lines in
pipes, sizes and hints that make sense, checked timeouts and files, idempotent
start/stop, JSON errors with --json, and user text never read as rich markup."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.unit.test_cli_badinput import assert_clean_error

KVM_USABLE_DEVICE = os.access("/dev/kvm", os.R_OK | os.W_OK)


def vm_names() -> list[str]:
    return [row["name"] for row in json.loads(run_cli("vm", "list", "--json", check=True).stdout)]


def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Put a ``qemu-system-x86_64`` running ``script`` first on PATH (qemu-img stays real)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    qemu = bindir / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\n" + script + "\n")
    qemu.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


# ---- 1. output to a pipe is never cut or wrapped ------------------------------------------


def test_piped_list_and_create_keep_whole_lines(iso: Path, secvf_env: Path) -> None:
    name = "malware-analysis-lab-01-" + "x" * 60
    created = run_cli("vm", "create", name, "--kind", "malware-analysis", "--iso", str(iso),
                      check=True)
    assert created.stdout.count("\n") == 1
    assert str(secvf_env / "vms" / name) in created.stdout
    vm_id = json.loads(run_cli("vm", "status", name, "--json", check=True).stdout)["id"]
    listed = run_cli("vm", "list", check=True).stdout
    assert "…" not in listed
    row = [line for line in listed.splitlines() if name in line]
    assert len(row) == 1 and vm_id in row[0] and "malware-analysis " in row[0]


# ---- 2. messages: sizes, image hints, help texts, timeouts, KVM, host size, files ---------


def test_disk_smaller_than_its_disk_image_is_told_in_units(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1G"], check=True)
    proc = run_cli("vm", "create", "v", "--disk-image", str(base), "--disk", "64M")
    assert_clean_error(proc, "--disk 64M", "(1G)", "--disk 1G or more")
    assert "1073741824" not in proc.stderr and "67108864" not in proc.stderr
    odd = tmp_path / "odd.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(odd), "1300M"], check=True)
    assert_clean_error(run_cli("vm", "create", "v", "--disk-image", str(odd), "--disk", "1G"),
                       "(1.3G); use --disk 2G or more")
    assert vm_names() == []


def test_memory_range_is_told_in_units(iso: Path) -> None:
    assert_clean_error(run_cli("vm", "create", "v", "--iso", str(iso), "--memory", "1M"),
                       "between 128M and 1T")


@pytest.mark.parametrize("command", [("vm", "create", "v"), ("sandbox", "create", "s")])
def test_unknown_image_names_no_build_hint_that_would_fail(command: tuple[str, ...]) -> None:
    proc = run_cli(*command, "--image", "nope")
    assert_clean_error(proc, "'nope'", "analysis, base, fakenet, sandbox")
    assert "image build nope" not in proc.stderr


@pytest.mark.parametrize("command", [("vm", "create"), ("sandbox", "create"), ("sandbox", "run")])
def test_share_help_shows_the_optional_mode(command: tuple[str, ...]) -> None:
    assert "HOSTDIR:GUESTPATH[:ro|:rw]" in run_cli(*command, "--help", check=True).stdout


@pytest.mark.parametrize("args", [
    ("vm", "stop", "v", "--timeout", "-1"),
    ("vm", "stop", "v", "--timeout", "nan"),
    ("vm", "stop", "v", "--timeout", "inf"),
    ("vm", "stop", "v", "--timeout", "soon"),
    ("vm", "start", "v", "--wait-ready", "0"),
    ("vm", "start", "v", "--wait-ready", "-5"),
    ("sandbox", "start", "s", "--timeout", "0"),
    ("sandbox", "start", "s", "--timeout", "-0.5"),
    ("sandbox", "run", "--rm", "--timeout", "0", "--", "true"),
    ("sandbox", "run", "--rm", "--timeout", "-1", "--", "true"),
])
def test_timeouts_that_mean_nothing_are_usage_errors(args: tuple[str, ...]) -> None:
    proc = run_cli(*args)
    # a usage error is 2, except where the exit status is a guest command's: 125 there
    assert proc.returncode == (125 if args[:2] == ("sandbox", "run") else 2), proc.stderr
    option = "--wait-ready" if "--wait-ready" in args else "--timeout"
    assert f"Invalid value for '{option}'" in proc.stderr and "seconds" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert vm_names() == []


def test_kvm_that_does_not_work_is_refused_before_qemu(iso: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run_cli("vm", "create", "t", "--iso", str(iso), "--accel", "tcg", check=True)
    fake_qemu(tmp_path, monkeypatch, "echo 'qemu-system-x86_64: error: failed to set MSR "
                                     "0x10a to 0x69' >&2; exit 1")
    for args in (("vm", "create", "k", "--iso", str(iso), "--accel", "kvm"),
                 ("vm", "start", "t", "--accel", "kvm")):
        proc = run_cli(*args)
        assert_clean_error(proc, "KVM is not usable here: ", "use --accel tcg or auto")
        assert "exit None" not in proc.stderr
    if KVM_USABLE_DEVICE:
        assert "failed to set MSR 0x10a" in proc.stderr
    assert vm_names() == ["t"]
    assert json.loads(run_cli("vm", "status", "t", "--json", check=True).stdout)["state"] == \
        "stopped"


@pytest.mark.skipif(not KVM_USABLE_DEVICE, reason="needs a /dev/kvm this user can open")
def test_kvm_whose_firmware_runs_is_accepted(iso: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # passes the boot probe (when an image is built) and the firmware-only check
    fake_qemu(tmp_path, monkeypatch, "echo SECVF-PROBE-OK")
    run_cli("vm", "create", "k", "--iso", str(iso), "--accel", "kvm", check=True)


def test_more_cpus_or_memory_than_the_host_is_a_warning(iso: Path) -> None:
    cpus = (os.cpu_count() or 1) + 1
    host_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 30
    if cpus > 64 or host_gib + 2 > 1024:
        pytest.skip("the host is bigger than any VM")
    proc = run_cli("vm", "create", "big", "--iso", str(iso), "--cpus", str(cpus),
                   "--memory", f"{host_gib + 2}G")
    assert proc.returncode == 0, proc.stderr
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("secvf: warning: ") for w in warnings)
    assert f"--cpus {cpus} " in warnings[0] and f"--memory {host_gib + 2}G " in warnings[1]
    assert proc.stdout.startswith("created generic VM big ")
    quiet = run_cli("vm", "create", "small", "--iso", str(iso), "--cpus", "1", "--memory", "256M")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_iso_and_disk_image_files_are_checked_at_create(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.iso"
    os.mkfifo(fifo)
    dangling = tmp_path / "dangling.iso"
    dangling.symlink_to(tmp_path / "gone.iso")
    for flag, what in (("--iso", "ISO"), ("--disk-image", "disk image")):
        assert_clean_error(run_cli("vm", "create", "v", flag, str(tmp_path)),
                           f"{what} {tmp_path} is a directory")
        assert_clean_error(run_cli("vm", "create", "v", flag, str(fifo)),
                           f"{what} {fifo} is not a regular file")
        assert_clean_error(run_cli("vm", "create", "v", flag, str(dangling)),
                           f"{what} {tmp_path / 'gone.iso'} does not exist")
    assert vm_names() == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_iso_is_refused_at_create(iso: Path) -> None:
    iso.chmod(stat.S_IWUSR)
    assert_clean_error(run_cli("vm", "create", "v", "--iso", str(iso)), "cannot be read")


# ---- 3. text from users and the file system is not rich markup ----------------------------


def test_brackets_in_paths_and_names_are_printed_as_they_are(
        iso: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "[plan]" / "home"
    monkeypatch.setenv("SECVF_HOME", str(home))
    created = run_cli("vm", "create", "lab", "--iso", str(iso), check=True)
    assert str(home / "vms" / "lab") in created.stdout
    odd = home / "vms" / "[bold]odd"
    odd.mkdir()
    (odd / "vm.json").write_text("{not json")
    listed = run_cli("vm", "list", check=True).stdout
    assert "[bold]odd" in listed and str(odd / "vm.json") in listed


def test_emoji_codes_in_names_and_paths_are_printed_as_they_are(
        iso: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refused = run_cli("vm", "status", ":thumbs_up:")
    assert refused.returncode == 1 and "VM name ':thumbs_up:' may" in refused.stderr
    home = tmp_path / ":smile:" / "home"
    monkeypatch.setenv("SECVF_HOME", str(home))
    run_cli("vm", "create", "lab", "--iso", str(iso), check=True)
    odd = home / "vms" / ":fire:odd"
    odd.mkdir()
    (odd / "vm.json").write_text("{not json")
    listed = run_cli("vm", "list", check=True).stdout  # a rich table
    assert ":fire:odd" in listed and str(odd / "vm.json") in listed


def test_audit_keeps_the_plan_and_live_labels(iso: Path) -> None:
    run_cli("vm", "create", "lab", "--iso", str(iso), check=True)
    row = [line for line in run_cli("audit", check=True).stdout.splitlines() if "lab" in line]
    assert len(row) == 1 and "- [plan]" in row[0]


# ---- 4. start and stop are idempotent -------------------------------------------------------


def test_start_of_running_and_stop_of_stopped_vm_succeed_with_a_note(iso: Path) -> None:
    run_cli("vm", "create", "life", "--iso", str(iso), "--memory", "256M", "--accel", "tcg",
            check=True)
    for args in (("vm", "stop", "life"), ("vm", "stop", "life", "--timeout", "0"),
                 ("sandbox", "stop", "life")):
        proc = run_cli(*args)
        assert proc.returncode == 0 and proc.stdout == ""
        assert proc.stderr == "secvf: note: " + (
            "sandbox 'life'" if args[0] == "sandbox" else "VM 'life'") + " is not running\n"
    stopped = run_cli("vm", "stop", "life", "--json", check=True)
    assert json.loads(stopped.stdout)["state"] == "stopped"
    try:
        run_cli("vm", "start", "life", check=True)
        again = run_cli("vm", "start", "life")
        assert again.returncode == 0 and again.stdout == ""
        assert again.stderr == "secvf: note: VM 'life' is already running\n"
        status = run_cli("vm", "start", "life", "--json", check=True)
        assert json.loads(status.stdout)["state"] == "running"
        assert "already running" in status.stderr
    finally:
        run_cli("vm", "stop", "life", "--timeout", "0", check=True)
    assert json.loads(run_cli("vm", "status", "life", "--json").stdout)["state"] == "stopped"
    assert_clean_error(run_cli("vm", "delete", "ghost"), "no VM named 'ghost'")


# ---- 5. with --json, errors are JSON too ----------------------------------------------------


@pytest.mark.parametrize(("args", "error_type", "code"), [
    (("vm", "status", "ghost"), "NotFound", 1),
    (("vm", "start", "ghost"), "NotFound", 1),
    (("vm", "stop", "ghost"), "NotFound", 1),
    (("vm", "create", "a;b"), "InvalidName", 1),
    (("vm", "exec", "ghost"), "NotFound", 125),  # every secvf-side error of exec: 125
    (("vm", "exec", "idle"), "NoExecChannel", 125),
    (("image", "build", "nope"), "NotFound", 1),
    (("sandbox", "start", "ghost"), "NotFound", 1),
])
def test_json_errors_are_json_with_the_same_exit_code(
        iso: Path, args: tuple[str, ...], error_type: str, code: int) -> None:
    run_cli("vm", "create", "idle", "--iso", str(iso), check=True)
    plain = run_cli(*args, "--", "true") if args[1] == "exec" else run_cli(*args)
    assert plain.returncode == code and plain.stdout == ""
    proc = (run_cli(*args, "--json", "--", "true") if args[1] == "exec"
            else run_cli(*args, "--json"))
    assert proc.returncode == code
    assert proc.stderr == plain.stderr and proc.stderr.startswith("secvf: error: ")
    error = json.loads(proc.stdout)["error"]
    assert error == {"type": error_type, "message": plain.stderr[len("secvf: error: "):-1],
                     "exit_code": code}


# ---- 6. the longest names ---------------------------------------------------------------------


def test_255_byte_names_create_and_clone_and_256_is_a_name_error(iso: Path) -> None:
    longest, clone = "a" * 255, "b" * 255
    run_cli("vm", "create", longest, "--iso", str(iso), check=True)
    run_cli("vm", "clone", longest, clone, check=True)
    assert sorted(vm_names()) == [longest, clone]
    status = json.loads(run_cli("vm", "status", clone, "--json", check=True).stdout)
    assert status["name"] == clone and status["state"] == "stopped"
    assert_clean_error(run_cli("vm", "clone", longest, "c" * 256), "name", "255 bytes")
    assert_clean_error(run_cli("vm", "create", "c" * 256, "--iso", str(iso)), "name",
                       "255 bytes")
    assert sorted(vm_names()) == [longest, clone]
