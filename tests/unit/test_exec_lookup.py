"""Finding a VM's exec socket (``workflows.vm_exec.exec_socket_for``): the quick look
without pydantic (``store.peek``) says yes only for a plainly running AI sandbox, and
every other case gets the validated answer and its error, as before the quick look.

The VMs here are bundles written by hand: a ``vm.json``, the run lock held by the test
as a supervisor holds it, a runtime record, and a file where the exec socket goes (only
its existence is looked at).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from secvf.errors import AgentUnavailable, ConfigError, CorruptRecord, NoExecChannel, NotFound
from secvf.model.config import VMConfig, VMKind, now_iso, save_config
from secvf.model.runtime import RuntimeRecord, Transition, VmState
from secvf.store.bundle import Bundle, RuntimeFiles, bundle_for
from secvf.store.locks import FileLock
from secvf.store.peek import _is_canonical_uuid, running_exec_socket
from secvf.store.runstate import write_runtime_state
from secvf.workflows.vm_exec import exec_socket_for
from tests.unit.running_sandbox import sandbox_config


class HandMadeVM:
    """A VM bundle in the test's library, made to look as a test needs."""

    def __init__(self, config: VMConfig) -> None:
        self.config = config
        self.bundle: Bundle = bundle_for(config.name)
        self.files = RuntimeFiles(config.id)
        self.bundle.path.mkdir(parents=True)
        save_config(self.bundle.config_file, config)
        self._lock = FileLock(self.bundle.run_lock, "test supervisor")

    def runs(self, state: VmState | None = VmState.RUNNING, *, socket: bool = True) -> None:
        """Hold the run lock; publish a record in ``state`` (None: none yet); make the
        exec socket (``socket``)."""
        self._lock.acquire()
        if state is not None:
            write_runtime_state(self.files, RuntimeRecord(
                state=state, name=self.config.name, id=self.config.id, kind=self.config.kind,
                supervisor_pid=os.getpid(), started_at=now_iso(),
                transitions=[Transition(state, now_iso())]))
        if socket:
            self.files.exec_socket.touch()

    def stop(self) -> None:
        self._lock.release()


@pytest.fixture
def sandbox() -> Iterator[HandMadeVM]:
    vm = HandMadeVM(sandbox_config("sbx"))
    yield vm
    vm.stop()


def test_a_running_sandbox_is_found_by_the_quick_look(sandbox: HandMadeVM) -> None:
    sandbox.runs()
    assert running_exec_socket(sandbox.bundle) == sandbox.files.exec_socket
    assert exec_socket_for("sbx") == sandbox.files.exec_socket


@pytest.mark.parametrize("state", [VmState.STARTING, VmState.STOPPING])
def test_a_sandbox_starting_or_stopping_with_its_socket_is_found(
        sandbox: HandMadeVM, state: VmState) -> None:
    sandbox.runs(state)
    assert running_exec_socket(sandbox.bundle) == exec_socket_for("sbx")


def test_a_paused_sandbox_has_no_answer_until_it_is_resumed(sandbox: HandMadeVM) -> None:
    sandbox.runs(VmState.PAUSED)
    assert running_exec_socket(sandbox.bundle) is None
    with pytest.raises(NoExecChannel) as caught:
        exec_socket_for("sbx")
    assert str(caught.value) == "VM 'sbx' is paused; resume it: secvf vm resume sbx"


def test_a_missing_vm_is_not_found() -> None:
    with pytest.raises(NotFound, match="no VM named 'ghost'"):
        exec_socket_for("ghost")


def test_a_generic_vm_has_no_exec_channel_by_design(sandbox: HandMadeVM) -> None:
    generic = HandMadeVM(sandbox.config.model_copy(update={
        "name": "plain", "id": sandbox_config().id, "kind": VMKind.GENERIC, "channels": None}))
    generic.runs()
    try:
        assert running_exec_socket(generic.bundle) is None
        with pytest.raises(NoExecChannel, match="is a generic VM: it has no exec channel"):
            exec_socket_for("plain")
    finally:
        generic.stop()


def test_a_stopped_sandbox_is_not_running(sandbox: HandMadeVM) -> None:
    sandbox.files.exec_socket.touch()  # left behind: no supervisor holds the lock
    assert running_exec_socket(sandbox.bundle) is None
    with pytest.raises(NoExecChannel, match=r"is not running \(start it: secvf vm start sbx\)"):
        exec_socket_for("sbx")


@pytest.mark.parametrize("state", [VmState.STARTING, None])
def test_a_sandbox_starting_without_its_socket_is_not_ready(
        sandbox: HandMadeVM, state: VmState | None) -> None:
    sandbox.runs(state, socket=False)
    assert running_exec_socket(sandbox.bundle) is None
    with pytest.raises(AgentUnavailable, match="is not ready yet"):
        exec_socket_for("sbx")


def test_a_running_sandbox_without_its_socket_has_none(sandbox: HandMadeVM) -> None:
    sandbox.runs(socket=False)
    with pytest.raises(NoExecChannel, match=r"has no exec socket \(it is running\)"):
        exec_socket_for("sbx")


def test_a_corrupt_runtime_record_is_reported(sandbox: HandMadeVM) -> None:
    sandbox.runs()
    sandbox.files.state_file.write_text('{"state": ')
    assert running_exec_socket(sandbox.bundle) is None
    with pytest.raises(CorruptRecord, match="not valid JSON"):
        exec_socket_for("sbx")


@pytest.mark.parametrize("content", ["{", "[]", '{"name": "sbx"}'])
def test_a_corrupt_vm_json_is_reported(sandbox: HandMadeVM, content: str) -> None:
    sandbox.runs()
    sandbox.bundle.config_file.write_text(content)
    assert running_exec_socket(sandbox.bundle) is None
    with pytest.raises(ConfigError):
        exec_socket_for("sbx")


def test_a_vm_json_naming_another_vm_is_refused(sandbox: HandMadeVM) -> None:
    sandbox.runs()
    data = json.loads(sandbox.bundle.config_file.read_text())
    sandbox.bundle.config_file.write_text(json.dumps({**data, "name": "other"}))
    assert running_exec_socket(sandbox.bundle) is None
    with pytest.raises(ConfigError, match="names the VM 'other'"):
        exec_socket_for("sbx")


def test_an_id_not_in_canonical_form_is_left_to_the_validated_path(tmp_path: Path) -> None:
    """The quick look takes only a canonical UUID for a file name; vm.json may hold
    another spelling of one, which the validated path accepts as before."""
    config = sandbox_config("upper")
    vm = HandMadeVM(config.model_copy(update={"id": config.id.upper()}))
    vm.runs()
    try:
        assert running_exec_socket(vm.bundle) is None
        assert exec_socket_for("upper") == vm.files.exec_socket
    finally:
        vm.stop()


@pytest.mark.parametrize("value", [
    "0b7e2e0c-6a2f-4bd4-9d1e-2c4f6a1b3e5d", "00000000-0000-0000-0000-000000000000",
    "0B7E2E0C-6A2F-4BD4-9D1E-2C4F6A1B3E5D", "{0b7e2e0c-6a2f-4bd4-9d1e-2c4f6a1b3e5d}",
    "urn:uuid:0b7e2e0c-6a2f-4bd4-9d1e-2c4f6a1b3e5d", "0b7e2e0c6a2f4bd49d1e2c4f6a1b3e5d",
    "0b7e2e0c-6a2f-4bd4-9d1e-2c4f6a1b3e5d\n", " 0b7e2e0c-6a2f-4bd4-9d1e-2c4f6a1b3e5d",
    "0b7e2e0c-6a2f-4bd4-9d1e-2c4f6a1b3e5", "0b7e2e0c-6a2f-4bd4-9d1e-2c4f6a1b3e5g",
    "0b7e2e0c-6a2f-4bd4-9d1e_2c4f6a1b3e5d", "٠b7e2e0c-6a2f-4bd4-9d1e-2c4f6a1b3e5d", "", 7, None,
])
def test_a_canonical_uuid_is_what_the_uuid_module_writes_back_unchanged(value: object) -> None:
    try:
        canonical = isinstance(value, str) and str(uuid.UUID(value)) == value
    except ValueError:
        canonical = False
    assert _is_canonical_uuid(value) is canonical


def test_the_quick_look_never_raises_for_what_it_reads(sandbox: HandMadeVM) -> None:
    sandbox.runs()
    for record in (b"\xff\xfe", b"[" * 100_000, b'{"state": ["running"]}', b"null"):
        sandbox.files.state_file.write_bytes(record)
        assert running_exec_socket(sandbox.bundle) is None
    sandbox.bundle.config_file.unlink()
    assert running_exec_socket(sandbox.bundle) is None
