#!/usr/bin/python3 -I
"""fakenet: a fake internet on an isolated network's router address (``fakenet`` image).

Started by ``/sbin/secvf-init`` once the network is configured (the host gives the VM
the network's router address, ``secvf_nics=MAC+ADDR/PREFIX``, no gateway). Standard
library only. On the first interface with a global IPv4 address it runs

* **dnsmasq**: DNS answering *every* name with this address (``address=/#/IP``), every
  query logged; DHCP for the upper half of the subnet (router and DNS: this address),
  so the fixed addresses SecVF hands out from ``.2`` upwards do not collide;
* **INetSim**: :data:`SERVICES` bound to this address (its own DNS off: dnsmasq answers).

Every line either writes (dnsmasq's log, INetSim's stdout and its ``service.log``)
goes to the serial console prefixed ``fakenet: `` — the console and the network
capture are the only ways out. When dnsmasq and every INetSim TCP service listen it
writes ``fakenet`` to init's ready FIFO (``--ready-fifo PATH``), so the ready marker
means "the fake internet answers". A service that exits is started again.
"""

from __future__ import annotations

import ipaddress
import os
import select
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "fakenet: "
CONSOLE = "/dev/console"
RUN_DIR = Path("/run/secvf/fakenet")
INETSIM_GROUP = "inetsim"
READY_WAIT_S = 50.0  # below init's READY_WAIT_S (60)
RESTART_DELAY_S = 1.0
MAX_LINE_BYTES = 2048

#: INetSim services and their ports (protocol, port): what a sample finds on the fake net.
SERVICES = {
    "http": ("tcp", 80), "https": ("tcp", 443), "smtp": ("tcp", 25), "smtps": ("tcp", 465),
    "pop3": ("tcp", 110), "pop3s": ("tcp", 995), "ftp": ("tcp", 21), "ftps": ("tcp", 990),
    "irc": ("tcp", 6667), "ident": ("tcp", 113), "finger": ("tcp", 79),
    "tftp": ("udp", 69), "ntp": ("udp", 123), "syslog": ("udp", 514),
}  # fmt: skip
DNS_PORT = 53
#: INetSim's fake files (in /var/lib/inetsim/http/fakefiles) by URL extension.
FAKE_FILES = (("txt", "sample.txt", "text/plain"), ("html", "sample.html", "text/html"),
              ("htm", "sample.html", "text/html"), ("png", "sample.png", "image/png"),
              ("jpg", "sample.jpg", "image/jpeg"), ("gif", "sample.gif", "image/gif"),
              ("exe", "sample_gui.exe", "application/x-msdos-program"))


def dhcp_range(network: ipaddress.IPv4Network,
               own: ipaddress.IPv4Address) -> tuple[str, str] | None:
    """The DHCP pool: the upper half of the subnet's hosts, without ``own``; None when the
    subnet is too small (a /30 or smaller has room for fixed addresses only)."""
    hosts = list(network.hosts()) if network.num_addresses <= 65536 else None
    if hosts is None:  # a big subnet: the top /24-sized block
        last = network.broadcast_address - 1
        return str(last - 253), str(last)
    upper = [h for h in hosts[len(hosts) // 2:] if h != own]
    if len(upper) < 2:
        return None
    return str(upper[0]), str(upper[-1])


def dnsmasq_conf(interface: str, address: ipaddress.IPv4Interface) -> str:
    """dnsmasq's configuration: every name is ``address``, DHCP as :func:`dhcp_range`."""
    ip = str(address.ip)
    lines = [
        "no-resolv", "no-hosts", "no-poll", "bind-interfaces", "log-queries",
        "log-facility=-", "keep-in-foreground", "user=nobody", "group=nogroup",
        f"interface={interface}", f"listen-address={ip}", "except-interface=lo",
        f"address=/#/{ip}",
        "domain-needed", "bogus-priv",
    ]  # fmt: skip
    pool = dhcp_range(address.network, address.ip)
    if pool is not None:
        lines += [
            f"dhcp-range={pool[0]},{pool[1]},{address.network.netmask},1h",
            f"dhcp-option=option:router,{ip}", f"dhcp-option=option:dns-server,{ip}",
            "dhcp-authoritative", "log-dhcp", f"dhcp-leasefile={RUN_DIR}/dnsmasq.leases",
        ]  # fmt: skip
    return "\n".join(lines) + "\n"


def inetsim_conf(address: ipaddress.IPv4Interface) -> str:
    """INetSim's configuration: :data:`SERVICES` on ``address`` (no DNS), no reports."""
    lines = [f"start_service {name}" for name in SERVICES]
    lines += [f"service_bind_address {address.ip}", "create_reports no",
              "service_max_childs 15", "service_timeout 60", "faketime_auto_delay 0"]
    for proto in ("http", "https"):  # every URL gets a file of its extension's type
        lines.append(f"{proto}_fakemode yes")
        lines += [f"{proto}_fakefile {ext} {name} {mime}" for ext, name, mime in FAKE_FILES]
        lines.append(f"{proto}_default_fakefile sample.html text/html")
    return "\n".join(lines) + "\n"


def listening(tcp_ports: set[int], udp_ports: set[int], proc_net: Path = Path("/proc/net")) -> bool:
    """True when every port of ``tcp_ports`` has a listening TCP socket and every port of
    ``udp_ports`` a bound UDP socket (read from ``/proc/net/tcp`` and ``udp``)."""
    return (tcp_ports <= _ports(proc_net / "tcp", "0A")
            and udp_ports <= _ports(proc_net / "udp", "07"))


def _ports(table: Path, state: str) -> set[int]:
    ports: set[int] = set()
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return ports
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[3] == state:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def find_address(ip_output: str) -> tuple[str, ipaddress.IPv4Interface] | None:
    """The first ``(interface, address)`` in ``ip -4 -o addr show scope global`` output."""
    for line in ip_output.splitlines():
        words = line.split()
        if len(words) >= 4 and words[2] == "inet":
            return words[1].rstrip(":"), ipaddress.IPv4Interface(words[3])
    return None


class Console:
    """Writes prefixed lines to the console; never raises."""

    def __init__(self, path: str = CONSOLE) -> None:
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
        except OSError:
            self.fd = 2

    def line(self, text: bytes) -> None:
        data = PREFIX.encode() + text.rstrip(b"\r\n")[:MAX_LINE_BYTES] + b"\n"
        try:
            os.write(self.fd, data)
        except OSError:
            pass

    def say(self, text: str) -> None:
        self.line(text.encode(errors="replace"))


class Service:
    """One daemon, restarted when it exits; its output is read line by line."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name, self.argv = name, argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.buffer = b""
        self.restart_at = 0.0

    def start(self, console: Console) -> None:
        console.say(f"starting {self.name}")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, cwd="/")
        os.set_blocking(self.proc.stdout.fileno(), False)  # type: ignore[union-attr]


class LogFollower:
    """``tail -F`` of one file: new lines as they are appended (a new file: from its start)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.inode, self.buffer = path, 0, -1, b""

    def read_lines(self) -> list[bytes]:
        try:
            st = self.path.stat()
        except OSError:
            return []
        if st.st_ino != self.inode or st.st_size < self.offset:
            self.inode, self.offset = st.st_ino, 0
        if st.st_size == self.offset:
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read(1 << 20)
        self.offset += len(data)
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        if len(self.buffer) > MAX_LINE_BYTES:
            lines.append(self.buffer[:MAX_LINE_BYTES])
            self.buffer = b""
        return lines


def _signal_ready(argv: list[str]) -> None:
    if len(argv) != 3 or argv[1] != "--ready-fifo":
        return
    try:
        fd = os.open(argv[2], os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"fakenet\n")
        os.close(fd)
    except OSError:
        pass


def _prepare_run_dir() -> Path:
    import grp

    logs = RUN_DIR / "log"
    logs.mkdir(parents=True, exist_ok=True)
    gid = grp.getgrnam(INETSIM_GROUP).gr_gid
    for path in (logs, logs / "report"):
        path.mkdir(exist_ok=True)
        os.chown(path, 0, gid)
        os.chmod(path, 0o770)
    return logs


def main(argv: list[str]) -> int:
    console = Console()
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=False).stdout
    found = find_address(out)
    if found is None:
        console.say("no interface has an IPv4 address: the fake internet is not started")
        _signal_ready(argv)
        return 1
    interface, address = found
    logs = _prepare_run_dir()
    (RUN_DIR / "dnsmasq.conf").write_text(dnsmasq_conf(interface, address))
    (RUN_DIR / "inetsim.conf").write_text(inetsim_conf(address))
    pool = dhcp_range(address.network, address.ip)
    dhcp = f"{pool[0]}-{pool[1]}" if pool else "off (subnet too small)"
    console.say(f"on {interface} {address}: DNS (every name -> {address.ip}), DHCP {dhcp}, INetSim "
                + ", ".join(f"{n} {p}/{t}" for n, (t, p) in SERVICES.items()))
    services = [
        Service("dnsmasq", ["dnsmasq", f"--conf-file={RUN_DIR}/dnsmasq.conf"]),
        Service("inetsim", ["inetsim", f"--config={RUN_DIR}/inetsim.conf", f"--log-dir={logs}/",
                            f"--report-dir={logs}/report/", "--data-dir=/var/lib/inetsim/"]),
    ]
    followers = [LogFollower(logs / "service.log")]
    for service in services:
        service.start(console)
    tcp = {p for t, p in SERVICES.values() if t == "tcp"} | {DNS_PORT}
    udp = {p for t, p in SERVICES.values() if t == "udp"} | {DNS_PORT}
    ready_by = time.monotonic() + READY_WAIT_S
    ready = False
    while True:
        if not ready and (listening(tcp, udp) or time.monotonic() > ready_by):
            ready = True
            console.say("listening" if listening(tcp, udp) else "not every service listens yet")
            _signal_ready(argv)
        _pump(services, followers, console, 0.05 if not ready else 0.25)


def _pump(services: list[Service], followers: list[LogFollower], console: Console,
          timeout_s: float) -> None:
    fds = {s.proc.stdout.fileno(): s for s in services if s.proc and s.proc.stdout}
    readable, _, _ = select.select(list(fds), [], [], timeout_s)
    for fd in readable:
        service = fds[fd]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            continue
        service.buffer += data
        *lines, service.buffer = service.buffer.split(b"\n")
        for line in lines:
            console.line(line)
    for follower in followers:
        for line in follower.read_lines():
            console.line(line)
    now = time.monotonic()
    for service in services:
        if service.proc is None:
            if now >= service.restart_at:
                service.start(console)
        elif service.proc.poll() is not None:
            console.say(f"{service.name} exited (status {service.proc.returncode}); restarting")
            if service.proc.stdout:
                service.proc.stdout.close()
            service.proc, service.restart_at = None, now + RESTART_DELAY_S


if __name__ == "__main__":
    sys.exit(main(sys.argv))
