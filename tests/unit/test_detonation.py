"""``secvf analyze`` without VMs: request checks, the sample's name on its medium, the
result store, and the sweep of what a killed detonation left."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest

from secvf.errors import ConfigError, NotFound, StateError
from secvf.store import analyses, networks
from secvf.workflows.detonation import (
    MAX_SAMPLE_BYTES,
    DetonationRequest,
    check_request,
    medium_name,
    sweep_interrupted,
)
from tests.helpers import run_cli


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "s.sh"
    path.write_text("#!/bin/sh\ntrue\n")
    return path


@pytest.mark.parametrize(("change", "message"), [
    ({"user": "nobody"}, "choose analyst or root"),
    ({"timeout_s": 0}, "1 to 3600 seconds"),
    ({"timeout_s": 7200}, "1 to 3600 seconds"),
    ({"network": "nat"}, "choose fakenet, none or isolated:NAME"),
    ({"log_max_bytes": 1000}, "64 KiB to 16 GiB"),
    ({"log_max_bytes": 17 << 30}, "64 KiB to 16 GiB"),
])
def test_bad_options_are_refused(script: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_request(DetonationRequest(sample=script, **change))


def test_missing_directory_and_huge_samples_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        check_request(DetonationRequest(sample=tmp_path / "nope"))
    with pytest.raises(ConfigError, match="not a regular file"):
        check_request(DetonationRequest(sample=tmp_path))
    huge = tmp_path / "huge"
    with huge.open("wb") as fh:
        fh.truncate(MAX_SAMPLE_BYTES + 1)  # sparse: costs nothing
    with pytest.raises(ConfigError, match="the limit is 256 MiB"):
        check_request(DetonationRequest(sample=huge))


def test_an_isolated_network_must_be_on_the_analysis_subnet(script: Path) -> None:
    networks.create_network("lab", subnet="10.0.100.0/24")
    with pytest.raises(ConfigError, match="10.13.37.0/24"):
        check_request(DetonationRequest(sample=script, network="isolated:lab"))
    networks.create_network("det", subnet="10.13.37.0/24")
    check_request(DetonationRequest(sample=script, network="isolated:det"))
    with pytest.raises(NotFound):
        check_request(DetonationRequest(sample=script, network="isolated:absent"))


def test_yara_rules_must_exist(script: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="YARA rules"):
        check_request(DetonationRequest(sample=script, yara=(tmp_path / "r.yar",)))


@pytest.mark.parametrize(("name", "expected"), [
    ("payload.exe", "payload.exe"),
    ("..", "sample"),
    ("a b;rm -rf", "a_b_rm_-rf"),
    ("a\nb", "a_b"),
    ("ünïcode.bin", "_n_code.bin"),
    (".hidden", "hidden"),
    ("manifest.json", "_manifest.json"),
    ("x" * 200, "x" * 64),
])
def test_the_medium_name_is_safe(name: str, expected: str) -> None:
    assert medium_name(Path("/samples") / name) == expected


def test_results_are_listed_resolved_by_prefix_exported_and_removed(tmp_path: Path) -> None:
    analysis_id, directory, lock = analyses.new_analysis()
    analyses.write_status(directory, id=analysis_id, state="running")
    (directory / "report.json").write_text("{}")
    (listed,) = analyses.list_analyses()
    assert (listed.id, listed.running, listed.status["state"]) == (analysis_id, True, "running")
    assert analyses.result_dir(analysis_id[:6]) == directory
    with pytest.raises(StateError):
        analyses.remove_analysis(analysis_id)
    assert analyses.interrupted() == []  # its detonation still holds the lock
    lock.release()
    analyses.write_status(directory, state="done")
    out = analyses.export_analysis(analysis_id, tmp_path / "a.tar.gz")
    assert os.stat(out).st_mode & 0o777 == 0o600
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert f"{analysis_id}/report.json" in names and f"{analysis_id}/.lock" not in names
    with pytest.raises(ConfigError, match="exists"):
        analyses.export_analysis(analysis_id, out)
    analyses.remove_analysis(analysis_id)
    assert analyses.list_analyses() == []


@pytest.mark.parametrize("bad", ["../x", "zz", "abc", "0123456789abcdef0"])
def test_bad_ids_are_not_found(bad: str) -> None:
    with pytest.raises(NotFound):
        analyses.result_dir(bad)


def test_what_a_killed_detonation_left_is_swept(tmp_path: Path) -> None:
    analysis_id, directory, lock = analyses.new_analysis()
    network = f"an-{analysis_id}"
    networks.create_network(network, subnet="10.13.37.0/24", analysis=True)
    (directory / "work-x").mkdir()
    analyses.write_status(directory, id=analysis_id, state="running",
                          made={"vms": [f"an-{analysis_id}"], "network": network})
    lock.release()  # as if its process had been killed
    assert sweep_interrupted() == [analysis_id]
    assert analyses.read_status(directory)["state"] == "interrupted"
    assert not (directory / "work-x").exists()
    with pytest.raises(NotFound):
        networks.load_network(network)
    assert sweep_interrupted() == []


def test_the_cli_lists_and_shows_results() -> None:
    analysis_id, directory, lock = analyses.new_analysis()
    analyses.write_status(directory, id=analysis_id, state="done", verdict="finished",
                          sample_name="s.sh")
    (directory / "report.json").write_text(json.dumps({"schema_version": 1, "run": {}}))
    lock.release()
    rows = json.loads(run_cli("analyses", "list", "--json", check=True).stdout)
    assert [(r["id"], r["verdict"], r["sample_name"]) for r in rows] == [
        (analysis_id, "finished", "s.sh")]
    shown = json.loads(run_cli("analyses", "show", analysis_id[:5], "--json",
                               check=True).stdout)
    assert shown == {"schema_version": 1, "run": {}}
    missing = run_cli("analyses", "show", "ffff")
    assert missing.returncode == 1 and "no analysis" in missing.stderr


def test_several_jobs_on_one_isolated_network_are_refused(script: Path) -> None:
    from secvf.workflows.detonation import detonate_all

    networks.create_network("det", subnet="10.13.37.0/24")
    request = DetonationRequest(sample=script, network="isolated:det")
    with pytest.raises(ConfigError, match="one at a time"):
        detonate_all([request, request], jobs=2)


def test_a_cut_log_and_a_copy_past_its_limit_are_noted(tmp_path: Path) -> None:
    from secvf.runtime.logcap import append_cut_note
    from secvf.workflows.detonation import _copy_bounded

    log = tmp_path / "serial.log"
    log.write_bytes(b"a" * 1000)
    append_cut_note(log, 1000)
    notes: list[str] = []
    _copy_bounded(log, tmp_path / "kept.log", notes, limit=1 << 20)
    assert (tmp_path / "kept.log").read_bytes() == log.read_bytes()
    assert notes == ["kept.log: the guest wrote more than the VM's log limit; the host kept "
                     "the first part and discarded the rest"]
    notes.clear()
    _copy_bounded(log, tmp_path / "short.log", notes, limit=100)
    assert (tmp_path / "short.log").read_bytes().startswith(b"a" * 100 + b"\nT truncated")
    assert notes == ["short.log was cut at 100 bytes"]
    _copy_bounded(tmp_path / "none.log", tmp_path / "x.log", notes, limit=100)
    assert notes[-1] == "no x.log: the guest wrote nothing there"
