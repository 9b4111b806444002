"""``secvf vm exec`` without click, for the command lines it is mostly called with.

An agent runs ``vm exec`` once per command, so its start is paid per command; click
and the rest of the command tree are a good part of it. :func:`run` parses a *plain*
command line itself (:func:`parse`) and runs it as the click command would
(:func:`~secvf.faces.cli.exec_core.run_vm_exec`, errors reported the same way), then
ends the process at once (:func:`exit_now`). Any other command line (``--help``, a
mistake, an option form :func:`parse` does not take) is left to click, so the help and
the usage errors are click's own.

Plain means: the options are words of their own from :data:`FLAGS` and :data:`VALUES`
(``--long=VALUE`` and short flags run together, ``-it``, too), and ``--timeout`` and
``--wait`` valid durations; no shell completion is asked for.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from secvf.errors import SecVFError
from secvf.faces.cli.common import parse_seconds, report_error, show_library_warnings
from secvf.faces.cli.exec_core import run_vm_exec

#: ``vm exec``'s flags and the parameter each sets (a test keeps them the click command's).
FLAGS = {"--root": "root", "-t": "tty_mode", "--tty": "tty_mode", "-i": "interactive",
         "--interactive": "interactive", "-d": "detach", "--detach": "detach",
         "--json": "as_json"}
#: ``vm exec``'s options that take a value, and their parameters.
VALUES = {"-c": "shell", "-u": "user", "--user": "user", "-e": "env", "--env": "env",
          "-w": "workdir", "--workdir": "workdir", "--timeout": "timeout", "--wait": "wait"}
#: The parameters that collect every value given (the others keep the last one).
MULTIPLE = frozenset({"env"})
#: The parameters that are durations (:func:`~secvf.faces.cli.common.parse_seconds`).
DURATIONS = frozenset({"timeout", "wait"})


def run(words: Sequence[str]) -> None:
    """Run ``secvf vm exec WORDS`` and end the process, if WORDS are a plain command line
    (see the module); return without doing anything if not, for click to run it."""
    params = parse(words)
    if params is None or any(key.startswith("_") and key.endswith("_COMPLETE")
                             for key in os.environ):  # click's shell completion
        return
    show_library_warnings()  # what the root command does for every command
    try:
        status = _status(params)
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        status = 1  # as click: whoever read stdout went away (`| head`), a quiet exit 1
    exit_now(status)


def _status(params: dict[str, Any]) -> int:
    """Run the command; its exit status, or the code of the SecVF error that ended it,
    reported as the CLI reports one."""
    try:
        return run_vm_exec(**params)
    except SecVFError as exc:
        report_error(exc, as_json=params["as_json"])
        return exc.exit_code


def parse(words: Sequence[str]) -> dict[str, Any] | None:
    """The parameters of ``vm exec`` (as click passes them to the command) from the words
    after ``vm exec``, or None if they are not a plain command line.

    As the click command parses them: options before and after NAME; after NAME the
    first word that is not an option (or what follows ``--``) is the command, and
    everything after ``--`` before NAME is NAME and the command.
    """
    params: dict[str, Any] = {"shell": None, "user": None, "root": False, "env": [],
                              "workdir": None, "tty_mode": False, "interactive": False,
                              "timeout": None, "wait": None, "detach": False,
                              "as_json": False}
    stop = _options(words, 0, params)
    if stop is None or "--" in words[:stop]:
        return None  # a bad option, or "--" as an option's value (click's odd case)
    if stop < len(words) and words[stop] == "--":
        name_at, command_at = stop + 1, stop + 2
    else:
        name_at = stop
        after = _options(words, stop + 1, params)
        if after is None:
            return None
        command_at = after + 1 if after < len(words) and words[after] == "--" else after
    if name_at >= len(words):
        return None  # no NAME: click says so
    params["env"] = tuple(params["env"])
    return {"name": words[name_at], "command": tuple(words[command_at:]), **params}


def _options(words: Sequence[str], at: int, params: dict[str, Any]) -> int | None:
    """Take the options from ``words[at:]`` into ``params``, up to the first word that is
    not one (or ``--``); that word's index, or None for an option that is not plain."""
    while at < len(words) and words[at] != "--" and words[at].startswith("-"):
        word = words[at]
        option, has_value, value = word.partition("=")
        if word in FLAGS:
            params[FLAGS[word]] = True
        elif word in VALUES and at + 1 < len(words):
            at += 1
            if not _set(params, VALUES[word], words[at]):
                return None
        elif has_value and option.startswith("--") and option in VALUES:
            if not _set(params, VALUES[option], value):
                return None
        elif len(word) > 2 and not word.startswith("--") \
                and all(f"-{letter}" in FLAGS for letter in word[1:]):
            params.update((FLAGS[f"-{letter}"], True) for letter in word[1:])
        else:
            return None
        at += 1
    return at


def _set(params: dict[str, Any], key: str, value: str) -> bool:
    """Give option ``key`` the ``value``; False if it is not a plain one."""
    if key in DURATIONS:
        try:
            params[key] = parse_seconds(value, zero_ok=False)
        except ValueError:
            return False
    elif key in MULTIPLE:
        params[key].append(value)
    else:
        params[key] = value
    return True


def exit_now(status: int) -> NoReturn:
    """End the process with ``status`` once stdout and stderr are flushed, without
    tearing the interpreter down (for a short command, a good part of its run time).

    Nothing on ``vm exec``'s path needs that: the one exit handler is logging's, which
    flushes handlers (the library's warnings go to stderr as they are logged), its
    threads are daemons, and its connection is closed by then. A stdout whose reader
    went away is no error here, as under click; any other failure to flush is left to
    the interpreter's own exit, which reports it.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                sys.exit(status)
    os._exit(status)
