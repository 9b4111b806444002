"""The lean ``secvf vm exec`` (:mod:`secvf.faces.cli.lean_exec`): it parses a plain command
line exactly as the click command does, leaves every other one to click, and runs, reports
and exits as the click command does; and the one-line errors and notes it writes without
rich are what rich would have printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from secvf.faces.cli import lean_exec
from secvf.faces.cli.app import Seconds
from secvf.faces.cli.vm_exec import vm_exec
from tests.unit.running_sandbox import RunningSandbox

#: Command lines (the words after ``vm exec``) the lean parser takes.
PLAIN = [
    ["agent1", "--", "true"],
    ["agent1", "true"],
    ["agent1"],
    ["agent1", "--"],
    ["agent1", "echo", "-w", "200", "--json", "-i"],
    ["-w", "/tmp", "agent1", "-e", "A=1", "--", "sh", "-c", "echo $A"],
    ["--json", "agent1", "--timeout", "30", "ls"],
    ["-it", "agent1", "bash"],
    ["-ti", "--root", "agent1", "--", "-x"],
    ["agent1", "-t", "--", "-e"],
    ["--", "agent1", "-t", "ls"],
    ["-e", "A=1", "-e", "B=2", "agent1", "--env", "C=3", "env"],
    ["--env=A=1", "--user=", "--timeout=0.5", "agent1", "true"],
    ["-c", "echo hi", "agent1"],
    ["-c", "-x", "agent1"],
    ["agent1", "-e", "--", "ls"],
    ["-u", "alice", "-u", "bob", "agent1", "id"],
    ["-d", "--detach", "agent1", "sleep", "9"],
    ["--wait", "1e3", "--interactive", "--tty", "agent1", "cat"],
    ["", "true"],
]

#: Command lines it leaves to click: help, mistakes, and forms it does not take.
NOT_PLAIN = [
    [], ["--json"], ["--"], ["-h"], ["--help"], ["agent1", "--help"], ["-x", "agent1", "true"],
    ["agent1", "-x", "true"], ["-ua", "agent1", "id"], ["-te", "A=1", "agent1", "true"],
    ["-tx", "agent1", "true"], ["--user"], ["agent1", "-w"], ["--root=1", "agent1", "true"],
    ["-", "agent1"], ["agent1", "-", "true"], ["--timeout", "0", "agent1", "true"],
    ["--timeout", "x", "agent1", "true"], ["--wait", "inf", "agent1", "true"],
    ["agent1", "--timeout", "-1", "true"], ["-c", "--", "agent1", "-t"],
    ["-e", "--", "agent1", "-t", "ls"],
]


def click_params(words: list[str]) -> dict[str, Any] | None:
    """The parameters the click command gives its callback for ``vm exec WORDS``; None if
    it refuses them (a usage error exits 125)."""
    try:
        with vm_exec.make_context("exec", list(words)) as ctx:
            return dict(ctx.params)
    except (SystemExit, click.exceptions.Exit):
        return None


@pytest.mark.parametrize("words", PLAIN, ids=" ".join)
def test_a_plain_command_line_is_parsed_as_click_parses_it(words: list[str]) -> None:
    expected = click_params(words)
    assert expected is not None
    assert lean_exec.parse(words) == expected


@pytest.mark.parametrize("words", NOT_PLAIN, ids=" ".join)
def test_any_other_command_line_is_left_to_click(words: list[str]) -> None:
    assert lean_exec.parse(words) is None


def test_the_option_tables_are_the_click_commands() -> None:
    flags: dict[str, str] = {}
    values: dict[str, str] = {}
    for param in vm_exec.params:
        if isinstance(param, click.Option):
            assert param.name is not None and not param.secondary_opts
            (flags if param.is_flag else values).update(dict.fromkeys(param.opts, param.name))
    assert (flags, values) == (lean_exec.FLAGS, lean_exec.VALUES)
    assert lean_exec.MULTIPLE == {p.name for p in vm_exec.params if p.multiple}
    assert lean_exec.DURATIONS == {p.name for p in vm_exec.params
                                   if isinstance(p.type, Seconds)}


# ---- the same outcome as through click -------------------------------------------------------

#: Runs the click command tree itself, as the CLI did before the lean start.
THROUGH_CLICK = "import sys; sys.argv[0] = 'secvf'; from secvf.faces.cli.commands import cli; cli()"


def run(*args: str, through_click: bool, stdin: bytes = b"") -> tuple[int, str, str]:
    """``secvf vm exec ARGS``, lean (``python -m secvf``) or through click."""
    start = ["-c", THROUGH_CLICK] if through_click else ["-m", "secvf"]
    proc = subprocess.run([sys.executable, *start, "vm", "exec", *args], input=stdin,
                          capture_output=True, timeout=120, env=os.environ.copy(), check=False)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def without_durations(output: str) -> Any:
    """A ``--json`` result without its timing (which differs between runs)."""
    data = json.loads(output)
    data.pop("duration_ms", None)
    return data


@pytest.fixture
def box(tmp_path: Path) -> Iterator[RunningSandbox]:
    with RunningSandbox(tmp_path, "agent1") as running:
        yield running


@pytest.mark.parametrize("args", [
    ("nosuch", "--", "true"), ("--json", "nosuch", "--", "true"), ("agent1",),
    ("--root", "-u", "x", "agent1", "true"), ("-e", "BAD", "--json", "agent1", "true"),
    ("-d", "-t", "agent1", "true"), ("bad/name", "true"),
], ids=" ".join)
def test_failures_before_the_vm_is_reached_are_reported_as_through_click(
        args: tuple[str, ...]) -> None:
    lean = run(*args, through_click=False)
    assert lean[0] == 125
    assert lean == run(*args, through_click=True)


@pytest.mark.parametrize("args", [
    ("agent1", "--", "sh", "-c", "echo out; echo err >&2; exit 3"),
    ("-c", "echo hi; kill -TERM $$", "agent1"),
    ("-i", "agent1", "--", "wc", "-c"),
    ("agent1", "--", "no-such-command-anywhere"),
], ids=" ".join)
def test_commands_run_as_through_click(box: RunningSandbox, args: tuple[str, ...]) -> None:
    assert run(*args, through_click=False, stdin=b"12345") == run(*args, through_click=True,
                                                                   stdin=b"12345")


def test_json_results_are_as_through_click(box: RunningSandbox) -> None:
    args = ("--json", "agent1", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    lean, through = run(*args, through_click=False), run(*args, through_click=True)
    assert (lean[0], lean[2]) == (through[0], through[2]) == (3, "")
    assert without_durations(lean[1]) == without_durations(through[1])


@pytest.mark.parametrize("through_click", [False, True])
def test_a_json_error_to_a_reader_gone_ends_it_quietly_with_1(through_click: bool) -> None:
    start = ["-c", THROUGH_CLICK] if through_click else ["-m", "secvf"]
    proc = subprocess.Popen([sys.executable, *start, "vm", "exec", "--json", "nosuch", "true"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    assert (proc.wait(timeout=60), proc.stderr.read()) == (1, b"")


@pytest.mark.parametrize("through_click", [False, True])
def test_a_reader_that_goes_away_ends_it_quietly_with_1(box: RunningSandbox,
                                                        through_click: bool) -> None:
    start = ["-c", THROUGH_CLICK] if through_click else ["-m", "secvf"]
    proc = subprocess.Popen([sys.executable, *start, "vm", "exec", "agent1", "--", "yes"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"y\n"
    proc.stdout.close()
    assert (proc.wait(timeout=60), proc.stderr.read()) == (1, b"")


def test_exit_now_flushes_stdout_and_exits_with_the_status() -> None:
    probe = ("import sys\nfrom secvf.faces.cli.lean_exec import exit_now\n"
             "sys.stdout.write('buffered')\nsys.stderr.write('also')\nexit_now(7)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, "buffered", "also")


# ---- one-line notes and errors without rich --------------------------------------------------

#: Lines rich prints as they are: written without it.
PLAIN_LINES = ["secvf: error: no VM named 'x' (see: secvf vm list)", "", "x" * 300,
               "naïve café ✓ 日本語 😀", "[bold]not markup[/bold] \\[x]", "ratio 1:2 at 12:00",
               "a: b: c", "secvf: note: connection closed (~.): the guest kills the command",
               ":smile: here", "http://host:8080/x"]  # no emoji: the console has them off
#: Lines rich changes (a tab, control characters): printed through it.
RICH_LINES = ["tab\there", "two\nlines", "bell\a", "cr\r"]

#: Prints PLAIN_LINES (rich still not loaded after them) and RICH_LINES with print_line,
#: then all of them through a rich console; prints both outputs as JSON.
PRINT_PROBE = """\
import io, json, sys
from secvf.faces.cli.common import LazyConsole
plain_lines, rich_lines = json.loads(sys.argv[1])
stderr, sys.stderr = sys.stderr, io.StringIO()
for line in plain_lines:
    LazyConsole(stderr=True).print_line(line)
assert "rich.console" not in sys.modules
for line in rich_lines:
    LazyConsole(stderr=True).print_line(line)
print_line, sys.stderr = sys.stderr.getvalue(), io.StringIO()
for line in plain_lines + rich_lines:
    LazyConsole(stderr=True).print(line, markup=False, highlight=False)
through_rich, sys.stderr = sys.stderr.getvalue(), stderr
print(json.dumps([print_line, through_rich]))
"""


@pytest.mark.parametrize("terminal", [False, True])
def test_a_line_printed_without_rich_is_what_rich_prints(terminal: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR")}
    if terminal:  # rich then writes as to a terminal 40 columns wide
        env.update(FORCE_COLOR="1", COLUMNS="40")
    lines = json.dumps([PLAIN_LINES, RICH_LINES])
    proc = subprocess.run([sys.executable, "-c", PRINT_PROBE, lines],
                          capture_output=True, text=True, timeout=60, env=env, check=True)
    print_line, through_rich = json.loads(proc.stdout)
    assert print_line == through_rich
