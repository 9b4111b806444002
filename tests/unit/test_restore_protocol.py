"""The ``restore`` messages (protocol generation 2) and the field rules both sides check."""

from __future__ import annotations

import pytest

from secvf.exec import protocol
from secvf.exec.protocol import InvalidRestore, check_restore_request
from secvf.machine import shares as host_shares

ENTROPY = "ab" * 64


def _request(**fields: object) -> dict:
    base = {"time_ns": 1_800_000_000 * 10**9, "entropy": ENTROPY}
    return protocol.build_payload("restore", {**base, **fields})


def _frame(name: str, **fields: object) -> protocol.Message:
    (frame,) = protocol.FrameDecoder().feed(protocol.encode_message(name, **fields))
    return protocol.decode_message(frame)


# ---- the messages ---------------------------------------------------------------------------


def test_restore_is_a_generation_2_connection_message():
    assert protocol.GENERATION >= 2
    for name, direction in (("restore", "to_agent"), ("restored", "to_client"),
                            ("restore_failed", "to_client")):
        spec = protocol.MESSAGES[name]
        assert (spec.introduced_in, spec.stream, spec.direction) == (2, "connection", direction)


def test_a_restore_round_trips_with_its_defaults():
    msg = _frame("restore", time_ns=1_800_000_000 * 10**9, entropy=ENTROPY)
    assert msg.stream_id == 0 and msg.flags == 0
    assert msg.payload == {"time_ns": 1_800_000_000 * 10**9, "entropy": ENTROPY, "hostname": None,
                           "mac": None, "shares": [], "clean_tmp": False}


def test_shares_travel_as_objects():
    share = {"tag": "workspace", "path": "/workspace", "read_only": False}
    assert _frame("restore", time_ns=1, entropy="", shares=[share])["shares"] == [share]


@pytest.mark.parametrize("shares", [
    [("workspace", "/workspace", False)],  # a tuple is not an object on the wire
    [{"tag": "workspace", "path": "/workspace"}],  # read_only missing
    [{"tag": 1, "path": "/workspace", "read_only": False}],
    [{"tag": "w", "path": "/w", "read_only": "no"}],
    "workspace",
])
def test_malformed_shares_are_a_bad_message(shares):
    with pytest.raises(protocol.BadMessage, match="shares"):
        protocol.build_payload("restore", {"time_ns": 1, "entropy": "", "shares": shares})


def test_restored_reports_errors_as_item_message_maps():
    msg = _frame("restored", errors=[{"item": "share:ro0", "message": "no such tag"}])
    assert msg["errors"] == [{"item": "share:ro0", "message": "no such tag"}]
    assert msg["mounted"] == [] and msg["clock_offset_ns"] is None and msg["reseeded"] is False
    with pytest.raises(protocol.BadMessage):
        protocol.build_payload("restored", {"errors": [{"item": 3}]})


def test_restore_failed_kinds_are_an_enumeration():
    assert [k.value for k in protocol.RestoreFailureKind] == ["invalid_request", "unsupported"]
    with pytest.raises(protocol.BadMessage):
        protocol.encode_message("restore_failed", kind="oops")
    assert _frame("restore_failed", kind="unsupported")["field"] is None


def test_a_restore_too_big_for_a_frame_cannot_be_sent():
    with pytest.raises(protocol.FrameTooLarge):
        protocol.encode_message("restore", time_ns=1,
                                entropy="ab" * (protocol.MAX_FRAME_BYTES // 2))


# ---- the field rules ------------------------------------------------------------------------


def test_a_full_valid_request_passes():
    check_restore_request(_request(
        hostname="sbx-1", mac="52:54:00:12:34:56", clean_tmp=True,
        shares=[{"tag": "workspace", "path": "/workspace", "read_only": False},
                {"tag": "ro0", "path": "/data/ref", "read_only": True},
                {"tag": "rw1", "path": "/srv/out", "read_only": False}]))


@pytest.mark.parametrize("hostname", ["sbx-1", "a", "A1", "node.example", "x" * 63, "1abc"])
def test_good_hostnames(hostname):
    check_restore_request(_request(hostname=hostname))


@pytest.mark.parametrize("hostname", ["", "bad_name", "-lead", "trail-", "a..b", ".a", "a b",
                                      "x" * 64, ".".join(["abcdefgh"] * 8), "sbx\n", "é"])
def test_bad_hostnames(hostname):
    with pytest.raises(InvalidRestore) as err:
        check_restore_request(_request(hostname=hostname))
    assert err.value.field == "hostname"


@pytest.mark.parametrize("mac", ["52:54:00:12:34:56", "02:00:00:00:00:01", "00:16:3e:aa:bb:cc"])
def test_good_macs(mac):
    check_restore_request(_request(mac=mac))


@pytest.mark.parametrize("mac", [
    "nope", "52:54:00:12:34", "52:54:00:12:34:56:78", "52-54-00-12-34-56", "52:54:00:12:34:5G",
    "52:54:00:AB:CD:EF", "01:00:5e:00:00:01", "52:54:00:12:34:56\n", "ff:ff:ff:ff:ff:ff",
    "00:00:00:00:00:00", " 52:54:00:12:34:56",
])
def test_bad_macs(mac):
    with pytest.raises(InvalidRestore) as err:
        check_restore_request(_request(mac=mac))
    assert err.value.field == "mac"


@pytest.mark.parametrize(("entropy", "why"), [
    ("abc", "hex"), ("zz" * 32, "hex"), ("AB" * 32, "hex"),
    ("ab" * 15, "bytes"), ("ab" * 513, "bytes"),
])
def test_bad_entropy(entropy, why):
    with pytest.raises(InvalidRestore, match=why) as err:
        check_restore_request(_request(entropy=entropy))
    assert err.value.field == "entropy"


def test_a_host_clock_before_2020_is_refused():
    with pytest.raises(InvalidRestore) as err:
        check_restore_request(_request(time_ns=1_000_000_000 * 10**9))
    assert err.value.field == "time_ns"


def _share(tag: str = "ro0", path: str = "/data/x", read_only: bool = True) -> dict:
    return {"tag": tag, "path": path, "read_only": read_only}


@pytest.mark.parametrize(("shares", "field"), [
    ([_share(path="data/x")], "shares[0].path"),
    ([_share(path="/")], "shares[0].path"),
    ([_share(path="/etc/x")], "shares[0].path"),
    ([_share(path="/tmp")], "shares[0].path"),
    ([_share(path="/home/agent/w")], "shares[0].path"),
    ([_share(path="/data/../etc")], "shares[0].path"),
    ([_share(path="/data//x")], "shares[0].path"),
    ([_share(path="/data/x/")], "shares[0].path"),
    ([_share(path="/data/a b")], "shares[0].path"),
    ([_share(path="/data/x\n")], "shares[0].path"),
    ([_share(path="/" + "d" * 300)], "shares[0].path"),
    ([_share(tag="0abc")], "shares[0].tag"),
    ([_share(tag="a" * 37)], "shares[0].tag"),
    ([_share(tag="a b")], "shares[0].tag"),
    ([_share(tag="ab\n")], "shares[0].tag"),
    ([_share(), _share(path="/data/y")], "shares[1].tag"),
    ([_share(), _share(tag="ro1", path="/data/x/sub")], "shares[1].path"),
    ([_share(path="/data/x/sub"), _share(tag="ro1", path="/data/x")], "shares[1].path"),
    ([_share(tag=f"t{i}", path=f"/d{i}") for i in range(33)], "shares"),
])
def test_bad_shares(shares, field):
    with pytest.raises(InvalidRestore) as err:
        check_restore_request(_request(shares=shares))
    assert err.value.field == field
    assert str(err.value).startswith(f"restore.{field}: ")


def test_the_guest_path_rule_is_the_hosts():
    # the agent cannot import the host's share rules; its copy must not drift from them
    assert protocol.GUEST_SYSTEM_DIRS == host_shares.GUEST_SYSTEM_DIRS
    assert protocol.SHARE_TAG_MAX_BYTES == host_shares.MAX_TAG_BYTES
    for path in ("/workspace", "/mnt/a", "/srv/b.c", "/data/x@y+z-1_2"):
        host_shares._check_guest_path(path, "share")
        protocol.check_guest_path(path)
    for path in ("/etc/x", "/usr", "/var/lib/x", "/proc/x", "/"):
        with pytest.raises(host_shares.ShareError):
            host_shares._check_guest_path(path, "share")
        with pytest.raises(InvalidRestore):
            protocol.check_guest_path(path)


def test_the_restore_limits_are_part_of_the_contract():
    limits = protocol.describe_contract()["restore_limits"]
    assert limits["max_shares"] == protocol.RESTORE_MAX_SHARES
    assert limits["guest_system_dirs"] == list(protocol.GUEST_SYSTEM_DIRS)
