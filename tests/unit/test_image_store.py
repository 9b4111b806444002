"""The image cache: atomic publish, listing, damaged manifests, removal, the build lock."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from secvf.errors import ConfigError, NotFound, StateError
from secvf.image import get_image, list_images, remove_image, store
from secvf.image.store import ImageManifest


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SECVF_CACHE", str(cache))
    return cache


def _manifest(name: str, digest_char: str = "a", age_s: int = 0) -> ImageManifest:
    return ImageManifest(
        format_version=1,
        name=name,
        recipe_hash=digest_char * 64,
        built_at=datetime.now(UTC) - timedelta(seconds=age_s),
        size_bytes=3,
        kernel_version="6.1.0-test",
        kernel_package="linux-image-6.1.0-test",
        cmdline="console=ttyS0",
        has_agent=name == "sandbox",
    )


def _publish(name: str, digest_char: str = "a", age_s: int = 0, *,
             recipe_hash: str | None = None) -> store.ImageInfo:
    manifest = _manifest(name, digest_char, age_s)
    if recipe_hash is not None:
        manifest = manifest.model_copy(update={"recipe_hash": recipe_hash})
    with store.build_lock(), store.staging_dir(name, manifest.recipe_hash) as work:
        for part in ("vmlinuz", "initrd.img", "rootfs.img"):
            (work / part).write_bytes(part.encode())
        return store.publish(work, manifest)


def test_published_image_is_listed_and_found() -> None:
    info = _publish("base")
    assert info.path == store.images_dir() / f"base-{'a' * 12}"
    assert info.rootfs.read_bytes() == b"rootfs.img"
    assert info.kernel.name == "vmlinuz" and info.initrd.name == "initrd.img"
    assert info.short_hash == "a" * 12
    assert list_images() == [info]
    assert get_image("base") == info
    on_disk = json.loads((info.path / "image.json").read_text())
    assert on_disk["name"] == "base" and on_disk["recipe_hash"] == "a" * 64


def test_build_in_progress_is_never_visible() -> None:
    with store.build_lock(), store.staging_dir("base", "b" * 64) as work:
        for part in ("vmlinuz", "initrd.img", "rootfs.img"):
            (work / part).write_bytes(b"x")
        (work / "image.json").write_text(_manifest("base", "b").model_dump_json())
        assert list_images() == []
        with pytest.raises(NotFound):
            get_image("base")
    assert [p for p in store.images_dir().iterdir() if p.name.startswith(".build-")] == []


def test_staging_clears_leftovers_of_killed_builds() -> None:
    leftover = store.images_dir() / ".build-base-aaaaaaaaaaaa-xyz"
    leftover.mkdir()
    with store.build_lock(), store.staging_dir("base", "a" * 64):
        assert not leftover.exists()


def test_get_image_returns_the_newest_build() -> None:
    _publish("base", "a", age_s=60)
    newer = _publish("base", "b")
    _publish("sandbox", "c")
    assert get_image("base") == newer
    assert [(i.name, i.short_hash[0]) for i in list_images()] == [
        ("base", "b"),
        ("base", "a"),
        ("sandbox", "c"),
    ]


def test_the_current_recipes_build_wins_over_a_newer_build_of_an_older_recipe() -> None:
    current = store.current_recipe_hash("base")
    assert current is not None and len(current) == 64
    own = _publish("base", age_s=3600, recipe_hash=current)
    _publish("base", "f")  # newer: built from another checkout into the same cache
    assert get_image("base") == own
    store.remove_image("base")
    older_only = _publish("base", "e")
    assert get_image("base") == older_only  # no build of the current recipe: the newest


def test_missing_image_says_how_to_build_it() -> None:
    with pytest.raises(NotFound, match=r"image 'base' is not built; run: secvf image build base"):
        get_image("base")


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: (p / "image.json").write_text("{not json"),
        lambda p: (p / "image.json").write_text(json.dumps({"name": "base"})),
        lambda p: (p / "image.json").unlink(),
        lambda p: (p / "rootfs.img").unlink(),
    ],
    ids=["not-json", "fields-missing", "no-manifest", "no-rootfs"],
)
def test_damaged_image_is_a_clear_error(damage) -> None:
    info = _publish("base")
    damage(info.path)
    with pytest.raises(ConfigError) as err:
        get_image("base")
    assert str(info.path) in str(err.value)
    assert "secvf image rm base" in str(err.value)
    assert list_images() == []


def test_manifest_may_not_point_outside_the_image() -> None:
    info = _publish("base")
    data = json.loads((info.path / "image.json").read_text())
    data["files"]["rootfs"] = "../../etc/passwd"
    (info.path / "image.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="not a plain file name"):
        get_image("base")


def test_manifest_must_name_its_own_directory() -> None:
    info = _publish("base")
    data = json.loads((info.path / "image.json").read_text())
    data["name"] = "sandbox"
    (info.path / "image.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="not its directory"):
        get_image("base")


def test_forced_rebuild_replaces_the_published_build() -> None:
    _publish("base")
    with store.build_lock(), store.staging_dir("base", "a" * 64) as work:
        for part in ("vmlinuz", "initrd.img", "rootfs.img"):
            (work / part).write_bytes(b"second")
        store.publish(work, _manifest("base"))
    assert get_image("base").rootfs.read_bytes() == b"second"
    assert [p.name for p in store.images_dir().iterdir() if p.is_dir()] == [f"base-{'a' * 12}"]


def test_remove_image_deletes_every_build_of_that_name() -> None:
    _publish("base", "a")
    _publish("base", "b")
    kept = _publish("sandbox", "c")
    remove_image("base")
    assert list_images() == [kept]
    with pytest.raises(NotFound):
        remove_image("base")


def test_remove_refuses_an_image_a_process_has_open() -> None:
    info = _publish("base")
    with info.rootfs.open("rb") as rootfs:
        holder = subprocess.Popen(["sleep", "30"], stdin=rootfs)
    try:
        time.sleep(0.1)
        with pytest.raises(StateError, match=str(holder.pid)):
            remove_image("base")
        assert get_image("base") == info
    finally:
        holder.kill()
        holder.wait()
    remove_image("base")
    assert list_images() == []


def test_second_builder_waits_for_the_lock() -> None:
    waited = []
    code = (
        "import time\nfrom secvf.image import store\n"
        "with store.build_lock():\n    print('locked', flush=True)\n    time.sleep(1)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    start = time.monotonic()
    with store.build_lock(on_wait=lambda: waited.append(True)):
        elapsed = time.monotonic() - start
    holder.wait()
    assert waited == [True]
    assert elapsed > 0.5
