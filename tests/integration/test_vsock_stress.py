"""Regression test for issue 17: no vsock rx stall across guest reboots and device replugs.

Twenty rounds of ``bench/vsock_stress.py`` (ten guest reboots, ten ``device_del`` +
``device_add`` of the vsock device with a new backend), each followed by a new guest listener
and a 2 MiB echo through the hybrid socket. It drives a plain QEMU and the backend itself,
not SecVF's supervisor. The test fails if any round stalls (no echo progress, the channel
does not come back, or the guest console reports a dead virtqueue) or if the backend's vring
trace breaks a lifecycle rule (a write to a stopped ring, a used index written by someone
else). A failed round's evidence (trace, logs, the rx ring read from guest memory) is kept
under the test's ``tmp_path``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

from secvf.image import ImageInfo

pytestmark = pytest.mark.vm

BENCH = Path(__file__).resolve().parents[2] / "bench"
ROUNDS = ["reboot", "replug"] * 10
ECHO_BYTES = 2 << 20


def _stress_module() -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the bench scripts import their siblings by name
    import vsock_stress

    return vsock_stress


def test_no_rx_stall_across_reboots_and_replugs(
    built_images: dict[str, ImageInfo], tmp_path: Path
) -> None:
    stress = _stress_module()
    image = built_images["sandbox"]
    evidence = tmp_path / "evidence"
    workdir = tmp_path / "vm"
    workdir.mkdir()
    vm = stress.StressVM(workdir, image, stress.stress_disk(image))
    try:
        results = stress.run_rounds(vm, ROUNDS, os.urandom(ECHO_BYTES), evidence, print)
        vm.check_current_trace(evidence)
    finally:
        vm.close()
    assert [r.kind for r in results] == ROUNDS
    stalls = [f"round {r.number} ({r.kind}): {r.failure} {r.console}" for r in results if not r.ok]
    assert not stalls, f"{len(stalls)} stalled rounds (evidence in {evidence}): {stalls}"
    check = vm.trace_check
    assert check.ok, f"vring trace broke the lifecycle rules: {check.violations[:5]}"
    assert check.rings >= 2 * len(ROUNDS) and check.used_writes > 0
