"""The CLI imports only what a command needs (issue 11: a lean start).

Each test runs the real CLI (``python -m secvf``) in a fresh interpreter and looks at
``sys.modules`` when it is done: ``--help`` loads neither rich nor pydantic nor any
layer below the API, and ``vm exec`` loads the exec client and a quick look at the VM's
records, not pydantic, asyncio, qemu.qmp, the image builder or the supervisor, and for a
plain command line not click, the other commands or rich either (``NOT_IN_LEAN_EXEC``).
A heavy import put back at the top of a module (``api``, a CLI module, a package
``__init__``) makes these fail. Nothing is timed here: ``bench/cli_start.py`` measures.

The lazy re-exports of :mod:`secvf.api` and :mod:`secvf.image` (PEP 562) are checked
against the imports mypy sees, so the two cannot drift apart.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.unit.running_sandbox import RunningSandbox

#: Runs ``python -m secvf ARGS`` in this interpreter, then prints the loaded modules (also
#: when the lean ``vm exec`` ends the process with ``os._exit``).
PROBE = """\
import os, runpy, sys
def modules():
    print("\\n--modules--\\n" + " ".join(sorted(sys.modules)), flush=True)
def exit_now(status, _exit=os._exit):
    modules()
    _exit(status)
os._exit = exit_now
try:
    runpy.run_module("secvf", run_name="__main__", alter_sys=True)
finally:
    modules()
"""

#: Never needed to parse a command line, print help or run a command in a sandbox.
HEAVY = ("pydantic", "pydantic_core", "asyncio", "qemu", "secvf.model.config",
         "secvf.model.runtime", "secvf.store.library", "secvf.store.runstate", "secvf.image",
         "secvf.machine", "secvf.runtime", "secvf.sdk")

#: Not loaded by a plain ``vm exec`` command line (secvf.faces.cli.lean_exec): click and
#: the command tree, rich (a one-line error is written without it), the client's replies
#: to other requests, and what only other paths need from the standard library (tempfile
#: for downloads and platformdirs without SECVF_HOME, uuid, datetime).
NOT_IN_LEAN_EXEC = ("click", "rich", "secvf.faces.cli.commands", "secvf.faces.cli.app",
                    "secvf.faces.cli.vm", "secvf.faces.cli.vm_exec", "secvf.faces.cli.sandbox",
                    "secvf.exec.replies", "platformdirs", "tempfile", "uuid", "datetime")


def run_probe(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """The CLI run with ``args`` (its output before the module list) and its modules."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                          text=True, timeout=120, check=False)
    output, marker, modules = proc.stdout.rpartition("\n--modules--\n")
    assert marker, f"the probe printed no module list:\n{proc.stdout}\n{proc.stderr}"
    proc.stdout = output
    return proc, set(modules.split())


def loaded(modules: set[str], packages: Iterable[str]) -> list[str]:
    """The modules in ``modules`` that are one of ``packages`` or inside one."""
    return sorted(m for m in modules
                  if any(m == p or m.startswith(p + ".") for p in packages))


@pytest.mark.parametrize("args", [("--help",), ("vm", "--help"), ("vm", "exec", "--help"),
                                  ("sandbox", "run", "--help")])
def test_help_loads_no_rich_and_nothing_below_the_api(args: tuple[str, ...]) -> None:
    proc, modules = run_probe(*args)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    assert loaded(modules, (*HEAVY, "rich", "secvf.exec", "secvf.store",
                            "secvf.workflows")) == []
    assert "secvf.api" in modules  # the CLI got its option choices from the API


def test_vm_exec_of_a_missing_vm_loads_only_the_exec_path() -> None:
    proc, modules = run_probe("vm", "exec", "nosuch", "--", "true")
    assert (proc.returncode, proc.stderr) == (
        125, "secvf: error: no VM named 'nosuch' (see: secvf vm list)\n")
    assert loaded(modules, (*HEAVY, *NOT_IN_LEAN_EXEC)) == []
    assert loaded(modules, ["secvf.workflows"]) == ["secvf.workflows",
                                                    "secvf.workflows.vm_exec"]
    assert "secvf.exec.client" in modules  # what the command runs with (were it found)


def test_vm_exec_in_a_running_sandbox_loads_neither_rich_nor_pydantic(tmp_path: Path) -> None:
    with RunningSandbox(tmp_path, "agent1"):
        proc, modules = run_probe("vm", "exec", "agent1", "--", "sh", "-c", "echo hi")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "hi\n", "")
    assert loaded(modules, (*HEAVY, *NOT_IN_LEAN_EXEC)) == []
    assert "secvf.store.peek" in modules


def test_vm_exec_json_in_a_running_sandbox_stays_lean(tmp_path: Path) -> None:
    with RunningSandbox(tmp_path, "agent1"):
        proc, modules = run_probe("vm", "exec", "--json", "agent1", "--", "true")
    assert proc.returncode == 0, proc.stderr
    assert '"exit_status": 0' in proc.stdout
    assert loaded(modules, (*HEAVY, *NOT_IN_LEAN_EXEC)) == []


@pytest.mark.parametrize("args", [("vm", "exec", "-h"), ("vm", "exec", "-ua", "nosuch", "true"),
                                  ("vm", "exec", "-x", "nosuch", "--", "true")])
def test_a_vm_exec_command_line_that_is_not_plain_goes_through_click(
        args: tuple[str, ...]) -> None:
    """Help, an option form the lean parser does not take, a bad option: click's turn
    (and so its help text and usage errors)."""
    proc, modules = run_probe(*args)
    assert "click" in modules and "secvf.faces.cli.commands" in modules
    assert proc.returncode in (0, 125), proc.stderr


@pytest.mark.parametrize("module", ["secvf.api", "secvf.image", "secvf.machine"])
def test_lazy_re_exports_match_the_imports_mypy_sees(module: str) -> None:
    """``_LAZY`` (what ``__getattr__`` imports) names exactly the ``if TYPE_CHECKING:``
    imports of the module, each from the same module, and every one resolves; those
    from the standard library are for annotations only."""
    mod = importlib.import_module(module)
    assert mod.__file__ is not None
    tree = ast.parse(Path(mod.__file__).read_text())
    seen: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom) and stmt.module, ast.unparse(stmt)
                if stmt.module.split(".")[0] in sys.stdlib_module_names:
                    continue
                seen.update((alias.name, stmt.module) for alias in stmt.names)
    assert seen == mod._LAZY
    missing = [name for name in seen if getattr(mod, name, None) is None]
    assert missing == []


@pytest.mark.parametrize("module", ["secvf.api", "secvf.image", "secvf.machine"])
def test_star_import_of_the_lazy_modules_works_in_a_fresh_interpreter(module: str) -> None:
    probe = (f"import {module} as m\nfrom {module} import *\n"
             "missing = [n for n in m.__all__ if n not in globals()]\n"
             "assert missing == [], missing\n"
             "assert set(m.__all__) <= set(dir(m))\n")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)
