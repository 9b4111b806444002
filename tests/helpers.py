"""Helpers shared by tests (not fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, check: bool = False, timeout: float = 300,
            input_bytes: bytes | None = None,
            prog: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``secvf`` CLI in a subprocess with the test's environment.

    ``prog`` names an installed console script (``secvf-cli``) to run instead of
    ``python -m secvf``.
    """
    argv = [os.path.join(os.path.dirname(sys.executable), prog)] if prog else [
        sys.executable, "-m", "secvf"]
    proc = subprocess.run(
        [*argv, *args], capture_output=True, text=input_bytes is None,
        timeout=timeout, env=os.environ.copy(), check=False, input=input_bytes,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"secvf {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (False if it vanishes mid-read)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
