"""Measure packet decoding (SecVF's dpkt decoder, and scapy's if installed) and the
filter language (compile once, evaluate per packet).

    python -m bench.filters            # from the repository root

scapy is not a dependency: run this with a Python where it is installed to compare
(``pip install scapy`` in a scratch venv, with SecVF's source on PYTHONPATH). The
numbers in docs/packets.md come from this script.
"""

from __future__ import annotations

import subprocess
import sys
import time

from secvf.net.decode import decode
from secvf.net.filters import PRESETS, compile_filter
from tests.unit.test_packets_decode import FRAMES

ROUNDS = 2000
FILTER = 'dns.qry.name contains "example" or (tcp.port in {80 443} and tls.sni) or arp'


def per_call_us(fn, items, rounds=ROUNDS):
    start = time.perf_counter()
    for _ in range(rounds):
        for item in items:
            fn(item)
    return (time.perf_counter() - start) / (rounds * len(items)) * 1e6


def import_ms(module):
    probe = f"import time; t = time.perf_counter(); import {module}; " \
            "print((time.perf_counter() - t) * 1000)"
    runs = [float(subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                 text=True, check=True).stdout) for _ in range(3)]
    return min(runs)


def main():
    frames = list(FRAMES.values())
    print(f"frames: {len(frames)} kinds ({', '.join(FRAMES)})")
    print(f"secvf decode (dpkt): {per_call_us(lambda f: decode(0.0, 'vm', f), frames):.1f} "
          "us/frame")
    hostile = [f[: len(f) // 2] for f in frames]
    print(f"secvf decode, frames cut in half: "
          f"{per_call_us(lambda f: decode(0.0, 'vm', f), hostile):.1f} us/frame")
    print(f"import dpkt: {import_ms('dpkt'):.0f} ms")
    try:
        from scapy.layers.l2 import Ether
    except ImportError:
        print("scapy: not installed here")
    else:
        def scapy_decode(frame):
            packet = Ether(frame)
            packet.summary()
        print(f"scapy Ether(frame) + summary(): {per_call_us(scapy_decode, frames, 200):.1f}"
              " us/frame")
        print(f"scapy, frames cut in half: {per_call_us(scapy_decode, hostile, 200):.1f} "
              "us/frame")
        print(f"import scapy.all: {import_ms('scapy.all'):.0f} ms")
    packets = [decode(0.0, "vm", f) for f in frames]
    start = time.perf_counter()
    for _ in range(200):
        compile_filter(FILTER)
    print(f"compile a {len(FILTER)}-char filter: "
          f"{(time.perf_counter() - start) / 200 * 1e6:.0f} us")
    match = compile_filter(FILTER)
    print(f"evaluate it: {per_call_us(match, packets):.2f} us/packet")
    every = [compile_filter(p.expression) for p in PRESETS]
    print(f"evaluate all {len(every)} presets: "
          f"{per_call_us(lambda p: [m(p) for m in every], packets, 500):.1f} us/packet")


if __name__ == "__main__":
    main()
