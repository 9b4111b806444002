#!/bin/busybox sh
# /init of SecVF's busybox initramfs (built by secvf.image.initramfs).
#
# Loads the modules listed in /etc/secvf-modules (busybox modprobe follows
# modules.dep), waits for the root disk /dev/vda, mounts it as ext4 and hands over
# to the rootfs's /sbin/secvf-init with switch_root. On failure it says why on the
# console and powers the VM off (PID 1 must not exit: that would be a kernel panic).

/bin/busybox --install -s

ROOT_DEVICE=/dev/vda
ROOT_WAIT_TENTHS=100
ROOT_INIT=/sbin/secvf-init

fail() {
	echo "SECVF-BOOT-FAILED: $*" >/dev/console
	sync
	poweroff -f
	echo o >/proc/sysrq-trigger
	while :; do sleep 60; done
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# KVM probe (secvf.accel): reaching userspace proves the accelerator runs a guest.
if [ "${secvf_probe:-}" = 1 ]; then
	echo "SECVF-PROBE-OK" >/dev/console
	poweroff -f
	echo o >/proc/sysrq-trigger
fi

# shellcheck disable=SC2046 # one module name per word
modprobe -a $(cat /etc/secvf-modules) || echo "secvf-initramfs: some modules failed to load" >/dev/console

tries=0
while [ ! -b "$ROOT_DEVICE" ]; do
	tries=$((tries + 1))
	[ "$tries" -le "$ROOT_WAIT_TENTHS" ] || fail "root disk $ROOT_DEVICE did not appear"
	usleep 100000
done

mount -t ext4 -o rw "$ROOT_DEVICE" /newroot || fail "cannot mount $ROOT_DEVICE as ext4"
[ -x "/newroot$ROOT_INIT" ] || fail "$ROOT_INIT is missing on the root disk"

for fs in dev proc sys; do
	mount --move "/$fs" "/newroot/$fs"
done
exec switch_root /newroot "$ROOT_INIT"
