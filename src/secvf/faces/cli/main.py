"""The ``secvf`` command line (alias ``secvf-cli``): a thin face over the core library.

Each command turns flags into one core call and the result (or a
:class:`~secvf.errors.SecVFError`) into output: a rich table or text for people,
``--json`` for scripts, a one-line error and a non-zero exit code on failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from secvf.errors import LaunchFailed, SecVFError
from secvf.model.config import Accel, NetworkMode, VMKind
from secvf.model.sizes import format_size
from secvf.runtime import control
from secvf.store import library

out = Console()
err = Console(stderr=True, soft_wrap=True)


def fail(exc: SecVFError) -> NoReturn:
    """Print ``exc`` as a one-line error (plus QEMU's output for launch failures) and exit."""
    err.print(f"secvf: error: {exc}", markup=False, highlight=False)
    if isinstance(exc, LaunchFailed):
        if exc.argv:
            err.print("command line: " + " ".join(exc.argv), markup=False, highlight=False)
        if exc.output.strip():
            err.print("output:\n" + exc.output.strip()[-3000:], markup=False, highlight=False)
    sys.exit(exc.exit_code)


class SecVFGroup(click.Group):
    """A click group that turns SecVF errors into clean one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SecVFError as exc:
            fail(exc)


def print_json(data: object) -> None:
    """Print ``data`` as JSON on stdout."""
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=SecVFGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="secvf")
def main() -> None:
    """SecVF: VMs for security work, with a host-guest channel only where it is meant to be."""


# ---- vm ---------------------------------------------------------------------------------


@main.group(cls=SecVFGroup)
def vm() -> None:
    """Create, run and inspect VMs."""


@vm.command("create")
@click.argument("name")
@click.option("--kind", type=click.Choice([k.value for k in VMKind]), default="generic",
              show_default=True)
@click.option("--cpus", type=int, default=1, show_default=True)
@click.option("--memory", default="1G", show_default=True, help="Guest RAM (e.g. 512M, 2G).")
@click.option("--disk", "disk_size", default="8G", show_default=True, help="Disk size.")
@click.option("--image", help="SecVF image to boot (default: base; sandbox for ai-sandbox).")
@click.option("--disk-image", type=click.Path(path_type=Path), help="Boot this disk image.")
@click.option("--iso", type=click.Path(path_type=Path), help="Boot this installer ISO.")
@click.option("--network", type=click.Choice([n.value for n in NetworkMode]),
              help="none or nat (default: nat; none for malware-analysis).")
@click.option("--accel", type=click.Choice([a.value for a in Accel]), default="auto",
              show_default=True)
@click.option("--share", "shares", multiple=True, help="HOSTDIR:GUESTPATH:ro (ai-sandbox only).")
@click.option("--workspace", type=click.Path(path_type=Path), help="Workspace dir (ai-sandbox).")
@click.option("--json", "as_json", is_flag=True, help="Print the new VM's config as JSON.")
def vm_create(name: str, kind: str, cpus: int, memory: str, disk_size: str, image: str | None,
              disk_image: Path | None, iso: Path | None, network: str | None, accel: str,
              shares: tuple[str, ...], workspace: Path | None, as_json: bool) -> None:
    """Create VM NAME (a copy-on-write overlay over its image)."""
    from secvf.workflows.create import build_config

    config = build_config(
        name=name, kind=VMKind(kind), cpus=cpus, memory=memory, disk_size=disk_size,
        image=image, disk_image=disk_image, iso=iso, network=network, accel=accel,
        shares=shares, workspace=workspace,
    )
    bundle = library.create_vm(config)
    if as_json:
        print_json(config.model_dump(mode="json"))
    else:
        out.print(f"created {config.kind} VM [bold]{name}[/] ({config.id}) in {bundle.path}")


@vm.command("list")
@click.option("--json", "as_json", is_flag=True)
def vm_list(as_json: bool) -> None:
    """List every VM with its kind and state."""
    rows: list[dict[str, Any]] = []
    for item in library.list_vms():
        if item.config is None:
            rows.append({"name": item.bundle.name, "state": "invalid", "error": item.error})
            continue
        status = control.vm_status(item.bundle.name)
        rows.append({k: status[k] for k in ("name", "id", "kind", "state", "accel", "network",
                                            "cpus", "memory_mib")})
    if as_json:
        print_json(rows)
        return
    table = Table("NAME", "KIND", "STATE", "CPUS", "MEMORY", "NETWORK", "ACCEL", "ID")
    for row in rows:
        if row["state"] == "invalid":
            table.add_row(row["name"], "?", "[red]invalid[/]", "", "", "", "", row["error"])
            continue
        table.add_row(row["name"], row["kind"], row["state"], str(row["cpus"]),
                      format_size(row["memory_mib"] << 20), row["network"],
                      row["accel"] or "-", row["id"])
    out.print(table)


@vm.command("status")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def vm_status(name: str, as_json: bool) -> None:
    """Show a VM's state, accelerator, uptime and live device list."""
    status = control.vm_status(name)
    if as_json:
        print_json(status)
        return
    out.print(f"[bold]{status['name']}[/] ({status['kind']}) {status['id']}")
    out.print(f"  state:   {status['state']}")
    if status["pid"]:
        out.print(f"  pid:     supervisor {status['pid']}, qemu {status['qemu_pid']}")
        out.print(f"  accel:   {status['accel']} ({status['accel_reason']})")
        out.print(f"  uptime:  {status['uptime_s']} s, guest ready: {status['guest_ready']}")
    if status.get("exec_socket"):
        out.print(f"  exec:    {status['exec_socket']}")
    for line in status.get("device_errors", []):
        out.print(f"  [red]guest reports a dead virtio device:[/] {line}", markup=True,
                  highlight=False)
    if status["devices"]:
        table = Table("DEVICE", "TYPE", "CHANNEL", title="live devices (QMP)")
        for dev in status["devices"]:
            table.add_row(dev["path"].rsplit("/", 1)[-1], dev["type"], dev["channel"] or "-")
        out.print(table)
    last = status.get("last_run")
    if last:
        out.print(f"  last run: {last.get('state')} ({last.get('reason')})"
                  f" at {last.get('ended_at')}")


@vm.command("start")
@click.argument("name")
@click.option("--accel", type=click.Choice([a.value for a in Accel]),
              help="Override the VM's accelerator for this run.")
@click.option("--foreground", is_flag=True, help="Keep the supervisor attached.")
@click.option("--wait-ready", type=float, default=None, metavar="SECONDS",
              help="Also wait for the guest's ready marker.")
@click.option("--json", "as_json", is_flag=True)
def vm_start(name: str, accel: str | None, foreground: bool, wait_ready: float | None,
             as_json: bool) -> None:
    """Start VM NAME under its own supervisor."""
    if foreground:
        from secvf.runtime.supervisor import run_supervisor

        sys.exit(run_supervisor(name, accel=accel, report_fd=None))
    status = control.start_vm(name, accel=accel, wait_ready=wait_ready)
    if as_json:
        print_json(status)
    else:
        out.print(f"started [bold]{name}[/] (accel {status['accel']}, "
                  f"{len(status['devices'])} devices)")


@vm.command("stop")
@click.argument("name")
@click.option("--force", is_flag=True, help="Do not wait for the guest: quit QEMU now.")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for a graceful powerdown before forcing.")
@click.option("--json", "as_json", is_flag=True)
def vm_stop(name: str, force: bool, timeout: float, as_json: bool) -> None:
    """Stop VM NAME (ACPI powerdown, then forced after --timeout)."""
    status = control.stop_vm(name, force=force, timeout=timeout)
    if as_json:
        print_json(status)
    else:
        out.print(f"stopped [bold]{name}[/]")


@vm.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Stop the VM first if it is running.")
def vm_delete(name: str, force: bool) -> None:
    """Delete VM NAME and its disk."""
    library.delete_vm(name, force=force)
    out.print(f"deleted [bold]{name}[/]")


@vm.command("clone")
@click.argument("src")
@click.argument("dst")
def vm_clone(src: str, dst: str) -> None:
    """Clone stopped VM SRC as DST (copy-on-write; new UUID and MAC)."""
    library.clone_vm(src, dst)
    out.print(f"cloned [bold]{src}[/] to [bold]{dst}[/]")


@vm.command("rename")
@click.argument("old")
@click.argument("new")
def vm_rename(old: str, new: str) -> None:
    """Rename stopped VM OLD to NEW."""
    library.rename_vm(old, new)
    out.print(f"renamed [bold]{old}[/] to [bold]{new}[/]")


@vm.command("import")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", help="Name for the imported VM (default: the name in its vm.json).")
def vm_import(path: Path, name: str | None) -> None:
    """Import a VM bundle directory (vm.json + disk.qcow2), validating everything."""
    bundle = library.import_vm(path, name=name)
    out.print(f"imported [bold]{bundle.name}[/]")


@vm.command("logs")
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output.")
def vm_logs(name: str, follow: bool) -> None:
    """Print VM NAME's serial console log."""
    from secvf.runtime.console import print_log

    bundle, _ = library.get_vm(name)
    print_log(bundle, follow=follow)


@vm.command("console")
@click.argument("name")
def vm_console(name: str) -> None:
    """Attach to VM NAME's serial console (detach with Ctrl-])."""
    from secvf.runtime.console import attach_console

    attach_console(name)


@vm.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("-c", "shell", help="Run this shell string with /bin/sh -c.")
@click.option("--user", "-u", help="Guest user (default: agent).")
@click.option("--root", is_flag=True, help="Run as root in the guest.")
@click.option("-e", "--env", "env", multiple=True, metavar="K=V", help="Environment variable.")
@click.option("-w", "--workdir", help="Working directory in the guest (default /workspace).")
@click.option("-t", "--tty", "tty_mode", is_flag=True, help="Allocate a pseudo-terminal.")
@click.option("-i", "--interactive", is_flag=True, help="Forward stdin (EOF included).")
@click.option("--timeout", type=float, help="Kill the command's process group after S seconds.")
@click.option("--json", "as_json", is_flag=True, help="Capture output; print a JSON result.")
def vm_exec(name: str, command: tuple[str, ...], shell: str | None, user: str | None, root: bool,
            env: tuple[str, ...], workdir: str | None, tty_mode: bool, interactive: bool,
            timeout: float | None, as_json: bool) -> None:
    """Run a command in AI sandbox NAME; exits with the command's status.

    Exit status: the command's code; 128+N if killed by signal N; 124 on timeout;
    125 for a SecVF error; 126/127 if the command could not run / was not found.
    """
    from secvf.errors import ConfigError
    from secvf.workflows.vm_exec import result_json, run_captured, run_streaming

    args = list(command[1:] if command[:1] == ("--",) else command)
    if bool(shell) == bool(args):
        raise ConfigError("give a command after '--' or a shell string with -c (not both)")
    if root and user:
        raise ConfigError("--root and --user exclude each other")
    env_map = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"-e {item!r}: expected KEY=VALUE")
        env_map[key] = value
    cmd: str | list[str] = shell if shell else args
    user = "root" if root else user
    if as_json:
        result = run_captured(name, cmd, env=env_map, cwd=workdir, user=user, tty=tty_mode,
                              timeout=timeout)
        data = result_json(result)
        print_json(data)
        sys.exit(data["exit_status"])
    sys.exit(run_streaming(name, cmd, env=env_map, cwd=workdir, user=user, tty_mode=tty_mode,
                           interactive=interactive, timeout=timeout))


# ---- image ------------------------------------------------------------------------------


@main.group(cls=SecVFGroup)
def image() -> None:
    """Build and manage guest images."""


@image.command("build")
@click.argument("names", nargs=-1)
@click.option("--force", is_flag=True, help="Rebuild even if a build of this recipe exists.")
@click.option("--json", "as_json", is_flag=True)
def image_build(names: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Build guest images (default: every image a new user needs)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from secvf.errors import NotFound
    from secvf.image import DEFAULT_IMAGES, RECIPES, build_image

    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise NotFound(f"there is no image recipe called '{unknown[0]}' "
                       f"(known: {', '.join(sorted(RECIPES))})")
    built = []
    for name in names or DEFAULT_IMAGES:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      TextColumn("{task.fields[step]}"), TimeElapsedColumn(),
                      console=err, transient=as_json) as progress:
            task = progress.add_task(name, total=1.0, step="")

            def report(step: str, fraction: float, task: Any = task, bar: Any = progress) -> None:
                bar.update(task, completed=fraction, step=step)

            info = build_image(name, force=force, progress=report)
        built.append(_image_row(info))
    if as_json:
        print_json(built)
    else:
        for row in built:
            out.print(f"image [bold]{row['name']}[/] {row['recipe_hash'][:12]} "
                      f"({format_size(row['size_bytes'])}) ready at {row['path']}")


def _image_row(info: Any) -> dict[str, Any]:
    return {"name": info.name, "recipe_hash": info.recipe_hash, "built_at": str(info.built_at)[:19],
            "size_bytes": info.size_bytes, "kernel_version": info.kernel_version,
            "path": str(info.path)}


@image.command("list")
@click.option("--json", "as_json", is_flag=True)
def image_list(as_json: bool) -> None:
    """List built images."""
    from secvf.image import list_images

    rows = [_image_row(i) for i in list_images()]
    if as_json:
        print_json(rows)
        return
    table = Table("NAME", "RECIPE", "SIZE", "KERNEL", "BUILT")
    for row in rows:
        table.add_row(row["name"], row["recipe_hash"][:12], format_size(row["size_bytes"]),
                      row["kernel_version"], row["built_at"])
    out.print(table)


@image.command("rm")
@click.argument("name")
def image_rm(name: str) -> None:
    """Remove a built image."""
    from secvf.image import remove_image

    remove_image(name)
    out.print(f"removed image [bold]{name}[/]")



# ---- sandbox ----------------------------------------------------------------------------


def sandbox_options(func: Any) -> Any:
    """Options shared by ``sandbox create`` and ``sandbox run``."""
    for option in reversed([
        click.option("--image", default="sandbox", show_default=True),
        click.option("--cpus", type=int, default=1, show_default=True),
        click.option("--memory", default="1G", show_default=True),
        click.option("--workspace", type=click.Path(path_type=Path),
                     help="Host dir for /workspace (default: under $SECVF_HOME/sandboxes)."),
        click.option("--share", "shares", multiple=True, metavar="HOSTDIR:GUESTPATH:ro",
                     help="Extra read-only share (repeatable)."),
        click.option("--network", type=click.Choice(["nat", "none"]), default="nat",
                     show_default=True),
        click.option("--accel", type=click.Choice([a.value for a in Accel]), default="auto",
                     show_default=True),
    ]):
        func = option(func)
    return func


@main.group(cls=SecVFGroup)
def sandbox() -> None:
    """AI sandboxes: disposable VMs with an exec channel and a workspace share."""


@sandbox.command("create")
@click.argument("name")
@sandbox_options
@click.option("--json", "as_json", is_flag=True)
def sandbox_create(name: str, image: str, cpus: int, memory: str, workspace: Path | None,
                   shares: tuple[str, ...], network: str, accel: str, as_json: bool) -> None:
    """Create sandbox NAME from the sealed sandbox image (copy-on-write)."""
    from secvf.workflows.sandbox import create_sandbox

    config = create_sandbox(name, image=image, cpus=cpus, memory=memory, workspace=workspace,
                            shares=shares, network=network, accel=accel)
    if as_json:
        print_json(config.model_dump(mode="json"))
    else:
        ws = config.channels.shares[0].host_path if config.channels else "-"
        out.print(f"created sandbox [bold]{name}[/] ({config.id}); workspace {ws}")


@sandbox.command("start")
@click.argument("name")
@click.option("--timeout", type=float, default=120.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def sandbox_start(name: str, timeout: float, as_json: bool) -> None:
    """Boot sandbox NAME; returns when `secvf vm exec` works."""
    from secvf.workflows.sandbox import start_sandbox

    status = start_sandbox(name, timeout=timeout)
    if as_json:
        print_json(status)
    else:
        out.print(f"sandbox [bold]{name}[/] ready in {status['boot_s']} s "
                  f"(exec socket {status['exec_socket']})")


@sandbox.command("run", context_settings={"ignore_unknown_options": True,
                                          "allow_interspersed_args": False})
@click.option("--name", help="Session name (default: sbx-<random>).")
@click.option("--rm", "remove", is_flag=True, help="Stop and delete the sandbox afterwards.")
@sandbox_options
@click.option("--timeout", type=float, help="Command timeout in seconds.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def sandbox_run(name: str | None, remove: bool, image: str, cpus: int, memory: str,
                workspace: Path | None, shares: tuple[str, ...], network: str, accel: str,
                timeout: float | None, command: tuple[str, ...]) -> None:
    """Create + start a sandbox, run COMMAND, exit with its status (--rm: then delete)."""
    from secvf.workflows.sandbox import create_sandbox, remove_sandbox, start_sandbox
    from secvf.workflows.vm_exec import run_streaming

    args = list(command[1:] if command[:1] == ("--",) else command)
    config = create_sandbox(name, image=image, cpus=cpus, memory=memory, workspace=workspace,
                            shares=shares, network=network, accel=accel)
    error: SecVFError | None = None
    code = 125
    try:
        start_sandbox(config.name)
        code = run_streaming(config.name, args, env={}, cwd=None, user=None, tty_mode=False,
                             interactive=False, timeout=timeout)
    except SecVFError as exc:
        error = exc
    finally:  # also on Ctrl-C: --rm means nothing is left behind
        if remove:
            remove_sandbox(config.name, purge=workspace is None)
    if error is not None:
        fail(error)
    sys.exit(code)


@sandbox.command("list")
@click.option("--json", "as_json", is_flag=True)
def sandbox_list(as_json: bool) -> None:
    """List sandboxes."""
    from secvf.workflows.sandbox import list_sandboxes

    rows = list_sandboxes()
    if as_json:
        print_json(rows)
        return
    table = Table("NAME", "STATE", "EXEC SOCKET", "ID")
    for row in rows:
        table.add_row(row["name"], row["state"], row["exec_socket"] or "-", row["id"])
    out.print(table)


@sandbox.command("stop")
@click.argument("name")
def sandbox_stop(name: str) -> None:
    """Stop sandbox NAME (bridge, virtiofsd, vsock backend, QEMU: nothing left behind)."""
    control.stop_vm(name)
    out.print(f"stopped sandbox [bold]{name}[/]")


@sandbox.command("rm")
@click.argument("name")
@click.option("--purge", is_flag=True, help="Also delete the default workspace directory.")
def sandbox_rm(name: str, purge: bool) -> None:
    """Delete sandbox NAME (keeps its workspace unless --purge)."""
    from secvf.workflows.sandbox import remove_sandbox

    remove_sandbox(name, purge=purge)
    out.print(f"removed sandbox [bold]{name}[/]")


# ---- audit ------------------------------------------------------------------------------


@main.command("audit")
@click.option("--json", "as_json", is_flag=True)
def audit_cmd(as_json: bool) -> None:
    """Show every VM's host-guest surfaces; exit 1 if any contradicts its kind."""
    from secvf.workflows.audit import as_json as audit_json
    from secvf.workflows.audit import audit_all

    results, stray = audit_all()
    data = audit_json(results, stray)
    if as_json:
        print_json(data)
    else:
        table = Table("VM", "KIND", "STATE", "CHANNELS", "EXEC SOCKET", "SHARES", "NIC",
                      "FINDINGS")
        for res in results:
            chans = ", ".join(sorted({str(d.get("channel")) for d in res.channel_devices})) or "-"
            sock = (f"{res.exec_socket['mode']}" if res.exec_socket else "-")
            shares = ", ".join(f"{s['host_path']} ({s['mode']})" for s in res.shares) or "-"
            table.add_row(res.name, res.kind, res.state, f"{chans} [{res.source}]", sock, shares,
                          res.network, "\n".join(res.findings) or "[green]none[/]")
        out.print(table)
        for finding in stray:
            out.print(f"[red]finding:[/] {finding}")
    sys.exit(1 if data["finding_count"] else 0)
