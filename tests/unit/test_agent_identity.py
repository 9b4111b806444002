"""Account look-ups are kept while the account files are unchanged."""

from __future__ import annotations

import os
import pwd

import pytest

from secvf.guest.agent import identity as identity_module
from secvf.guest.agent.errors import RequestFailed
from secvf.guest.agent.identity import resolve_identity


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """Account files of the test's own and a count of real look-ups."""
    files = [tmp_path / "passwd", tmp_path / "group"]
    for path in files:
        path.write_text("x\n")
    calls = []
    real = pwd.getpwnam

    def getpwnam(name: str) -> pwd.struct_passwd:
        calls.append(name)
        return real(name)

    monkeypatch.setattr(identity_module, "ACCOUNT_FILES", tuple(map(str, files)))
    monkeypatch.setattr(identity_module.pwd, "getpwnam", getpwnam)
    monkeypatch.setattr(identity_module, "_looked_up", {})
    return files, calls


def test_an_unchanged_account_is_looked_up_once(counted):
    _, calls = counted
    first, second = resolve_identity("root"), resolve_identity("root")
    assert first == second and first.uid == 0
    assert calls == ["root"]


def test_a_changed_account_file_is_read_again(counted):
    files, calls = counted
    resolve_identity("root")
    with open(files[1], "a") as fh:
        fh.write("more\n")
    resolve_identity("root")
    os.replace(files[0], files[0].with_name("old"))
    files[0].write_text("x\n")  # same size, new inode
    resolve_identity("root")
    assert calls == ["root"] * 3


def test_without_the_files_every_request_looks_up(counted):
    files, calls = counted
    files[0].unlink()
    resolve_identity("root")
    resolve_identity("root")
    assert calls == ["root", "root"]


def test_an_unknown_account_is_never_kept(counted):
    _, calls = counted
    for _ in range(2):
        with pytest.raises(RequestFailed, match="no such user"):
            resolve_identity("no-such-user-secvf")
    assert calls == ["no-such-user-secvf"] * 2
