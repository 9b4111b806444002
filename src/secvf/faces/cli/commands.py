"""The whole ``secvf`` command tree: the root command (:func:`.app.main`) with every
command group added, as click runs it."""

from secvf.faces.cli.analyze import analyses, analyze
from secvf.faces.cli.app import main as cli
from secvf.faces.cli.audit import audit
from secvf.faces.cli.gc import gc
from secvf.faces.cli.image import image
from secvf.faces.cli.iso import iso
from secvf.faces.cli.logs import logs
from secvf.faces.cli.mcp import mcp
from secvf.faces.cli.net import net, vm_set_network
from secvf.faces.cli.packets import packets
from secvf.faces.cli.sandbox import sandbox
from secvf.faces.cli.sandbox_template import sandbox_template
from secvf.faces.cli.tui import tui
from secvf.faces.cli.vm import vm
from secvf.faces.cli.vm_background import vm_attach, vm_kill, vm_ps
from secvf.faces.cli.vm_exec import vm_exec
from secvf.faces.cli.vm_snapshot import vm_snapshot

vm.add_command(vm_exec)
vm.add_command(vm_ps)
vm.add_command(vm_attach)
vm.add_command(vm_kill)
vm.add_command(vm_snapshot)
vm.add_command(vm_set_network)
sandbox.add_command(sandbox_template)
cli.add_command(vm)
cli.add_command(image)
cli.add_command(iso)
cli.add_command(sandbox)
cli.add_command(audit)
cli.add_command(gc)
cli.add_command(net)
cli.add_command(packets)
cli.add_command(analyze)
cli.add_command(analyses)
cli.add_command(mcp)
cli.add_command(logs)
cli.add_command(tui)

__all__ = ["cli"]
