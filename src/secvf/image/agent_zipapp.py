"""The guest agent as one zipapp: what sandbox images install and unit tests run.

Built from the ``secvf`` source tree: ``secvf/guest/agent/*.py`` (the agent package),
``secvf/exec/protocol.py`` (the wire protocol), ``secvf/exec/forwarding.py`` (the
port-forward handshake) and ``secvf/guest/restore_watch.py`` (the
restore watch, whose clock and RNG helpers the agent uses), all standard library only.
"""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

#: The ``secvf`` package directory the archive is built from.
PACKAGE_DIR = Path(__file__).resolve().parent.parent

#: Parent packages of the archived modules, given stub __init__ files.
ZIPAPP_STUB_PACKAGES = ("secvf", "secvf/exec", "secvf/guest")
#: The whole content of each stub __init__.py.
ZIPAPP_STUB = b'"""Only what the SecVF guest agent needs (secvf.image.agent_zipapp)."""\n'
#: Timestamp of every zipapp entry (the earliest a zip can hold), for identical bytes.
ZIPAPP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def agent_zipapp(package_dir: Path = PACKAGE_DIR) -> bytes:
    """Return the guest agent as one zipapp, built from the ``secvf`` source ``package_dir``.

    The archive holds ``secvf/guest/agent/*.py``, ``secvf/exec/protocol.py``,
    ``secvf/exec/forwarding.py``,
    ``secvf/guest/restore_watch.py``, stub ``__init__.py`` files for their parent
    packages and, as the archive's own ``__main__.py``, the agent's ``__main__.py``:
    ``python3 -I agent.pyz`` needs nothing but the standard library. The bytes depend on
    the sources only (entries sorted, fixed timestamps and modes, stored uncompressed),
    so the recipe hash is stable.

    Raises:
        OSError: a source file cannot be read (FileNotFoundError if one is missing).
    """
    agent_dir = package_dir / "guest" / "agent"
    entries = {
        "__main__.py": (agent_dir / "__main__.py").read_bytes(),
        "secvf/exec/protocol.py": (package_dir / "exec" / "protocol.py").read_bytes(),
        "secvf/exec/forwarding.py": (package_dir / "exec" / "forwarding.py").read_bytes(),
        "secvf/guest/restore_watch.py": (package_dir / "guest" / "restore_watch.py").read_bytes(),
    }
    entries |= {f"secvf/guest/agent/{p.name}": p.read_bytes() for p in agent_dir.glob("*.py")}
    entries |= {f"{package}/__init__.py": ZIPAPP_STUB for package in ZIPAPP_STUB_PACKAGES}
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, ZIPAPP_DATE_TIME)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, entries[name])
    return archive.getvalue()
