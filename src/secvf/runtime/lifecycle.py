"""The supervisor's lifecycle: a guarded state machine over its published record.

Every state change of a run goes through :meth:`Lifecycle.transition`, which checks
it against :data:`TRANSITIONS` and raises :class:`~secvf.errors.IllegalTransition`
(a bug in the supervisor, never a user error) for anything else. Everything that
is not a state change — the accelerator, the live devices, guest readiness — goes
through :meth:`Lifecycle.update`, which cannot change the state. Both publish the
whole :class:`~secvf.model.runtime.RuntimeRecord` to the sink they were given (the
runtime state file, for the supervisor). Steps that need a state declare it with
:meth:`Lifecycle.require`, which raises :class:`~secvf.errors.StateError`.

The transitions, and what makes the supervisor take them::

    stopped  → starting   a supervisor took run.lock
    starting → running    QEMU is up, its devices passed the check, the guest resumed
    starting → stopping   a stop request arrived while starting
    starting → stopped    the launch failed or was refused; everything torn down
    starting → crashed    the supervisor itself failed while starting (QMP, a socket)
    running  → stopping   a stop request, a signal, or a device helper died
    running  → stopped    the guest powered off
    running  → crashed    QEMU died, guest panic, or the supervisor failed
    running  → paused     a pause request: QEMU stopped the vCPUs (QMP ``stop``)
    paused   → running    a resume request: the vCPUs run again (QMP ``cont``)
    paused   → stopping   a stop request, a signal, or a device helper died
    paused   → crashed    QEMU died or the supervisor failed while the guest was paused
    stopping → stopped    QEMU is gone after a stop
    stopping → crashed    a crash (helper death, panic) while stopping

``stopped`` and ``crashed`` end a run: a lifecycle that reached either refuses any
further transition (a supervisor runs one VM once).

Example::

    life = Lifecycle(name="web", vm_id=uuid, kind=VMKind.GENERIC, publish=print)
    life.transition(VmState.STARTING, supervisor_pid=os.getpid(), started_at=now_iso())
    life.update(accel="tcg", accel_reason="requested")
    life.transition(VmState.RUNNING, qemu_pid=1234)
    life.transition(VmState.STOPPED)   # the guest powered off
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from secvf.errors import IllegalTransition, StateError
from secvf.model.config import VMKind, now_iso
from secvf.model.runtime import RuntimeRecord, Transition, VmState

TRANSITIONS: Mapping[VmState, frozenset[VmState]] = {
    VmState.STOPPED: frozenset({VmState.STARTING}),
    VmState.STARTING: frozenset({VmState.RUNNING, VmState.STOPPING, VmState.STOPPED,
                                 VmState.CRASHED}),
    VmState.RUNNING: frozenset({VmState.PAUSED, VmState.STOPPING, VmState.STOPPED,
                                VmState.CRASHED}),
    # a paused guest cannot power itself off: it leaves through stopping or crashed
    VmState.PAUSED: frozenset({VmState.RUNNING, VmState.STOPPING, VmState.CRASHED}),
    VmState.STOPPING: frozenset({VmState.STOPPED, VmState.CRASHED}),
    VmState.CRASHED: frozenset(),
}

#: States that end a run.
FINAL_STATES = frozenset({VmState.STOPPED, VmState.CRASHED})

#: Record fields only :meth:`Lifecycle.transition` may set.
_STATE_FIELDS = frozenset({"state", "transitions"})


def paused_error(name: str, to: str) -> StateError:
    """The error for an operation, ``to`` do something, that VM ``name`` being paused
    refuses (the supervisor's and the client's check say the same)."""
    return StateError(f"VM '{name}' is paused; resume it to {to}: secvf vm resume {name}",
                      VmState.PAUSED.value, [VmState.RUNNING.value])


class Lifecycle:
    """One run's state machine and record; publishes the record on every change.

    Args:
        name: the VM's name.
        vm_id: the VM's UUID.
        kind: the VM's kind.
        publish: called with the new record after every change; if it raises, the
            lifecycle has moved all the same and the error propagates to the caller.
    """

    def __init__(self, *, name: str, vm_id: str, kind: VMKind,
                 publish: Callable[[RuntimeRecord], None]) -> None:
        self._identity = {"name": name, "id": vm_id, "kind": kind}
        self._publish = publish
        self._state = VmState.STOPPED
        self._record: RuntimeRecord | None = None  # set by the first transition
        self._ended = False  # a final state was entered

    def __repr__(self) -> str:
        return f"Lifecycle(vm={self._identity['name']!r}, state={self._state.value!r})"

    @property
    def state(self) -> VmState:
        """The current state (``stopped`` before the run starts)."""
        return self._state

    @property
    def record(self) -> RuntimeRecord | None:
        """The last published record (None before the first transition)."""
        return self._record

    @property
    def transitions(self) -> list[Transition]:
        """Every state entered so far, in order."""
        return list(self._record.transitions) if self._record else []

    def require(self, *states: VmState) -> None:
        """Declare that the caller needs one of ``states``.

        Raises:
            StateError: the lifecycle is in another state.
        """
        if self._state not in states:
            needed = " or ".join(s.value for s in states)
            raise StateError(f"VM '{self._identity['name']}' is {self._state.value}, "
                             f"not {needed}", self._state.value, [s.value for s in states])

    def transition(self, new: VmState, *,
                   before_publish: Callable[[RuntimeRecord], None] | None = None,
                   **fields: Any) -> RuntimeRecord:
        """Enter state ``new`` (setting ``fields`` too) and publish; return the record.
        ``before_publish`` gets the new record first (the end of a run writes why it
        ended before anyone can see that it did).

        Raises:
            IllegalTransition: :data:`TRANSITIONS` has no edge from the current state
                to ``new``, or the run already ended.
            pydantic.ValidationError: ``fields`` do not fit :class:`RuntimeRecord`
                (nothing is published then).
        """
        allowed = TRANSITIONS[self._state] if not self._ended else frozenset()
        if new not in allowed:
            raise IllegalTransition(
                f"illegal lifecycle transition {self._state.value} -> {new.value}"
                + (" (the run has ended)" if self._ended else ""),
                self._state.value, sorted(s.value for s in allowed))
        self._check_fields(fields)
        base = self._record.model_dump() if self._record else dict(self._identity)
        history = [*self.transitions, Transition(new, now_iso())]
        record = RuntimeRecord.model_validate(
            {**base, **fields, "state": new, "transitions": history})
        self._state = new
        self._ended = new in FINAL_STATES
        if before_publish is not None:
            before_publish(record)
        self._commit(record)
        return record

    def update(self, **fields: Any) -> RuntimeRecord:
        """Set record ``fields`` without changing the state, and publish.

        Raises:
            StateError: the run has not started or has ended.
            TypeError: ``fields`` name the state or the transitions.
            pydantic.ValidationError: ``fields`` do not fit :class:`RuntimeRecord`.
        """
        self._check_fields(fields)
        if self._record is None or self._ended:
            self.require(VmState.STARTING, VmState.RUNNING, VmState.PAUSED, VmState.STOPPING)
        assert self._record is not None
        record = RuntimeRecord.model_validate({**self._record.model_dump(), **fields})
        self._commit(record)
        return record

    def _check_fields(self, fields: Mapping[str, Any]) -> None:
        clash = _STATE_FIELDS & fields.keys()
        if clash:
            raise TypeError(f"{sorted(clash)} change only through Lifecycle.transition()")

    def _commit(self, record: RuntimeRecord) -> None:
        self._record = record
        self._publish(record)
