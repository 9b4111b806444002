"""Initramfs parts: module dependency closure and the newc cpio writer."""

from __future__ import annotations

import io
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secvf.errors import ImageBuildFailed
from secvf.image.initramfs import CpioEntry, module_closure, module_name, write_cpio

RING = "kernel/drivers/virtio/virtio_ring.ko"
VIRTIO = "kernel/drivers/virtio/virtio.ko"
DEP = f"""\
{RING}:
{VIRTIO}: {RING}
kernel/drivers/block/virtio_blk.ko: {VIRTIO} {RING}
kernel/drivers/char/hw_random/virtio-rng.ko: {VIRTIO}
kernel/fs/fuse/fuse.ko:
"""


def test_closure_puts_dependencies_first_without_duplicates() -> None:
    assert module_closure(DEP, ["virtio_blk", "virtio-rng"]) == [
        "kernel/drivers/virtio/virtio_ring.ko",
        "kernel/drivers/virtio/virtio.ko",
        "kernel/drivers/block/virtio_blk.ko",
        "kernel/drivers/char/hw_random/virtio-rng.ko",
    ]


def test_dash_and_underscore_name_the_same_module() -> None:
    assert module_closure(DEP, ["virtio_rng"]) == module_closure(DEP, ["virtio-rng"])
    assert module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"


def test_builtin_modules_need_no_file() -> None:
    assert module_closure(DEP, ["ext4", "fuse"], builtin="kernel/fs/ext4/ext4.ko\n") == [
        "kernel/fs/fuse/fuse.ko"
    ]


def test_unknown_module_fails_the_build() -> None:
    with pytest.raises(ImageBuildFailed, match="no module named 'nope'"):
        module_closure(DEP, ["nope"])


@st.composite
def module_graphs(draw: st.DrawFn) -> dict[str, list[str]]:
    """A random acyclic modules.dep: module i may depend only on modules < i."""
    count = draw(st.integers(min_value=1, max_value=12))
    return {
        f"kernel/m{i}.ko": [f"kernel/m{j}.ko" for j in draw(st.sets(st.integers(0, i - 1)))]
        if i
        else []
        for i in range(count)
    }


@given(graph=module_graphs(), data=st.data())
def test_closure_is_complete_and_ordered(graph: dict[str, list[str]], data: st.DataObject) -> None:
    text = "".join(f"{path}: {' '.join(deps)}\n" for path, deps in graph.items())
    wanted = data.draw(st.lists(st.sampled_from(sorted(graph)), min_size=1))
    closure = module_closure(text, [module_name(w) for w in wanted])
    assert len(closure) == len(set(closure))
    assert set(wanted) <= set(closure)
    for position, path in enumerate(closure):
        assert set(graph[path]) <= set(closure[:position])


def _extract(entries: list[CpioEntry], dest: Path) -> None:
    archive = io.BytesIO()
    write_cpio(entries, archive)
    subprocess.run(
        ["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
        input=archive.getvalue(),
        cwd=dest,
        check=True,
    )


@given(
    files=st.dictionaries(
        st.text("abcxyz_-.", min_size=1, max_size=12).filter(lambda n: n not in (".", "..")),
        st.binary(max_size=300),
        min_size=1,
        max_size=6,
    )
)
def test_cpio_round_trips_through_gnu_cpio(files: dict[str, bytes], tmp_path_factory) -> None:
    dest = tmp_path_factory.mktemp("cpio")
    entries = [CpioEntry("d", stat.S_IFDIR | 0o755)]
    entries += [CpioEntry(f"d/{n}", stat.S_IFREG | 0o640, data) for n, data in files.items()]
    _extract(entries, dest)
    for name, data in files.items():
        path = dest / "d" / name
        assert path.read_bytes() == data
        assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_cpio_holds_device_nodes(tmp_path: Path) -> None:
    archive = io.BytesIO()
    write_cpio([CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))], archive)
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive.getvalue(), capture_output=True, check=True
    ).stdout.decode()
    assert listing.startswith("crw-------")
    assert "5,   1" in listing and "dev/console" in listing
