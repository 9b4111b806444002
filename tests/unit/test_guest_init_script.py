"""The guest init (``src/secvf/guest/init.sh``) run under dash, function by function.

Sourced by another shell, init.sh only defines its functions; each test sources it,
replaces ``say`` (which writes to /dev/console) with stderr, and calls one function.
Whatever signals "every process" runs as PID 1 of a new PID namespace
(``unshare --pid --fork --mount-proc``), so it can only reach the test's own processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import secvf

INIT = Path(secvf.__file__).parent / "guest" / "init.sh"
PRELUDE = f'. {INIT}\nsay() {{ echo "secvf-init: $*" >&2; }}\n'

needs_dash = pytest.mark.skipif(shutil.which("dash") is None, reason="needs dash")
needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a PID/mount namespace")


def dash(script: str, *, namespace: list[str] | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script`` after sourcing init.sh under dash (inside ``unshare NAMESPACE``)."""
    argv = ["dash", "-c", PRELUDE + script]
    if namespace is not None:
        argv = ["unshare", *namespace, "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


def in_pid_namespace(script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as PID 1 of a new PID namespace with its own /proc."""
    return dash(script, namespace=["--pid", "--fork", "--mount-proc"])


@needs_dash
def test_sourcing_defines_functions_and_boots_nothing() -> None:
    proc = dash('type stop_processes set_clock start_console >/dev/null && echo "$$ fine"')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("fine")


@needs_dash
@needs_namespaces
def test_stop_processes_terms_waits_then_kills_the_rest(tmp_path: Path) -> None:
    # one process cleans up on TERM, one ignores TERM; the grace is 1 s (100 cs)
    proc = in_pid_namespace(f"""
        d={tmp_path}
        dash -c 'trap "echo cleaned >$0/term-seen; exit 0" TERM; : >$0/armed1
                 while :; do sleep 0.1; done' "$d" &
        dash -c 'trap "" TERM; : >$0/armed2; while :; do sleep 0.1; done' "$d" &
        while [ ! -e "$d/armed1" ] || [ ! -e "$d/armed2" ]; do sleep 0.05; done
        stop_processes 100
        echo "returned $?"
        wait
        other_processes_left && echo "still running" || echo "none left"
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["returned 0", "none left"]
    assert (tmp_path / "term-seen").read_text() == "cleaned\n"
    assert "processes still running after 1 s: KILL" in proc.stderr  # the TERM-ignorer


@needs_dash
@needs_namespaces
def test_stop_processes_without_stragglers_kills_nothing() -> None:
    proc = in_pid_namespace("""
        sleep 300 &
        stop_processes 6000
        echo "returned $?"
        wait
    """)
    assert proc.returncode == 0 and proc.stdout == "returned 0\n", proc.stderr
    assert "KILL" not in proc.stderr


@needs_dash
@needs_namespaces
def test_stop_processes_refuses_unless_pid_1() -> None:
    # PID 1 of the namespace starts a second shell, which must refuse and signal nothing
    inner = f"{PRELUDE}stop_processes 100; echo \"refused $?\""
    proc = in_pid_namespace(f"""
        sleep 300 &
        sleeper=$!
        dash -c '{inner}'
        kill -0 "$sleeper" && echo "sleeper alive"
        kill "$sleeper"
    """)
    assert proc.stdout.split("\n")[:2] == ["refused 1", "sleeper alive"], proc.stderr
    assert "only PID 1 stops every process" in proc.stderr


@needs_dash
@needs_namespaces
def test_poweroff_helper_signals_pid_1(tmp_path: Path) -> None:
    helper = tmp_path / "secvf-init"  # init dispatches on its name
    shutil.copy(INIT, helper)
    helper.chmod(0o755)
    proc = in_pid_namespace(f"""
        trap 'echo "PID 1 got USR2"; exit 0' USR2
        {helper} poweroff
        sleep 60 &
        wait
        echo "no signal"
    """)
    assert proc.stdout == "PID 1 got USR2\n", proc.stderr


@needs_dash
@needs_namespaces
@pytest.mark.parametrize(("uptime", "centiseconds"),
                         [("0.08 0.01", 8), ("12.34 20.00", 1234), ("3600.90 1.00", 360090)])
def test_uptime_is_read_in_centiseconds(tmp_path: Path, uptime: str, centiseconds: int) -> None:
    fake = tmp_path / "uptime"
    fake.write_text(uptime + "\n")
    proc = dash(f'mount --bind {fake} /proc/uptime && read_uptime_cs && echo "$UPTIME_CS"',
                namespace=["--mount"])
    assert proc.stdout == f"{centiseconds}\n", proc.stderr


@needs_dash
@pytest.mark.parametrize("rtc", [None, "1796115479", "1796115400"])
def test_clock_is_set_to_the_host_time_plus_uptime(tmp_path: Path, rtc: str | None) -> None:
    rtc_file = tmp_path / "since_epoch"  # a reading at or before the estimate changes nothing
    if rtc is not None:
        rtc_file.write_text(rtc + "\n")
    proc = dash(f'RTC_SECONDS={rtc_file}\n'
                'read_uptime_cs() { UPTIME_CS=437; }\n'
                'date() { echo "date $*" >&2; }\n'  # set_clock discards date's stdout
                'set_clock', env={"secvf_time": "1796115475123456789"})
    # 1796115475.123456789 s + 4.37 s of uptime
    assert proc.stderr == "date -u -s @1796115479.493456789\n"


@needs_dash
def test_an_estimate_behind_the_rtc_gives_way_to_it(tmp_path: Path) -> None:
    rtc_file = tmp_path / "since_epoch"
    rtc_file.write_text("1796115481\n")  # the host's time is 0-2 s past the RTC's reading
    proc = dash(f'RTC_SECONDS={rtc_file}\n'
                'read_uptime_cs() { UPTIME_CS=437; }\n'
                'date() { echo "date $*" >&2; }\n'
                'set_clock', env={"secvf_time": "1796115475123456789"})
    assert proc.stderr == ("secvf-init: secvf_time is behind the RTC: clock set from the RTC\n"
                           "date -u -s @1796115482.000000000\n")


@needs_dash
@pytest.mark.parametrize("value", ["", "12.5", "now", "1e9"])
def test_clock_stays_without_a_valid_host_time(value: str) -> None:
    proc = dash('date() { echo "date $*" >&2; }\nset_clock', env={"secvf_time": value})
    assert "date" not in proc.stderr
    assert ("ignoring secvf_time" in proc.stderr) == bool(value)


@needs_dash
@pytest.mark.parametrize(("console", "password", "started", "said"), [
    ("login", True, "setsid -w agetty --noclear --local-line null 115200 vt220",
     "console: login as root on null"),
    ("login", False, "console_hint", "console: no login on null (root has no password)"),
    ("autologin", False,
     "setsid -w agetty --noclear --local-line --autologin root null 115200 vt220",
     "console: root shell on null without a password (autologin)"),
    ("", True, None, "console: output only"),
    ("output-only", True, None, "console: output only"),
])
def test_console_offers_what_the_kernel_command_line_asks(
        console: str, password: bool, started: str | None, said: str) -> None:
    # /dev/null stands in for the serial port (a character device every host has)
    proc = dash(f'CONSOLE_TTY=null\n'
                f'root_has_password() {{ {"true" if password else "false"}; }}\n'
                f'respawn() {{ echo "respawn $*"; }}\n'
                f'start_console', env={"secvf_console": console})
    assert proc.stdout == (f"respawn {started}\n" if started else ""), proc.stderr
    assert proc.stderr == f"secvf-init: {said}\n"


@needs_dash
@needs_namespaces
@pytest.mark.parametrize(("root_entry", "has_password"), [
    ("root:$6$salt$hash:19000:0:99999:7:::", True),
    ("root:*:19000:0:99999:7:::", False),
    ("root:!$6$salt$hash:19000:0:99999:7:::", False),
    ("root::19000:0:99999:7:::", False),
])
def test_root_has_a_password_only_with_a_crypt_hash(tmp_path: Path, root_entry: str,
                                                     has_password: bool) -> None:
    shadow = tmp_path / "shadow"
    shadow.write_text(f"daemon:$6$not$root:19000::::::\n{root_entry}\nbin:*:19000::::::\n")
    proc = dash(f"mount --bind {shadow} /etc/shadow && root_has_password && echo yes || echo no",
                namespace=["--mount"])
    assert proc.stdout == ("yes\n" if has_password else "no\n"), proc.stderr


# ---- readiness: the marker waits for the agent ------------------------------------------------

def _agent(tmp_path: Path, present: bool = True) -> str:
    """Shell lines pointing init at a ready FIFO in ``tmp_path`` and an agent file there."""
    if present:
        (tmp_path / "agent.pyz").write_text("")
    return f"READY_FIFO={tmp_path}/ready AGENT={tmp_path}/agent.pyz\nopen_ready_fifo\n"


@needs_dash
def test_the_marker_waits_for_the_agents_line(tmp_path: Path) -> None:
    proc = dash(_agent(tmp_path) + f"""
        ( sleep 0.5; echo agent >{tmp_path}/ready ) 3<&- &
        wait_for_agent 30; echo "waited $?"
        [ -e {tmp_path}/ready ] || echo "fifo removed"
    """)
    assert proc.stdout.split("\n")[:2] == ["waited 0", "fifo removed"], proc.stderr
    assert proc.stderr == ""


@needs_dash
def test_an_agent_that_never_listens_is_named_after_the_wait(tmp_path: Path) -> None:
    proc = dash(_agent(tmp_path) + "wait_for_agent 1; echo done")
    assert proc.stdout == "done\n"
    assert proc.stderr == "secvf-init: the exec agent is not listening after 1 s\n"


@needs_dash
def test_an_image_without_the_agent_does_not_wait(tmp_path: Path) -> None:
    proc = dash(_agent(tmp_path, present=False) + "wait_for_agent 30; echo done")
    assert (proc.stdout, proc.stderr) == ("done\n", "")
    assert not (tmp_path / "ready").exists()


@needs_dash
def test_the_agent_writes_its_line_with_its_own_helper(tmp_path: Path) -> None:
    package = Path(secvf.__file__).parent.parent
    helper = (f"python3 -I -c 'import sys; sys.path.insert(0, \"{package}\"); "
              "from secvf.guest.agent.__main__ import signal_ready; "
              "sys.exit(not signal_ready(sys.argv[1], \"agent\"))'")
    proc = dash(_agent(tmp_path) + f"""
        ( {helper} {tmp_path}/ready ) 3<&- &
        wait_for_agent 30; echo done
    """)
    assert (proc.stdout, proc.stderr) == ("done\n", "")


@needs_dash
def test_a_dhcp_client_restarted_by_restore_keeps_the_address_once(tmp_path: Path) -> None:
    keep = tmp_path / "dhcp-keep-address"
    keep.write_text("")
    proc = dash(f"BB=echo DHCP_KEEP_ADDRESS={keep} interface=eth0\n"
                "dhcp_event deconfig; echo first; dhcp_event deconfig")
    assert proc.stdout == "first\nip -4 addr flush dev eth0\n", proc.stderr
    assert not keep.exists()


# ---- network: secvf_nics=MAC+MODE[,...], each NIC found by its MAC ---------------------------

MAC_A, MAC_B, MAC_C = "52:54:00:12:34:56", "52:54:00:ab:cd:ef", "52:54:00:00:00:01"
UDHCPC = "-s /sbin/secvf-init -t 5 -T 1 -A 3 -b"
MODES = " (dhcp, manual, ADDR/PREFIX or ADDR/PREFIX@GATEWAY)"


def start_network(tmp_path: Path, interfaces: dict[str, str], nics: str | None, *,
                  wait_cs: int = 30, before: str = "") -> tuple[list[str], str]:
    """Run ``start_network`` with ``secvf_nics=nics`` (None: unset) over a fake
    /sys/class/net holding ``interfaces`` (name -> MAC) and a fake busybox that records
    its arguments; returns those calls and what init said."""
    net = tmp_path / "net"
    for name, mac in {"lo": "00:00:00:00:00:00", **interfaces}.items():
        (net / name).mkdir(parents=True)
        (net / name / "address").write_text(mac + "\n")
    calls = tmp_path / "calls"
    script = (f"BB=bb NET_CLASS_DIR={net} RESOLV_CONF={tmp_path}/resolv.conf "
              f"NIC_WAIT_CS={wait_cs} CALLS={calls}\n"
              'bb() { echo "$*" >>"$CALLS"; }\n'
              + ("unset secvf_nics\n" if nics is None else "")
              + before + "start_network; echo returned $?")
    proc = dash(script, env={} if nics is None else {"secvf_nics": nics})
    assert proc.stdout == "returned 0\n", proc.stderr
    return calls.read_text().splitlines() if calls.exists() else [], proc.stderr


def said(*lines: str) -> str:
    return "".join(f"secvf-init: {line}\n" for line in lines)


@needs_dash
def test_a_dhcp_nic_gets_udhcpc_on_the_interface_with_its_mac(tmp_path: Path) -> None:
    calls, stderr = start_network(tmp_path, {"eth0": MAC_A, "eth1": MAC_B}, f"{MAC_B}+dhcp")
    assert calls == ["ip link set lo up", "ip link set eth1 up", f"udhcpc -i eth1 {UDHCPC}"]
    assert stderr == ""
    assert not (tmp_path / "resolv.conf").exists()  # the lease writes it (dhcp_event)


@needs_dash
def test_a_static_nic_with_a_gateway_gets_the_default_route_and_nameserver(
        tmp_path: Path) -> None:
    elsewhere = tmp_path / "image-resolv.conf"  # an image's resolv.conf may be a link
    elsewhere.write_text("nameserver 192.0.2.53\n")
    (tmp_path / "resolv.conf").symlink_to(elsewhere)
    calls, stderr = start_network(tmp_path, {"eth0": MAC_A},
                                  f"{MAC_A}+10.0.100.5/24@10.0.100.1")
    assert calls == ["ip link set lo up", "ip link set eth0 up",
                     "ip -4 addr add 10.0.100.5/24 dev eth0",
                     "ip -4 route replace default via 10.0.100.1 dev eth0"]
    assert stderr == said("network: eth0 10.0.100.5/24 via 10.0.100.1")
    resolv = tmp_path / "resolv.conf"
    assert not resolv.is_symlink() and resolv.read_text() == "nameserver 10.0.100.1\n"
    assert elsewhere.read_text() == "nameserver 192.0.2.53\n"


@needs_dash
def test_a_static_nic_without_a_gateway_gets_only_its_address(tmp_path: Path) -> None:
    calls, stderr = start_network(tmp_path, {"eth0": MAC_A}, f"{MAC_A}+192.168.7.2/30")
    assert calls == ["ip link set lo up", "ip link set eth0 up",
                     "ip -4 addr add 192.168.7.2/30 dev eth0"]
    assert stderr == said("network: eth0 192.168.7.2/30, no gateway")
    assert not (tmp_path / "resolv.conf").exists()


@needs_dash
def test_a_manual_nic_is_only_brought_up(tmp_path: Path) -> None:
    calls, stderr = start_network(tmp_path, {"eth0": MAC_A}, f"{MAC_A}+manual")
    assert calls == ["ip link set lo up", "ip link set eth0 up"]
    assert stderr == said("network: eth0 up without an address (manual)")


@needs_dash
def test_nics_are_matched_by_mac_not_by_pci_order(tmp_path: Path) -> None:
    # the first NIC of the list is the second interface; a DHCP lease's router wins, so
    # the static NIC's gateway gives no route and no nameserver
    calls, stderr = start_network(tmp_path, {"eth0": MAC_B, "eth1": MAC_A},
                                  f"{MAC_A}+dhcp,{MAC_B}+10.0.100.5/24@10.0.100.1")
    assert calls == ["ip link set lo up",
                     "ip link set eth1 up", f"udhcpc -i eth1 {UDHCPC}",
                     "ip link set eth0 up", "ip -4 addr add 10.0.100.5/24 dev eth0"]
    assert stderr == said(
        "network: eth0 10.0.100.5/24; gateway 10.0.100.1 unused (the default route is DHCP's)")
    assert not (tmp_path / "resolv.conf").exists()


@needs_dash
def test_a_dhcp_nic_listed_after_a_static_gateway_still_wins(tmp_path: Path) -> None:
    calls, _ = start_network(tmp_path, {"eth0": MAC_A, "eth1": MAC_B},
                             f"{MAC_A}+10.0.100.5/24@10.0.100.1,{MAC_B}+dhcp")
    assert not any("route" in call for call in calls)
    assert f"udhcpc -i eth1 {UDHCPC}" in calls
    assert not (tmp_path / "resolv.conf").exists()


@needs_dash
def test_only_the_first_gateway_gives_the_default_route(tmp_path: Path) -> None:
    calls, stderr = start_network(tmp_path, {"eth0": MAC_A, "eth1": MAC_B},
                                  f"{MAC_B}+10.0.2.5/24@10.0.2.1,{MAC_A}+10.0.1.5/24@10.0.1.1")
    assert [call for call in calls if "route" in call] == [
        "ip -4 route replace default via 10.0.2.1 dev eth1"]
    assert "ip -4 addr add 10.0.1.5/24 dev eth0" in calls
    assert (tmp_path / "resolv.conf").read_text() == "nameserver 10.0.2.1\n"
    assert said("network: eth0 10.0.1.5/24; gateway 10.0.1.1 unused "
                "(the default route is via 10.0.2.1)") in stderr


@needs_dash
@pytest.mark.parametrize(("entry", "problem"), [
    (MAC_A, "expected MAC+MODE"),
    ("*", "expected MAC+MODE"),  # not globbed into the file names of the directory
    ("zz:54:00:12:34:56+dhcp", "'zz:54:00:12:34:56' is not a MAC address"),
    ("52:54:00:12:34+dhcp", "'52:54:00:12:34' is not a MAC address"),
    ("52:54:00:12:34:56:78+dhcp", "'52:54:00:12:34:56:78' is not a MAC address"),
    ("525400123456+dhcp", "'525400123456' is not a MAC address"),
    (f"{MAC_A}+", "unknown mode ''" + MODES),
    (f"{MAC_A}+DHCP", "unknown mode 'DHCP'" + MODES),
    (f"{MAC_A}+10.0.0.5", "unknown mode '10.0.0.5'" + MODES),
    (f"{MAC_A}+10.0.0.256/24", "'10.0.0.256' is not an IPv4 address"),
    (f"{MAC_A}+10.0.0/24", "'10.0.0' is not an IPv4 address"),
    (f"{MAC_A}+10.0.0.5.6/24", "'10.0.0.5.6' is not an IPv4 address"),
    (f"{MAC_A}+010.0.0.5/24", "'010.0.0.5' is not an IPv4 address"),
    (f"{MAC_A}+10..0.5/24", "'10..0.5' is not an IPv4 address"),
    (f"{MAC_A}+10.0.0.5./24", "'10.0.0.5.' is not an IPv4 address"),
    (f"{MAC_A}+/24", "'' is not an IPv4 address"),
    (f"{MAC_A}+10.0.0.5/33", "prefix '33' is not in 0..32"),
    (f"{MAC_A}+10.0.0.5/", "prefix '' is not in 0..32"),
    (f"{MAC_A}+10.0.0.5/-1", "prefix '-1' is not in 0..32"),
    (f"{MAC_A}+10.0.0.5/024", "prefix '024' is not in 0..32"),
    (f"{MAC_A}+10.0.0.5/24/8", "prefix '24/8' is not in 0..32"),
    (f"{MAC_A}+10.0.0.5/24@", "gateway '' is not an IPv4 address"),
    (f"{MAC_A}+10.0.0.5/24@10.0.0.300", "gateway '10.0.0.300' is not an IPv4 address"),
    (f"{MAC_A}+10.0.0.5/24@gw", "gateway 'gw' is not an IPv4 address"),
])
def test_a_bad_nic_entry_is_skipped_with_a_message_and_the_good_ones_applied(
        tmp_path: Path, entry: str, problem: str) -> None:
    # the bad entry names eth0's MAC: accepted by mistake, it would configure eth0
    calls, stderr = start_network(tmp_path, {"eth0": MAC_A, "eth1": MAC_B, "eth2": MAC_C},
                                  f"{entry},{MAC_B}+manual,{MAC_C}+10.0.9.5/24")
    assert calls == ["ip link set lo up", "ip link set eth1 up", "ip link set eth2 up",
                     "ip -4 addr add 10.0.9.5/24 dev eth2"]
    assert stderr == said(f"ignoring NIC '{entry}': {problem}",
                          "network: eth1 up without an address (manual)",
                          "network: eth2 10.0.9.5/24, no gateway")


@needs_dash
def test_every_edge_of_the_grammar_that_is_valid_is_applied(tmp_path: Path) -> None:
    calls, stderr = start_network(
        tmp_path, {"eth0": MAC_A, "eth1": MAC_B, "eth2": MAC_C},
        f"{MAC_A}+0.0.0.0/0,{MAC_B.upper()}+255.255.255.255/32@10.0.0.1,,{MAC_C}+1.2.3.4/9,")
    assert calls == ["ip link set lo up",
                     "ip link set eth0 up", "ip -4 addr add 0.0.0.0/0 dev eth0",
                     "ip link set eth1 up", "ip -4 addr add 255.255.255.255/32 dev eth1",
                     "ip -4 route replace default via 10.0.0.1 dev eth1",
                     "ip link set eth2 up", "ip -4 addr add 1.2.3.4/9 dev eth2"]
    assert "ignoring" not in stderr  # an empty entry is nothing, not a bad entry


@needs_dash
def test_a_mac_listed_twice_is_configured_once(tmp_path: Path) -> None:
    calls, stderr = start_network(tmp_path, {"eth0": MAC_B},
                                  f"{MAC_B}+manual,{MAC_B.upper()}+dhcp")
    assert calls == ["ip link set lo up", "ip link set eth0 up"]
    assert stderr.startswith(said(f"ignoring NIC '{MAC_B.upper()}+dhcp': "
                                  f"MAC {MAC_B} is listed before"))


@needs_dash
@pytest.mark.parametrize("nics", [None, ""])
def test_without_nics_only_lo_comes_up(tmp_path: Path, nics: str | None) -> None:
    calls, stderr = start_network(tmp_path, {"eth0": MAC_A}, nics)
    assert (calls, stderr) == (["ip link set lo up"], "")


@needs_dash
def test_a_nic_that_appears_late_is_waited_for(tmp_path: Path) -> None:
    # virtio_net binds the second NIC 0.3 s after init starts looking
    late = tmp_path / "net" / "eth1"
    calls, stderr = start_network(
        tmp_path, {"eth0": MAC_A}, f"{MAC_B}+manual,{MAC_A}+manual", wait_cs=1000,
        before=f"( sleep 0.3; mkdir {late} && echo {MAC_B} >{late}/address.tmp && "
               f"mv {late}/address.tmp {late}/address ) &\n")
    assert calls == ["ip link set lo up", "ip link set eth1 up", "ip link set eth0 up"]
    assert "no network interface" not in stderr


@needs_dash
def test_a_nic_that_never_appears_is_named_and_the_others_are_configured(
        tmp_path: Path) -> None:
    script_wait_cs = 30
    began = time.monotonic()
    calls, stderr = start_network(tmp_path, {"eth0": MAC_A},
                                  f"{MAC_C}+dhcp,{MAC_B}+manual,{MAC_A}+manual",
                                  wait_cs=script_wait_cs)
    elapsed = time.monotonic() - began
    assert calls == ["ip link set lo up", "ip link set eth0 up"]
    assert stderr == said(f"no network interface has MAC {MAC_C}: NIC '{MAC_C}+dhcp' "
                          "not configured",
                          f"no network interface has MAC {MAC_B}: NIC '{MAC_B}+manual' "
                          "not configured",  # the wait is for all NICs together
                          "network: eth0 up without an address (manual)")
    assert 0.25 <= elapsed < 0.3 + 5


@needs_dash
def test_a_nic_that_cannot_take_its_address_is_named(tmp_path: Path) -> None:
    calls, stderr = start_network(
        tmp_path, {"eth0": MAC_A}, f"{MAC_A}+10.0.0.5/24@10.0.0.1",
        before='bb() { echo "$*" >>"$CALLS"; case $* in *"addr add"*) return 2 ;; esac; }\n')
    assert calls == ["ip link set lo up", "ip link set eth0 up",
                     "ip -4 addr add 10.0.0.5/24 dev eth0"]
    assert stderr == said("cannot add 10.0.0.5/24 to eth0")
    assert not (tmp_path / "resolv.conf").exists()


@needs_dash
def test_a_lease_configures_the_interface_udhcpc_names(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    proc = dash(f"BB=echo RESOLV_CONF={resolv} DHCP_KEEP_ADDRESS={tmp_path}/keep\n"
                "interface=eth1 ip=10.0.2.15 mask=24 router=10.0.2.2 dns='10.0.2.3 10.0.2.4'\n"
                "dhcp_event bound")
    assert proc.stdout.splitlines() == [  # (addr show's output goes to grep)
        "ip -4 addr flush dev eth1",
        "ip -4 addr add 10.0.2.15/24 dev eth1",
        "ip -4 route replace default via 10.0.2.2 dev eth1"], proc.stderr
    assert resolv.read_text() == "nameserver 10.0.2.3\nnameserver 10.0.2.4\n"
    assert proc.stderr == said("network: eth1 10.0.2.15/24 via 10.0.2.2")
