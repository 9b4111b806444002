"""Fixtures for tests that boot real guests: the session's built images."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from secvf.image import DEFAULT_IMAGES, ImageInfo, build_image
from tests.helpers import run_cli


@pytest.fixture(scope="session")
def built_images() -> dict[str, ImageInfo]:
    """Build (or reuse from the shared cache) every default image, by name.

    The first session on a machine builds them (about a minute); later sessions find
    them in the cache by recipe hash and take well under a second.
    """
    return {name: build_image(name) for name in DEFAULT_IMAGES}


# ---- a shared library and fleet of booted VMs --------------------------------------------
# Booting under TCG costs seconds, so the VM tests share one library (SECVF_HOME) and the
# VMs in it across the session. Tests that need a fresh VM create their own in the same
# library and clean it up.



@pytest.fixture(scope="session")
def vm_library(built_images: dict[str, ImageInfo]) -> Iterator[Path]:
    """One SECVF_HOME + runtime dir for every VM test; every VM is force-stopped at the end."""
    home = Path(tempfile.mkdtemp(prefix="secvf-vmtests-"))
    runtime = Path(tempfile.mkdtemp(prefix="svr", dir="/tmp"))
    saved = {k: os.environ.get(k) for k in ("SECVF_HOME", "SECVF_RUNTIME_DIR")}
    os.environ["SECVF_HOME"] = str(home)
    os.environ["SECVF_RUNTIME_DIR"] = str(runtime)
    yield home
    for vm_dir in sorted((home / "vms").glob("*")):
        run_cli("vm", "delete", "--force", vm_dir.name)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(home, ignore_errors=True)
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def secvf_env(vm_library: Path) -> Path:
    """VM tests use the shared session library instead of a per-test one."""
    return vm_library


@pytest.fixture(scope="session")
def fleet(vm_library: Path) -> dict[str, dict]:
    """A generic VM (NAT), a malware-analysis VM and an AI sandbox, running at once.

    Returns each VM's ``vm status --json`` once its guest reported ready.
    """
    import json

    from secvf.runtime.control import wait_for_ready

    run_cli("vm", "create", "gen", "--memory", "512M", check=True)
    run_cli("vm", "create", "mal", "--kind", "malware-analysis", "--memory", "512M", check=True)
    run_cli("sandbox", "create", "sbx", "--memory", "512M", check=True)
    run_cli("vm", "start", "gen", check=True)
    run_cli("vm", "start", "mal", check=True)
    run_cli("sandbox", "start", "sbx", check=True)
    statuses = {}
    for name in ("gen", "mal", "sbx"):
        wait_for_ready(name, 120)
        statuses[name] = json.loads(run_cli("vm", "status", name, "--json", check=True).stdout)
    return statuses
