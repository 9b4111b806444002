"""SecVF: a QEMU VM manager for security teams and AI-agent sandboxes.

The promise: a host-guest control channel (vsock exec bridge, virtio-fs shares)
exists only on AI-sandbox VMs; generic and malware-analysis VMs have none, and the
running device tree proves it. See ``docs/`` for the parts.
"""

from __future__ import annotations

import logging

from secvf.errors import SecVFError

__version__ = "0.1.0"
__all__ = ["SecVFError", "__version__"]

logging.getLogger("secvf").addHandler(logging.NullHandler())
