"""Guest-side servers for bench/vsock.py (stdlib only; runs inside the guest).

``python3 guest_servers.py [vsock|tcp]`` (default ``tcp``) listens on three ports:

* 5000 echo   — sends back every byte it receives;
* 5001 sink   — reads until EOF, then sends the byte count as 8 bytes (big-endian);
* 5002 source — reads an 8-byte length, sends that many bytes, then closes.

``python3 guest_servers.py pipe-floor N`` instead prints how fast ``head -c N /dev/zero``
reaches this process through a pipe grown to 1 MiB and read 1 MiB at a time (what the
exec agent does with a command's stdout), as ``pipe-floor <MB/s>``: the guest's own
limit for a command's output before any byte leaves the guest.

``python3 guest_servers.py spawn-floor N`` runs ``/bin/true`` N times the fastest way the
standard library has (``subprocess.run``, which vforks), as whoever runs it, and prints
each run's milliseconds on one line after ``spawn-floor``: the guest's own cost of
starting and reaping a command, the floor under an exec round trip.

In ``vsock`` mode it listens on AF_VSOCK (any CID); in ``tcp`` mode on 0.0.0.0. The TCP
baseline disk runs this file in place of the exec agent, so the guest's init starts it.
"""

import fcntl
import os
import socket
import struct
import subprocess
import sys
import threading
import time

ECHO_PORT, SINK_PORT, SOURCE_PORT = 5000, 5001, 5002
CHUNK = 256 * 1024
ZEROS = bytes(CHUNK)


def echo(conn):
    while True:
        data = conn.recv(CHUNK)
        if not data:
            return
        conn.sendall(data)


def sink(conn):
    total = 0
    while True:
        data = conn.recv(CHUNK)
        if not data:
            break
        total += len(data)
    conn.sendall(struct.pack(">Q", total))


def source(conn):
    header = b""
    while len(header) < 8:
        data = conn.recv(8 - len(header))
        if not data:
            return
        header += data
    left = struct.unpack(">Q", header)[0]
    view = memoryview(ZEROS)
    while left:
        n = conn.send(view[: min(left, CHUNK)])
        left -= n


def serve(listener, handler):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=run_one, args=(conn, handler), daemon=True).start()


def run_one(conn, handler):
    try:
        if conn.family == socket.AF_INET:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handler(conn)
    except OSError:
        pass
    finally:
        conn.close()


def listen(mode, port):
    if mode == "vsock":
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.bind((socket.VMADDR_CID_ANY, port))
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
    s.listen(64)
    return s


def pipe_floor(nbytes):
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, 1 << 20)
    buffer = bytearray(1 << 20)
    begin = time.perf_counter()
    proc = subprocess.Popen(["head", "-c", str(nbytes), "/dev/zero"], stdout=write_fd)
    os.close(write_fd)
    got = 0
    while n := os.readv(read_fd, [buffer]):
        got += n
    proc.wait()
    elapsed = time.perf_counter() - begin
    if got != nbytes:
        sys.exit(f"pipe-floor: read {got} bytes, expected {nbytes}")
    print(f"pipe-floor {nbytes / elapsed / 1e6:.1f}")


def spawn_floor(runs):
    subprocess.run(["/bin/true"], check=True)  # page cache and allocator warm
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        subprocess.run(["/bin/true"], check=True)
        times.append((time.perf_counter() - begin) * 1000)
    print("spawn-floor", " ".join(f"{t:.3f}" for t in times))


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "tcp"
    if mode == "pipe-floor":
        pipe_floor(int(sys.argv[2]))
        return
    if mode == "spawn-floor":
        spawn_floor(int(sys.argv[2]))
        return
    handlers = {ECHO_PORT: echo, SINK_PORT: sink, SOURCE_PORT: source}
    threads = [
        threading.Thread(target=serve, args=(listen(mode, p), h), daemon=True)
        for p, h in handlers.items()
    ]
    for t in threads:
        t.start()
    print(f"guest_servers: listening ({mode})", flush=True)
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
