"""The disk diff of a detonation (secvf.analysis.diskdiff), on real ext4 images.

Images are made as the image builder makes them (``mkfs.ext4 -d``), changed without
mounting (``debugfs -w`` on a raw copy), and the change is put into a qcow2 overlay over
the clean layer the way a guest's writes would be: only the 64 KiB clusters that differ
are written (``qemu-io write -s``), so ``qemu-img map`` of the overlay shows exactly
what "the guest" wrote.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from secvf.analysis.diskdiff import (
    DiffLimits,
    DiskDiff,
    DiskDiffError,
    FileChange,
    diff_disks,
    escape_path,
)

TOOLS = ("mkfs.ext4", "debugfs", "qemu-img", "qemu-io")
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS),
    reason=f"needs {', '.join(TOOLS)} (e2fsprogs, qemu-utils)")

CLUSTER = 64 * 1024
IMAGE_SIZE = "64M"


def make_image(tree: Path, image: Path, size: str = IMAGE_SIZE) -> Path:
    """A raw ext4 image of ``tree``, as secvf.image.disk.make_ext4 makes one."""
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-d", str(tree), str(image)],
                   check=True)
    return image


def qcow2_over(backing: Path, image: Path, backing_format: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format, "-b",
                    str(backing), str(image)], check=True)
    return image


def debugfs_write(raw: Path, *commands: str) -> None:
    """Change the filesystem in ``raw`` with debugfs (never mounted)."""
    proc = subprocess.run(["debugfs", "-w", "-f", "-", str(raw)],
                          input="\n".join(commands) + "\n", capture_output=True, text=True,
                          check=True)
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("debugfs 1.")]
    assert not errors, errors


def write_changes(original: Path, changed: Path, overlay: Path, tmp: Path) -> int:
    """Write the clusters where ``changed`` differs from ``original`` into ``overlay``
    (a qcow2 whose guest view equals ``original``), as a guest's writes would be."""
    commands = []
    with original.open("rb") as a, changed.open("rb") as b:
        offset = 0
        while chunk := b.read(CLUSTER):
            if chunk != a.read(CLUSTER):
                piece = tmp / f"cluster-{offset}"
                piece.write_bytes(chunk)
                commands += ["-c", f"write -s {piece} {offset} {len(chunk)}"]
            offset += len(chunk)
    if commands:
        subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(overlay)], check=True,
                       capture_output=True)
    return len(commands) // 2


class Images:
    """A base image, its clean frozen layer and a session overlay to change."""

    def __init__(self, tmp: Path, tree: Path) -> None:
        self.tmp = tmp
        self.base = make_image(tree, tmp / "base.raw")
        self.clean = qcow2_over(self.base, tmp / "clean.qcow2", "raw")
        self.session = qcow2_over(self.clean, tmp / "session.qcow2", "qcow2")
        self.work = tmp / "work"
        self.work.mkdir()

    def change(self, *commands: str) -> int:
        """Apply debugfs commands to the session disk; returns the clusters written."""
        edited = self.tmp / "edited.raw"
        shutil.copyfile(self.base, edited)
        debugfs_write(edited, *commands)
        written = write_changes(self.base, edited, self.session, self.tmp)
        edited.unlink()
        return written

    def diff(self, **kwargs: object) -> DiskDiff:
        return diff_disks(self.clean, self.session, workdir=self.work, **kwargs)  # type: ignore[arg-type]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def by_path(changes: list[FileChange]) -> dict[str, FileChange]:
    return {c.path: c for c in changes}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for d in ("etc", "usr/bin", "home/user", "var/lib"):
        (root / d).mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n")
    (root / "usr/bin/tool").write_bytes(b"\x7fELF" + b"\0" * 1000)
    (root / "usr/bin/tool").chmod(0o755)
    (root / "home/user/notes.txt").write_text("keep me\n")
    (root / "home/user/old.txt").write_text("delete me\n")
    (root / "home/user/edit.txt").write_text("before\n")
    (root / "var/lib/moved.txt").write_text("I move\n")
    return root


@pytest.fixture
def images(tmp_path: Path, tree: Path) -> Images:
    return Images(tmp_path, tree)


def test_unchanged_session_has_an_empty_diff(images: Images) -> None:
    diff = images.diff()
    assert (diff.created, diff.modified, diff.deleted, diff.ignored) == ([], [], [], [])
    assert diff.method == "qemu-img map" and diff.changed_bytes == 0
    assert not diff.truncated and not diff.errors
    assert list(images.work.iterdir()) == []  # raw copies removed


def test_created_modified_deleted_with_hashes(images: Images, tmp_path: Path) -> None:
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"MZ dropped payload\n" * 100)
    edit = tmp_path / "edit.txt"
    edit.write_bytes(b"after, and longer\n")
    images.change(
        f"write {payload} /usr/bin/.hidden",
        "sif /usr/bin/.hidden mode 0104755",
        "rm /home/user/old.txt",
        "rm /home/user/edit.txt",
        f"write {edit} /home/user/edit.txt",
        "mkdir /home/user/drop",
        f"write {payload} /home/user/drop/a.bin",
        f"write {edit} /home/user/drop/b.txt",
    )
    diff = images.diff()
    created = by_path(diff.created)
    assert set(created) == {"/usr/bin/.hidden", "/home/user/drop", "/home/user/drop/a.bin",
                            "/home/user/drop/b.txt"}
    hidden = created["/usr/bin/.hidden"]
    assert (hidden.kind, hidden.mode, hidden.size) == ("file", 0o4755, 1900)
    assert hidden.sha256 == sha(payload.read_bytes()) and not hidden.hash_truncated
    assert created["/home/user/drop"].kind == "dir"
    assert created["/home/user/drop/b.txt"].sha256 == sha(edit.read_bytes())
    assert created["/home/user/drop/a.bin"].mtime > time.time() - 3600

    modified = by_path(diff.modified)
    assert list(modified) == ["/home/user/edit.txt"]
    changed = modified["/home/user/edit.txt"]
    assert changed.sha256 == sha(b"after, and longer\n")
    assert changed.before_sha256 == sha(b"before\n")
    assert {"content", "size"} <= set(changed.changed)

    deleted = by_path(diff.deleted)
    assert list(deleted) == ["/home/user/old.txt"]
    assert deleted["/home/user/old.txt"].before_sha256 == sha(b"delete me\n")
    assert deleted["/home/user/old.txt"].sha256 is None
    assert diff.counts == {"created": 4, "modified": 1, "deleted": 1}
    assert not diff.errors

    report = json.loads(json.dumps(diff.to_json()))
    assert report["counts"] == diff.counts
    assert report["created"][0]["mode"].startswith("0")


def test_metadata_only_changes_are_modifications(images: Images) -> None:
    images.change("sif /usr/bin/tool mode 0106755", "sif /home/user/notes.txt uid 1000",
                  "sif /etc/passwd mtime 20200101000000")
    modified = by_path(images.diff().modified)
    assert modified["/usr/bin/tool"].changed == ("mode",)
    assert modified["/usr/bin/tool"].mode == 0o6755
    assert modified["/home/user/notes.txt"].changed == ("uid",)
    assert modified["/etc/passwd"].changed == ("mtime",)
    assert modified["/etc/passwd"].sha256 == modified["/etc/passwd"].before_sha256


def test_a_rename_is_a_deletion_and_a_creation(images: Images) -> None:
    images.change("ln /var/lib/moved.txt /var/lib/renamed.txt", "unlink /var/lib/moved.txt")
    diff = images.diff()
    assert [c.path for c in diff.deleted] == ["/var/lib/moved.txt"]
    assert [c.path for c in diff.created] == ["/var/lib/renamed.txt"]
    created = diff.created[0]
    assert created.sha256 == diff.deleted[0].before_sha256 == sha(b"I move\n")
    assert "same inode as deleted /var/lib/moved.txt" in created.note


def test_weird_names_are_escaped_not_interpreted(images: Images, tmp_path: Path) -> None:
    # a name with a newline, a non-UTF-8 byte and "../" (just a name) — made by editing a
    # directory entry in the raw image (debugfs cannot type a newline), then letting
    # e2fsck fix the directory block's checksum
    content = tmp_path / "c"
    content.write_bytes(b"x")
    weird = b"a\nb\xff..%"  # same length as the placeholder below
    edited = images.tmp / "edited.raw"
    shutil.copyfile(images.base, edited)
    debugfs_write(edited, f"write {content} /home/PLACEHOLDER", f"write {content} /home/x..y")
    data = bytearray(edited.read_bytes())
    at = data.find(b"PLACEHOLDER")
    assert at > 0
    data[at:at + len(weird)] = weird
    edited.write_bytes(bytes(data))
    fsck = subprocess.run(["e2fsck", "-fy", str(edited)], capture_output=True, check=False)
    assert fsck.returncode in (0, 1), fsck.stdout
    write_changes(images.base, edited, images.session, images.tmp)
    diff = images.diff()
    paths = {c.path for c in diff.created}
    name = b"/home/" + weird + b"PLACEHOLDER"[len(weird):]
    assert escape_path(name) in paths and "/home/x..y" in paths
    change = by_path(diff.created)[escape_path(name)]
    assert change.path == "/home/a\\nb\\xff..%LDER" and change.raw_path == name
    assert "\n" not in json.dumps(diff.to_json())
    assert change.to_json()["raw_path_hex"] == name.hex()


def test_escape_path() -> None:
    assert escape_path(b"/etc/../passwd") == "/etc/../passwd"
    assert escape_path("/tmp/é".encode()) == "/tmp/é"
    assert escape_path(b"/a\\b\tc\x1b\xc3") == "/a\\\\b\\tc\\u001b\\xc3"
    assert escape_path("/x\u202ey".encode()) == "/x\\u202ey"  # bidi override


def test_symlinks_are_reported_never_followed(images: Images, tmp_path: Path) -> None:
    long_target = "/" + "d" * 100 + "/passwd"
    images.change("symlink /home/user/pw /etc/passwd",
                  f"symlink /home/user/long {long_target}",
                  "symlink /home/user/abs /../../../../etc/shadow")
    created = by_path(images.diff().created)
    assert created["/home/user/pw"].kind == "symlink"
    assert created["/home/user/pw"].target == "/etc/passwd"
    assert created["/home/user/pw"].sha256 is None  # the host's /etc/passwd is not read
    assert created["/home/user/long"].target == long_target
    assert created["/home/user/abs"].target == "/../../../../etc/shadow"


def test_special_files_are_reported_not_read(images: Images) -> None:
    images.change("cd /home/user", "mknod fifo p", "mknod null c 1 3")
    created = by_path(images.diff().created)
    assert created["/home/user/fifo"].kind == "fifo"
    assert created["/home/user/null"].kind == "chardev"
    assert created["/home/user/null"].sha256 is None


def test_a_huge_file_is_hashed_up_to_the_limit(images: Images, tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"A" * 3_000_000)
    images.change(f"write {big} /home/user/big")
    diff = images.diff(limits=DiffLimits(max_hash_bytes_per_file=1_000_000))
    change = by_path(diff.created)["/home/user/big"]
    assert change.size == 3_000_000 and change.hashed_bytes == 1_000_000
    assert change.hash_truncated and change.sha256 == sha(b"A" * 1_000_000)


def test_total_hash_budget_and_report_limit(images: Images, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"B" * 10_000)
    images.change(*(f"write {f} /home/user/f{i}" for i in range(12)))
    diff = images.diff(limits=DiffLimits(max_hash_bytes_total=25_000, max_reported=10))
    assert diff.truncated and len(diff.created) == 10 and diff.counts["created"] == 12
    assert diff.hashed_bytes == 25_000
    assert any("hash budget" in c.note for c in diff.created)


def test_boot_noise_is_listed_as_ignored(images: Images, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n127.0.1.1\tsecvf\n::1\tlocalhost ip6-localhost\n")
    resolv = tmp_path / "resolv"
    resolv.write_text("nameserver 10.0.2.3\n")
    images.change("rm /etc/hosts", f"write {hosts} /etc/hosts",
                  f"write {resolv} /etc/resolv.conf")
    diff = images.diff()
    assert diff.created == [] and diff.modified == []
    assert sorted(c.path for c in diff.ignored) == ["/etc/hosts", "/etc/resolv.conf"]
    assert all(c.note.startswith("boot noise") for c in diff.ignored)


def test_a_sample_editing_hosts_is_not_noise(images: Images, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n127.0.1.1\tsecvf\n::1\tlocalhost ip6-localhost\n"
                     "6.6.6.6\tupdate.microsoft.com\n")
    images.change("rm /etc/hosts", f"write {hosts} /etc/hosts")
    diff = images.diff()
    assert [c.path for c in diff.modified] == ["/etc/hosts"] and diff.ignored == []


def test_raw_images_are_compared_block_by_block(tmp_path: Path, tree: Path) -> None:
    base = make_image(tree, tmp_path / "base.raw")
    session = tmp_path / "session.raw"
    shutil.copyfile(base, session)
    debugfs_write(session, "rm /home/user/old.txt", "mkdir /new")
    work = tmp_path / "work"
    work.mkdir()
    diff = diff_disks(base, session, workdir=work)
    assert diff.method == "compare"
    assert [c.path for c in diff.deleted] == ["/home/user/old.txt"]
    assert [c.path for c in diff.created] == ["/new"]


def test_corrupt_superblock_is_a_clear_error(images: Images) -> None:
    # overwrite the ext4 magic (superblock at 1024, s_magic at +56) through the overlay
    images.change("sif /etc/passwd uid 5")
    zero = images.tmp / "zero"
    zero.write_bytes(b"\0" * 2)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {zero} 1080 2",
                    str(images.session)], check=True, capture_output=True)
    with pytest.raises(DiskDiffError, match="bad superblock magic") as info:
        images.diff()
    assert info.value.image == images.session
    assert list(images.work.iterdir()) == []


def test_truncated_image_is_a_clear_error(images: Images) -> None:
    raw = images.tmp / "short.raw"
    with images.base.open("rb") as f:
        raw.write_bytes(f.read(4096))
    with pytest.raises(DiskDiffError) as info:
        diff_disks(images.base, raw, workdir=images.work)
    assert info.value.image == raw


def test_not_an_image_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DiskDiffError, match="cannot read"):
        diff_disks(tmp_path / "missing", tmp_path / "missing", workdir=tmp_path)


def test_performance_2000_files_20_changed(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for d in range(40):
        (root / f"d{d}").mkdir(parents=True)
        for f in range(50):
            (root / f"d{d}" / f"f{f}").write_bytes(f"{d}/{f}\n".encode() * 20)
    images = Images(tmp_path, root)
    new = tmp_path / "new"
    new.write_bytes(b"changed\n" * 50)
    commands = []
    for i in range(20):
        if i % 3 == 0:
            commands.append(f"rm /d{i}/f{i}")
        commands.append(f"write {new} /d{i}/new{i}" if i % 3 else f"write {new} /d{i}/f{i}")
    images.change(*commands)
    started = time.monotonic()
    diff = images.diff()
    elapsed = time.monotonic() - started
    print(f"\ndisk diff of 2,000 files, 20 changed: {elapsed:.3f} s "
          f"(diff's own elapsed_s {diff.elapsed_s:.3f} s, method {diff.method}, "
          f"changed {diff.changed_bytes} bytes)")
    assert len(diff.created) == 13 and len(diff.modified) == 7 and diff.deleted == []
