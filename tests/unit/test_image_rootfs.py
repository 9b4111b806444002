"""Rootfs customisation and apt sources, plus the ext4 disk step, on small real trees."""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from secvf.errors import ImageBuildFailed
from secvf.image import RECIPES, recipe_hash
from secvf.image import recipe as recipe_mod
from secvf.image.disk import MIB, disk_size, make_ext4
from secvf.image.recipe import GuestUser
from secvf.image.rootfs import add_user, apt_sources, guest_path, stage_key, tree_size

DEB822 = """\
Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb
URIs: https://vendor.example/apt
Suites: stable
Components: main
"""


def test_apt_sources_from_deb822(tmp_path: Path) -> None:
    (tmp_path / "debian.sources").write_text(DEB822)
    assert apt_sources("bookworm", (tmp_path,)) == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://mirror.example/debian-security bookworm-security main",
    ]


def test_apt_sources_from_one_line_format(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list"
    sources.write_text(
        "# comment\n"
        "deb [arch=amd64] http://one.example/debian bookworm main non-free\n"
        "deb-src http://one.example/debian bookworm main\n"
        "deb http://one.example/debian sid main\n"
    )
    assert apt_sources("bookworm", (sources,)) == ["deb http://one.example/debian bookworm main"]


def test_apt_sources_default_to_deb_debian_org(tmp_path: Path) -> None:
    assert apt_sources("trixie", (tmp_path / "none.list",)) == [
        "deb http://deb.debian.org/debian trixie main",
        "deb http://deb.debian.org/debian trixie-updates main",
        "deb http://deb.debian.org/debian-security trixie-security main",
    ]


def test_package_stage_follows_the_packages_only_and_ignores_the_init_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, sandbox = RECIPES["base"], RECIPES["sandbox"]
    assert stage_key(base) == stage_key(replace(sandbox, packages=base.packages))
    assert stage_key(base) != stage_key(sandbox)  # the sandbox adds git and python3-venv
    assert stage_key(base) != stage_key(replace(base, packages=(*base.packages, "curl")))
    init = tmp_path / "init.sh"
    init.write_text("#!/bin/sh\n# another init\n")
    monkeypatch.setattr(recipe_mod, "INIT_SCRIPT", init)
    assert stage_key(base) == stage_key(RECIPES["base"])
    assert recipe_hash(base) != recipe_hash(replace(base, cmdline=base.cmdline + " x"))


@pytest.fixture
def etc_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (tree / "etc" / "group").write_text("root:x:0:\n")
    (tree / "etc" / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    return tree


@pytest.mark.skipif(os.geteuid() != 0, reason="chown of the home directory needs root")
def test_add_user(etc_tree: Path) -> None:
    add_user(etc_tree, GuestUser("agent", 1000, "/home/agent"))
    assert "agent:x:1000:1000::/home/agent:/bin/sh\n" in (etc_tree / "etc/passwd").read_text()
    assert "agent:x:1000:\n" in (etc_tree / "etc/group").read_text()
    assert (etc_tree / "etc/shadow").read_text().endswith("agent:!:19000:0:99999:7:::\n")
    home = (etc_tree / "home/agent").stat()
    assert (home.st_uid, home.st_gid, home.st_mode & 0o777) == (1000, 1000, 0o750)


@pytest.mark.parametrize("user", [GuestUser("root", 1000, "/x"), GuestUser("agent", 0, "/x")])
def test_add_user_refuses_a_clash(etc_tree: Path, user: GuestUser) -> None:
    with pytest.raises(ImageBuildFailed, match="clashes"):
        add_user(etc_tree, user)


def test_guest_path_stays_inside_the_tree(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr" / "sbin").mkdir(parents=True)
    (tree / "sbin").symlink_to("usr/sbin")
    (tree / "escape").symlink_to(tmp_path)
    assert guest_path(tree, "/sbin/secvf-init") == tree / "sbin" / "secvf-init"
    for bad in ("/escape/x", "relative/x", "/etc/../../x"):
        with pytest.raises(ImageBuildFailed):
            guest_path(tree, bad)


def test_disk_size_adds_headroom_in_whole_mib() -> None:
    assert disk_size(0, 1024) == 1024 * MIB
    assert disk_size(100 * MIB, 0) == 110 * MIB
    assert disk_size(1, 1) % MIB == 0


def test_make_ext4_copies_the_tree(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sbin").mkdir(parents=True)
    init = tree / "sbin" / "secvf-init"
    init.write_text("#!/bin/sh\n")
    init.chmod(0o755)
    image = tmp_path / "rootfs.img"
    make_ext4(tree, image, disk_size(tree_size(tree), 16))
    assert image.stat().st_size == 17 * MIB
    assert image.stat().st_mode & 0o777 == 0o444
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)
    listing = subprocess.run(
        ["debugfs", "-R", "stat /sbin/secvf-init", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Mode:  0755" in listing
