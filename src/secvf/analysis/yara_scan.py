"""YARA over the sample and the files it dropped (optional).

Uses ``yara-python`` when it is importable, else the ``yara`` command-line tool, else
nothing: :func:`scan` then returns ``enabled: false`` with a note, as it does when no rule
files are given. Rules are the analyst's (trusted); targets are hostile files, so each
scan has a timeout, files over :data:`MAX_TARGET_BYTES` are skipped, and at most
:data:`MAX_MATCHES` matches are kept.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["scan", "engine", "MAX_MATCHES"]

SCAN_TIMEOUT_S = 30  # per target
MAX_TARGET_BYTES = 256 << 20  # larger files are not scanned
MAX_MATCHES = 200  # matches kept in all
MAX_STRINGS = 16  # string identifiers kept per match


def engine() -> str | None:
    """``yara-python``, ``yara-cli`` or None: what :func:`scan` would use."""
    try:
        import yara  # noqa: F401
    except ImportError:
        return "yara-cli" if shutil.which("yara") else None
    return "yara-python"


def scan(rules: Sequence[Path], targets: Sequence[tuple[str, Path]]) -> dict[str, Any]:
    """Run the rule files ``rules`` over ``targets`` ((label, host path) pairs).

    Returns:
        the report's ``yara`` section. Never raises: a rule file that does not compile
        or a target that cannot be read is said in ``note``.
    """
    names = [p.name for p in rules]
    which = engine() if rules else None
    if not rules:
        return _section(False, None, names, [], "no YARA rules given; not scanned")
    if which is None:
        return _section(False, None, names, [],
                        "no YARA engine (install yara-python or the yara package)")
    matches: list[dict[str, Any]] = []
    problems: list[str] = []
    runner = _scan_python if which == "yara-python" else _scan_cli
    for label, path in targets:
        if len(matches) >= MAX_MATCHES:
            problems.append(f"stopped after {MAX_MATCHES} matches")
            break
        try:
            if path.stat().st_size > MAX_TARGET_BYTES:
                problems.append(f"{label}: larger than {MAX_TARGET_BYTES} bytes, not scanned")
                continue
        except OSError as exc:
            problems.append(f"{label}: {exc.strerror or exc}")
            continue
        try:
            found = runner(rules, path)
        except _RulesError as exc:
            return _section(False, which, names, [], f"rules do not compile: {exc}")
        except Exception as exc:  # noqa: BLE001 — a hostile target must not stop the report
            problems.append(f"{label}: {exc}"[:300])
            continue
        matches.extend({"target": label, **m} for m in found)
    return _section(True, which, names, matches[:MAX_MATCHES],
                    "; ".join(problems)[:2000] or None)


class _RulesError(Exception):
    pass


_compiled: dict[tuple[str, ...], Any] = {}


def _scan_python(rules: Sequence[Path], path: Path) -> list[dict[str, Any]]:
    import yara

    key = tuple(str(p) for p in rules)
    compiled = _compiled.get(key)
    if compiled is None:
        try:
            compiled = yara.compile(filepaths={f"r{i}": str(p) for i, p in enumerate(rules)})
        except yara.Error as exc:
            raise _RulesError(str(exc)) from exc
        _compiled.clear()
        _compiled[key] = compiled
    out = []
    for m in compiled.match(str(path), timeout=SCAN_TIMEOUT_S):
        strings = sorted({s.identifier if hasattr(s, "identifier") else str(s[1])
                          for s in m.strings})[:MAX_STRINGS]
        out.append({"rule": str(m.rule), "tags": [str(t) for t in m.tags], "strings": strings})
    return out


def _scan_cli(rules: Sequence[Path], path: Path) -> list[dict[str, Any]]:
    out = []
    for rule_file in rules:
        try:
            proc = subprocess.run(["yara", "-g", "-s", "-w", "--", str(rule_file), str(path)],
                                  capture_output=True, text=True, errors="replace",
                                  timeout=SCAN_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"yara timed out after {SCAN_TIMEOUT_S} s") from exc
        if proc.returncode != 0:
            raise _RulesError(proc.stderr.strip()[:300])
        current: dict[str, Any] | None = None
        for line in proc.stdout.splitlines():
            if line.startswith("0x") and current is not None:
                ident = line.split(":", 2)[1] if line.count(":") >= 2 else ""
                if ident and ident not in current["strings"] \
                        and len(current["strings"]) < MAX_STRINGS:
                    current["strings"].append(ident)
                continue
            head, _, _ = line.partition(" ")
            rule, tags = head, ""
            if " [" in line:
                rule, _, rest = line.partition(" [")
                tags = rest.split("]", 1)[0]
            current = {"rule": rule, "tags": [t for t in tags.split(",") if t],
                       "strings": []}
            out.append(current)
    return out


def _section(enabled: bool, which: str | None, rules: list[str],
             matches: list[dict[str, Any]], note: str | None) -> dict[str, Any]:
    return {"enabled": enabled, "engine": which, "rules": rules, "matches": matches,
            "note": note}
