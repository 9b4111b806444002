"""Contract tests: the wire surface is pinned by tests/schema/gen-N.json and golden bytes.

Re-bless after an intended change with ``SECVF_BLESS_SCHEMA=1`` set, and follow
docs/VERSIONING.md (bump GENERATION for anything that is not purely additive).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from secvf.exec import protocol

SCHEMA_DIR = Path(__file__).parent / "schema"
SNAPSHOT = SCHEMA_DIR / f"gen-{protocol.GENERATION}.json"
GOLDEN = SCHEMA_DIR / f"golden-gen-{protocol.GENERATION}.json"
BLESS = os.environ.get("SECVF_BLESS_SCHEMA") == "1"

#: Sample values for required fields, by kind, for the round-trip test.
SAMPLES = {
    "str": "sample",
    "int": 7,
    "number": 1.5,
    "bool": True,
    "list[str]": ["a", "b"],
    "map[str,str]": {"K": "V"},
    "list[map[str,str]]": [{"item": "hostname", "message": "m"}],
    "list[share]": [{"tag": "workspace", "path": "/workspace", "read_only": False}],
    "list[process]": [
        {
            "id": "0001a7f3",
            "argv": ["sleep", "9"],
            "user": "agent",
            "pid": 42,
            "state": "running",
            "started_at": 1.5,
            "code": None,
            "signal": None,
            "duration_ms": None,
            "buffered_bytes": 3,
            "dropped_bytes": 0,
        }
    ],
}

#: Frames whose bytes must never change within a generation: (name, frame bytes builder).
GOLDEN_FRAMES = {
    "hello": lambda: protocol.encode_message(
        "hello", generation=1, software="secvf-host", capabilities=["exec"]
    ),
    "exec_argv": lambda: protocol.encode_message(
        "exec", 1, argv=["ls", "-l"], env={"A": "1"}, timeout_s=5
    ),
    "exec_shell_tty": lambda: protocol.encode_message(
        "exec", 2, shell="echo hi", tty=True, rows=40, cols=120, user="root"
    ),
    "started": lambda: protocol.encode_message("started", 1, pid=1234),
    "stdout": lambda: protocol.encode_data(protocol.FrameType.STDOUT, 1, b"out\x00\xff"),
    "stdin": lambda: protocol.encode_data(protocol.FrameType.STDIN, 1, b"in\n"),
    "exit_signal": lambda: protocol.encode_message("exit", 1, signal=9, duration_ms=12),
    "start_failed": lambda: protocol.encode_message(
        "start_failed", 1, kind="not_found", errno=2, errno_name="ENOENT", message="x"
    ),
    "upload": lambda: protocol.encode_message("upload", 3, path="/w/f", mode=0o644),
    "file_data": lambda: protocol.encode_data(protocol.FrameType.FILE_DATA, 3, b"\x01\x02"),
    "error": lambda: protocol.encode_error_frame("refused", "not allowed"),
    "keepalive": lambda: protocol.encode_message("keepalive"),
    "restore": lambda: protocol.encode_message(
        "restore",
        time_ns=1_800_000_000_123_456_789,
        entropy="00ff" * 16,
        hostname="sbx-1",
        mac="52:54:00:12:34:56",
        shares=[{"tag": "workspace", "path": "/workspace", "read_only": False}],
        clean_tmp=True,
    ),
    "restored": lambda: protocol.encode_message(
        "restored",
        clock_offset_ns=-5,
        guest_time_ns=1_800_000_000_000_000_000,
        reseeded=True,
        hostname="sbx-1",
        errors=[{"item": "share:ro0", "message": "x"}],
    ),
    "restore_failed": lambda: protocol.encode_message(
        "restore_failed", kind="invalid_request", field="mac", message="x"
    ),
    "exec_detach": lambda: protocol.encode_message(
        "exec", 4, argv=["python3", "-m", "http.server"], user="agent", detach=True
    ),
    "detached": lambda: protocol.encode_message("detached", 4, id="0001a7f3", pid=321),
    "ps": lambda: protocol.encode_message("ps", 5),
    "process_list": lambda: protocol.encode_message(
        "process_list", 5, processes=SAMPLES["list[process]"]
    ),
    "attach": lambda: protocol.encode_message("attach", 6, id="0001a7f3"),
    "attached": lambda: protocol.encode_message(
        "attached", 6, id="0001a7f3", pid=321, state="running", dropped_bytes=4096
    ),
    "output_dropped": lambda: protocol.encode_message("output_dropped", 6, bytes=65536),
    "kill": lambda: protocol.encode_message("kill", 7, id="0001a7f3", signum=9),
    "killed": lambda: protocol.encode_message("killed", 7, id="0001a7f3", signum=9),
    "detached_error": lambda: protocol.encode_message(
        "detached_error", 7, kind="not_found", id="ffff0000", message="x"
    ),
}


#: The snapshot's enumerations, and the (message, field) each one constrains.
ENUMERATIONS = {
    "error_codes": (("error", "code"), protocol.ErrorCode),
    "start_failure_kinds": (("start_failed", "kind"), protocol.StartFailureKind),
    "file_error_kinds": (("file_error", "kind"), protocol.FileErrorKind),
    "restore_failure_kinds": (("restore_failed", "kind"), protocol.RestoreFailureKind),
    "detached_error_kinds": (("detached_error", "kind"), protocol.DetachedErrorKind),
}


def _rendered_contract() -> str:
    return json.dumps(protocol.describe_contract(), sort_keys=True, indent=2) + "\n"


def test_contract_matches_snapshot():
    rendered = _rendered_contract()
    if BLESS:
        SCHEMA_DIR.mkdir(exist_ok=True)
        SNAPSHOT.write_text(rendered)
    assert SNAPSHOT.exists(), f"missing {SNAPSHOT}; run with SECVF_BLESS_SCHEMA=1"
    assert json.loads(rendered) == json.loads(SNAPSHOT.read_text()), (
        "the wire contract changed; read docs/VERSIONING.md, then re-bless with "
        "SECVF_BLESS_SCHEMA=1"
    )


def test_earlier_generations_are_append_only():
    current = protocol.describe_contract()
    for path in sorted(SCHEMA_DIR.glob("gen-*.json")):
        old = json.loads(path.read_text())
        for name, spec in old["messages"].items():
            assert name in current["messages"], f"message {name!r} from {path.name} removed"
            now = current["messages"][name]
            assert now["introduced_in"] == spec["introduced_in"]
            assert now["direction"] == spec["direction"]
            for field, fspec in spec["fields"].items():
                assert now["fields"].get(field) == fspec, f"{name}.{field} changed"
            added = set(now["fields"]) - set(spec["fields"])
            assert all(not now["fields"][f]["required"] for f in added), (
                "new fields must be optional"
            )
        assert old["frame"]["types"].items() <= current["frame"]["types"].items()
        assert old["frame"]["header_format"] == current["frame"]["header_format"]
        for enumeration in ENUMERATIONS:
            values = current[enumeration]
            assert values[: len(old.get(enumeration, []))] == old.get(enumeration, []), (
                f"{enumeration}: values are append-only ({path.name})"
            )


def test_new_messages_are_tagged_with_their_generation():
    for spec in protocol.MESSAGES.values():
        assert protocol.MIN_GENERATION <= spec.introduced_in <= protocol.GENERATION
        assert all(f.introduced_in >= spec.introduced_in for f in spec.fields)


def _sample(field: protocol.FieldSpec) -> object:
    if field.choices is not None:
        return list(field.choices)[-1].value
    return SAMPLES[field.kind.rstrip("?")]


@pytest.mark.parametrize("name", sorted(protocol.MESSAGES))
def test_every_message_round_trips_by_wire_name(name):
    spec = protocol.MESSAGES[name]
    required = {
        f.name: _sample(f) for f in spec.fields if f.default is protocol.REQUIRED
    }
    data = protocol.encode_message(name, 5, **required)
    (frame,) = protocol.FrameDecoder().feed(data)
    msg = protocol.decode_message(frame)
    assert msg.name == name and msg.stream_id == 5
    assert msg.payload == protocol.build_payload(name, required)


def _golden_rendering() -> dict[str, str]:
    return {name: build().hex() for name, build in sorted(GOLDEN_FRAMES.items())}


def test_golden_bytes_decode_and_encode_identically():
    if BLESS:
        GOLDEN.write_text(json.dumps(_golden_rendering(), indent=2, sort_keys=True) + "\n")
    stored = json.loads(GOLDEN.read_text())
    assert stored == _golden_rendering(), "encoding changed within a generation"
    for hexed in stored.values():
        (frame,) = protocol.FrameDecoder().feed(bytes.fromhex(hexed))
        if frame.type in (protocol.FrameType.CONTROL, protocol.FrameType.ERROR):
            protocol.decode_message(frame)


def test_golden_frames_of_every_generation_still_decode():
    goldens = sorted(SCHEMA_DIR.glob("golden-gen-*.json"))
    assert len(goldens) == protocol.GENERATION and goldens[-1] == GOLDEN
    for path in goldens:
        for hexed in json.loads(path.read_text()).values():
            (frame,) = protocol.FrameDecoder().feed(bytes.fromhex(hexed))
            if frame.type in (protocol.FrameType.CONTROL, protocol.FrameType.ERROR):
                protocol.decode_message(frame)


def test_generation_1_snapshot_is_frozen():
    # the old generation's record is kept as it was (docs/VERSIONING.md)
    old = json.loads((SCHEMA_DIR / "gen-1.json").read_text())
    assert old["generation"] == 1 and "restore" not in old["messages"]


def test_generation_2_snapshot_is_frozen():
    old = json.loads((SCHEMA_DIR / "gen-2.json").read_text())
    assert old["generation"] == 2 and "restore" in old["messages"]
    assert "detached" not in old["messages"] and "detach" not in old["messages"]["exec"]["fields"]


def test_a_generation_2_exec_frame_decodes_as_a_normal_exec():
    # a generation-2 host never sends "detach": the agent reads it as false
    (frame,) = protocol.FrameDecoder().feed(
        bytes.fromhex(json.loads((SCHEMA_DIR / "golden-gen-2.json").read_text())["exec_argv"])
    )
    assert protocol.decode_message(frame)["detach"] is False


def test_process_items_are_checked_field_by_field():
    item = SAMPLES["list[process]"][0]
    assert protocol.MESSAGES["process_list"].fields[0].accepts([item, {**item, "extra": 1}])
    for key in protocol.PROCESS_FIELDS:
        assert not protocol.MESSAGES["process_list"].fields[0].accepts(
            [{k: v for k, v in item.items() if k != key}]
        ), key
    assert not protocol.MESSAGES["process_list"].fields[0].accepts([{**item, "pid": "42"}])
    assert not protocol.MESSAGES["process_list"].fields[0].accepts([{**item, "state": None}])


def test_golden_exec_frame_fields():
    (frame,) = protocol.FrameDecoder().feed(
        bytes.fromhex(json.loads(GOLDEN.read_text())["exec_argv"])
    )
    msg = protocol.decode_message(frame)
    assert (frame.stream_id, frame.flags) == (1, protocol.FLAG_START)
    assert msg["argv"] == ["ls", "-l"] and msg["env"] == {"A": "1"} and msg["timeout_s"] == 5


# --------------------------------------------------------------------------- enumerations


def test_enumerated_fields_are_exactly_the_snapshot_enumerations():
    enumerated = {
        (spec.name, f.name): f.choices
        for spec in protocol.MESSAGES.values()
        for f in spec.fields
        if f.choices is not None
    }
    assert enumerated == dict(ENUMERATIONS.values())
    contract = protocol.describe_contract()
    for key, (_, choices) in ENUMERATIONS.items():
        assert contract[key] == [member.value for member in choices]


@pytest.mark.parametrize("message, field", [where for where, _ in ENUMERATIONS.values()])
def test_senders_cannot_encode_a_value_outside_the_enumeration(message, field):
    required = {
        f.name: _sample(f)
        for f in protocol.MESSAGES[message].fields
        if f.default is protocol.REQUIRED
    }
    with pytest.raises(protocol.BadMessage, match=field):
        protocol.encode_message(message, 1, **{**required, field: "not_a_value"})


def test_encode_error_frame_refuses_an_unknown_code():
    with pytest.raises(protocol.BadMessage):
        protocol.encode_error_frame("no_such_code", "x")


def test_receivers_keep_values_a_newer_peer_may_add():
    body = b'{"v":1,"t":"start_failed","p":{"kind":"added_later"}}'
    frame = protocol.Frame(protocol.FrameType.CONTROL, protocol.FLAG_END, 1, body)
    assert protocol.decode_message(frame)["kind"] == "added_later"


def test_every_protocol_violation_has_an_error_code():
    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    for cls in subclasses(protocol.ProtocolViolation):
        assert isinstance(cls.code, protocol.ErrorCode), cls


def test_every_error_code_is_documented():
    doc = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    assert "`agent_unavailable`" in doc
    assert all(f"`{code.value}`" in doc for code in protocol.ErrorCode)
