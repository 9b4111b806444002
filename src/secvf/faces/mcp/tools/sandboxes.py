"""AI-sandbox tools: list, create, start, stop, run, remove, port forwards."""

from __future__ import annotations

from typing import Any

from secvf import api
from secvf.errors import ConfigError

from ..confirm import CommandConfirmation, DestructiveConfirmation, settle
from ..output import jsonable
from ..registry import tool
from ..state import current_state
from ..tiers import Tier
from .exec import ExecOptions, one_shot


@tool(Tier.READ_ONLY, read_only=True, idempotent=True)
def sandbox_list() -> dict[str, Any]:
    """Every AI sandbox: name, state, image, workspace."""
    return {"sandboxes": jsonable(api.list_sandboxes())}


@tool(Tier.SAFE_MUTATE)
def sandbox_create(name: str | None = None, image: str = "sandbox", cpus: int = 1,
                   memory: str = "1G", disk_size: str = "8G",
                   networks: list[str] | None = None) -> dict[str, Any]:
    """Create an AI sandbox (``name``: a generated one if omitted). ``networks``:
    ``nat`` (default), ``none``, ``isolated:NAME``. Host shares are not offered here."""
    notes: list[str] = []
    config = api.create_sandbox(name, image=image, cpus=cpus, memory=memory,
                                disk_size=disk_size, networks=networks or ("nat",), notes=notes)
    return {"name": config.name, "vm": jsonable(config), "notes": notes}


@tool(Tier.SAFE_MUTATE, idempotent=True)
def sandbox_start(name: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Start sandbox ``name``; returns once its agent answers (exec works)."""
    return jsonable(api.start_sandbox(name, timeout=timeout_s))  # type: ignore[no-any-return]


@tool(Tier.SAFE_MUTATE, idempotent=True)
def sandbox_stop(name: str) -> dict[str, Any]:
    """Stop sandbox ``name`` (its disks are synced first)."""
    return jsonable(api.stop_vm(name))  # type: ignore[no-any-return]


@tool(Tier.SAFE_MUTATE, untrusted_output=True)
def sandbox_run(command: str | list[str], confirmation: CommandConfirmation,
                image: str = "sandbox", remove: bool = True,
                timeout_s: float | None = 300.0) -> dict[str, Any]:
    """Create and start a fresh sandbox, run ``command`` in it (a string runs with
    /bin/sh -c), and (``remove``) delete it again. Output is capped and untrusted."""
    settle(confirmation)
    config = api.create_sandbox(None, image=image)
    try:
        api.start_sandbox(config.name)
        result = one_shot(config.name, command, ExecOptions(timeout_s=timeout_s))
    finally:
        if remove:
            api.remove_sandbox(config.name, purge=True, force=True)
    return {"name": config.name, "removed": remove, **result}


@tool(Tier.FULL, destructive=True)
def sandbox_remove(name: str, confirmation: DestructiveConfirmation,
                   purge: bool = False, force: bool = False) -> dict[str, Any]:
    """Delete sandbox ``name`` (``purge``: its default workspace too; ``force``: stop it
    first if it runs). Asks the user."""
    settle(confirmation)
    api.remove_sandbox(name, purge=purge, force=force)
    return {"name": name, "removed": True, "purged": purge}


@tool(Tier.SAFE_MUTATE)
def forward_start(name: str, host_port: int, guest_port: int) -> dict[str, Any]:
    """Forward TCP 127.0.0.1:``host_port`` (0: a free port) to ``guest_port`` in running
    sandbox ``name``, until forward_stop or the server ends. Loopback only."""
    if not (0 <= host_port <= 65535 and 1 <= guest_port <= 65535):
        raise ConfigError("ports are 0-65535 (host, 0: any free one) and 1-65535 (guest)")
    spec = f"127.0.0.1:{host_port}:{guest_port}"
    forward = api.port_forward(name, spec)
    forward_id = current_state().jobs.add_forward(name, spec, forward)
    return {"forward_id": forward_id, "name": name, "host": "127.0.0.1",
            "host_port": forward.host_port, "guest_port": guest_port}


@tool(Tier.SAFE_MUTATE, read_only=False, idempotent=True)
def forward_list() -> dict[str, Any]:
    """The port forwards this server started, with their counters."""
    jobs = current_state().jobs
    return {"forwards": [{"forward_id": fid, "name": vm, "spec": spec,
                          "host_port": fwd.host_port, "stats": jsonable(fwd.stats)}
                         for fid, (vm, spec, fwd) in list(jobs.forwards.items())]}


@tool(Tier.SAFE_MUTATE)
def forward_stop(forward_id: str) -> dict[str, Any]:
    """Stop port forward ``forward_id``."""
    vm, spec, forward = current_state().jobs.remove_forward(forward_id)
    forward.close()
    return {"forward_id": forward_id, "name": vm, "spec": spec, "stopped": True}
