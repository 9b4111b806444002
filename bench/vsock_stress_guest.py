"""Guest side of bench/vsock_stress.py (stdlib only; runs inside the guest as PID 1's agent).

The stress benchmark writes this file over the exec agent's path in a copy of the sandbox
disk, so the guest init starts it at every boot (and restarts it if it exits). It listens
on AF_VSOCK port :data:`CONTROL_PORT`; each connection carries one command line:

* ``PING``          -> ``PONG <boot id>``
* ``LISTEN <port>`` -> a *new* listener on ``<port>`` is bound, then ``LISTENING <port>``;
  it accepts one connection, echoes every byte until EOF, and is closed.
* ``REBOOT``        -> ``REBOOTING``, then ``echo b > /proc/sysrq-trigger`` (no shutdown,
  the way a crashed or reset guest reboots).
"""

import socket
import sys
import threading
import time

CONTROL_PORT = 5100
CHUNK = 256 * 1024
LISTEN_TIMEOUT_S = 60.0


def boot_id():
    with open("/proc/sys/kernel/random/boot_id") as fh:
        return fh.read().strip()


def echo_once(listener):
    listener.settimeout(LISTEN_TIMEOUT_S)
    try:
        conn, _ = listener.accept()
    except OSError:
        listener.close()
        return
    listener.close()
    conn.settimeout(None)
    try:
        while True:
            data = conn.recv(CHUNK)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        conn.close()


def handle(conn):
    line = b""
    while not line.endswith(b"\n") and len(line) < 64:
        byte = conn.recv(1)
        if not byte:
            return
        line += byte
    words = line.decode(errors="replace").split()
    if words == ["PING"]:
        conn.sendall(f"PONG {boot_id()}\n".encode())
    elif len(words) == 2 and words[0] == "LISTEN" and words[1].isdigit():
        port = int(words[1])
        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        listener.bind((socket.VMADDR_CID_ANY, port))
        listener.listen(1)
        threading.Thread(target=echo_once, args=(listener,), daemon=True).start()
        conn.sendall(f"LISTENING {port}\n".encode())
    elif words == ["REBOOT"]:
        conn.sendall(b"REBOOTING\n")
        conn.close()
        time.sleep(0.2)
        with open("/proc/sysrq-trigger", "w") as fh:
            fh.write("b")
    else:
        conn.sendall(b"ERROR\n")


def run_one(conn):
    try:
        handle(conn)
    except OSError as exc:
        print(f"stress-guest: {exc}", flush=True)
    finally:
        conn.close()


def main():
    control = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    control.bind((socket.VMADDR_CID_ANY, CONTROL_PORT))
    control.listen(16)
    print(f"stress-guest: listening on {CONTROL_PORT}, boot {boot_id()}", flush=True)
    while True:
        conn, _ = control.accept()
        threading.Thread(target=run_one, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
