"""Running the host tools an image build needs, with errors that name the build step."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from secvf.errors import ImageBuildFailed

#: Host tools the builder runs, and the Debian package that provides each.
REQUIRED_TOOLS: dict[str, str] = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "depmod": "kmod",
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "tar": "tar",
}

_STDERR_TAIL_LINES = 12
_COMMAND_SHOWN_CHARS = 200


def check_tools(step: str = "preflight") -> None:
    """Raise :class:`ImageBuildFailed` naming every missing tool and its package."""
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise ImageBuildFailed(
            step, f"missing host tools; install them with: apt-get install {' '.join(missing)}"
        )


def run(step: str, argv: Sequence[str | Path], *, cwd: Path | None = None) -> str:
    """Run ``argv`` to completion and return its stdout.

    Raises:
        ImageBuildFailed: the tool is missing or exits non-zero; the message carries
            the last lines of its stderr.
    """
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ImageBuildFailed(step, f"{args[0]} is not installed") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-_STDERR_TAIL_LINES:])
        command = shlex.join(args)
        if len(command) > _COMMAND_SHOWN_CHARS:
            command = command[:_COMMAND_SHOWN_CHARS] + " ..."
        raise ImageBuildFailed(step, f"`{command}` exited with {proc.returncode}:\n{tail}")
    return proc.stdout
