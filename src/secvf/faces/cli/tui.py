"""``secvf tui``: the terminal UI. Textual (and :mod:`secvf.faces.tui`) is imported only
when the command runs, so ``secvf --help`` stays light."""

from __future__ import annotations

import click


@click.command("tui")
def tui() -> None:
    """Full-screen terminal UI: VMs, sandboxes, networks, analyses, logs and the audit
    (keys: ? for help, q to quit)."""
    from secvf.faces.tui.app import run

    run()
