"""Danger patterns: exec commands that need a human's confirmation before they run.

These are a speed bump, not a boundary: a determined agent can always write a
command no pattern recognises (``base64 -d | sh``, a script file, Python). The VM is
the boundary; the patterns catch the obvious cases so a person sees them first.
Each pattern has a category, so the confirmation prompt and the audit log say *why*
a command was held.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DangerMatch:
    """One pattern that matched: its category and the text that matched."""

    category: str
    pattern: str
    matched: str


#: (category, regular expression); matched case-insensitively against the command
#: as one string (an argv is joined with spaces, shell-quoted).
PATTERNS: tuple[tuple[str, str], ...] = (
    # destructive deletes: recursive rm of anything, a glob, find -delete, wipes
    ("destructive-delete", r"\brm\s+(-[a-z]*\s+)*-[a-z]*r[a-z]*\b"),
    ("destructive-delete", r"\brm\s+(-[a-z-]+\s+)*--recursive\b"),
    ("destructive-delete", r"\brm\s+[^;&|]*(\*|(?<!\S)(/|~|\.|\.\.)(?=\s|$))"),
    ("destructive-delete", r"\bfind\b.*\s-delete\b"),
    ("destructive-delete", r"\bfind\b.*-exec\s+rm\b"),
    ("destructive-delete", r"\b(shred|wipefs|mkfs(\.\w+)?|blkdiscard)\b"),
    ("destructive-delete", r"\bdd\b.*\bof=/dev/"),
    ("destructive-delete", r">\s*/dev/(sd|vd|nvme|xvd)"),
    ("destructive-delete", r"\bgit\s+clean\s+-[a-z]*f"),
    # pipe-to-shell: download and execute
    ("pipe-to-shell", r"\b(curl|wget)\b[^|;&]*\|\s*(sudo\s+)?(ba|z|da|k)?sh\b"),
    ("pipe-to-shell", r"\b(curl|wget)\b[^|;&]*\|\s*(sudo\s+)?(python3?|perl|ruby|node|php)\b"),
    ("pipe-to-shell", r"\b(ba|z|da)?sh\s+(-c\s+)?[\"']?\$\(\s*(curl|wget)\b"),
    ("pipe-to-shell", r"\bsource\s+<\(\s*(curl|wget)\b"),
    # reverse shells
    ("reverse-shell", r"/dev/(tcp|udp)/"),
    ("reverse-shell", r"\b(nc|ncat|netcat)\b.*\s-[a-z]*[ec]\b"),
    ("reverse-shell", r"\bsocat\b.*\bexec:"),
    ("reverse-shell", r"\bmkfifo\b.*\b(nc|ncat|netcat|sh)\b"),
    ("reverse-shell", r"socket\.socket\(.*(connect|dup2)"),
    ("reverse-shell", r"\bpty\.spawn\("),
    # persistence
    ("persistence", r"\bcrontab\b(?!\s+-l\b)"),
    ("persistence", r"(>>?|\btee\b|\bcp\b|\bmv\b|\bln\b|\binstall\b)[^;&|]*"
                    r"/etc/(cron[.\w]*|systemd/|init\.d/|rc\.local|profile(\.d)?\b)"),
    ("persistence", r"\bsystemctl\s+(--user\s+)?(enable|link|edit)\b"),
    ("persistence", r"(>>?|\btee\b(\s+-a)?|\bcp\b|\bmv\b)[^;&|]*"
                    r"(\.bashrc|\.bash_profile|\.profile|\.zshrc|\.ssh/authorized_keys)\b"),
    ("persistence", r"\bat\s+(now|-f)\b"),
    # privilege escalation
    ("privilege-escalation", r"\b(sudo|doas|pkexec)\b"),
    ("privilege-escalation", r"\bsu(\s+-|\s+root)?(\s|$)"),
    ("privilege-escalation", r"\bchmod\s+([ugoa]*\+[rwx]*s|[2467][0-7]{3})\b"),
    ("privilege-escalation", r"\bsetcap\b"),
    ("privilege-escalation", r"/etc/(sudoers|shadow|passwd)\b"),
    # egress to the internet
    ("internet-egress", r"\b(curl|wget|aria2c)\b\s"),
    ("internet-egress", r"\b(nc|ncat|netcat|telnet|ssh|scp|sftp|rsync|ftp)\s+\S"),
    ("internet-egress", r"\bgit\s+(clone|fetch|pull|push)\b"),
    ("internet-egress", r"\b(pip3?|npm|yarn|gem|cargo|go)\s+(install|get|add)\b"),
    ("internet-egress", r"\bapt(-get)?\s+(install|update|upgrade)\b"),
    ("internet-egress", r"\bhttps?://"),
)

_COMPILED = tuple((category, pattern, re.compile(pattern, re.IGNORECASE))
                  for category, pattern in PATTERNS)


def command_text(command: str | Sequence[str]) -> str:
    """The command as one string: a shell string as it is, an argv shell-quoted."""
    if isinstance(command, str):
        return command
    return shlex.join(list(command))


def find_dangers(command: str | Sequence[str]) -> list[DangerMatch]:
    """Every pattern ``command`` matches (at most one per category), in pattern order."""
    text = command_text(command)
    found: dict[str, DangerMatch] = {}
    for category, pattern, regex in _COMPILED:
        if category in found:
            continue
        match = regex.search(text)
        if match:
            found[category] = DangerMatch(category, pattern, match.group(0))
    return list(found.values())
