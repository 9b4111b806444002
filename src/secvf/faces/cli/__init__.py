"""The ``secvf`` command line (alias ``secvf-cli``): a face over :mod:`secvf.api`.

One module per command group; :mod:`.app` holds what they share and
:mod:`.terminal` the local terminal handling of ``vm exec``.
"""

from secvf.faces.cli.analyze import analyses, analyze
from secvf.faces.cli.app import main
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
main.add_command(vm)
main.add_command(image)
main.add_command(iso)
main.add_command(sandbox)
main.add_command(audit)
main.add_command(gc)
main.add_command(net)
main.add_command(packets)
main.add_command(analyze)
main.add_command(analyses)
main.add_command(mcp)
main.add_command(logs)
main.add_command(tui)

__all__ = ["main"]
