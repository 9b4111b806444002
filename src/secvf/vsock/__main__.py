"""Command line: ``python -m secvf.vsock --vhost-user-socket PATH --uds-path PATH --guest-cid N``.

Exit status: 0 after QEMU disconnects or SIGTERM, 1 on an error (logged to stderr).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from secvf.vsock.backend import serve
from secvf.vsock.errors import VsockError
from secvf.vsock.limits import DEFAULT_MAX_CONNECTIONS
from secvf.vsock.trace import TRACE_ENV, trace_path_from_env


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m secvf.vsock",
        description="vhost-user-vsock backend with a Firecracker-style hybrid Unix socket.",
    )
    parser.add_argument(
        "--vhost-user-socket",
        type=Path,
        required=True,
        help="listen here for QEMU's vhost-user connection",
    )
    parser.add_argument(
        "--uds-path",
        type=Path,
        required=True,
        help="hybrid socket for host clients; guest connects go to PATH_<port>",
    )
    parser.add_argument("--guest-cid", type=int, required=True, help="the guest's CID (>= 3)")
    parser.add_argument("--ready-fd", type=int, help="write READY\\n here once listening")
    parser.add_argument("--vm-name", help="VM name for logs and security events")
    parser.add_argument("--vm-id", help="VM UUID for logs and security events")
    parser.add_argument("--log-dir", type=Path,
                        help="write security events to the JSON Lines event log here")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="live connections plus pending handshakes (default %(default)s)",
    )
    parser.add_argument("--debug", action="store_true", help="log every vhost-user message")
    parser.add_argument(
        "--trace-file",
        type=Path,
        default=trace_path_from_env(),
        help=f"append a vring lifecycle trace here (default: ${TRACE_ENV}, else off)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run :func:`secvf.vsock.serve`, and return the exit status."""
    args = _parser().parse_args(argv)
    label = args.vm_name or f"cid{args.guest_cid}"
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.debug else logging.INFO,
        format=f"%(asctime)s secvf-vsock[{label}] %(levelname)s %(name)s: %(message)s",
    )
    # serve() handles SIGTERM/SIGINT while it runs and then puts back what it found: make
    # that "ignored", so a stop request arriving while the process is already ending
    # (QEMU has just disconnected) does not kill it with status -15 instead of 0
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    try:
        serve(
            args.vhost_user_socket,
            args.uds_path,
            args.guest_cid,
            ready_fd=args.ready_fd,
            vm_name=args.vm_name,
            vm_id=args.vm_id,
            max_connections=args.max_connections,
            log_dir=args.log_dir,
            trace_file=args.trace_file,
        )
    except VsockError as exc:
        logging.getLogger("secvf.vsock").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
