"""The accelerator probe boots SecVF's own kernel and initramfs and looks for its marker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from secvf.errors import ConfigError
from secvf.model.config import Accel
from secvf.runtime.accel import AccelChoice, choose_accel, kvm_problem, probe_accel

pytestmark = pytest.mark.vm


def test_probe_sees_the_marker_when_the_guest_runs(built_images: dict) -> None:
    image = built_images["base"]
    choice = probe_accel("tcg", image.kernel, image.initrd, timeout_s=60)
    assert choice.accel == "tcg" and "booted a guest" in choice.reason


def test_probe_fails_over_to_tcg_when_no_guest_runs(built_images: dict, tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-kernel"
    bogus.write_bytes(b"\0" * 4096)
    choice = probe_accel("tcg", bogus, built_images["base"].initrd, timeout_s=20)
    assert choice.accel == "tcg" and "failed" in choice.reason


def test_tcg_is_honoured_without_probing_and_kvm_only_where_it_works(tmp_path: Path) -> None:
    assert choose_accel(Accel.TCG, None, None) == AccelChoice("tcg", "requested")
    problem = kvm_problem(None, None)
    if problem is None:
        assert choose_accel(Accel.KVM, None, None).accel == "kvm"
    else:  # this host: QEMU cannot run a guest under KVM, and says why
        with pytest.raises(ConfigError, match=f"KVM is not usable here: {re.escape(problem)}"):
            choose_accel(Accel.KVM, None, None)
