"""config/shares.json: how virtiofsd serves shares, and that no setting loosens a share."""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path

import pytest

from secvf.machine.share_settings import AUTO_TIMEOUT_S, ShareSettings, load_settings, settings_path
from secvf.machine.shares import STAGED_SOURCE, ShareError, virtiofsd_argv, virtiofsd_options
from secvf.model.config import Share


def _fake_virtiofsd(tmp_path: Path, rust: bool) -> str:
    path = tmp_path / ("virtiofsd-rust" if rust else "virtiofsd-c")
    usage = "--shared-dir <DIR>" if rust else "-o source=PATH"
    path.write_text(f"#!/bin/sh\necho '{usage}'\n")
    path.chmod(0o755)
    return str(path)


def _write(settings: dict) -> None:
    settings_path().parent.mkdir(parents=True, exist_ok=True)
    settings_path().write_text(json.dumps(settings))


def test_defaults_when_there_is_no_file() -> None:
    assert not settings_path().exists()
    assert load_settings() == ShareSettings()
    assert settings_path().name == "shares.json" and settings_path().parent.name == "config"


def test_c_options_carry_every_setting(tmp_path: Path) -> None:
    c = _fake_virtiofsd(tmp_path, rust=False)
    default = virtiofsd_options(c, settings=ShareSettings())
    assert default == ("-o", f"source={STAGED_SOURCE}", "-o", "sandbox=namespace",
                       "-o", "cache=auto", "-o", "no_xattr", "-o", "readdirplus",
                       "-o", "no_writeback", "-o", f"timeout={AUTO_TIMEOUT_S:g}",
                       "--thread-pool-size=0", "-o", "log_level=warn")
    # other cache modes keep their own timeouts unless asked
    assert not [o for o in virtiofsd_options(c, settings=ShareSettings(cache="always"))
                if o.startswith("timeout=")]
    tuned = virtiofsd_options(c, "/src", ShareSettings(
        cache="always", timeout_s=2.5, thread_pool_size=4, xattr=True, readdirplus=False,
        writeback=True))
    assert " ".join(tuned) == (
        "-o source=/src -o sandbox=namespace -o cache=always -o xattr -o no_readdirplus "
        "-o writeback -o timeout=2.5 --thread-pool-size=4 -o log_level=warn")


def test_rust_options_and_the_timeout_it_cannot_take(tmp_path: Path) -> None:
    rust = _fake_virtiofsd(tmp_path, rust=True)
    assert "timeout" not in " ".join(virtiofsd_options(rust, settings=ShareSettings()))
    opts = virtiofsd_options(rust, settings=ShareSettings(cache="none", readdirplus=False))
    assert opts[:4] == ("--shared-dir", STAGED_SOURCE, "--sandbox", "namespace")
    assert ("--cache", "never") == opts[4:6] and "--no-readdirplus" in opts
    with pytest.raises(ShareError, match=r"shares\.json: timeout_s is not supported"):
        virtiofsd_options(rust, settings=ShareSettings(timeout_s=5))


def test_the_file_is_read_at_each_launch(tmp_path: Path) -> None:
    c = _fake_virtiofsd(tmp_path, rust=False)
    _write({"cache": "none", "timeout_s": 0})
    assert "cache=none" in virtiofsd_options(c) and "timeout=0" in virtiofsd_options(c)
    _write({"thread_pool_size": 2})
    assert "--thread-pool-size=2" in virtiofsd_options(c)


@pytest.mark.parametrize("bad", ['{"cache": "fast"}', '{"timeout_s": -1}',
                                 '{"thread_pool_size": 1000}', '{"dax": true}', "not json"])
def test_a_bad_file_is_a_share_error_naming_it(tmp_path: Path, bad: str) -> None:
    settings_path().parent.mkdir(parents=True, exist_ok=True)
    settings_path().write_text(bad)
    with pytest.raises(ShareError, match=r"shares\.json"):
        virtiofsd_options(_fake_virtiofsd(tmp_path, rust=False))


def test_no_setting_loosens_a_share(tmp_path: Path) -> None:
    """Whatever config/shares.json says, a read-only share is served from a read-only,
    nosuid, nodev bind through the id-mapping, filter-installing launcher, and the
    settings only ever add virtiofsd's own tuning options."""
    source = tmp_path / "src"
    source.mkdir(mode=0o700)
    ro = Share(tag="ro0", host_path=str(source), guest_path="/ref", read_only=True)
    for cache, timeout, pool, flag in itertools.product(
            ("auto", "always", "none"), (None, 0, 3600), (0, 8), (False, True)):
        _write({"cache": cache, "timeout_s": timeout, "thread_pool_size": pool,
                "xattr": flag, "readdirplus": not flag, "writeback": flag})
        argv = virtiofsd_argv(ro)
        joined = " ".join(argv)
        assert "remount,bind,nosuid,nodev,ro " in joined, joined
        assert "-m secvf.machine.share_launcher" in joined
        settings = load_settings()
        fixed = ("-o", f"source={ro.host_path}" if os.getuid() == 0 else f"source={STAGED_SOURCE}",
                 "-o", "sandbox=namespace")
        assert argv[-len(fixed) - len(settings.c_options()) - 2:] == (
            *fixed, *settings.c_options(), "-o", "log_level=warn")
        for option in settings.c_options():
            assert TUNING.fullmatch(option), option


TUNING = re.compile(r"-o|cache=(auto|always|none)|timeout=[0-9.]+|(no_)?(xattr|readdirplus|"
                    r"writeback)|--thread-pool-size=[0-9]+")
