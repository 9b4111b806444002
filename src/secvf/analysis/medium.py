"""The sample medium: a read-only ISO 9660 image holding ``manifest.json`` and the sample.

The analysis guest's detonator (``secvf/guest/detonator.py``) mounts it at
``/media/sample`` (``-t iso9660 -o ro,nodev,nosuid``) once it is inserted into the VM's
empty cdrom drive. Rock Ridge keeps the sample's name and mode (an executable stays
executable); the ISO 9660 level-3 names underneath are only there for the standard.

Manifest (format 1), validated strictly by the detonator::

    {"format": 1, "sample": "NAME", "args": ["..."], "user": "analyst" | "root",
     "timeout_s": NUMBER, "pid_limit": INT}
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pycdlib

from secvf.errors import ConfigError

__all__ = ["MANIFEST_NAME", "SAMPLE_MODE", "build_sample_medium", "manifest"]

MANIFEST_NAME = "manifest.json"
#: Mode of the sample on the medium (Rock Ridge): readable and executable by everyone.
SAMPLE_MODE = 0o100555
MANIFEST_MODE = 0o100444
VOLUME_ID = "SECVF_SAMPLE"
MAX_NAME_BYTES = 255


def manifest(sample_name: str, *, args: list[str] | None = None, user: str = "analyst",
             timeout_s: float = 60, pid_limit: int = 256) -> dict[str, Any]:
    """A format-1 manifest for ``sample_name`` (defaults: as the analyst, 60 s, 256 pids)."""
    return {"format": 1, "sample": sample_name, "args": list(args or []), "user": user,
            "timeout_s": timeout_s, "pid_limit": pid_limit}


def build_sample_medium(sample: Path, manifest: dict[str, Any], out: Path) -> Path:
    """Write an ISO with ``manifest.json`` and ``sample`` (named ``manifest["sample"]``)
    to ``out`` and return ``out``.

    Raises:
        ConfigError: the manifest's sample name is not a plain file name, or is the
            manifest's own name.
        OSError: ``sample`` cannot be read or ``out`` cannot be written.
    """
    name = manifest.get("sample")
    if (not isinstance(name, str) or not name or "/" in name or "\0" in name
            or name in (".", "..", MANIFEST_NAME) or len(name.encode()) > MAX_NAME_BYTES):
        raise ConfigError(f"the sample's name on the medium must be a plain file name, "
                          f"not {name!r}")
    data = sample.read_bytes()
    meta = json.dumps(manifest, sort_keys=True).encode()
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, rock_ridge="1.09", vol_ident=VOLUME_ID)
    try:
        iso.add_fp(io.BytesIO(meta), len(meta), "/MANIFEST.JSON;1", rr_name=MANIFEST_NAME,
                   file_mode=MANIFEST_MODE)
        iso.add_fp(io.BytesIO(data), len(data), f"/{_iso_name(name)};1", rr_name=name,
                   file_mode=SAMPLE_MODE)
        partial = out.with_name(out.name + ".partial")
        iso.write(str(partial))
    finally:
        iso.close()
    partial.replace(out)
    return out


def _iso_name(name: str) -> str:
    """An ISO 9660 level-3 name (``A-Z0-9_``, one dot) that differs from the manifest's."""
    stem = re.sub(r"[^A-Z0-9_]", "_", name.upper())[:30] or "SAMPLE"
    return f"S_{stem}.BIN"
