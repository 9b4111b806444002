"""SecVF: a QEMU VM manager for security teams and AI-agent sandboxes.

The promise: a host-guest control channel (vsock exec bridge, virtio-fs shares)
exists only on AI-sandbox VMs; generic and malware-analysis VMs have none, and the
running device tree proves it. See ``docs/`` for the parts.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

from secvf.errors import SecVFError

__version__ = "0.1.0"
__all__ = ["SecVFError", "__version__"]

logging.getLogger("secvf").addHandler(logging.NullHandler())


def lazy_exports(module: str, exports: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The PEP 562 ``__getattr__`` and ``__dir__`` of module ``module``, which re-exports
    each name in ``exports`` from the module it maps to, imported on first use::

        __getattr__, __dir__ = lazy_exports(__name__, {"ImageInfo": "secvf.image.store"})

    A name, once imported, is kept in ``module``; any other name is an AttributeError
    (so ``from module import submodule`` still finds a submodule).
    """
    namespace = vars(sys.modules[module])

    def __getattr__(name: str) -> Any:
        source = exports.get(name)
        if source is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(source), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
