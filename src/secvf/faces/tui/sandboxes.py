"""The Sandboxes area: AI-sandbox VMs (create, start, stop, remove), their background
processes and port forwards, and ``e`` for the exec pane."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from secvf import api
from secvf.faces.tui import data
from secvf.faces.tui.data import VMRow
from secvf.faces.tui.vms import VMActions, VMTable
from secvf.faces.tui.widgets import PromptScreen

#: How long starting a sandbox waits for its agent.
AGENT_TIMEOUT_S = 120.0


def sandbox_rows() -> list[VMRow]:
    """Every AI sandbox's row."""
    return [VMRow.from_status(status) for status in api.list_sandboxes()]


class SandboxTable(VMTable):
    """The VM table, sandboxes only."""

    def accepts(self, row: VMRow) -> bool:
        """Only AI sandboxes."""
        return row.kind == "ai-sandbox"


def processes_text(name: str, processes: list[dict[str, Any]],
                   forwards: list[str]) -> str:
    """The background processes and port forwards of sandbox ``name``, as lines."""
    lines = [f"{name}: background processes"]
    for proc in processes:
        argv = " ".join(proc.get("argv") or [])
        end = "" if proc["state"] == "running" else f" exit {proc.get('exit_code')}"
        lines.append(f"  {proc['id']} pid {proc.get('pid')} {proc['state']}{end}  "
                     f"{data.clean(argv)[:60]}")
    if not processes:
        lines.append("  none")
    lines.append("port forwards (this TUI's): " + (", ".join(forwards) or "none"))
    return "\n".join(lines)


class SandboxesPane(VMActions):
    """The Sandboxes area: the VM keys plus create, exec, processes, port forward."""

    BINDINGS = [
        *VMActions.BINDINGS,
        Binding("a", "create", "Create"),
        Binding("e", "exec", "Exec"),
        Binding("b", "processes", "Background", show=False),
        Binding("f", "forward", "Port forward", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.forwards: dict[str, list[Any]] = {}  # sandbox -> its PortForward objects

    def compose(self) -> ComposeResult:
        """The sandbox table, the processes line and hints."""
        yield SandboxTable(load=sandbox_rows, id="sandbox-table")
        yield Static("", classes="detail", id="sandbox-detail", markup=False)
        yield Static("a create · e exec · b background processes · f port forward · "
                     "? all keys", classes="hint", markup=False)

    def start_call(self, row: VMRow) -> Callable[[], Any]:
        """A sandbox start waits until its agent answers."""
        return partial(api.start_sandbox, row.name, timeout=AGENT_TIMEOUT_S)

    def delete_call(self, row: VMRow) -> Callable[[], Any]:
        """``sandbox rm --purge --force``; this TUI's forwards to it are closed first."""
        def remove() -> None:
            for forward in self.forwards.pop(row.name, []):
                forward.close()
            api.remove_sandbox(row.name, purge=True, force=True)
        return remove

    def losses(self, row: VMRow) -> list[str]:
        """The VM's losses and its default workspace."""
        return [*super().losses(row),
                "its default workspace $SECVF_HOME/sandboxes/" + row.name
                + " (a --workspace you gave is kept)"]

    def action_create(self) -> None:
        """Create a sandbox (asks for a name; empty: one is made up)."""
        def named(name: str | None) -> None:
            self.tui.call_api(partial(api.create_sandbox, name), label="creating a sandbox",
                              done=lambda config: self.created(config.name))
        self.tui.push_screen(PromptScreen("New sandbox name (empty: a generated one):"),
                             named)

    def created(self, name: str) -> None:
        """Show the new sandbox."""
        self.tui.notify(f"sandbox {name} created; s starts it", timeout=4)
        self.vm_table.reload()

    def action_exec(self) -> None:
        """The exec pane of the selected sandbox."""
        from secvf.faces.tui.exec_pane import ExecScreen

        if (row := self.target()) is None:
            return
        if row.state != "running":
            self.tui.notify(f"sandbox {row.name} is {row.state}; start it first (s)",
                            severity="warning", timeout=4)
            return
        self.tui.push_screen(ExecScreen(row.name))

    def action_processes(self) -> None:
        """List the selected sandbox's background processes."""
        if (row := self.target()) is None:
            return
        name = row.name

        def load() -> str:
            procs = [api.detached_as_json(p) for p in api.list_detached(name)]
            forwards = [f"127.0.0.1:{f.host_port}" for f in self.forwards.get(name, [])]
            return processes_text(name, procs, forwards)
        self.tui.call_api(load, done=self.query_one("#sandbox-detail", Static).update)

    def action_forward(self) -> None:
        """Forward a host port to the selected sandbox while this TUI runs."""
        if (row := self.target()) is None:
            return

        def spec(text: str | None) -> None:
            if text:
                self.tui.call_api(partial(api.port_forward, row.name, text),
                                  done=partial(self.forwarded, row.name))
        self.tui.push_screen(PromptScreen(f"Forward to {row.name} ([ADDR:]HOST_PORT:"
                                          "GUEST_PORT):", placeholder="8080:8000"), spec)

    def forwarded(self, name: str, forward: Any) -> None:
        """Keep the forward open until the sandbox goes or the TUI quits."""
        self.forwards.setdefault(name, []).append(forward)
        self.tui.notify(f"forwarding 127.0.0.1:{forward.host_port} to {name}", timeout=4)

    def on_unmount(self) -> None:
        """Close every forward."""
        for forwards in self.forwards.values():
            for forward in forwards:
                forward.close()
        self.forwards.clear()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        """Moving to another sandbox clears the processes line."""
        self.query_one("#sandbox-detail", Static).update("")
