"""The device-tree walk: breadth-first order, batched ``qom-list`` requests, bounds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from secvf.runtime import devtree
from secvf.runtime.devtree import walk_devices


class TreeQMP:
    """A QMP stand-in serving ``qom-list`` from a dict of path -> [(name, type)], and
    counting how many requests were in flight at once."""

    def __init__(self, tree: dict[str, list[tuple[str, str]]]) -> None:
        self.tree = tree
        self.in_flight = 0
        self.most_in_flight = 0
        self.requests: list[str] = []

    async def execute(self, command: str, args: dict[str, Any]) -> list[dict[str, str]]:
        assert command == "qom-list"
        self.requests.append(args["path"])
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0)  # the reply comes later, as over a socket
        self.in_flight -= 1
        children = self.tree.get(args["path"], [])
        return [{"name": "type", "type": "string"},
                *({"name": n, "type": f"child<{t}>"} for n, t in children)]


def sequential_walk(tree: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """The reference: one request at a time, breadth first."""
    found, queue = [], ["/machine"]
    while queue:
        path = queue.pop(0)
        for name, qom_type in tree.get(path, []):
            found.append((f"{path}/{name}", qom_type))
            if qom_type not in devtree.LEAF_TYPES:
                queue.append(f"{path}/{name}")
    return found


def wide_tree(width: int) -> dict[str, list[tuple[str, str]]]:
    tree: dict[str, list[tuple[str, str]]] = {
        "/machine": [("peripheral", "container"), ("unattached", "container")],
        "/machine/peripheral": [("vsock0", "vhost-user-vsock-pci")],
        "/machine/peripheral/vsock0": [("virtio-backend", "vhost-user-vsock-device"),
                                       ("bus master[0]", "memory-region")],
        "/machine/unattached": [(f"device[{i}]", "pcie-root-port") for i in range(width)],
    }
    for i in range(width):
        tree[f"/machine/unattached/device[{i}]"] = [(f"bus{i}", "PCIE")]
    return tree


def test_the_walk_finds_what_a_sequential_walk_finds_in_the_same_order() -> None:
    tree = wide_tree(150)
    qmp = TreeQMP(tree)
    devices = asyncio.run(walk_devices(qmp))  # type: ignore[arg-type]
    assert [(d.path, d.type) for d in devices] == sequential_walk(tree)
    assert any(d.channel == "vsock" for d in devices)
    assert "/machine/peripheral/vsock0/bus master[0]" not in qmp.requests  # a leaf type


def test_one_level_is_requested_in_batches_not_one_by_one() -> None:
    qmp = TreeQMP(wide_tree(150))
    asyncio.run(walk_devices(qmp))  # type: ignore[arg-type]
    assert qmp.most_in_flight == devtree.QOM_BATCH


def test_the_walk_stops_near_the_node_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devtree, "MAX_QOM_NODES", 100)
    qmp = TreeQMP(wide_tree(400))
    devices = asyncio.run(walk_devices(qmp))  # type: ignore[arg-type]
    # the bound is checked before each batch: the 400 children of one node all count,
    # and none of them is read
    assert len(devices) == 403
    assert not any(path.startswith("/machine/unattached/device") for path in qmp.requests)


def test_only_a_named_peripheral_has_a_device_id() -> None:
    from secvf.runtime.devtree import LiveDevice

    assert LiveDevice("/machine/peripheral/vsock0", "vhost-user-vsock-pci").device_id == "vsock0"
    assert LiveDevice("/machine/peripheral-anon/device[0]", "virtio-rng-pci").device_id is None
    assert LiveDevice("/machine/peripheral/vsock0/virtio-backend", "x").device_id is None
