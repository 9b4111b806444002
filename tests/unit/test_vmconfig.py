from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from secvf.errors import ConfigError, ForbiddenDevice
from secvf.model.config import (
    CHANNEL_FIELDS,
    load_config,
    new_mac,
    now_iso,
    parse_config,
    save_config,
)


def raw_config(**over: object) -> dict[str, object]:
    data: dict[str, object] = {
        "id": str(uuid.uuid4()), "name": "vm1", "kind": "generic", "cpus": 1,
        "memory_mib": 512, "disk_bytes": 1 << 30,
        "boot": {"type": "iso", "path": "/x.iso"}, "network": "nat", "mac": new_mac(),
        "created_at": now_iso(), "updated_at": now_iso(),
    }
    data.update(over)
    return data


def test_valid_config_round_trips(tmp_path: Path) -> None:
    cfg = parse_config(raw_config(), source="t")
    path = tmp_path / "vm.json"
    save_config(path, cfg)
    assert load_config(path) == cfg
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("field", sorted(CHANNEL_FIELDS))
@pytest.mark.parametrize("kind", ["generic", "malware-analysis"])
def test_channel_field_on_non_sandbox_is_refused_by_name(field: str, kind: str) -> None:
    with pytest.raises(ForbiddenDevice) as info:
        parse_config(raw_config(kind=kind, **{field: {"guest_cid": 3}}), source="vm.json")
    assert f"'{field}'" in str(info.value) and kind in str(info.value)


def test_sandbox_requires_channels_and_accepts_them() -> None:
    with pytest.raises(ConfigError, match="channels"):
        parse_config(raw_config(kind="ai-sandbox"), source="vm.json")
    cfg = parse_config(raw_config(kind="ai-sandbox", channels={"guest_cid": 7}), source="x")
    assert cfg.channels is not None and cfg.channels.guest_cid == 7


@pytest.mark.parametrize(("field", "value"), [
    ("cpus", 0), ("cpus", 1000), ("memory_mib", 1), ("disk_bytes", 5), ("name", "../x"),
    ("kind", "router"), ("network", "bridge"), ("mac", "zz"), ("id", "not-a-uuid"),
    ("boot", {"type": "floppy"}), ("unknown_key", 1),
])
def test_hand_edited_values_give_one_line_errors(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw_config(**{field: value}), source="vm.json")
    assert "\n" not in str(info.value) and "vm.json" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b"\xff\xfe", b"null", b'{"id": 1}'])
def test_corrupt_files_name_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "vm.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_atomic_save_leaves_no_temp_files(tmp_path: Path) -> None:
    cfg = parse_config(raw_config(), source="t")
    for _ in range(3):
        save_config(tmp_path / "vm.json", cfg)
    assert [p.name for p in tmp_path.iterdir()] == ["vm.json"]
    assert json.loads((tmp_path / "vm.json").read_text())["name"] == "vm1"
