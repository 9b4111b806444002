#!/bin/sh
# secvf-init: PID 1 of SecVF guest images (installed as /sbin/secvf-init).
#
# As PID 1 it mounts the API filesystems, sets the hostname, brings up the network,
# mounts virtio-fs shares, starts the exec agent (sandbox images), arms the ACPI power
# button, prints the ready marker on the serial console, then reaps orphans forever.
#
# Kernel command line parameters (the kernel hands unknown key=value pairs to init
# as environment variables):
#   secvf_hostname=NAME                     hostname (default: secvf)
#   secvf_net=nat                           configure eth0 by DHCP (QEMU user networking)
#   secvf_shares=TAG:/PATH:ro|rw[,...]      virtio-fs shares to mount
#
# Run as any other PID it is a helper for its own PID 1:
#   secvf-init poweroff                     what the ACPI power button runs
#   secvf-init deconfig|bound|renew|...     busybox udhcpc's event script

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

BB=/bin/busybox
SELF=/sbin/secvf-init
READY_MARKER=SECVF-READY
AGENT=/usr/lib/secvf/agent/agent.pyz
AGENT_LOG_FIFO=/run/secvf/agent-log
ACPI_DIR=/run/secvf/acpi

say() {
	echo "secvf-init: $*" >/dev/console
}

# --- boot ------------------------------------------------------------------

mount_fs() { # TYPE TARGET OPTIONS
	mountpoint -q "$2" && return 0
	mkdir -p "$2"
	mount -t "$1" -o "$3" "$1" "$2" || say "cannot mount $1 on $2"
}

mount_filesystems() {
	mount_fs proc /proc nosuid,nodev,noexec
	mount_fs sysfs /sys nosuid,nodev,noexec
	mount_fs devtmpfs /dev nosuid,mode=0755
	mount_fs devpts /dev/pts nosuid,noexec,gid=5,mode=0620,ptmxmode=0666
	mount_fs tmpfs /dev/shm nosuid,nodev,mode=1777
	mount_fs tmpfs /run nosuid,nodev,mode=0755
	mount_fs tmpfs /tmp nosuid,nodev,mode=1777
	ln -sfn /proc/self/fd /dev/fd
	ln -sfn /proc/self/fd/0 /dev/stdin
	ln -sfn /proc/self/fd/1 /dev/stdout
	ln -sfn /proc/self/fd/2 /dev/stderr
	mkdir -p /run/secvf
}

set_hostname() {
	name=${secvf_hostname:-secvf}
	echo "$name" >/proc/sys/kernel/hostname || say "cannot set hostname '$name'"
	printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost\n' "$name" >/etc/hosts
}

start_network() {
	$BB ip link set lo up
	[ "${secvf_net:-none}" = nat ] || return 0
	if ! $BB ip link set eth0 up 2>/dev/null; then
		say "secvf_net=nat but the VM has no eth0"
		return 0
	fi
	# Returns once a lease is bound (or after ~5 s); udhcpc then renews in the background.
	$BB udhcpc -i eth0 -s "$SELF" -t 5 -T 1 -A 3 -b >/dev/null 2>&1 || say "DHCP on eth0 failed"
}

mount_shares() {
	[ -n "${secvf_shares:-}" ] || return 0
	old_ifs=$IFS
	IFS=,
	for share in $secvf_shares; do
		IFS=$old_ifs
		tag=${share%%:*}
		rest=${share#*:}
		path=${rest%:*}
		mode=${rest##*:}
		case "$tag:$path:$mode" in
		?*:/*:ro | ?*:/*:rw) ;;
		*)
			say "ignoring share '$share': expected TAG:/PATH:ro or TAG:/PATH:rw"
			continue
			;;
		esac
		if mkdir -p "$path" && mount -t virtiofs -o "$mode" "$tag" "$path"; then
			say "share $tag on $path ($mode)"
		else
			say "cannot mount share '$tag' on $path"
		fi
	done
	IFS=$old_ifs
}

start_agent() {
	[ -f "$AGENT" ] || return 0
	mkfifo -m 0600 "$AGENT_LOG_FIFO"
	# Opened read-write, the FIFO never reports EOF, so the prefixer outlives each agent run.
	sed -u 's/^/secvf-agent: /' <>"$AGENT_LOG_FIFO" >/dev/console 2>&1 &
	# Started with & the agent inherits SIGINT and SIGQUIT ignored; it gives its commands
	# default dispositions itself (secvf.guest.agent.__main__).
	(
		cd /
		while :; do
			python3 -I -u "$AGENT" </dev/null >"$AGENT_LOG_FIFO" 2>&1
			say "agent exited (status $?); restarting in 1 s"
			sleep 1
		done
	) &
}

arm_power_button() {
	# busybox acpid runs <confdir>/PWRF/00000080 on an ACPI power-button press
	# (QMP system_powerdown); it reads the button through evdev (/dev/input/event*).
	mkdir -p "$ACPI_DIR/PWRF"
	printf '#!/bin/sh\nexec %s poweroff\n' "$SELF" >"$ACPI_DIR/PWRF/00000080"
	chmod 0755 "$ACPI_DIR/PWRF/00000080"
	$BB acpid -c "$ACPI_DIR" -l /dev/null -p /run/acpid.pid || say "cannot start acpid"
}

announce_ready() {
	say "ready: hostname $(cat /proc/sys/kernel/hostname), $(cut -d' ' -f1 /proc/uptime) s of guest uptime"
	if [ -c /dev/ttyS0 ]; then
		echo "$READY_MARKER" >/dev/ttyS0
	else
		echo "$READY_MARKER" >/dev/console
	fi
}

reap_forever() {
	# dash's wait reaps every child, including orphans re-parented to PID 1.
	while :; do
		sleep 3600 &
		wait
	done
}

boot() {
	mount_filesystems
	set_hostname
	start_network
	mount_shares
	start_agent
	arm_power_button
	announce_ready
	reap_forever
}

# --- helpers run by PID 1's children -----------------------------------------

power_off() {
	say "power button pressed: shutting down"
	kill -s TERM -1
	sleep 1
	kill -s KILL -1
	sync
	umount -a -t virtiofs 2>/dev/null
	mount -o remount,ro / || say "cannot remount / read-only"
	sync
	$BB poweroff -f
	echo o >/proc/sysrq-trigger
}

dhcp_event() { # udhcpc passes the lease in: interface ip mask router dns
	case "$1" in
	deconfig)
		$BB ip -4 addr flush dev "$interface"
		;;
	bound | renew)
		if ! $BB ip -4 addr show dev "$interface" | grep -q " $ip/$mask "; then
			$BB ip -4 addr flush dev "$interface"
			$BB ip -4 addr add "$ip/$mask" dev "$interface"
		fi
		for gateway in $router; do
			$BB ip -4 route replace default via "$gateway" dev "$interface"
			break
		done
		rm -f /etc/resolv.conf
		for server in $dns; do
			echo "nameserver $server"
		done >/etc/resolv.conf
		say "network: $interface $ip/$mask via ${router:-no gateway}"
		;;
	esac
}

if [ "$$" -eq 1 ]; then
	boot
fi
case "${1:-}" in
poweroff) power_off ;;
deconfig | bound | renew | leasefail | nak) dhcp_event "$1" ;;
*)
	echo "usage: $SELF poweroff (as PID 1 it boots the guest)" >&2
	exit 2
	;;
esac
