"""Recipe hashing: it changes with everything that changes an image, and only then."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from secvf.errors import ImageBuildFailed
from secvf.image import READY_MARKER, RECIPES, recipe_hash
from secvf.image import recipe as recipe_mod
from secvf.image.recipe import GuestFile, Recipe, host_suite


@pytest.fixture
def recipe(tmp_path: Path) -> Recipe:
    agent = tmp_path / "agent.py"
    agent.write_text("print('agent v1')\n")
    return Recipe(
        name="t", description="test", files=(GuestFile("/usr/lib/secvf/agent/agent.py", agent),)
    )


def test_hash_is_stable_for_the_same_inputs(recipe: Recipe) -> None:
    assert recipe_hash(recipe) == recipe_hash(replace(recipe))
    assert len(recipe_hash(recipe)) == 64


def test_description_does_not_change_the_hash(recipe: Recipe) -> None:
    assert recipe_hash(recipe) == recipe_hash(replace(recipe, description="other words"))


@pytest.mark.parametrize(
    "change",
    [
        {"packages": ("python3", "busybox-static", "procps", "iproute2", "curl")},
        {"suite": "trixie"},
        {"kernel_package": "linux-image-amd64"},
        {"boot_modules": ("virtio_pci", "virtio_blk")},
        {"disk_headroom_mib": 2048},
        {"cmdline": "console=ttyS0"},
        {"users": (recipe_mod.GuestUser("agent", 1000, "/home/agent"),)},
    ],
)
def test_hash_changes_with_the_recipe(recipe: Recipe, change: dict) -> None:
    assert recipe_hash(recipe) != recipe_hash(replace(recipe, **change))


def test_hash_changes_with_a_copied_files_content(recipe: Recipe) -> None:
    before = recipe_hash(recipe)
    recipe.files[0].source.write_text("print('agent v2')\n")
    assert recipe_hash(recipe) != before


@pytest.mark.parametrize("script", ["INIT_SCRIPT", "INITRAMFS_SCRIPT"])
def test_hash_changes_with_the_guest_scripts(
    recipe: Recipe, script: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = tmp_path / "script.sh"
    copy.write_bytes(getattr(recipe_mod, script).read_bytes())
    monkeypatch.setattr(recipe_mod, script, copy)
    before = recipe_hash(recipe)
    copy.write_text(copy.read_text() + "# edited\n")
    assert recipe_hash(recipe) != before


def test_hash_changes_with_the_format_version(
    recipe: Recipe, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = recipe_hash(recipe)
    monkeypatch.setattr(recipe_mod, "FORMAT_VERSION", recipe_mod.FORMAT_VERSION + 1)
    assert recipe_hash(recipe) != before


def test_missing_copied_file_is_a_clear_build_error(tmp_path: Path) -> None:
    missing = tmp_path / "agent.py"
    broken = Recipe(name="t", description="", files=(GuestFile("/x/agent.py", missing),))
    with pytest.raises(ImageBuildFailed) as err:
        recipe_hash(broken)
    assert err.value.step == "recipe"
    assert str(missing) in str(err.value)


def test_builtin_recipes() -> None:
    base, sandbox = RECIPES["base"], RECIPES["sandbox"]
    assert not base.has_agent and base.users == ()
    assert sandbox.has_agent
    assert [(u.name, u.uid, u.home, u.shell) for u in sandbox.users] == [
        ("agent", 1000, "/home/agent", "/bin/sh")
    ]
    watch = ("/usr/lib/secvf/restore-watch.py", None)
    assert [(f.dest, f.build) for f in base.files] == [watch]
    assert [(f.dest, f.build) for f in sandbox.files] == [
        watch, ("/usr/lib/secvf/agent/agent.pyz", recipe_mod.agent_zipapp)
    ]
    assert base.files[0].source == recipe_mod.RESTORE_WATCH_SOURCE
    assert "python3" in base.packages and "busybox-static" in base.packages


@pytest.mark.parametrize(
    ("text", "suite"),
    [
        ("ID=debian\nVERSION_CODENAME=trixie\n", "trixie"),
        ('ID="debian"\nVERSION_CODENAME="bookworm"\n', "bookworm"),
        ("ID=ubuntu\nVERSION_CODENAME=noble\n", "bookworm"),
        ("ID=debian\n", "bookworm"),
    ],
)
def test_host_suite(tmp_path: Path, text: str, suite: str) -> None:
    os_release = tmp_path / "os-release"
    os_release.write_text(text)
    assert host_suite(os_release) == suite


def test_host_suite_without_os_release(tmp_path: Path) -> None:
    assert host_suite(tmp_path / "absent") == "bookworm"


def test_guest_scripts_are_valid_sh_and_print_the_ready_marker() -> None:
    for script in (recipe_mod.INIT_SCRIPT, recipe_mod.INITRAMFS_SCRIPT):
        subprocess.run(["sh", "-n", str(script)], check=True)
    assert f"READY_MARKER={READY_MARKER}\n" in recipe_mod.INIT_SCRIPT.read_text()


def test_init_starts_the_agent_zipapp_the_recipe_installs() -> None:
    init = recipe_mod.INIT_SCRIPT.read_text()
    assert f"AGENT={recipe_mod.AGENT_GUEST_PATH}\n" in init
    assert 'python3 -I -u "$AGENT"' in init


def test_init_starts_the_restore_watch_the_recipe_installs() -> None:
    init = recipe_mod.INIT_SCRIPT.read_text()
    assert f"RESTORE_WATCH={recipe_mod.RESTORE_WATCH_GUEST_PATH}\n" in init
    assert 'python3 -I -S -u "$RESTORE_WATCH"' in init
