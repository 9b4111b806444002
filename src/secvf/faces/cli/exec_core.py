"""What ``secvf vm exec`` does once its command line is parsed, without click.

The click command (:mod:`.vm_exec`) and the lean start (:mod:`.lean_exec`) both run
:func:`run_vm_exec`; :func:`exec_errors` gives ``vm exec`` and ``sandbox run`` their
exit statuses (see :mod:`.vm_exec` for what they are).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from secvf import api
from secvf.errors import CommandStartFailed, ConfigError, ExitCode, SecVFError
from secvf.faces.cli.common import failure_json, print_json
from secvf.faces.cli.terminal import INTERRUPTED_EXIT, forwards_stdin, run_streaming


@contextlib.contextmanager
def exec_errors(as_json: bool) -> Iterator[None]:
    """Exit statuses of ``vm exec`` and ``sandbox run`` for what goes wrong in the block.

    A SecVFError leaves with exit code 125 (126/127 for a command that did not start)
    and is reported by the CLI as usual (JSON too with ``as_json``); Ctrl-C exits 130
    quietly (with ``as_json``, as a JSON error).
    """
    try:
        yield
    except SecVFError as exc:
        if not isinstance(exc, CommandStartFailed):
            exc.exit_code = ExitCode.SECVF_ERROR  # this command's code for SecVF failures
        raise
    except KeyboardInterrupt:
        if as_json:
            print_json(failure_json("KeyboardInterrupt", "interrupted", INTERRUPTED_EXIT))
        sys.exit(INTERRUPTED_EXIT)


def run_vm_exec(name: str, command: tuple[str, ...], *, shell: str | None, user: str | None,
                root: bool, env: tuple[str, ...], workdir: str | None, tty_mode: bool,
                interactive: bool, timeout: float | None, wait: float | None, detach: bool,
                as_json: bool) -> int:
    """Run ``secvf vm exec`` with the parameters of its command line; return the status
    to exit with (the command's, or 0 once a ``--detach`` command started).

    Raises:
        SecVFError: with exit code 125, or 126/127 if the command did not start (see
            :func:`exec_errors`), for the caller to report.
    """
    with exec_errors(as_json):
        cmd = _command(command, shell)
        env_map = _environment(env)
        if root and user:
            raise ConfigError("--root and --user exclude each other")
        user = "root" if root else user
        if detach and (tty_mode or interactive or timeout is not None):
            raise ConfigError("--detach takes no -t, -i or --timeout: a background process "
                              "has no terminal and no stdin (read its output with secvf vm "
                              "attach) and runs until it exits or secvf vm kill")
        if wait is not None:
            api.wait_for_exec(name, wait)
        if detach:
            started = api.start_detached(name, cmd, env=env_map, cwd=workdir, user=user)
            if as_json:
                print_json({"id": started.id, "pid": started.pid})
            else:
                import click  # its echo strips terminal codes from the guest's id off a terminal

                click.echo(started.id)
            return 0
        if as_json:
            stdin = sys.stdin.buffer if forwards_stdin(tty_mode, interactive) else None
            result = api.run_command(name, cmd, env=env_map, cwd=workdir, user=user,
                                     tty=tty_mode, stdin=stdin, timeout=timeout)
            data = api.result_as_json(result)
            print_json(data)
            return int(data["exit_status"])
        return run_streaming(name, cmd, env=env_map, cwd=workdir, user=user,
                             tty_mode=tty_mode, interactive=interactive, timeout=timeout)


def _command(words: tuple[str, ...], shell: str | None) -> str | list[str]:
    """The argv, or the shell string of ``-c``.

    Raises:
        ConfigError: neither or both were given.
    """
    if bool(shell) == bool(words):
        raise ConfigError("give a command (after NAME, or after '--') or a shell string "
                          "with -c (not both)")
    return shell if shell else list(words)


def _environment(items: tuple[str, ...]) -> dict[str, str]:
    """``-e K=V`` options as a mapping.

    Raises:
        ConfigError: an item without ``=`` or with an empty name.
    """
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"-e {item!r}: expected KEY=VALUE")
        env[key] = value
    return env
