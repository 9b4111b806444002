"""A fake QMP peer: QEMU's side of QMP, for tests that must run without QEMU.

:class:`FakeQMPServer` listens on a Unix socket and behaves like QEMU's monitor: it
sends the greeting, insists on ``qmp_capabilities`` first, then answers commands
from its :class:`QMPScript`:

* ``qom-list`` / ``qom-get`` (property ``type``) from the script's QOM tree — what
  :func:`secvf.runtime.devtree.walk_devices` reads;
* ``cont``, ``stop`` and ``query-status`` — paused until ``cont``, as under ``-S``
  (status ``prelaunch``; ``paused`` after a ``stop`` of a guest that ran);
* ``system_powerdown`` — emits ``POWERDOWN`` and, unless the script's guest ignores
  ACPI, ``SHUTDOWN`` (``guest: true``) and quits; a paused guest does so only once it
  is resumed (``cont``), as a real one sees the power button only when it runs;
* ``quit`` — replies, emits ``SHUTDOWN`` (``guest: false``) and quits;
* ``migrate-set-capabilities`` / ``migrate-set-parameters`` — accepted (every start sets
  them);
* a command named in ``fail`` gets a ``GenericError`` instead; ``events`` lists events
  to emit right after a command's reply; ``slow`` delays a command's answer (requests
  are answered in order, as QEMU does); anything else is ``CommandNotFound``.

"Quits" means the connection is closed and :attr:`FakeQMPServer.quit_requested` is
set. In-process use::

    async with FakeQMPServer(path, QMPScript(fail={"cont": "cannot resume"})) as peer:
        qmp = QMPClient("test")
        await qmp.connect(str(path))
        await peer.emit("GUEST_PANICKED", {"action": "pause"})
    assert peer.commands[0] == "qmp_capabilities"

As a stand-in for the QEMU *process*, ``python -m secvf.testing.qmp --script FILE
QEMU-ARGS...`` finds the QMP socket in QEMU's own arguments (``-chardev
socket,id=X,path=P`` with ``-mon chardev=X,mode=control``, or ``-qmp unix:P``),
serves it with the script and exits 0 once it quits; each command is appended to
the script's ``command_log``. :func:`write_fake_qemu` writes an executable to put in
``$SECVF_QEMU``, so the supervisor runs its real launch and stop paths against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

#: The QEMU version the greeting announces.
FAKE_QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}

READ_CHUNK_BYTES = 65536
#: An incomplete request longer than this is garbage: the peer answers an error and hangs up.
MAX_REQUEST_BYTES = 1 << 20

JSONObject = dict[str, Any]


def generic_tree() -> dict[str, list[tuple[str, str]]]:
    """A small QOM tree of a generic VM: disk, RNG, panic device, nothing that is a channel."""
    return {
        "/machine": [("peripheral", "container"), ("peripheral-anon", "container"),
                     ("unattached", "container")],
        "/machine/peripheral": [("disk0dev", "virtio-blk-pci"), ("rng0dev", "virtio-rng-pci"),
                                ("panic0", "pvpanic")],
        "/machine/peripheral/disk0dev": [("virtio-backend", "virtio-blk-device")],
        "/machine/unattached": [("device[0]", "qemu64-x86_64-cpu")],
    }


class QMPScript(BaseModel):
    """How the fake peer answers (JSON-serialisable, for the stand-in process)."""

    model_config = ConfigDict(extra="forbid")

    tree: dict[str, list[tuple[str, str]]] = generic_tree()  # QOM path -> [(child, type)]
    fail: dict[str, str] = {}  # command -> description of the GenericError it gets
    events: dict[str, list[JSONObject]] = {}  # command -> [{"event": E, "data": {...}}]
    slow: dict[str, float] = {}  # command -> seconds to wait before answering it
    ignore_powerdown: bool = False  # the guest ignores the ACPI power button
    command_log: str | None = None  # file the stand-in process appends each command to

    @classmethod
    def load(cls, path: Path) -> QMPScript:
        """Read a script written by :meth:`save`."""
        return cls.model_validate_json(path.read_text())

    def save(self, path: Path) -> Path:
        """Write the script as JSON; return ``path``."""
        path.write_text(self.model_dump_json(indent=2))
        return path


class FakeQMPServer:
    """A QMP peer on a Unix socket serving one client at a time (as QEMU does).

    Attributes:
        commands: every command received, in order (``qmp_capabilities`` included).
        running: whether the "guest" runs (False until ``cont``).
        ran: whether it ever ran (``query-status`` says ``paused`` then, not ``prelaunch``).
        powerdown_pending: a ``system_powerdown`` came while it was paused.
        quit_requested: set once the peer quit (``quit``, or a powerdown obeyed).
    """

    def __init__(self, path: Path, script: QMPScript | None = None) -> None:
        self.path = path
        self.script = script or QMPScript()
        self.commands: list[str] = []
        self.running = False
        self.ran = False  # cont was seen: a stopped guest is "paused", not "prelaunch"
        self.powerdown_pending = False  # system_powerdown while paused: acted on at cont
        self.quit_requested = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writer: asyncio.StreamWriter | None = None

    def __repr__(self) -> str:
        return f"FakeQMPServer(path={str(self.path)!r}, running={self.running})"

    async def start(self) -> None:
        """Listen on :attr:`path` (replacing a stale socket file)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(self._session, path=str(self.path))

    async def close(self) -> None:
        """Stop listening and drop the client."""
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def __aenter__(self) -> FakeQMPServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def emit(self, event: str, data: JSONObject | None = None) -> None:
        """Send event ``event`` to the connected client.

        Raises:
            ConnectionError: no client is connected.
        """
        if self._writer is None:
            raise ConnectionError("no QMP client is connected")
        micros = time.time_ns() // 1000
        await self._send({"event": event, "data": data or {},
                          "timestamp": {"seconds": micros // 1_000_000,
                                        "microseconds": micros % 1_000_000}})

    # ---- one session ---------------------------------------------------------------------

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:  # QEMU's monitor takes one client
            writer.close()
            return
        self._writer = writer
        try:
            await self._send({"QMP": {"version": {"qemu": FAKE_QEMU_VERSION, "package": ""},
                                      "capabilities": []}})
            negotiated = False
            buffer = ""
            while not self.quit_requested.is_set():
                chunk = await reader.read(READ_CHUNK_BYTES)
                if not chunk:
                    break
                buffer += chunk.decode(errors="replace")
                requests, buffer = _split_json_stream(buffer)
                for request in requests:
                    negotiated = await self._dispatch(request, negotiated)
                if len(buffer) > MAX_REQUEST_BYTES:
                    await self._send(_error("GenericError", "JSON parse error"))
                    break
        except ConnectionError:
            pass
        finally:
            self._writer = None
            writer.close()

    async def _dispatch(self, request: Any, negotiated: bool) -> bool:
        """Answer one request; return whether capabilities are negotiated."""
        if not isinstance(request, dict) or not isinstance(request.get("execute"), str):
            await self._send(_error("GenericError", "QMP input lacks member 'execute'"))
            return negotiated
        command = request["execute"]
        self._log(command)
        reply_id = {"id": request["id"]} if "id" in request else {}
        args = request.get("arguments") or {}
        await asyncio.sleep(self.script.slow.get(command, 0))
        if not negotiated and command != "qmp_capabilities":
            reply = _error("CommandNotFound", "Expecting capabilities negotiation with "
                                              "'qmp_capabilities'")
        elif command in self.script.fail:
            reply = _error("GenericError", self.script.fail[command])
        else:
            reply = self._answer(command, args)
        await self._send({**reply, **reply_id})
        for event in self.script.events.get(command, []):
            await self.emit(str(event["event"]), event.get("data"))
        if "return" in reply:
            await self._after(command)
        return negotiated or (command == "qmp_capabilities" and "return" in reply)

    def _answer(self, command: str, args: JSONObject) -> JSONObject:
        if command in ("qmp_capabilities", "system_powerdown", "quit",
                       "migrate-set-capabilities", "migrate-set-parameters"):
            return {"return": {}}
        if command in ("cont", "stop"):
            self.running = command == "cont"
            self.ran = self.ran or self.running
            return {"return": {}}
        if command == "query-status":
            status = "running" if self.running else "paused" if self.ran else "prelaunch"
            return {"return": {"running": self.running, "singlestep": False,
                               "status": status}}
        if command == "qom-list":
            return self._qom_list(str(args.get("path", "")))
        if command == "qom-get":
            return self._qom_get(str(args.get("path", "")), str(args.get("property", "")))
        return _error("CommandNotFound", f"The command {command} has not been found")

    def _qom_list(self, path: str) -> JSONObject:
        if path not in self.script.tree and self._type_of(path) is None:
            return _error("DeviceNotFound", f"Device '{path}' not found")
        props: list[JSONObject] = [{"name": "type", "type": "string"}]
        props += [{"name": name, "type": f"child<{qom_type}>"}
                  for name, qom_type in self.script.tree.get(path, [])]
        return {"return": props}

    def _qom_get(self, path: str, prop: str) -> JSONObject:
        qom_type = self._type_of(path)
        if qom_type is None:
            return _error("DeviceNotFound", f"Device '{path}' not found")
        if prop != "type":
            return _error("GenericError", f"Property '{prop}' not found")
        return {"return": qom_type}

    def _type_of(self, path: str) -> str | None:
        if path == "/machine":
            return "pc-q35-7.2-machine"
        parent, _, name = path.rpartition("/")
        return dict(self.script.tree.get(parent, [])).get(name)

    async def _after(self, command: str) -> None:
        """What QEMU does once it answered ``command``."""
        if command == "cont":
            await self.emit("RESUME")
            if self.powerdown_pending:
                self.powerdown_pending = False
                await self._guest_powers_off()
        elif command == "stop":
            await self.emit("STOP")
        elif command == "quit":
            await self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            self.quit_requested.set()
        elif command == "system_powerdown":
            await self.emit("POWERDOWN")
            if self.script.ignore_powerdown:
                return
            if self.running:
                await self._guest_powers_off()
            else:
                self.powerdown_pending = True

    async def _guest_powers_off(self) -> None:
        await self.emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
        self.quit_requested.set()

    async def _send(self, message: JSONObject) -> None:
        if self._writer is None:
            raise ConnectionError("no QMP client is connected")
        self._writer.write(json.dumps(message).encode() + b"\r\n")
        await self._writer.drain()

    def _log(self, command: str) -> None:
        self.commands.append(command)
        if self.script.command_log:
            with open(self.script.command_log, "a") as fh:
                fh.write(command + "\n")


def _split_json_stream(buffer: str) -> tuple[list[Any], str]:
    """The complete JSON values at the start of ``buffer``, and the rest.

    QMP is a stream of JSON objects with no framing (qemu.qmp sends no newline).
    """
    decoder = json.JSONDecoder()
    values = []
    rest = buffer.lstrip()
    while rest:
        try:
            value, end = decoder.raw_decode(rest)
        except json.JSONDecodeError:
            break  # incomplete: wait for more
        values.append(value)
        rest = rest[end:].lstrip()
    return values, rest


def _error(error_class: str, desc: str) -> JSONObject:
    return {"error": {"class": error_class, "desc": desc}}


# ---- the stand-in QEMU process -------------------------------------------------------------


def qmp_socket_from_argv(argv: list[str]) -> Path:
    """The QMP socket path in a QEMU command line.

    Raises:
        ValueError: the command line has no QMP socket.
    """
    chardevs: dict[str, dict[str, str]] = {}
    monitors: list[str] = []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-qmp" and value.startswith("unix:"):
            return Path(value[len("unix:"):].split(",")[0])
        if flag == "-chardev":
            backend, _, rest = value.partition(",")
            opts = _options(rest)
            if backend == "socket" and "id" in opts and "path" in opts:
                chardevs[opts["id"]] = opts
        elif flag == "-mon":
            opts = _options(value)
            if opts.get("mode") == "control" and "chardev" in opts:
                monitors.append(opts["chardev"])
    for chardev in monitors:
        if chardev in chardevs:
            return Path(chardevs[chardev]["path"])
    raise ValueError("no QMP socket (-qmp unix:… or -chardev socket + -mon mode=control)")


def _options(text: str) -> dict[str, str]:
    """``a=1,b=2`` as a dict."""
    pairs = (opt.partition("=") for opt in text.split(",") if opt)
    return {key: value for key, _, value in pairs}


def write_fake_qemu(directory: Path, script: QMPScript | None = None) -> Path:
    """Write ``fake-qemu`` (and its script) into ``directory``; return its path.

    Put it in ``$SECVF_QEMU`` and the supervisor starts this instead of QEMU.
    """
    script_file = (script or QMPScript()).save(directory / "fake-qemu.json")
    exe = directory / "fake-qemu"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m secvf.testing.qmp '
                   f'--script "{script_file}" "$@"\n')
    exe.chmod(0o755)
    return exe


async def _stand_in(path: Path, script: QMPScript) -> None:
    async with FakeQMPServer(path, script) as server:
        print(f"fake QEMU: QMP on {path}", file=sys.stderr, flush=True)
        await server.quit_requested.wait()


def main(argv: list[str] | None = None) -> int:
    """``python -m secvf.testing.qmp --script FILE QEMU-ARGS...``: serve QMP until quit.

    The script option comes first; everything after it is QEMU's command line.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] != "--script":
        print("usage: python -m secvf.testing.qmp --script FILE QEMU-ARGS...", file=sys.stderr)
        return 2
    try:
        path = qmp_socket_from_argv(args[2:])
    except ValueError as exc:
        print(f"fake QEMU: {exc}", file=sys.stderr)
        return 1
    asyncio.run(_stand_in(path, QMPScript.load(Path(args[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
