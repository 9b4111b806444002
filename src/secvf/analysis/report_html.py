"""The report as one self-contained HTML page.

Everything in a report that came from the guest (names, argv, paths, DNS names, hosts,
SNI, event text) is hostile. The rules this module keeps:

* every value goes through :func:`_e` (``html.escape(..., quote=True)``, cut to
  :data:`MAX_TEXT_CHARS`) and only into element content — no guest text in an attribute,
  no ``href`` or ``src`` anywhere, URLs shown as text;
* no script, no external resource: the CSS is inline, attributes are constants;
* each table and list is cut at :data:`MAX_ROWS` rows, the process tree at
  :data:`MAX_DEPTH` levels, so the page's size is bounded whatever the report holds.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["render_html", "MAX_ROWS", "MAX_TEXT_CHARS"]

MAX_ROWS = 2000  # rows per table
MAX_TEXT_CHARS = 2048  # characters per value
MAX_DEPTH = 70  # process tree levels rendered
MAX_TREE_NODES = 5000  # process tree nodes rendered

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td{font-family:ui-monospace,monospace;word-break:break-all}
.bad{color:#a00;font-weight:bold}.ok{color:#070}.muted{color:#777}
ul.tree{font-family:ui-monospace,monospace;font-size:.9em}
.note{background:#fff7d6;padding:2px 6px;margin:2px 0}
"""


def _e(value: Any) -> str:
    """``value`` as escaped text for element content."""
    if value is None:
        return '<span class="muted">—</span>'
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        value = " ".join(str(v) for v in value[:256])
    elif isinstance(value, dict):
        value = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    text = str(value)
    if len(text) > MAX_TEXT_CHARS:
        text = text[:MAX_TEXT_CHARS] + " …[cut]"
    return html.escape(text, quote=True)


def _table(headers: Sequence[str], rows: Any, cells: Callable[[Any], Sequence[Any]]) -> str:
    if not isinstance(rows, list) or not rows:
        return '<p class="muted">none</p>'
    out = ["<table><tr>", *(f"<th>{html.escape(h)}</th>" for h in headers), "</tr>"]
    for row in rows[:MAX_ROWS]:
        try:
            values = cells(row)
        except (KeyError, TypeError, AttributeError, IndexError):
            values = [row] + [None] * (len(headers) - 1)
        out.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in values) + "</tr>")
    out.append("</table>")
    if len(rows) > MAX_ROWS:
        out.append(f'<p class="muted">{len(rows) - MAX_ROWS} more rows not shown</p>')
    return "".join(out)


def _kv(pairs: Sequence[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{_e(v)}</td></tr>"
                               for k, v in pairs) + "</table>"


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else default


def _tree(roots: Any) -> str:
    if not isinstance(roots, list) or not roots:
        return '<p class="muted">no processes traced</p>'
    out: list[str] = ['<ul class="tree">']
    budget = [MAX_TREE_NODES]
    # Iterative walk: each stack entry is a node to open, or None to close a list.
    stack: list[tuple[Any, int] | None] = [(r, 0) for r in reversed(roots)]
    while stack:
        item = stack.pop()
        if item is None:
            out.append("</ul></li>")
            continue
        node, depth = item
        if budget[0] <= 0:
            continue
        budget[0] -= 1
        out.append("<li>" + _proc_line(node))
        children = _get(node, "children", [])
        if isinstance(children, list) and children and depth < MAX_DEPTH:
            out.append("<ul>")
            stack.append(None)
            stack.extend((c, depth + 1) for c in reversed(children))
        else:
            out.append("</li>")
    out.append("</ul>")
    if budget[0] <= 0:
        out.append(f'<p class="muted">tree cut at {MAX_TREE_NODES} processes</p>')
    return "".join(out)


def _proc_line(node: Any) -> str:
    argv = _get(node, "argv")
    shown = " ".join(str(a) for a in argv) if isinstance(argv, list) else _get(node, "exe")
    end = ""
    if _get(node, "signal"):
        end = f' <span class="bad">killed by {_e(_get(node, "signal"))}</span>'
    elif _get(node, "exit_code") is not None:
        end = f" exit {_e(_get(node, 'exit_code'))}"
    return (f"<b>{_e(_get(node, 'pid'))}</b> {_e(shown)}{end} "
            f'<span class="muted">{_e(_get(node, "start"))}–{_e(_get(node, "end"))}</span>')


def _summary(r: dict[str, Any]) -> str:
    run = _get(r, "run", {})
    sample = _get(r, "sample", {})
    outcome = _get(run, "outcome")
    flags = []
    for key, label in (("timed_out", "timed out"), ("monitor_died", "monitor died"),
                       ("pid_limit_hit", "pid limit hit"), ("kernel_panic", "kernel panic")):
        if _get(run, key):
            flags.append(f'<span class="bad">{label}</span>')
    if _get(run, "medium_write_attempts"):
        flags.append('<span class="bad">tried to write the sample medium</span>')
    if _get(sample, "architecture_note"):
        flags.append(f'<span class="bad">{_e(_get(sample, "architecture_note"))}</span>')
    yara = _get(r, "yara", {})
    matches = _get(yara, "matches")
    if isinstance(matches, list) and matches:
        flags.append(f'<span class="bad">{len(matches)} YARA matches</span>')
    pairs = [("analysis", _get(r, "analysis_id")), ("sample", _get(sample, "name")),
             ("sha256", _get(sample, "sha256")), ("outcome", outcome),
             ("exit code", _get(run, "exit_code")), ("exit signal", _get(run, "exit_signal")),
             ("processes", _get(r, "process_count")),
             ("files created/modified/deleted", _diff_counts(_get(r, "disk_diff"))),
             ("generated", _get(r, "generated_at"))]
    return _kv(pairs) + (f"<p>{' · '.join(flags)}</p>" if flags else "")


def _diff_counts(diff: Any) -> str | None:
    if not isinstance(diff, dict):
        return None
    return " / ".join(str(len(diff.get(k) or [])) for k in ("created", "modified", "deleted"))


def _sample(r: dict[str, Any]) -> str:
    s = _get(r, "sample", {})
    return _kv([(k, _get(s, k)) for k in ("name", "size", "sha256", "sha1", "md5",
                                          "file_type", "file_type_source", "format",
                                          "architecture", "runnable_here",
                                          "architecture_note")])


def _run(r: dict[str, Any]) -> str:
    run = _get(r, "run", {})
    body = _kv([(k, _get(run, k)) for k in ("argv", "user", "cwd", "timeout_s", "started_at",
                                            "ended_at", "outcome", "exit_code",
                                            "exit_signal", "timed_out", "monitor_died",
                                            "pid_limit_hit", "kernel_panic",
                                            "detonator_errors")])
    dump = _get(r, "memory_dump")
    if isinstance(dump, dict):
        body += "<h3>Memory dump</h3>" + _kv([(k, _get(dump, k))
                                              for k in ("file", "format", "bytes", "sha256")])
    body += "<h3>Sample medium write attempts</h3>" + _table(
        ["path", "pid", "source"], _get(run, "medium_write_attempts"),
        lambda a: [a["path"], a["pid"], a["source"]])
    return body


def _network(r: dict[str, Any]) -> str:
    net = _get(r, "network")
    sys_net = _get(r, "network_syscalls", {})
    parts = ["<h3>Contacted (syscalls)</h3>", _table(
        ["family", "proto", "address", "port", "syscall", "count", "ok", "pids"],
        _get(sys_net, "endpoints"),
        lambda x: [x["family"], x["proto"], x["address"], x["port"], x["syscall"],
                   x["count"], x["ok"], x["pids"]]),
        "<h3>DNS (syscalls)</h3>",
        _table(["name", "type"], _get(sys_net, "dns_queries"), lambda q: [q["name"], q["type"]]),
        "<h3>Listening</h3>",
        _table(["family", "address", "port", "pid"], _get(sys_net, "listening"),
               lambda x: [x["family"], x["address"], x["port"], x["pid"]])]
    if not isinstance(net, dict):
        parts.append('<p class="muted">no capture</p>')
        return "".join(parts)
    parts += [
        _kv([("capture", _get(net, "path")), ("packets", _get(net, "packets")),
             ("bytes", _get(net, "bytes")), ("malformed", _get(net, "malformed")),
             ("truncated", _get(net, "truncated")), ("error", _get(net, "error"))]),
        "<h3>DNS queries</h3>",
        _table(["ts", "vm", "name", "type", "answers", "rcode"], _get(net, "dns"),
               lambda q: [q["ts"], q["vm"], q["name"], q["type"], q["answers"], q["rcode"]]),
        "<h3>HTTP requests</h3>",
        _table(["ts", "vm", "method", "host", "path", "dst"], _get(net, "http"),
               lambda h: [h["ts"], h["vm"], h["method"], h["host"], h["path"], h["dst"]]),
        "<h3>TLS SNI</h3>",
        _table(["ts", "vm", "sni", "dst"], _get(net, "tls_sni"),
               lambda t: [t["ts"], t["vm"], t["sni"], t["dst"]]),
        "<h3>Contacted endpoints (capture)</h3>",
        _table(["proto", "src", "dst", "port", "packets", "bytes", "first", "SYN"],
               _get(net, "endpoints"),
               lambda f: [f["proto"], f["src"], f["dst"], f["dst_port"], f["packets"],
                          f["bytes"], f["first_ts"], f["syn"]]),
        "<h3>Preset hits</h3>",
        _table(["preset", "count", "first"], _get(net, "presets"),
               lambda p: [p["name"], p["count"], p["first_ts"]]),
    ]
    return "".join(parts)


def _files(r: dict[str, Any]) -> str:
    diff = _get(r, "disk_diff")
    files = _get(r, "files", {})
    parts = []
    if isinstance(diff, dict):
        change = ["path", "kind", "size", "mode", "uid", "gid", "mtime", "sha256"]
        for key in ("created", "modified", "deleted"):
            cols = change + (["before_sha256"] if key != "created" else [])
            parts.append(f"<h3>Disk: {key}</h3>")
            parts.append(_table(cols, diff.get(key), _picker(cols)))
        if diff.get("truncated"):
            parts.append('<p class="bad">disk diff truncated</p>')
    else:
        parts.append('<p class="muted">no disk diff</p>')
    parts.append("<h3>Dropped zip members</h3>")
    parts.append(_table(["archive", "name", "size", "compressed", "encrypted"],
                        _get(r, "dropped_zip"),
                        lambda z: [z["archive"], z["name"], z["size"], z["compressed_size"],
                                   z["encrypted"]]))
    path_rows = ["path", "count", "pids"]
    for key, title in (("written", "Written (syscalls)"), ("deleted", "Deleted (syscalls)"),
                       ("created_dirs", "Directories created (syscalls)")):
        parts.append(f"<h3>{title}</h3>")
        parts.append(_table(path_rows, _get(files, key),
                            lambda x: [x["path"], x["count"], x["pids"]]))
    parts.append("<h3>Renamed (syscalls)</h3>")
    parts.append(_table(["from", "to", "pid"], _get(files, "renamed"),
                        lambda x: [x["from"], x["to"], x["pid"]]))
    parts.append("<h3>chmod (syscalls)</h3>")
    parts.append(_table(["path", "mode", "pid"], _get(files, "chmod"),
                        lambda x: [x["path"], x["mode"], x["pid"]]))
    return "".join(parts)


def _picker(keys: Sequence[str]) -> Callable[[Any], list[Any]]:
    return lambda row: [_get(row, k) for k in keys]


def _yara(r: dict[str, Any]) -> str:
    y = _get(r, "yara", {})
    head = _kv([("enabled", _get(y, "enabled")), ("engine", _get(y, "engine")),
                ("rules", _get(y, "rules")), ("note", _get(y, "note"))])
    return head + _table(["target", "rule", "tags", "strings"], _get(y, "matches"),
                         lambda m: [m["target"], m["rule"], m["tags"], m["strings"]])


def _monitor(r: dict[str, Any]) -> str:
    m = _get(r, "monitor", {})
    s = _get(r, "serial", {})
    body = _kv([(k, _get(m, k)) for k in ("lines", "strace_lines", "event_lines",
                                          "garbage_lines", "truncated", "complete",
                                          "format", "detonator", "unmatched_unfinished")])
    body += "<h3>Garbage samples</h3>" + _table(["line"], _get(m, "garbage_samples"),
                                                lambda g: [g])
    body += "<h3>Other detonator events</h3>" + _table(["event"], _get(m, "other_events"),
                                                       lambda g: [g])
    body += "<h3>Serial console</h3>" + _kv([("lines", _get(s, "lines")),
                                             ("kernel panic", _get(s, "kernel_panic")),
                                             ("oops", _get(s, "oops"))])
    body += _table(["panic / oops line"], _get(s, "panic_lines"), lambda g: [g])
    return body


def _safe(section: Callable[[dict[str, Any]], str], report: dict[str, Any]) -> str:
    """A section's HTML, or a note that it is malformed (a report from an older or
    damaged file must still render)."""
    try:
        return section(report)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError):
        return '<p class="bad">this section of the report is malformed</p>'


def render_html(report: dict[str, Any]) -> str:
    """The report as a complete HTML document (a str). Never raises on the report's
    content: a malformed section is shown as far as it goes."""
    timeline = _table(["t (s)", "time", "pid", "kind", "detail", "ok"],
                      _get(report, "timeline"),
                      lambda e: [e["t"], e["time"], e["pid"], e["kind"], e["detail"],
                                 e["ok"]])
    if _get(report, "timeline_truncated"):
        timeline += '<p class="bad">timeline truncated</p>'
    notes = _get(report, "notes", [])
    notes_html = "".join(f'<div class="note">{_e(n)}</div>'
                         for n in (notes if isinstance(notes, list) else [])[:MAX_ROWS])
    sections = [("Summary", _safe(_summary, report)), ("Sample", _safe(_sample, report)),
                ("Run", _safe(_run, report)),
                ("Process tree", _safe(lambda r: _tree(_get(r, "processes")), report)),
                ("Timeline", timeline), ("Network", _safe(_network, report)),
                ("Files", _safe(_files, report)), ("YARA", _safe(_yara, report)),
                ("Monitor and serial logs", _safe(_monitor, report)),
                ("Notes", notes_html or '<p class="muted">none</p>')]
    body = "".join(f"<h2>{title}</h2>{content}" for title, content in sections)
    title = f"SecVF analysis {_e(_get(report, 'analysis_id'))}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "style-src 'unsafe-inline'\">"
            f"<title>{title}</title><style>{_CSS}</style></head><body>"
            f"<h1>{title}</h1>"
            f"<p class=\"muted\">schema version {_e(_get(report, 'schema_version'))}</p>"
            f"{body}</body></html>\n")
