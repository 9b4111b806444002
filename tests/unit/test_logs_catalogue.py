"""The event catalogue (docs/events.md) names every event the code can emit, with its
stream, severity and fields, and nothing else.

Emission sites are found by reading the source (AST), not by running it: every call of
``write_event``, ``write_log_event``, an event log's ``.write``, ``make_record`` and the
switch's emitters (``_event``, ``network_event``, ``log_emitter(...)(...)``). A site whose
event name is a parameter of its function forwards someone else's event and is skipped
(its callers are sites); any other name must be a literal, a module constant or a local
assigned from literals, or this test fails at that site.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import secvf
from secvf.store.eventlog import BASE_FIELDS, CHAIN_FIELDS
from secvf.store.logquery import SEVERITIES, STREAMS

PACKAGE = Path(secvf.__file__).parent
CATALOGUE = PACKAGE.parents[1] / "docs" / "events.md"

#: Keyword arguments of an emitter that are not fields of the event.
NOT_FIELDS = {"severity", "stream", "now", *BASE_FIELDS}

#: Emitters called as ``name(event, severity, ...)`` (the switch's).
POSITIONAL_SEVERITY = {"_event", "network_event"}


@dataclass
class Site:
    """One place that emits an event."""

    where: str  # path:line
    events: set[str]  # the names it can emit
    stream: str | None  # None: not a literal
    severities: set[str] | None  # None: not known statically
    fields: set[str]  # the literal keyword (or dict-literal) field names


@dataclass
class Entry:
    """One catalogue row."""

    stream: str
    severities: set[str]
    fields: set[str] = field(default_factory=set)


def module_constants() -> dict[str, dict[str, str]]:
    """Every module's top-level ``NAME = "text"``, by module path."""
    found: dict[str, dict[str, str]] = {}
    for path in PACKAGE.rglob("*.py"):
        consts = found.setdefault(_module(path), {})
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)
                    and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str)):
                consts[node.targets[0].id] = node.value.value
    return found


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _strings(node: ast.AST) -> set[str]:
    """Every string literal in ``node`` (an ``a if c else b`` gives both)."""
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


class SiteFinder(ast.NodeVisitor):
    """Collects the :class:`Site` list and the unresolvable sites of one module."""

    def __init__(self, path: Path, constants: dict[str, dict[str, str]]) -> None:
        self.path = path
        self.tree = ast.parse(path.read_text())
        self.own = constants.get(_module(path), {})
        self.imported: dict[str, str] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module in constants:
                for alias in node.names:
                    if alias.name in constants[node.module]:
                        self.imported[alias.asname or alias.name] = \
                            constants[node.module][alias.name]
        self.sites: list[Site] = []
        self.unresolved: list[str] = []
        self.scopes: list[ast.FunctionDef | ast.AsyncFunctionDef] = []

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.scopes.append(node)
        self.generic_visit(node)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        shape = self._shape(node)
        if shape is None:
            return
        event_arg, stream, severity_arg, fields = shape
        where = f"{self.path.relative_to(PACKAGE.parent)}:{node.lineno}"
        events = self._resolve(event_arg)
        if events is None:
            return  # a forwarder: its callers are the sites
        if not events:
            self.unresolved.append(where)
            return
        self.sites.append(Site(where, events, stream, self._severities(severity_arg),
                               fields))

    def _shape(self, node: ast.Call
               ) -> tuple[ast.expr, str | None, ast.expr | None, set[str]] | None:
        """(event argument, stream, severity argument, field names) of an emitter call."""
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else \
            func.id if isinstance(func, ast.Name) else None
        keywords = {k.arg: k.value for k in node.keywords if k.arg is not None}
        kw_fields = set(keywords) - NOT_FIELDS
        stream_kw = keywords.get("stream")
        stream = stream_kw.value if isinstance(stream_kw, ast.Constant) else \
            None if stream_kw is not None else "security"
        if isinstance(func, ast.Call) and getattr(func.func, "id", None) == "log_emitter":
            if len(node.args) < 3:
                return None
            keys = {k.value for k in getattr(node.args[2], "keys", []) if
                    isinstance(k, ast.Constant)}
            return node.args[0], "security", node.args[1], keys - NOT_FIELDS
        if not node.args:
            return None
        if name in ("write_event", "make_record"):
            return node.args[0], stream, keywords.get("severity"), kw_fields
        if name == "write" and isinstance(func, ast.Attribute) and "log" in ast.unparse(
                func.value).lower():
            return node.args[0], stream, keywords.get("severity"), kw_fields
        if name == "write_log_event" and len(node.args) >= 2:
            first = node.args[0]
            return (node.args[1], first.value if isinstance(first, ast.Constant) else None,
                    keywords.get("severity"), kw_fields)
        if name in POSITIONAL_SEVERITY and len(node.args) >= 2:
            return node.args[0], "security", node.args[1], kw_fields
        return None

    def _resolve(self, arg: ast.expr) -> set[str] | None:
        """The names ``arg`` can be; None for a parameter; empty if unknown."""
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return {arg.value}
        if isinstance(arg, ast.IfExp):  # "a" if paused else "b"
            body, orelse = self._resolve(arg.body), self._resolve(arg.orelse)
            return set() if body is None or orelse is None else body | orelse
        if not isinstance(arg, ast.Name):
            return set()
        scope = self.scopes[-1] if self.scopes else None
        if scope is not None:
            params = scope.args
            if arg.id in {a.arg for a in (*params.posonlyargs, *params.args,
                                          *params.kwonlyargs)}:
                return None
            assigned = [n.value for n in ast.walk(scope) if isinstance(n, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == arg.id
                                for t in n.targets)]
            if assigned:
                return set().union(*(_strings(v) for v in assigned))
        if arg.id in self.own:
            return {self.own[arg.id]}
        if arg.id in self.imported:
            return {self.imported[arg.id]}
        return set()

    def _severities(self, arg: ast.expr | None) -> set[str] | None:
        if arg is None:
            return {"INFO"}
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return {arg.value}
        names = {n.attr for n in ast.walk(arg) if isinstance(n, ast.Attribute)
                 and isinstance(n.value, ast.Name) and n.value.id == "Severity"}
        names |= {s for s in _strings(arg) if s in SEVERITIES}
        others = [n for n in ast.walk(arg) if isinstance(n, ast.Name) and n.id != "Severity"]
        if isinstance(arg, ast.IfExp):
            others = [n for n in (arg.body, arg.orelse) if isinstance(n, ast.Name)]
        return names if names and not others else None


def emission_sites() -> tuple[list[Site], list[str]]:
    """Every emission site in ``secvf``, and the sites whose event name is unknown."""
    constants = module_constants()
    sites: list[Site] = []
    unresolved: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if "testing" in parts or parts[:2] == ("faces", "tui"):  # the TUI writes no events:
            continue  # its ``log.write`` calls are its log pane's
        finder = SiteFinder(path, constants)
        finder.visit(finder.tree)
        sites += finder.sites
        unresolved += finder.unresolved
    return sites, unresolved


_ROW = re.compile(r"^\|\s*`(?P<event>[^`]+)`\s*\|(?P<stream>[^|]*)\|(?P<severity>[^|]*)\|"
                  r"(?P<fields>[^|]*)\|")


def catalogue() -> dict[str, Entry]:
    """The rows of docs/events.md's tables: ``| `event` | stream | SEVERITY, ... | `f`, ... |``."""
    entries: dict[str, Entry] = {}
    for line in CATALOGUE.read_text().splitlines():
        match = _ROW.match(line)
        if not match:
            continue
        assert match["event"] not in entries, f"{match['event']} is catalogued twice"
        severities = {s.strip() for s in match["severity"].split(",")}
        entries[match["event"]] = Entry(match["stream"].strip(), severities,
                                        set(re.findall(r"`([^`]+)`", match["fields"])))
    return entries


def test_the_finder_sees_the_known_kinds_of_site() -> None:
    """A finder that saw nothing would pass everything: check it sees each kind."""
    sites, _ = emission_sites()
    seen = {name for site in sites for name in site.events}
    assert {"vm_started", "exec", "vm_stopped", "vm_crashed", "mac_spoof",
            "switch_restarted", "vsock_guest_violation", "log_rotated"} <= seen
    exec_site = next(s for s in sites if "exec" in s.events)
    assert exec_site.stream == "exec" and "duration_ms" in exec_site.fields


def test_every_emitted_event_is_catalogued_with_its_stream_severity_and_fields() -> None:
    sites, unresolved = emission_sites()
    assert unresolved == [], ("event names that are not a literal or a constant (use one, "
                              "so the catalogue test can see it)")
    entries = catalogue()
    problems = []
    for site in sites:
        for name in sorted(site.events):
            entry = entries.get(name)
            if entry is None:
                problems.append(f"{site.where}: {name!r} is not in docs/events.md")
                continue
            if site.stream is not None and site.stream != entry.stream:
                problems.append(f"{site.where}: {name!r} goes to {site.stream}, the "
                                f"catalogue says {entry.stream}")
            # a site that picks one of several events (a if c else b) may pick the
            # severity with it: it is checked against all of them together
            allowed = set().union(*(entries[n].severities for n in site.events
                                    if n in entries))
            if site.severities is not None and not site.severities <= allowed:
                problems.append(f"{site.where}: {name!r} can be {sorted(site.severities)}, "
                                f"the catalogue says {sorted(entry.severities)}")
            if len(site.events) == 1 and not site.fields <= entry.fields:
                problems.append(f"{site.where}: {name!r} fields "
                                f"{sorted(site.fields - entry.fields)} are not catalogued")
    assert problems == []


def test_the_catalogue_has_no_stale_or_malformed_entries() -> None:
    sites, _ = emission_sites()
    emitted = {name for site in sites for name in site.events}
    entries = catalogue()
    assert len(entries) > 20  # the table parsed
    assert sorted(set(entries) - emitted) == []
    for name, entry in entries.items():
        assert entry.stream in STREAMS, name
        assert entry.severities and entry.severities <= set(SEVERITIES), name
        assert not entry.fields & set(CHAIN_FIELDS), name


def test_no_site_uses_a_chain_field_as_its_own() -> None:
    sites, _ = emission_sites()
    assert [s.where for s in sites if s.fields & set(CHAIN_FIELDS)] == []
