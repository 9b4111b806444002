"""Port forwarding into a running AI sandbox: parse ``[HOST_ADDR:]HOST_PORT:GUEST_PORT``,
check the VM has the channel, and start a :class:`secvf.exec.forwarder.PortForward`.

Only AI sandboxes have it: it rides their vsock channel (the agent's forward relay),
which generic and malware-analysis VMs do not have by design.
"""

from __future__ import annotations

import ipaddress

from secvf.errors import ConfigError
from secvf.exec.forwarder import PortForward
from secvf.exec.forwarding import check_port
from secvf.store.bundle import RuntimeFiles
from secvf.store.library import get_vm
from secvf.workflows.vm_exec import exec_socket_for

#: Where a forward listens unless another address is asked for explicitly.
DEFAULT_HOST_ADDR = "127.0.0.1"


def parse_forward_spec(spec: str) -> tuple[str, int, int]:
    """``[HOST_ADDR:]HOST_PORT:GUEST_PORT`` → ``(host_addr, host_port, guest_port)``.

    HOST_ADDR is an IP address (IPv6 in brackets: ``[::1]:8080:80``); without it the
    forward listens on 127.0.0.1. HOST_PORT 0 picks a free port.

    Raises:
        ConfigError: the spec does not parse, or a port is out of range.
    """
    host_addr = DEFAULT_HOST_ADDR
    rest = spec
    if spec.startswith("["):
        addr, sep, rest = spec[1:].partition("]:")
        if not sep:
            raise ConfigError(f"port forward {spec!r}: an IPv6 address goes in brackets, "
                              "then :HOST_PORT:GUEST_PORT")
        host_addr = addr
    elif spec.count(":") == 2:
        host_addr, rest = spec.split(":", 1)
    parts = rest.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"port forward {spec!r}: expected [HOST_ADDR:]HOST_PORT:GUEST_PORT")
    try:
        ipaddress.ip_address(host_addr)
        host_port, guest_port = int(parts[0]), check_port(int(parts[1]))
        if host_port:
            check_port(host_port)
    except ValueError as exc:
        raise ConfigError(f"port forward {spec!r}: {exc}") from None
    return host_addr, host_port, guest_port


def start_port_forward(name: str, spec: str) -> PortForward:
    """Start forwarding ``spec`` (see :func:`parse_forward_spec`) into sandbox ``name``;
    the caller closes it. It ends by itself when the VM stops (new connections are
    reset, open ones end).

    Raises:
        ConfigError: a bad spec.
        NotFound: no such VM.
        NoExecChannel: not an AI sandbox (no channel by design), or not running.
        ForwardError: the host address or port cannot be listened on.
    """
    host_addr, host_port, guest_port = parse_forward_spec(spec)
    exec_socket_for(name)  # the same refusals as vm exec, in the same words
    _, config = get_vm(name)
    return PortForward(RuntimeFiles(config.id).vsock_socket, guest_port,
                       host_addr=host_addr, host_port=host_port).start()
