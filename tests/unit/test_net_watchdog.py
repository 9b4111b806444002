"""The watchdog keeps the switch alive while ports remain, cleans stale ports, and leaves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from secvf.net import launcher
from secvf.net.frame import BROADCAST
from secvf.net.watchdog import describe_exit
from tests.unit.net_helpers import eth, live_network, mac_bytes, port_object, wait_until


def test_a_killed_switch_is_restarted_and_peers_talk_again() -> None:
    with live_network() as net:
        a, b = net.add(1), net.add(2)
        old = net.query("ping")["pid"]
        os.kill(old, signal.SIGKILL)

        def delivered() -> bool:
            a.send(eth(BROADCAST, mac_bytes(1)))
            return b.recv(0.05) is not None

        wait_until(delivered, timeout=5, what="frames through the new switch")
        assert net.query("ping")["pid"] != old
        restarted = net.events("switch_restarted")
        assert len(restarted) == 1 and restarted[0]["signal"] == 9
        assert restarted[0]["severity"] == "WARNING" and "SIGKILL" in restarted[0]["status"]


def test_the_watchdog_stops_after_the_last_port_is_released() -> None:
    with live_network() as net:
        net.add(1)
        net.remove(1)
        assert launcher.watchdog_running(net.paths)  # a grace period, not at once
        wait_until(lambda: not launcher.watchdog_running(net.paths), 6, "watchdog exit")
        assert not net.paths.control.exists()
        assert [e["event"] for e in net.events()][-1] == "switch_stopped"
        net.add(2)  # a new port starts a new watchdog
        assert launcher.watchdog_running(net.paths) and net.query("ping")["ok"]


def test_a_port_whose_supervisor_died_is_removed() -> None:
    with live_network() as net:
        keep = net.add(1)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
        stale = port_object(net.paths, 2, pid=int(dead.stdout))
        launcher.write_port(net.netdir, stale)
        wait_until(lambda: not net.paths.port_file(stale["port"]).exists(), 5, "stale removed")
        wait_until(lambda: len(net.query("stats")["ports"]) == 1, 5, "switch reloaded")
        assert keep.port["port"] == net.query("stats")["ports"][0]["port"]
        assert "supervisor pid" in net.paths.log.read_text()


def test_sigterm_stops_watchdog_and_switch() -> None:
    with live_network() as net:
        net.add(1)
        switch = net.query("ping")["pid"]
        pid = net.watchdog_pid()
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not launcher.watchdog_running(net.paths), 5, "watchdog exit")
        wait_until(lambda: not os.path.exists(f"/proc/{switch}"), 5, "switch exit")
        assert net.events("switch_stopped")[-1]["reason"] == "signal"


def test_exit_descriptions() -> None:
    assert describe_exit(-9)["status"] == "killed by signal 9 (SIGKILL)"
    assert describe_exit(3) == {"status": "exited with status 3", "exit_code": 3}
