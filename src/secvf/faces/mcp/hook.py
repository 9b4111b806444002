"""The confirmation hook: a script that approves or denies a held call.

When the client cannot ask its user (no elicitation capability), a held call is
denied unless the configured hook approves it. The contract (the original SecVF's):
the hook gets one JSON object on stdin (``tool``, ``arguments``, ``reasons``, ``tier``,
``client``); exit status 0 approves, anything else denies, and a hook that has not
exited after the timeout is killed and counts as a denial. Its stdout and stderr are
kept (capped) for the audit log only.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: How much of the hook's output the audit record keeps.
HOOK_OUTPUT_CAP = 512


@dataclass(frozen=True)
class HookVerdict:
    """What the hook said: ``approved`` and why (``exit 0``, ``exit 3``, ``timeout`` …)."""

    approved: bool
    reason: str
    output: str = ""


def run_hook(script: Path, request: dict[str, Any], *, timeout_s: float) -> HookVerdict:
    """Run ``script`` with ``request`` as JSON on stdin and return its verdict.

    Never raises: a script that cannot be started, crashes or times out denies.
    """
    payload = json.dumps(request, default=str).encode()
    try:
        done = subprocess.run([str(script)], input=payload, capture_output=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return HookVerdict(False, f"timeout after {timeout_s:g} s")
    except OSError as exc:
        return HookVerdict(False, f"hook could not run: {exc}")
    output = (done.stdout + done.stderr).decode("utf-8", "replace")[:HOOK_OUTPUT_CAP]
    return HookVerdict(done.returncode == 0, f"exit {done.returncode}", output)
