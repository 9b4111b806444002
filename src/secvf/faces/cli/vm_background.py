"""``secvf vm ps | attach | kill``: background processes of an AI sandbox, started with
``secvf vm exec NAME --detach -- COMMAND``.

``vm attach`` exits like ``vm exec``: with the process's status once it ended, 125 for a
SecVF error, 130 after Ctrl-C (which only detaches: the process keeps running).
"""

from __future__ import annotations

import signal
import sys
from datetime import datetime

import click

from secvf import api
from secvf.errors import ConfigError
from secvf.faces.cli.common import escape, new_table, note, out, print_json
from secvf.faces.cli.exec_core import exec_errors
from secvf.faces.cli.terminal import INTERRUPTED_EXIT, follow_detached
from secvf.faces.cli.vm_exec import ExecCommand


def parse_signal(text: str) -> int:
    """``TERM``, ``SIGTERM``, ``term`` or ``15`` as a signal number.

    Raises:
        ConfigError: not a signal.
    """
    name = text.strip().upper()
    if name.isdigit():
        number = int(name)
        if 1 <= number <= signal.SIGRTMAX:
            return number
    else:
        try:
            return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
        except KeyError:
            pass
    raise ConfigError(f"--signal {text!r}: not a signal (give a name like TERM or KILL, "
                      "or a number)")


@click.command("ps")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def vm_ps(name: str, as_json: bool) -> None:
    """List AI sandbox NAME's background processes (vm exec --detach), running and
    recently exited: id, command, user, pid, state, start, exit, output kept and dropped.
    """
    processes = api.list_detached(name)
    if as_json:
        print_json([api.detached_as_json(p) for p in processes])
        return
    if not processes:
        note(f"no background processes in '{name}' (start one: secvf vm exec {name} "
             "--detach -- COMMAND)")
        return
    table = new_table("ID", "PID", "USER", "STATE", "STARTED", "EXIT", "OUTPUT", "DROPPED",
                      "COMMAND")
    for p in processes:
        started = datetime.fromtimestamp(p.started_at).strftime("%Y-%m-%d %H:%M:%S")
        if p.state == "running":
            ended = "-"
        elif p.signal is not None:
            ended = f"signal {p.signal}"
        else:
            ended = str(p.exit_code)
        table.add_row(escape(p.id), str(p.pid), escape(p.user), escape(p.state), started, ended,
                      str(p.buffered_bytes), str(p.dropped_bytes), escape(" ".join(p.argv)))
    out.print(table)


@click.command("attach", cls=ExecCommand)
@click.argument("name")
@click.argument("process_id", metavar="ID")
def vm_attach(name: str, process_id: str) -> None:
    """Stream background process ID's output (what the guest kept, then live) until it
    exits; exit with its status. Ctrl-C detaches: the process keeps running.

    stdout goes to stdout and stderr to stderr; output the guest's 1 MiB buffer dropped
    is reported on stderr.
    """
    with exec_errors(as_json=False):
        try:
            status = follow_detached(name, process_id)
        except KeyboardInterrupt:
            note(f"detached from {process_id}; it keeps running "
                 f"(stop it: secvf vm kill {name} {process_id})")
            sys.exit(INTERRUPTED_EXIT)
        sys.exit(status)


@click.command("kill")
@click.argument("name")
@click.argument("process_id", metavar="ID")
@click.option("--signal", "-s", "signal_name", default="TERM", show_default=True,
              help="Signal to send to the process group (a name or a number).")
def vm_kill(name: str, process_id: str, signal_name: str) -> None:
    """Send a signal (default TERM) to background process ID's process group."""
    api.kill_detached(name, process_id, parse_signal(signal_name))
