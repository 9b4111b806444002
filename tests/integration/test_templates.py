"""Sandbox templates on real VMs: sessions restored from one saved guest are each their own
machine (RNG, clock, hostname, MAC, /tmp), have their shares and a working exec channel;
a stale template is never restored and gets rebuilt; ``--cold`` boots.

The template is built once for the module (its own shape: 640 MiB, so the module's
sessions and nobody else's restore it) and removed at the end.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secvf import api
from secvf.store import templates as store
from secvf.store.events import read_events

pytestmark = pytest.mark.vm

MEMORY = "640M"
REBUILD_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def template(vm_library: Path) -> Iterator[api.TemplateInfo]:
    info = api.build_template(memory=MEMORY)
    yield info
    for left in api.list_templates():
        api.remove_template(left.id)


@pytest.fixture
def sessions(template: api.TemplateInfo) -> Iterator[list[str]]:
    """Names of sessions a test made; removed (with their workspaces) afterwards."""
    made: list[str] = []
    yield made
    for name in made:
        api.remove_sandbox(name, purge=True, force=True)


def session(made: list[str], name: str, **options) -> dict:
    config = api.create_sandbox(name, memory=MEMORY, **options)
    made.append(name)
    status = api.start_sandbox(name)
    status["template"] = config.channels.template if config.channels else None
    return status


def run(name: str, script: str, **options) -> api.ExecResult:
    return api.run_command(name, ["sh", "-c", script], **options)


def test_two_sessions_from_one_template_are_two_machines(template, sessions) -> None:
    seen = {}
    for name in ("tpl-a", "tpl-b"):
        status = session(sessions, name)
        assert status["start_mode"] == "restored" and status["template"] == template.id
        assert {d["type"] for d in status["hotplugged"]} >= {"vhost-user-vsock-pci",
                                                             "vhost-user-fs-pci"}
        added = [e for e in read_events() if e["event"] == "vm_devices_added"
                 and e.get("vm") == name]
        assert [sorted(d["type"] for d in e["devices"]) for e in added] == [
            ["vhost-user-fs-pci", "vhost-user-vsock-pci"]]  # logged once, both channels
        before = time.time()
        result = run(name, "hostname; cat /sys/class/net/eth0/address; "
                           "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
                           "date +%s.%N; ls -A /tmp | wc -l")
        after = time.time()
        assert result.exit_code == 0, result.stderr
        host, mac, rng, clock, tmp = result.stdout.decode().split()
        assert host == name and tmp == "0" and mac == api.get_vm(name).nics[0].mac
        assert before - 1.0 < float(clock) < after + 1.0
        seen[name] = (mac, rng)
    (mac_a, rng_a), (mac_b, rng_b) = seen["tpl-a"], seen["tpl-b"]
    assert mac_a != mac_b and rng_a != rng_b


def test_a_restored_session_has_its_shares(template, sessions, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "data.txt").write_text("reference\n")
    ref.chmod(0o755)
    (ref / "data.txt").chmod(0o644)
    status = session(sessions, "tpl-share", shares=[f"{ref}:/data/ref:ro"])
    assert status["start_mode"] == "restored"
    assert run("tpl-share", "echo from-guest > /workspace/w.txt").exit_code == 0
    channels = api.get_vm("tpl-share").channels
    assert channels is not None
    workspace = Path(channels.shares[0].host_path)
    assert (workspace / "w.txt").read_text() == "from-guest\n"
    assert run("tpl-share", "cat /data/ref/data.txt").stdout == b"reference\n"
    denied = run("tpl-share", "echo x > /data/ref/new", user="root")
    assert denied.exit_code != 0 and not (ref / "new").exists()


def test_exec_works_after_a_restore(template, sessions) -> None:
    session(sessions, "tpl-exec")
    assert run("tpl-exec", "exit 7").exit_code == 7
    assert run("tpl-exec", "tr a-z A-Z", stdin=b"shout\n").stdout == b"SHOUT\n"
    assert run("tpl-exec", "test -t 0 && echo tty", tty=True).stdout.strip() == b"tty"
    assert run("tpl-exec", "id -u").stdout == b"1000\n"


def test_cold_boots_even_when_a_template_fits(template, sessions) -> None:
    config = api.create_sandbox("tpl-cold", memory=MEMORY, cold=True)
    sessions.append("tpl-cold")
    assert config.channels is not None and config.channels.template is None
    assert api.start_sandbox("tpl-cold")["start_mode"] == "booted"
    assert run("tpl-cold", "hostname").stdout == b"tpl-cold\n"


def test_a_stale_template_is_not_restored_and_gets_rebuilt(template, sessions) -> None:
    stale_id = "f" * 64
    stale = store.template_dir(stale_id)
    shutil.copytree(store.template_dir(template.id), stale)
    record = json.loads((stale / "template.json").read_text())
    record.update(id=stale_id, recipe_hash="0" * 64)
    (stale / "template.json").write_text(json.dumps(record))
    api.remove_template(template.id)
    notes: list[str] = []
    config = api.create_sandbox("tpl-stale", memory=MEMORY, notes=notes)
    sessions.append("tpl-stale")
    assert config.channels is not None and config.channels.template is None
    assert len(notes) == 1 and "stale (the image was rebuilt)" in notes[0]
    assert api.start_sandbox("tpl-stale")["start_mode"] == "booted"
    again: list[str] = []
    api.create_sandbox("tpl-stale2", memory=MEMORY, notes=again)  # said once only
    sessions.append("tpl-stale2")
    assert again == []
    deadline = time.monotonic() + REBUILD_TIMEOUT_S
    while not (store.template_dir(template.id) / "template.json").exists():
        assert time.monotonic() < deadline, "the stale template was not rebuilt"
        time.sleep(0.5)
    while stale.exists():  # the rebuild removes the stale one once it is in place
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # the sandbox templates (secvf analyze's clean states are templates too)
    assert [t.id for t in api.list_templates()] == [template.id]
