"""Jail identities: one slot per VM, kept across runs, never shared, freed by delete."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from secvf.jail import identity
from secvf.jail.identity import (
    ID_BASE,
    SLOT_IDS,
    JailIdentity,
    JailIdentityError,
    claim_identity,
    identity_of,
    release_identity,
    slot_of_uid,
)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SECVF_HOME", str(tmp_path / "home"))
    return tmp_path


def _bundle(home: Path, name: str) -> Path:
    path = home / "home" / "vms" / name
    path.mkdir(parents=True)
    return path


def test_each_vm_gets_its_own_slot_and_keeps_it(home):
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    first = claim_identity(a, _bundle(home, "a"))
    second = claim_identity(b, _bundle(home, "b"))
    assert first != second
    assert claim_identity(a, home / "home" / "vms" / "a") == first
    assert identity_of(b) == second
    assert not set(range(first.uid, first.uid + SLOT_IDS)) & {second.uid}


def test_released_or_orphaned_slots_are_taken_again(home):
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    slot_a = claim_identity(a, _bundle(home, "a")).slot
    bundle_b = _bundle(home, "b")
    slot_b = claim_identity(b, bundle_b).slot
    release_identity(a)
    assert identity_of(a) is None
    assert claim_identity(c, _bundle(home, "c")).slot == slot_a
    bundle_b.rmdir()  # removed behind SecVF's back: the slot is free
    assert claim_identity(str(uuid.uuid4()), _bundle(home, "d")).slot == slot_b


def test_corrupt_slot_record_counts_as_free(home):
    a = str(uuid.uuid4())
    slot = claim_identity(a, _bundle(home, "a")).slot
    (home / "home" / "jail" / "slots" / str(slot)).write_text("{garbage")
    assert identity_of(a) is None
    assert claim_identity(str(uuid.uuid4()), _bundle(home, "b")).slot == slot


def test_full_range_is_a_clear_error(home, monkeypatch):
    monkeypatch.setattr(identity, "MAX_SLOTS", 2)
    claim_identity(str(uuid.uuid4()), _bundle(home, "a"))
    claim_identity(str(uuid.uuid4()), _bundle(home, "b"))
    with pytest.raises(JailIdentityError, match="delete VMs"):
        claim_identity(str(uuid.uuid4()), _bundle(home, "c"))


def test_ids_lie_in_secvfs_range_below_2_31():
    last = JailIdentity(identity.MAX_SLOTS - 1)
    assert last.uid + SLOT_IDS - 1 < 2**31
    assert JailIdentity(0).uid == ID_BASE
    assert slot_of_uid(JailIdentity(5).uid + 1000) == 5
    assert slot_of_uid(1000) is None
