"""``secvf audit`` judges a sandbox's shares by the share rules: a ``:rw`` share that
passes them is fine, a hand-edited one that breaks them is a finding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secvf import api
from tests.helpers import run_cli
from tests.unit.fake_images import publish_fake_image


@pytest.fixture(autouse=True)
def sandbox_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECVF_CACHE", str(tmp_path / "cache"))
    publish_fake_image("sandbox")


def audit_of(name: str) -> dict:
    proc = run_cli("audit", "--json")
    return {vm["name"]: vm for vm in json.loads(proc.stdout)["vms"]}[name]


def test_a_read_write_share_that_passes_the_rules_is_no_finding(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    api.create_sandbox("ok", shares=[f"{data}:/data:rw"])
    assert audit_of("ok")["findings"] == []


def test_a_hand_edited_share_of_a_system_tree_is_a_finding(secvf_env: Path) -> None:
    api.create_sandbox("edited")
    config_file = secvf_env / "vms" / "edited" / "vm.json"
    config = json.loads(config_file.read_text())
    config["channels"]["shares"].append(
        {"tag": "rw1", "host_path": "/etc", "guest_path": "/data", "read_only": False})
    config_file.write_text(json.dumps(config))
    findings = audit_of("edited")["findings"]
    assert any("break the share rules" in f and "/etc" in f for f in findings), findings
