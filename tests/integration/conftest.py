"""Fixtures for tests that boot real guests: the host check, the session's built images,
a shared library with a fleet of booted VMs, and ``vm_factory`` for tests that need VMs of
their own."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from secvf.image import DEFAULT_IMAGES, ImageInfo, build_image
from secvf.machine.plan import qemu_binary
from tests.helpers import run_cli

#: The logs ``vm_factory`` keeps from a VM of a failed test.
VM_LOGS = ("serial.log", "supervisor.log", "qemu.log")


def vm_host_problem() -> str | None:
    """Why this host cannot run the VM tests, or None if it can."""
    if os.geteuid() != 0:
        return (f"VM tests need root (virtiofsd in user namespaces, exec as other uids); "
                f"running as uid {os.geteuid()}")
    qemu = qemu_binary()
    if shutil.which(qemu) is None:
        return f"{qemu} is missing: install qemu-system-x86 (or point $SECVF_QEMU at a QEMU)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every ``vm``-marked test, with the reason, on a host that cannot run them."""
    problem = vm_host_problem()
    if problem is None:
        return
    for item in items:
        if item.get_closest_marker("vm") is not None:
            item.add_marker(pytest.mark.skip(reason=problem))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Keep each phase's report on the item (``rep_setup``, ``rep_call``) for fixtures."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def built_images() -> dict[str, ImageInfo]:
    """Build (or reuse from the shared cache) every default image, by name.

    The first session on a machine builds them (about a minute); later sessions find
    them in the cache by recipe hash and take well under a second.
    """
    problem = vm_host_problem()
    if problem is not None:
        pytest.skip(problem)
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


@pytest.fixture(scope="session")
def analysis_images(vm_library: Path) -> None:
    """The two images `secvf analyze` needs (not built by default), built or cached."""
    for name in ("analysis", "fakenet"):
        build_image(name)


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


# ---- VMs of one test -------------------------------------------------------------------------

@dataclass
class VMFactory:
    """Creates VMs in the session library for one test; ``vm_factory`` cleans them up."""

    made: dict[str, str] = field(default_factory=dict)  # VM name -> "vm" or "sandbox"

    def vm(self, name: str, *args: str) -> str:
        """``secvf vm create NAME ARGS...``; returns the name."""
        run_cli("vm", "create", name, *args, check=True)
        self.made[name] = "vm"
        return name

    def sandbox(self, name: str, *args: str) -> str:
        """``secvf sandbox create NAME ARGS...``; returns the name."""
        run_cli("sandbox", "create", name, *args, check=True)
        self.made[name] = "sandbox"
        return name


@pytest.fixture
def vm_factory(vm_library: Path, request: pytest.FixtureRequest,
               tmp_path: Path) -> Iterator[VMFactory]:
    """Make VMs for this test; at teardown every one still there is force-stopped and
    deleted, and — if the test failed — its serial, supervisor and QEMU logs are first
    copied to ``<tmp_path>/vm-logs/<name>/`` (the path is printed)."""
    factory = VMFactory()
    yield factory
    reports = [getattr(request.node, f"rep_{when}", None) for when in ("setup", "call")]
    failed = any(r is not None and r.failed for r in reports)
    for name, kind in factory.made.items():
        bundle = vm_library / "vms" / name
        if not bundle.exists():
            continue  # the test removed it itself
        run_cli("vm", "stop", "--force", name)  # so the logs are complete
        if failed:
            saved = tmp_path / "vm-logs" / name
            saved.mkdir(parents=True, exist_ok=True)
            for log in VM_LOGS:
                if (bundle / log).exists():
                    shutil.copy2(bundle / log, saved / log)
            print(f"vm_factory: logs of VM '{name}' saved in {saved}")
        if kind == "sandbox":
            run_cli("sandbox", "rm", "--purge", "--force", name)
        else:
            run_cli("vm", "delete", "--force", name)
