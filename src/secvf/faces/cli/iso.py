"""``secvf iso …``: the cache of verified installer media (docs/iso.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from secvf import api
from secvf.errors import MediaError
from secvf.faces.cli.app import SecVFGroup, format_time
from secvf.faces.cli.common import err, escape, new_table, out, print_json

#: How many hex digits of a SHA-256 the ``iso list`` table shows (``--json``: all 64).
SHORT_HASH = 16


@click.group(cls=SecVFGroup)
def iso() -> None:
    """Fetch, add, verify and remove installer ISOs in the cache (vm create --iso NAME)."""


@iso.command("fetch")
@click.argument("url")
@click.option("--sha256", metavar="HEX", help="The ISO's SHA-256 (64 hex digits).")
@click.option("--checksums", metavar="URL",
              help="A checksum file listing it (sha256sum, BSD 'SHA256 (f) = h', or one hash).")
@click.option("--name", help="Its name in the cache (default: the URL's file name).")
@click.option("--ca-file", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Trust only the CA certificates in FILE (PEM), not the system's "
                   "(also: $SECVF_ISO_CA_FILE).")
@click.option("--json", "as_json", is_flag=True, help="Print the new entry as JSON.")
def iso_fetch(url: str, sha256: str | None, checksums: str | None, name: str | None,
              ca_file: Path | None, as_json: bool) -> None:
    """Download URL over HTTPS (hosts on $SECVF_HOME/config/iso-hosts only) and cache it
    once its SHA-256 checks out; run it again to resume a broken-off download."""
    if sha256 is not None and checksums is not None:
        raise click.UsageError("--sha256 and --checksums exclude each other")
    with _byte_progress(quiet=as_json) as progress:
        entry = api.fetch_iso(url, sha256=sha256, checksums=checksums, name=name,
                              ca_file=ca_file, progress=progress)
    _print_entry("fetched", entry, as_json)


@iso.command("add")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--sha256", required=True, metavar="HEX", help="The ISO's SHA-256.")
@click.option("--name", help="Its name in the cache (default: the file's name).")
@click.option("--json", "as_json", is_flag=True, help="Print the new entry as JSON.")
def iso_add(path: Path, sha256: str, name: str | None, as_json: bool) -> None:
    """Copy ISO PATH (obtained elsewhere) into the cache if its SHA-256 is HEX."""
    with _byte_progress(quiet=as_json) as progress:
        entry = api.add_iso(path, sha256=sha256, name=name, progress=progress)
    _print_entry("added", entry, as_json)


@iso.command("list")
@click.option("--json", "as_json", is_flag=True)
def iso_list(as_json: bool) -> None:
    """List cached ISOs: name, size, SHA-256, source, when last verified."""
    entries = api.list_isos()
    if as_json:
        print_json(entries)
        return
    table = new_table("NAME", "SIZE", "SHA256", "SOURCE", "VERIFIED")
    for entry in entries:
        if entry["error"]:
            table.add_row(escape(entry["name"]), "-", "-", "invalid", escape(entry["error"]))
            continue
        table.add_row(escape(entry["name"]), api.format_size(entry["size_bytes"]),
                      entry["sha256"][:SHORT_HASH] + "…", escape(entry["source"]),
                      format_time(entry["verified_at"]))
    out.print(table)


@iso.command("verify")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
def iso_verify(name: str | None, as_json: bool) -> None:
    """Hash cached ISO NAME (default: all) again; exit 1 if any is not what it was."""
    with _byte_progress(quiet=as_json) as progress:
        checks = api.verify_isos(name, progress=progress)
    bad = [c for c in checks if not c["ok"]]
    if as_json:
        print_json(checks)
    elif not checks:
        out.print("no cached ISOs (see: secvf iso fetch, secvf iso add)")
    for check in [] if as_json else checks:
        if check["ok"]:
            out.print(f"ok        {escape(check['name'])} sha256 {check['actual']}")
        elif check["error"]:
            out.print(f"[red]unusable[/]  {escape(check['name'])}: {escape(check['error'])}")
        else:
            out.print(f"[red]MISMATCH[/]  {escape(check['name'])}: expected "
                      f"{check['expected']}, got {check['actual']}")
    if bad and as_json:
        raise SystemExit(1)
    if bad:
        raise MediaError(f"{len(bad)} of {len(checks)} cached ISOs failed verification: "
                         f"{', '.join(c['name'] for c in bad)}")


@iso.command("rm")
@click.argument("name")
def iso_rm(name: str) -> None:
    """Remove cached ISO NAME (refused while a VM's cdrom drive names it)."""
    api.remove_iso(name)
    out.print(f"removed cached ISO [bold]{escape(name)}[/]")


def _print_entry(done: str, entry: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(entry)
        return
    out.print(f"{done} ISO [bold]{escape(entry['name'])}[/] "
              f"({api.format_size(entry['size_bytes'])}, sha256 {entry['sha256']}) at "
              f"{escape(entry['path'])}; boot it with: secvf vm create VM --iso "
              f"{escape(entry['name'])}", highlight=False)


@contextlib.contextmanager
def _byte_progress(*, quiet: bool) -> Iterator[Callable[[str, int, int | None], None]]:
    """A progress bar on stderr for each job the callback hears of (``what``): bytes,
    speed, time left (gone at the end with ``quiet``, so ``--json`` runs leave none).
    Only on a terminal: in a pipe or a log, stderr gets errors and nothing else."""
    if not err.is_terminal:
        yield lambda what, done, total: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err.console,
                  transient=quiet) as bar:

        def report(what: str, done: int, total: int | None) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(escape(what), total=total)
            bar.update(tasks[what], completed=done, total=total)

        yield report
