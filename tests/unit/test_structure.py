"""The structural half of the promise: only the AI-sandbox machine builder constructs
vsock and virtio-fs devices. This walks every module's AST and fails if any other
module mentions a vsock/virtio-fs QEMU device type in a string it could pass to QEMU."""

from __future__ import annotations

import ast
from pathlib import Path

import secvf

PACKAGE = Path(secvf.__file__).parent
ALLOWED = {PACKAGE / "machine" / "sandbox.py"}
DEVICE_TYPES = ("vhost-user-vsock", "vhost-vsock", "vsock-pci", "vhost-user-fs",
                "virtio-fs-pci", "virtio-9p", "virtio-serial", "virtserialport", "virtconsole")
# modules that name device types only to *recognise* them, and the vsock backend that
# *serves* the device QEMU creates; none of them may build a device
RECOGNISERS = {PACKAGE / "model" / "channels.py", *(PACKAGE / "vsock").rglob("*.py")}


def device_strings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef
                                | ast.AsyncFunctionDef)
                  and n.body and isinstance(n.body[0], ast.Expr)}
    found = []
    for node in ast.walk(tree):
        if id(node) in docstrings:
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.lower()
            found += [f"{path.name}:{node.lineno}: {node.value!r}" for t in DEVICE_TYPES
                      if t in text]
    return found


def test_only_the_sandbox_builder_constructs_channel_devices() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in ALLOWED or path in RECOGNISERS:
            continue
        offenders += device_strings(path)
    assert offenders == []


def test_the_sandbox_builder_does_construct_them() -> None:
    found = " ".join(device_strings(PACKAGE / "machine" / "sandbox.py"))
    assert "vhost-user-vsock-pci" in found and "vhost-user-fs-pci" in found


def test_recognisers_do_not_build_devices() -> None:
    """channels.py may name patterns, but must not emit -device arguments."""
    for path in RECOGNISERS:
        text = path.read_text()
        assert '"-device"' not in text and "add_device" not in text


def test_add_device_is_called_by_builders_only() -> None:
    callers = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_device"):
                callers.add(path.relative_to(PACKAGE).as_posix())
    assert callers == {"machine/common.py", "machine/network.py", "machine/sandbox.py"}
