"""A command's process group and session: who is still in it, and ending all of them."""

from __future__ import annotations

import os
import signal
import time

from secvf.exec import protocol

GROUP_POLL_S = 0.02


def group_members(leader: int) -> list[int]:
    """Return live pids whose process group or session is ``leader`` (zombies excluded)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
        if state != b"Z" and leader in (pgrp, session):
            members.append(int(entry))
    return members


def terminate_group(leader: int, grace_s: float = protocol.KILL_GRACE_S) -> None:
    """SIGTERM every process of ``leader``'s group/session, SIGKILL survivors after grace."""
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while members := group_members(leader):
        for pid in members:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            time.sleep(GROUP_POLL_S)
        elif time.monotonic() >= deadline:
            sig = signal.SIGKILL
        else:
            time.sleep(GROUP_POLL_S)
