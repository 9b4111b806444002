"""Boot benchmark: SecVF guests to ready vs the same kernel booting Debian with systemd.

Per run (runs interleave the four kinds, so host load drifts hit all of them alike):

* SecVF ``base``: ``secvf vm create`` (not timed), then ``secvf vm start --wait-ready``
  timed by the wall clock around the CLI (supervisor, QEMU, guest to ``SECVF-READY``).
* SecVF sandbox: ``secvf sandbox create`` (not timed), then ``secvf sandbox start``, which
  returns once the guest agent answers through the exec socket (``vm exec`` works).
* Baseline: plain QEMU (our command line, same vmlinuz + initrd, same -cpu/-m/-smp), a
  Debian rootfs with systemd, sshd and qemu-guest-agent: QEMU start → multi-user.target
  marker on the console, → SSH banner on the hostfwd port, → first ``ssh root@ true`` OK.
* Reference: plain QEMU of the ``base`` image itself (SecVF's init, no SecVF host
  processes): QEMU start → ``SECVF-READY``; shows what the CLI/supervisor add.

    .venv/bin/python bench/boot.py [--runs N]     (default 5)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import baseline_image
import benchlib as bl

from secvf.image import READY_MARKER, build_image


def secvf_base_boot(i: int) -> float:
    """``secvf vm start --wait-ready`` of a fresh VM from the base image."""
    name = f"boot{i}"
    bl.secvf("vm", "create", name, "--image", "base", "--accel", bl.ACCEL)
    try:
        elapsed, _ = bl.secvf("vm", "start", name, "--wait-ready", "180")
    finally:
        bl.secvf("vm", "delete", name, "--force")
    return elapsed


def secvf_sandbox_boot(i: int) -> float:
    """``secvf sandbox start`` of a fresh sandbox (returns when exec works)."""
    name = f"sbx{i}"
    bl.secvf("sandbox", "create", name, "--accel", bl.ACCEL)
    try:
        elapsed, _ = bl.secvf("sandbox", "start", name, "--timeout", "180")
    finally:
        bl.secvf("sandbox", "rm", name, "--purge")
    return elapsed


def systemd_boot(workdir: Path, base, disk, pubkey: str) -> tuple[float, float, float]:
    """Plain QEMU, systemd guest: (multi-user marker, SSH banner, first ssh true)."""
    append = f"{base.cmdline} {baseline_image.authkey_param(pubkey)}"
    with bl.PlainVM(
        workdir, base.kernel, base.initrd, disk.rootfs, append=append, forwards=(22,)
    ) as vm:
        multi_user = vm.wait_line(baseline_image.MULTI_USER_MARKER, 240)
        banner = bl.wait_ssh_banner(vm.ports[22], 240, vm.started)
        first_ssh = bl.SSH(workdir, vm.ports[22]).wait_true(240, vm.started)
    return multi_user, banner, first_ssh


def plain_base_boot(workdir: Path, base) -> float:
    """Plain QEMU of the base image: QEMU start → SECVF-READY."""
    with bl.PlainVM(
        workdir,
        base.kernel,
        base.initrd,
        base.rootfs,
        append=f"{base.cmdline} {bl.NAT_NIC_PARAM}",
        name="plainbase",
    ) as vm:
        return vm.wait_line(READY_MARKER, 120)


def main() -> None:
    args = bl.parse_args(__doc__.splitlines()[0], 5)
    base, sandbox = build_image("base"), build_image("sandbox")
    disk = baseline_image.systemd_disk(base, progress=bl.log)
    results: dict[str, list[float]] = {
        k: [] for k in ("base", "sandbox", "multi", "banner", "ssh", "plain")
    }
    rep = bl.Report("boot: QEMU start → guest ready", f"bench/boot.py --runs {args.runs}")
    with bl.private_secvf() as root:
        workdir = Path(tempfile.mkdtemp(dir=root))
        pubkey = bl.SSH.make_key(workdir)
        for i in range(args.runs):
            bl.log(f"run {i + 1}/{args.runs}")
            results["base"].append(secvf_base_boot(i))
            results["sandbox"].append(secvf_sandbox_boot(i))
            multi, banner, ssh = systemd_boot(workdir, base, disk, pubkey)
            results["multi"].append(multi)
            results["banner"].append(banner)
            results["ssh"].append(ssh)
            results["plain"].append(plain_base_boot(workdir, base))
            bl.log("  " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in results.items()))
    rep.facts.update(
        {
            "guest": f"1 vCPU, {bl.GUEST_MEMORY_MIB} MiB, -cpu max, q35, virtio-blk qcow2 overlay, "
            f"user networking; kernel {base.kernel_version}",
            "images": f"base {base.short_hash}, sandbox {sandbox.short_hash}, "
            f"baseline systemd-{disk.short} (vmlinuz + initrd.img of base)",
            "values": "median (min–max, n) of wall seconds; a fresh overlay every run",
        }
    )
    med = {k: bl.median(v) for k, v in results.items()}
    multi_name = "systemd guest: multi-user.target marker"
    rep.add(
        bl.Row(
            "base image: secvf vm start --wait-ready → SECVF-READY",
            bl.spread(results["base"]),
            multi_name,
            bl.spread(results["multi"]),
            bl.ratio(med["base"], med["multi"]),
            "CLI wall time: includes Python start-up",
        )
    )
    rep.add(
        bl.Row(
            "",
            "",
            "systemd guest: SSH banner on hostfwd port",
            bl.spread(results["banner"]),
            bl.ratio(med["base"], med["banner"]),
        )
    )
    rep.add(
        bl.Row(
            "sandbox: secvf sandbox start → exec works",
            bl.spread(results["sandbox"]),
            "systemd guest: first `ssh root@ true` OK",
            bl.spread(results["ssh"]),
            bl.ratio(med["sandbox"], med["ssh"]),
            "sandbox adds vsock backend, virtiofsd, agent ping",
        )
    )
    rep.add(
        bl.Row(
            "reference: plain QEMU, base image → SECVF-READY",
            bl.spread(results["plain"]),
            multi_name,
            bl.spread(results["multi"]),
            bl.ratio(med["plain"], med["multi"]),
            "no SecVF host processes: the guest's own boot time",
        )
    )
    rep.notes += [
        "The baseline is booted by plain QEMU with the same kernel, initramfs, CPU model, RAM "
        "and devices (plus a hostfwd port); its /sbin/secvf-init execs systemd.",
        "A stock Debian cloud image would be slower still (initramfs-tools, cloud-init).",
    ]
    rep.print()


if __name__ == "__main__":
    main()
