#!/bin/sh
# Install the Debian packages SecVF needs on the host (Debian 12 or 13).
# Idempotent: packages already present are left alone. Run as root (or via sudo).
set -eu

PACKAGES="qemu-system-x86 qemu-utils mmdebstrap e2fsprogs busybox-static cpio \
kmod zstd ca-certificates python3 python3-venv python3-pip iproute2 util-linux \
openssh-client procps uidmap openssl tcpdump strace zip tmux"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

missing=""
for pkg in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done

# virtiofsd: part of qemu-system-common on Debian 12, its own package on Debian 13.
if [ ! -x /usr/lib/qemu/virtiofsd ] && [ ! -x /usr/libexec/virtiofsd ] \
        && ! command -v virtiofsd >/dev/null 2>&1; then
    if apt-cache show virtiofsd >/dev/null 2>&1; then
        missing="$missing virtiofsd"
    fi
fi

if [ -n "$missing" ]; then
    echo "secvf: installing:$missing"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    # shellcheck disable=SC2086
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
else
    echo "secvf: system packages already installed"
fi

# virtio-fs shares run virtiofsd in a user namespace that maps guest uids to an
# unprivileged host range (docs/sandbox.md). When SecVF runs as root it uses root's
# range: give root one if it has none, after every range already handed out (so it
# never overlaps another user's subordinate ids).
for map in /etc/subuid /etc/subgid; do
    if ! grep -q '^root:' "$map" 2>/dev/null; then
        start=$(awk -F: 'BEGIN { end = 100000 } NF == 3 && $2 + $3 > end { end = $2 + $3 } END { print end }' "$map" 2>/dev/null || echo 100000)
        echo "secvf: adding root:$start:65536 to $map"
        echo "root:$start:65536" | $SUDO tee -a "$map" >/dev/null
    fi
done
