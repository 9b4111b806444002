"""The launcher's files, checks and sysctl, and the package's standard-library promise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import secvf.net
from secvf.net import launcher
from secvf.net.config import ConfigError, NetPaths
from secvf.net.control import SwitchUnavailable, query
from tests.unit.net_helpers import port_object, read_json, switch_config, wait_until

MODULES = ["capture", "config", "control", "engine", "events", "frame", "launcher", "pcapng",
           "ratelimit", "switch", "taps", "watchdog"]


def test_atomic_write_makes_a_private_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    launcher.atomic_write_json(target, {"a": 1})
    launcher.atomic_write_json(target, {"a": 2})
    assert read_json(target) == {"a": 2} and os.stat(target).st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_prepare_makes_private_directories(tmp_path: Path) -> None:
    paths = launcher.prepare(tmp_path / "n")
    assert all(os.stat(d).st_mode & 0o7777 == 0o700 for d in (paths.root, paths.ports))
    # jailed QEMUs (each its own uid) bind there; sticky, not listable
    assert os.stat(paths.sockets).st_mode & 0o7777 == 0o1733


def test_bad_configs_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    netdir = tmp_path / "n"
    with pytest.raises(ConfigError, match="min_frame"):
        launcher.ensure_switch(netdir, switch_config(tmp_path, min_frame=5))
    with pytest.raises(ConfigError, match="frames_per_s"):
        launcher.ensure_switch(netdir, switch_config(tmp_path, frames_per_s=-1))
    assert not NetPaths(netdir).switch_json.exists()
    port = port_object(NetPaths(netdir), 1)
    for bad, match in (({"mac": "ff:ff:ff:ff:ff:ff"}, "group"), ({"port": "../x"}, "8 hex"),
                       ({"qemu_path": "/etc/passwd"}, "qemu_path"), ({"pid": 0}, "pid")):
        with pytest.raises(ConfigError, match=match):
            launcher.write_port(netdir, port | bad)


def test_a_port_written_before_ensure_switch_waits_for_it(tmp_path: Path) -> None:
    netdir = Path(tempfile.mkdtemp(prefix="svn-", dir="/tmp"))
    paths = NetPaths(netdir)
    try:
        launcher.write_port(netdir, port_object(paths, 1))  # no switch.json: nothing starts
        assert paths.port_file(port_object(paths, 1)["port"]).exists()
        assert not launcher.watchdog_running(paths)
        launcher.ensure_switch(netdir, switch_config(tmp_path))
        assert [p["vm"] for p in query(netdir, {"op": "stats"})["ports"]] == ["vm1"]
        launcher.release_port(netdir, port_object(paths, 1)["port"])
        wait_until(lambda: not launcher.watchdog_running(paths), 6, "watchdog exit")
    finally:
        shutil.rmtree(netdir, ignore_errors=True)


def test_query_without_a_switch_raises_switch_unavailable(tmp_path: Path) -> None:
    with pytest.raises(SwitchUnavailable) as info:
        query(tmp_path, {"op": "ping"})
    assert isinstance(info.value, OSError) and "no switch answers" in str(info.value)
    launcher.release_port(tmp_path, "a0000001-0")  # nothing there: no error


@pytest.mark.skipif(os.geteuid() != 0, reason="raising the sysctl needs root")
def test_dgram_qlen_is_raised_only_when_lower(tmp_path: Path) -> None:
    knob = tmp_path / "max_dgram_qlen"
    knob.write_text("10\n")
    assert launcher.raise_dgram_qlen(knob) == 512 and knob.read_text() == "512\n"
    knob.write_text("1000\n")
    assert launcher.raise_dgram_qlen(knob) == 1000 and knob.read_text() == "1000\n"
    assert launcher.raise_dgram_qlen(tmp_path / "missing") is None


def test_the_package_exports_resolve() -> None:
    for name in secvf.net.__all__:
        assert getattr(secvf.net, name) is not None


def test_the_package_loads_only_the_standard_library() -> None:
    probe = ("import sys\n" + "".join(f"import secvf.net.{m}\n" for m in MODULES)
             + "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True,
                            text=True, check=True).stdout.split()
    third_party = [m for m in loaded if m not in sys.stdlib_module_names
                   and m not in {"secvf", "__main__"} and not m.startswith("_")]
    assert third_party == []
