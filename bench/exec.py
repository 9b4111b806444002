"""Exec benchmark: SecVF's exec channel vs SSH and the QEMU guest agent's guest-exec.

SecVF side (one sandbox, ``secvf sandbox create/start``):

* create → first exec: wall time of ``secvf sandbox create`` + ``secvf sandbox start`` +
  ``secvf vm exec NAME -- true`` (the CLI a user runs);
* ``true`` round trip with the SDK (``ExecClient``): one connection per call (connect +
  handshake + run, as ``secvf vm exec`` does) and calls on one open connection; plus the
  CLI ``secvf vm exec NAME -- true`` (includes Python start-up), fewer runs;
* 64 MiB of stdout (``head -c 64M /dev/zero``), counted on the host.

Against the guest's own floor (issue 11), same run, same sandbox: the fastest the guest
starts and reaps ``/bin/true`` by itself (``subprocess.run``, which vforks, from a Python
process already running as that user: ``guest_servers.py spawn-floor``), as the default
user and as root, in batches interleaved with the SDK round trips on one open connection
as each user; and the CLI's host overhead, ``secvf vm exec NAME -- true`` minus the SDK
call it makes (a new connection per call), the two alternated.

Throughput against the raw channel (issue 11), same run, same sandbox: the raw vsock bulk
rate both ways, measured as ``bench/vsock.py`` does (``guest_servers.py`` sink and source
behind the hybrid socket's ``CONNECT <port>``), beside exec stdout (``head -c 64M``) and
exec stdin (64 MiB from the SDK into ``wc -c``), each through the exec bridge like any SDK
call, and the guest's own pipe floor (``head -c 64M`` read through a pipe by Python inside
the guest, no vsock). The four transfers interleave, ``THROUGHPUT_REPEATS`` times; medians.
``--only throughput`` runs just this part (no baseline guest, ~1 min).

Baseline, same run, same kernel/initrd/accelerator: plain QEMU of a Debian systemd guest
with OpenSSH (key auth, hostfwd) and qemu-guest-agent (virtio-serial, JSON on a Unix
socket). create → first exec: ``qemu-img create`` + QEMU start until ``ssh root@ true``
succeeds, and until ``guest-exec /bin/true`` succeeds (both probed at once in one boot).
``ssh true`` runs through a ControlMaster connection (a fresh ssh handshake costs
seconds under TCG; a few fresh ones are timed too). ``guest-exec`` polls
``guest-exec-status`` every 2 ms. guest-exec caps captured output at 16 MiB, so its
64 MiB is four 16 MiB calls.

    .venv/bin/python bench/exec.py [--runs N] [--only throughput]
                                                  (default 200 round trips per method)
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import baseline_image
import benchlib as bl
import vsock as vsock_bench

from secvf.exec.client import ExecClient
from secvf.image import build_image
from secvf.workflows.vm_exec import exec_socket_for

BULK = 64 << 20
QGA_CAP = 16 << 20
BULK_REPEATS = 3
CLI_RUNS = 20
FRESH_SSH_RUNS = 5
THROUGHPUT_REPEATS = 3
#: The spawn floor and the round trips run in this many interleaved batches.
FLOOR_BATCHES = 10
#: issue 11's targets: the SDK round trip against the guest's own spawn floor (p50, p99)
RTT_P50_TARGET, RTT_P99_TARGET = 1.25, 2.0
#: issue 11's target: `vm exec` wall time minus the SDK call it makes, in seconds
CLI_OVERHEAD_TARGET_S = 0.060
#: issue 11's targets: exec stdout and stdin against the raw vsock rate of the same run
STDOUT_TARGET, STDIN_TARGET = 0.7, 0.5


def secvf_side(runs: int, only_throughput: bool = False) -> dict[str, list[float]]:
    """All SecVF measurements on one sandbox (only the throughput part if asked)."""
    name = "execbench"
    out: dict[str, list[float]] = {}
    begin = time.monotonic()
    bl.secvf("sandbox", "create", name, "--accel", bl.ACCEL)
    bl.secvf("sandbox", "start", name, "--timeout", "180")
    bl.secvf("vm", "exec", name, "--", "true")
    out["create_first"] = [time.monotonic() - begin]
    if not only_throughput:
        out |= _round_trips(name, runs)
    out |= throughput(name)
    bl.secvf("vm", "stop", name, "--force")
    return out


def throughput(name: str) -> dict[str, list[float]]:
    """Raw vsock both ways, exec stdout, exec stdin and the guest pipe floor, interleaved;
    seconds per 64 MiB (the floor: MB/s as the guest measured it)."""
    dial, _ = vsock_bench.start_guest_servers(name)
    out: dict[str, list[float]] = {"raw_to_guest": [], "raw_from_guest": [], "bulk": [],
                                   "stdin": [], "pipe_floor_mbs": []}  # fmt: skip
    with ExecClient.connect(exec_socket_for(name)) as client:
        for _ in range(THROUGHPUT_REPEATS):
            out["raw_to_guest"].append(bl.timed(lambda: vsock_bench.send_to_sink(dial, BULK)))
            out["raw_from_guest"].append(bl.timed(lambda: vsock_bench.read_from_source(dial, BULK)))
            out["bulk"].append(bl.timed(lambda: _secvf_bulk(client)))
            out["stdin"].append(bl.timed(lambda: _secvf_stdin(client)))
            floor = client.run(["python3", "/tmp/guest_servers.py", "pipe-floor", str(BULK)])
            if floor.exit_code != 0:
                raise RuntimeError(f"pipe floor: {floor.stderr.decode(errors='replace')}")
            out["pipe_floor_mbs"].append(float(floor.stdout.split()[1]))
    return out


def _secvf_stdin(client: ExecClient) -> None:
    result = client.run(["wc", "-c"], stdin=bytes(BULK))
    if result.exit_code != 0 or result.stdout.strip() != str(BULK).encode():
        raise RuntimeError(f"SecVF stdin: wc -c said {result.stdout!r}, exit {result.exit_code}")


def _round_trips(name: str, runs: int) -> dict[str, list[float]]:
    """``true`` round trips (SDK: fresh and reused connection, as the default user and as
    root; CLI) and the guest's own spawn floor for both users, in interleaved batches."""
    path = exec_socket_for(name)
    vsock_bench.upload_guest_servers(name)
    out: dict[str, list[float]] = {key: [] for key in (
        "fresh", "reused", "reused_root", "floor", "floor_root", "cli", "cli_sdk")}

    def fresh() -> None:
        with ExecClient.connect(path) as client:
            client.run(["true"])

    batch = max(1, runs // FLOOR_BATCHES)
    with ExecClient.connect(path) as client:
        for _ in range(FLOOR_BATCHES):  # interleaved, so load drifts hit all alike
            out["floor"] += _spawn_floor(client, batch, None)
            out["floor_root"] += _spawn_floor(client, batch, "root")
            for _ in range(batch):
                out["fresh"].append(bl.timed(fresh))
                out["reused"].append(bl.timed(lambda: client.run(["true"])))
                out["reused_root"].append(bl.timed(lambda: client.run(["true"], user="root")))
    for _ in range(CLI_RUNS):  # the CLI beside the call it makes, for its host overhead
        out["cli"].append(bl.secvf("vm", "exec", name, "--", "true")[0])
        out["cli_sdk"].append(bl.timed(fresh))
    return out


def _spawn_floor(client: ExecClient, runs: int, user: str | None) -> list[float]:
    """Seconds per ``/bin/true`` started and reaped by Python inside the guest as ``user``
    (None: the agent's default user), ``runs`` of them."""
    result = client.run(["python3", "/tmp/guest_servers.py", "spawn-floor", str(runs)],
                        user=user)  # fmt: skip
    words = result.stdout.split()
    if result.exit_code != 0 or words[:1] != [b"spawn-floor"]:
        raise RuntimeError(f"spawn floor: {result.stderr.decode(errors='replace')}")
    return [float(ms) / 1000 for ms in words[1:]]


def _secvf_bulk(client: ExecClient) -> None:
    received = 0

    def count(chunk: bytes) -> None:
        nonlocal received
        received += len(chunk)

    result = client.run(["head", "-c", str(BULK), "/dev/zero"], on_stdout=count,
                        max_output_bytes=1)  # fmt: skip
    if received != BULK or result.exit_code != 0:
        raise RuntimeError(f"SecVF bulk: got {received} bytes, exit {result.exit_code}")


def baseline_side(workdir: Path, runs: int) -> tuple[dict[str, list[float]], str]:
    """All SSH and guest-agent measurements on one plain-QEMU systemd guest."""
    base = build_image("base")
    disk = baseline_image.systemd_disk(base, progress=bl.log)
    pubkey = bl.SSH.make_key(workdir)
    append = f"{base.cmdline} {baseline_image.authkey_param(pubkey)}"
    out: dict[str, list[float]] = {}
    begin = time.monotonic()
    vm = bl.PlainVM(workdir, base.kernel, base.initrd, disk.rootfs, append=append,
                    forwards=(22,), qga=True)  # fmt: skip
    ssh = bl.SSH(workdir, vm.ports[22])
    try:
        assert vm.qga_socket is not None
        agent = bl.GuestAgent(vm.qga_socket)
        firsts = _first_exec_both(ssh, agent, begin)
        out["ssh_create_first"], out["qga_create_first"] = [firsts[0]], [firsts[1]]
        out["ssh_fresh"] = [bl.timed(lambda: _check(ssh, "true")) for _ in range(FRESH_SSH_RUNS)]
        ssh.start_master()
        out["ssh"] = [bl.timed(lambda: _check(ssh, "true")) for _ in range(runs)]
        out["ssh_bulk"] = [bl.timed(lambda: _ssh_bulk(ssh)) for _ in range(BULK_REPEATS)]
        ssh.stop_master()
        out["qga"] = [bl.timed(lambda: _qga_true(agent)) for _ in range(runs)]
        out["qga_bulk"] = [bl.timed(lambda: _qga_bulk(agent))]
        agent.close()
    finally:
        ssh.stop_master()  # a no-op if it never started
        vm.stop()
    return out, disk.short


def _first_exec_both(ssh: bl.SSH, agent: bl.GuestAgent, begin: float) -> tuple[float, float]:
    """Probe SSH and the guest agent at the same time; seconds from ``begin`` for each."""
    found: dict[str, float] = {}

    def probe_ssh() -> None:
        found["ssh"] = ssh.wait_true(240, begin)

    def probe_qga() -> None:
        agent.wait_ready(240, begin)
        _qga_true(agent)
        found["qga"] = time.monotonic() - begin

    threads = [threading.Thread(target=probe_ssh), threading.Thread(target=probe_qga)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if set(found) != {"ssh", "qga"}:
        raise RuntimeError(f"baseline guest never answered on: { ({'ssh', 'qga'} - set(found)) }")
    return found["ssh"], found["qga"]


def _check(ssh: bl.SSH, *command: str) -> None:
    if ssh.run(*command) != 0:
        raise RuntimeError(f"ssh {' '.join(command)} failed")


def _ssh_bulk(ssh: bl.SSH) -> None:
    proc = subprocess.Popen(ssh.argv("head", "-c", str(BULK), "/dev/zero"),
                            stdout=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    received = 0
    while chunk := proc.stdout.read(1 << 20):
        received += len(chunk)
    if proc.wait() != 0 or received != BULK:
        raise RuntimeError(f"ssh bulk: got {received} bytes, exit {proc.returncode}")


def _qga_true(agent: bl.GuestAgent) -> None:
    status = agent.exec("/bin/true")
    if status.get("exitcode") != 0:
        raise RuntimeError(f"guest-exec /bin/true: {status}")


def _qga_bulk(agent: bl.GuestAgent) -> None:
    for _ in range(BULK // QGA_CAP):
        status = agent.exec("/usr/bin/head", ["-c", str(QGA_CAP), "/dev/zero"])
        if len(status["stdout"]) != QGA_CAP or status.get("out-truncated"):
            raise RuntimeError(f"guest-exec head: {len(status['stdout'])} bytes")


def ms_pct(values: list[float], pct: float) -> float:
    """Percentile in milliseconds."""
    return bl.percentile(values, pct) * 1000


def add_throughput_rows(rep: bl.Report, sec: dict[str, list[float]]) -> None:
    """Exec stdout/stdin against the raw vsock rate of the same run (issue 11)."""
    n = len(sec["bulk"])
    raw_from = BULK / bl.median(sec["raw_from_guest"]) / 1e6
    raw_to = BULK / bl.median(sec["raw_to_guest"]) / 1e6
    floor = bl.median(sec["pipe_floor_mbs"])
    for metric, key, raw, raw_name, target in (
        ("exec stdout, 64 MiB of `head -c` (SDK, via the bridge)", "bulk", raw_from,
         "raw vsock guest→host, 64 MiB (guest_servers source)", STDOUT_TARGET),
        ("exec stdin, 64 MiB into `wc -c` (SDK, via the bridge)", "stdin", raw_to,
         "raw vsock host→guest, 64 MiB (guest_servers sink)", STDIN_TARGET),
    ):  # fmt: skip
        mbs = BULK / bl.median(sec[key]) / 1e6
        rep.add(bl.Row(f"{metric}, median of {n}",
                       bl.spread([BULK / t / 1e6 for t in sec[key]], "MB/s", 1),
                       raw_name, f"{raw:.1f} MB/s", f"{mbs / raw:.2f}× raw",
                       f"target ≥ {target}× raw"))  # fmt: skip
    rep.add(bl.Row(f"guest pipe floor: `head -c 64M` read through a 1 MiB pipe by Python in "
                   f"the guest, median of {n}", f"{floor:.1f} MB/s",
                   "raw vsock guest→host", f"{raw_from:.1f} MB/s", f"{floor / raw_from:.2f}× raw",
                   "no vsock, no agent: exec stdout cannot beat this"))  # fmt: skip


def add_floor_rows(rep: bl.Report, sec: dict[str, list[float]]) -> None:
    """Round trips against the guest's own spawn floor, and the CLI's host overhead
    (issue 11's targets)."""
    for user, floor_key, rtt_key in (("agent", "floor", "reused"),
                                     ("root", "floor_root", "reused_root")):  # fmt: skip
        floor = bl.median(sec[floor_key])
        rep.add(bl.Row(f"guest spawn floor as {user}: `/bin/true` by `subprocess.run` in the "
                       f"guest, p50 / p99 (n={len(sec[floor_key])})",
                       f"{floor * 1000:.1f} / {ms_pct(sec[floor_key], 99):.1f} ms", "", "", "",
                       "no agent, no vsock: a round trip cannot beat this"))  # fmt: skip
        for label, pct, target in (("p50", 50, RTT_P50_TARGET), ("p99", 99, RTT_P99_TARGET)):
            rtt = ms_pct(sec[rtt_key], pct)
            rep.add(bl.Row(f"`true` round trip {label} as {user}, SDK, one open connection "
                           f"(n={len(sec[rtt_key])})", f"{rtt:.1f} ms",
                           f"guest spawn floor p50 as {user}", f"{floor * 1000:.1f} ms",
                           f"{rtt / (floor * 1000):.2f}× floor",
                           f"target ≤ {target}× floor"))  # fmt: skip
    cli, sdk = bl.median(sec["cli"]), bl.median(sec["cli_sdk"])
    rep.add(bl.Row(f"`secvf vm exec NAME -- true` host overhead: CLI median minus the SDK "
                   f"call it makes (new connection), alternated (n={len(sec['cli'])})",
                   f"{(cli - sdk) * 1000:.0f} ms", "SDK `true`, new connection",
                   f"{sdk * 1000:.1f} ms", f"CLI {cli * 1000:.0f} ms",
                   f"target ≤ {CLI_OVERHEAD_TARGET_S * 1000:.0f} ms"))  # fmt: skip


def add_rows(rep: bl.Report, sec: dict[str, list[float]], base: dict[str, list[float]]) -> None:
    """The result rows."""
    ssh_name, qga_name = "SSH (ControlMaster)", "qemu-guest-agent guest-exec"
    for label, pct in (("p50", 50), ("p99", 99)):
        s = ms_pct(sec["fresh"], pct)
        for bname, key in ((ssh_name, "ssh"), (qga_name, "qga")):
            b = ms_pct(base[key], pct)
            rep.add(bl.Row(f"`true` round trip {label}, SDK, new connection per call "
                           f"(n={len(sec['fresh'])})", f"{s:.1f} ms", bname, f"{b:.1f} ms",
                           bl.ratio(s, b)))  # fmt: skip
    for label, pct in (("p50", 50), ("p99", 99)):
        s = ms_pct(sec["reused"], pct)
        b = ms_pct(base["ssh"], pct)
        rep.add(bl.Row(f"`true` round trip {label}, SDK, one open connection", f"{s:.1f} ms",
                       ssh_name, f"{b:.1f} ms", bl.ratio(s, b)))  # fmt: skip
    cli, fresh_ssh = bl.median(sec["cli"]), bl.median(base["ssh_fresh"])
    rep.add(bl.Row(f"`true` via CLI `secvf vm exec` median (n={len(sec['cli'])})",
                   f"{cli * 1000:.0f} ms", f"fresh `ssh root@ true`, no ControlMaster "
                   f"(n={len(base['ssh_fresh'])})", f"{fresh_ssh * 1000:.0f} ms",
                   bl.ratio(cli, fresh_ssh), "both include a client process start"))  # fmt: skip
    s_mbs = BULK / bl.median(sec["bulk"]) / 1e6
    b_mbs = BULK / bl.median(base["ssh_bulk"]) / 1e6
    q_mbs = BULK / bl.median(base["qga_bulk"]) / 1e6
    rep.add(bl.Row(f"64 MiB stdout (median of {len(sec['bulk'])})",
                   f"{bl.median(sec['bulk']):.2f} s = {s_mbs:.1f} MB/s", ssh_name,
                   f"{bl.median(base['ssh_bulk']):.2f} s = {b_mbs:.1f} MB/s",
                   bl.ratio(s_mbs, b_mbs, higher_is_better=True)))  # fmt: skip
    rep.add(bl.Row("", "", f"{qga_name} (4 × 16 MiB, n=1)",
                   f"{bl.median(base['qga_bulk']):.2f} s = {q_mbs:.1f} MB/s",
                   bl.ratio(s_mbs, q_mbs, higher_is_better=True),
                   "guest-exec caps captured output at 16 MiB"))  # fmt: skip
    s_first = sec["create_first"][0]
    rep.add(bl.Row("create → first successful exec (n=1)", f"{s_first:.2f} s",
                   "qemu-img + QEMU → first `ssh root@ true`",
                   f"{base['ssh_create_first'][0]:.2f} s",
                   bl.ratio(s_first, base["ssh_create_first"][0]),
                   "SecVF: sandbox create + start + vm exec (CLI)"))  # fmt: skip
    rep.add(bl.Row("", "", "qemu-img + QEMU → first guest-exec OK",
                   f"{base['qga_create_first'][0]:.2f} s",
                   bl.ratio(s_first, base["qga_create_first"][0])))  # fmt: skip


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        choices=["throughput"],
        help="run only this part (throughput: raw vsock vs exec stdout/stdin)",
    )


def main() -> None:
    args = bl.parse_args(__doc__.splitlines()[0], 200, _options)
    only = args.only == "throughput"
    command = f"bench/exec.py --runs {args.runs}" + (" --only throughput" if only else "")
    rep = bl.Report("exec: SecVF exec channel vs SSH and QEMU guest agent", command)
    base_image, sandbox = build_image("base"), build_image("sandbox")
    with bl.private_secvf() as root:
        bl.log("SecVF sandbox")
        sec = secvf_side(args.runs, only)
        if not only:
            bl.log("baseline: systemd guest with sshd + qemu-guest-agent (plain QEMU)")
            base, disk_key = baseline_side(Path(tempfile.mkdtemp(dir=root)), args.runs)
    rep.facts.update({
        "guest": f"1 vCPU, {bl.GUEST_MEMORY_MIB} MiB, -cpu max, q35; kernel "
                 f"{sandbox.kernel_version}; the guests ran one after the other",
        "images": f"sandbox {sandbox.short_hash}" + ("" if only else
                  f"; baseline systemd-{disk_key} (vmlinuz + initrd.img of base "
                  f"{base_image.short_hash})"),
        "guest users": "SecVF: unprivileged 'agent' (default); SSH and guest-exec: root",
    })  # fmt: skip
    add_throughput_rows(rep, sec)
    if not only:
        add_floor_rows(rep, sec)
        add_rows(rep, sec, base)
    rep.notes += ["Ratios: '× faster'/'× higher' = SecVF better; '× slower'/'× lower' = worse."]
    rep.print()


if __name__ == "__main__":
    main()
