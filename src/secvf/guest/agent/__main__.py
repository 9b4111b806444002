"""The agent's command line and process start-up: ``python3 -I agent.pyz [options]``.

This file is also the zipapp's top-level ``__main__.py``, so it imports absolutely.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import types

from secvf.exec import forwarding, protocol
from secvf.guest.agent import AGENT_VERSION
from secvf.guest.agent.errors import RequestFailed
from secvf.guest.agent.forward import serve_forwards
from secvf.guest.agent.identity import resolve_identity
from secvf.guest.agent.restore import Restorer
from secvf.guest.agent.server import (
    DEFAULT_USER,
    MAX_SESSIONS,
    Agent,
    listen_unix,
    listen_vsock,
    listen_vsock_retrying,
)
from secvf.guest.agent.spawner import SpawnerFailed

#: What the agent writes to init's ready FIFO once it listens.
AGENT_READY_LINE = "agent"

#: Signals Python itself ignores at start-up; subprocess restores them in every child.
PYTHON_IGNORED_SIGNALS = frozenset({signal.SIGPIPE, signal.SIGXFSZ})

log = logging.getLogger("secvf.agent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the agent's command line."""
    parser = argparse.ArgumentParser(description="SecVF guest exec agent")
    parser.add_argument("--port", type=int, default=protocol.AGENT_VSOCK_PORT, help="vsock port")
    parser.add_argument("--unix", metavar="PATH", help="listen on a Unix socket instead of vsock")
    parser.add_argument("--default-user", default=DEFAULT_USER, help="user when none is asked")
    parser.add_argument(
        "--keepalive-interval", type=float, default=protocol.KEEPALIVE_INTERVAL_S, metavar="S"
    )
    parser.add_argument("--max-sessions", type=int, default=MAX_SESSIONS)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--ready-fifo",
        metavar="PATH",
        help="write 'agent' to this FIFO once listening (init waits for it)",
    )
    return parser.parse_args(argv)


def signal_ready(fifo: str, line: str) -> bool:
    """Write ``line`` to init's ready FIFO; False if nobody reads it (any more) or it is gone.

    Opened without blocking and without creating it: after boot init has removed it, and an
    agent restarted later has nobody to tell.
    """
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, line.encode() + b"\n")
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def reset_ignored_signals_for_commands() -> None:
    """Make commands start with default dispositions for signals the agent inherited ignored.

    A shell starts background jobs (init's ``… &``) with SIGINT and SIGQUIT ignored, and
    an ignored signal stays ignored across fork and exec, so every command would inherit
    it. Each such signal gets a handler that does nothing instead: the agent still
    ignores it, and exec resets a handled signal to its default in the command.
    """
    for signum in signal.valid_signals() - PYTHON_IGNORED_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, _ignore_signal)


def _ignore_signal(signum: int, frame: types.FrameType | None) -> None:
    """Handler standing in for SIG_IGN (see :func:`reset_ignored_signals_for_commands`)."""


def start_forward_relay() -> None:
    """Serve port forwards (:mod:`secvf.guest.agent.forward`) in a thread; a failure only
    means the sandbox has no port forwarding."""
    try:
        listener = listen_vsock(forwarding.FORWARD_VSOCK_PORT)
    except OSError as exc:
        log.warning("no port forwarding: cannot listen on vsock port %d: %s",
                    forwarding.FORWARD_VSOCK_PORT, exc)
        return
    threading.Thread(target=serve_forwards, args=(listener,), name="forwards",
                     daemon=True).start()


def stop_detached_on_sigterm(agent: Agent) -> None:
    """On SIGTERM (the VM shutting down, or a test stopping the agent), end the agent's
    background processes first (TERM, then KILL after the grace), then die of SIGTERM as
    before: they are started in sessions of their own, so nothing else would."""

    def stop(signum: int, frame: types.FrameType | None) -> None:
        agent.detached.stop_all()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, stop)


def start_default_spawner(agent: Agent) -> None:
    """Start the default user's spawner before the agent reports ready, so a guest
    saved at "ready" (a sandbox template) has it running and no session's first command
    waits for it. A failure only means commands start the slower way."""
    try:
        identity = resolve_identity(agent.default_user)
        if not identity.is_self:
            agent.spawners.for_account(identity.account).start()
    except (RequestFailed, SpawnerFailed) as exc:
        log.warning("no spawner for %s: %s", agent.default_user, exc)


def main(argv: list[str] | None = None) -> int:
    """Entry point: listen and serve until killed."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="secvf-agent %(levelname)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    reset_ignored_signals_for_commands()
    listener = listen_unix(args.unix) if args.unix else listen_vsock_retrying(args.port)
    where = args.unix or f"vsock port {args.port}"
    log.info("agent %s listening on %s (generation %d)", AGENT_VERSION, where, protocol.GENERATION)
    agent = Agent(
        listener,
        default_user=args.default_user,
        keepalive_interval_s=args.keepalive_interval,
        max_sessions=args.max_sessions,
        restorer=Restorer.for_agent(listening_on_vsock=not args.unix),
    )
    stop_detached_on_sigterm(agent)
    if not args.unix:
        start_forward_relay()
    start_default_spawner(agent)
    if args.ready_fifo:
        signal_ready(args.ready_fifo, AGENT_READY_LINE)
    agent.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
