#!/bin/sh
# secvf-init: PID 1 of SecVF guest images (installed as /sbin/secvf-init).
#
# As PID 1 it mounts the API filesystems, sets the clock, grows the root filesystem to
# the disk, sets the hostname, brings up the network, mounts virtio-fs shares, starts the
# exec agent (sandbox images) or the detonator (analysis images) or the fake internet
# (fakenet images), arms the ACPI power button, waits until that one is ready,
# starts the restore watch (every image), prints the ready marker on the serial console,
# offers a login there if the VM has one, then reaps orphans forever.
# On SIGUSR2 it shuts the guest down (TERM, grace, KILL, sync, unmount, power off).
#
# Kernel command line parameters (the kernel hands unknown key=value pairs to init
# as environment variables):
#   secvf_hostname=NAME                     hostname (default: secvf)
#   secvf_nics=MAC+MODE[,...]               the NICs to configure, each found by its MAC
#                                           (never by name or PCI order); MODE is one of
#                                             dhcp         udhcpc (QEMU user networking)
#                                             manual       link up, no address
#                                             ADDR/PREFIX  a fixed IPv4 address
#                                             ADDR/PREFIX@GATEWAY  and a default route via
#                                                          GATEWAY, its nameserver too
#                                           one default route: a dhcp NIC's lease, else the
#                                           first GATEWAY; a bad entry is skipped (with a
#                                           console line); absent or empty: only lo
#   secvf_shares=TAG:/PATH:ro|rw[,...]      virtio-fs shares to mount
#   secvf_console=login|autologin           a getty on ttyS0 (root logs in with its password;
#                                           without one, a hint) or a root shell without a
#                                           password; absent or anything else: output only
#   secvf_time=NANOSECONDS                  the host's time (since the epoch) when it planned
#                                           the VM, plus its estimate of the time until the
#                                           kernel started; the guest adds its uptime
#
# Run as any other PID it is a helper for its own PID 1:
#   secvf-init poweroff                     ask PID 1 to shut down (SIGUSR2, as busybox
#                                           poweroff does)
#   secvf-init deconfig|bound|renew|...     busybox udhcpc's event script
# Sourced by another shell (the unit tests) it only defines its functions.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
umask 022

BB=/bin/busybox
SELF=/sbin/secvf-init
READY_MARKER=SECVF-READY
AGENT=/usr/lib/secvf/agent/agent.pyz
AGENT_LOG_FIFO=/run/secvf/agent-log
RESTORE_WATCH=/usr/lib/secvf/restore-watch.py
# analysis images: runs the sample of the cdrom medium; fakenet images: the fake internet.
# Each writes its name to READY_FIFO once it waits for the medium / its services listen.
DETONATOR=/usr/lib/secvf/detonator.py
FAKENET=/usr/lib/secvf/fakenet.py
# the agent writes "agent" here once it listens on vsock port 2222; the marker waits for it
READY_FIFO=/run/secvf/ready
# how long the ready marker waits for the agent (seconds)
READY_WAIT_S=60
# the agent's restore creates this before it restarts the DHCP client for a new MAC: that
# client's first "deconfig" then keeps its interface's address (the new lease is the same)
DHCP_KEEP_ADDRESS=/run/secvf/dhcp-keep-address
# where the interfaces of secvf_nics are looked up by MAC (<name>/address)
NET_CLASS_DIR=/sys/class/net
RESOLV_CONF=/etc/resolv.conf
# how long start_network waits for a NIC of secvf_nics that is not there yet, all NICs
# together (centiseconds of uptime): virtio_net may bind a little after init starts
NIC_WAIT_CS=200
# drivers of the devices a restored sandbox gets hot-plugged (there is no udev to load them)
CHANNEL_MODULES="vmw_vsock_virtio_transport virtiofs"
ACPI_DIR=/run/secvf/acpi
ROOT_DEVICE=/dev/vda
RTC_SECONDS=/sys/class/rtc/rtc0/since_epoch
CONSOLE_TTY=ttyS0
# agetty's baud rate and TERM for the serial console
CONSOLE_BAUD=115200
CONSOLE_TERM=vt220
# a disk at least this much bigger than the root filesystem makes init grow the filesystem
GROW_MIN_BYTES=$((16 << 20))
# how long processes get between TERM and KILL at shutdown (centiseconds of uptime)
SHUTDOWN_GRACE_CS=500

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

read_uptime_cs() { # sets UPTIME_CS to the guest's uptime in centiseconds
	read -r up _ </proc/uptime
	frac=${up#*.}
	UPTIME_CS=$((${up%.*} * 100 + 1$frac - 100)) # 1$frac: "08" is not octal
}

set_clock() {
	# The kernel set the clock from the RTC, which counts whole seconds and lags the host
	# by up to one more (QEMU starts it at the host's time rounded down), so the host's
	# time is 0-2 s past the RTC's reading. secvf_time plus the uptime is finer, unless the
	# host's estimate of the boot fell short (a loaded host): then it is below the RTC's
	# reading, and the middle of those 2 s is the better guess.
	case ${secvf_time:-} in
	'') return 0 ;;
	*[!0-9]*)
		say "ignoring secvf_time='$secvf_time': not a number of nanoseconds"
		return 0
		;;
	esac
	read_uptime_cs
	ns=$((secvf_time + UPTIME_CS * 10000000))
	if read -r rtc 2>/dev/null <"$RTC_SECONDS" && [ "$((ns / 1000000000))" -lt "$rtc" ]; then
		say "secvf_time is behind the RTC: clock set from the RTC"
		ns=$(((rtc + 1) * 1000000000))
	fi
	date -u -s "@$((ns / 1000000000)).$(printf %09d $((ns % 1000000000)))" >/dev/null ||
		say "cannot set the clock from secvf_time"
}

grow_root_fs() {
	# A disk made bigger than the image (vm create --disk) gets its space at first boot.
	read -r sectors </sys/class/block/${ROOT_DEVICE#/dev/}/size || return 0
	# ext4 superblock (at 1024): s_blocks_count_lo at +4, s_log_block_size at +24,
	# s_blocks_count_hi at +0x150; od prints them as fields 1, 6 and 84 from offset 1028.
	# shellcheck disable=SC2046 # one number per word
	set -- $(od -An -v -tu4 -j1028 -N336 "$ROOT_DEVICE")
	[ "$#" -eq 84 ] || return 0
	fs_bytes=$(((${1} + (${84} << 32)) * (1024 << ${6})))
	disk_bytes=$((sectors * 512))
	[ "$((disk_bytes - fs_bytes))" -ge "$GROW_MIN_BYTES" ] || return 0
	if out=$(resize2fs "$ROOT_DEVICE" 2>&1); then
		say "root filesystem grown from $((fs_bytes >> 20)) MiB to the disk's $((disk_bytes >> 20)) MiB"
	else
		say "cannot grow the root filesystem: $(echo "$out" | tail -n 1)"
	fi
}

set_hostname() {
	name=${secvf_hostname:-secvf}
	echo "$name" >/proc/sys/kernel/hostname || say "cannot set hostname '$name'"
	printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost\n' "$name" >/etc/hosts
}

is_ipv4() { # TEXT: true if TEXT is a dotted-quad IPv4 address (no leading zeros)
	case $1 in '' | *[!0-9.]* | .* | *. | *..*) return 1 ;; esac
	ipv4_ifs=$IFS
	IFS=.
	# shellcheck disable=SC2086 # split at the dots (digits and dots only: no globbing)
	set -- $1
	IFS=$ipv4_ifs
	[ "$#" -eq 4 ] || return 1
	for octet; do
		case $octet in
		[0-9] | [1-9][0-9] | 1[0-9][0-9] | 2[0-4][0-9] | 25[0-5]) ;;
		*) return 1 ;;
		esac
	done
}

split_nic() { # MAC+MODE: sets NIC_MAC, NIC_MODE, NIC_ADDR (ADDR/PREFIX) and NIC_GATEWAY
	NIC_MAC=${1%%+*}
	NIC_MODE=${1#*+}
	NIC_ADDR=${NIC_MODE%%@*}
	NIC_GATEWAY=
	case $NIC_MODE in *@*) NIC_GATEWAY=${NIC_MODE#*@} ;; esac
}

check_nic() { # ENTRY: split_nic, and NIC_PROBLEM says what is wrong with ENTRY (empty: nothing)
	split_nic "$1"
	NIC_PROBLEM=
	hex='[0-9A-Fa-f][0-9A-Fa-f]'
	case $1 in
	*+*) ;;
	*)
		NIC_PROBLEM="expected MAC+MODE"
		return
		;;
	esac
	# shellcheck disable=SC2254 # $hex is a pattern
	case $NIC_MAC in
	$hex:$hex:$hex:$hex:$hex:$hex) ;;
	*)
		NIC_PROBLEM="'$NIC_MAC' is not a MAC address"
		return
		;;
	esac
	case $NIC_MODE in
	dhcp | manual) return ;;
	*/*) ;;
	*)
		NIC_PROBLEM="unknown mode '$NIC_MODE' (dhcp, manual, ADDR/PREFIX or ADDR/PREFIX@GATEWAY)"
		return
		;;
	esac
	if ! is_ipv4 "${NIC_ADDR%%/*}"; then
		NIC_PROBLEM="'${NIC_ADDR%%/*}' is not an IPv4 address"
		return
	fi
	case ${NIC_ADDR#*/} in
	[0-9] | [12][0-9] | 3[0-2]) ;;
	*)
		NIC_PROBLEM="prefix '${NIC_ADDR#*/}' is not in 0..32"
		return
		;;
	esac
	case $NIC_MODE in
	*@*) is_ipv4 "$NIC_GATEWAY" || NIC_PROBLEM="gateway '$NIC_GATEWAY' is not an IPv4 address" ;;
	esac
}

parse_nics() { # sets NICS to secvf_nics' valid entries (MACs in lower case), NIC_DHCP if one is dhcp
	NICS=
	NIC_DHCP=
	nics_ifs=$IFS
	IFS=,
	set -f
	for entry in ${secvf_nics:-}; do
		IFS=$nics_ifs
		[ -n "$entry" ] || continue
		check_nic "$entry"
		if [ -n "$NIC_PROBLEM" ]; then
			say "ignoring NIC '$entry': $NIC_PROBLEM"
			continue
		fi
		case $NIC_MAC in *[A-F]*) NIC_MAC=$(echo "$NIC_MAC" | tr A-F a-f) ;; esac
		case " $NICS " in
		*" $NIC_MAC+"*)
			say "ignoring NIC '$entry': MAC $NIC_MAC is listed before"
			continue
			;;
		esac
		NICS="${NICS:+$NICS }$NIC_MAC+$NIC_MODE"
		[ "$NIC_MODE" = dhcp ] && NIC_DHCP=yes
	done
	set +f
	IFS=$nics_ifs
}

iface_of() { # MAC (lower case): sets IFACE to the network interface with that address
	for dir in "$NET_CLASS_DIR"/*; do
		read -r addr 2>/dev/null <"$dir/address" || continue
		if [ "$addr" = "$1" ]; then
			IFACE=${dir##*/}
			return 0
		fi
	done
	return 1
}

configure_nic() { # IFACE, after split_nic: link up, then the entry's mode
	$BB ip link set "$1" up || {
		say "cannot bring up $1 (MAC $NIC_MAC)"
		return
	}
	case $NIC_MODE in
	dhcp)
		# Returns once a lease is bound (or after ~5 s); udhcpc then renews in the background.
		$BB udhcpc -i "$1" -s "$SELF" -t 5 -T 1 -A 3 -b >/dev/null 2>&1 || say "DHCP on $1 failed"
		;;
	manual) say "network: $1 up without an address (manual)" ;;
	*)
		$BB ip -4 addr add "$NIC_ADDR" dev "$1" || {
			say "cannot add $NIC_ADDR to $1"
			return
		}
		if [ -z "$NIC_GATEWAY" ]; then
			say "network: $1 $NIC_ADDR, no gateway"
		elif [ -n "$NIC_DHCP" ]; then
			say "network: $1 $NIC_ADDR; gateway $NIC_GATEWAY unused (the default route is DHCP's)"
		elif [ -n "$DEFAULT_GATEWAY" ]; then
			say "network: $1 $NIC_ADDR; gateway $NIC_GATEWAY unused (the default route is via $DEFAULT_GATEWAY)"
		elif $BB ip -4 route replace default via "$NIC_GATEWAY" dev "$1"; then
			DEFAULT_GATEWAY=$NIC_GATEWAY
			rm -f "$RESOLV_CONF"
			echo "nameserver $NIC_GATEWAY" >"$RESOLV_CONF"
			say "network: $1 $NIC_ADDR via $NIC_GATEWAY"
		else
			say "network: $1 $NIC_ADDR; cannot route via $NIC_GATEWAY"
		fi
		;;
	esac
}

start_network() {
	$BB ip link set lo up
	parse_nics
	[ -n "$NICS" ] || return 0
	DEFAULT_GATEWAY=
	read_uptime_cs
	nic_deadline=$((UPTIME_CS + NIC_WAIT_CS))
	for entry in $NICS; do
		split_nic "$entry"
		# the driver may bind a NIC a little after init starts: look again until the deadline
		until iface_of "$NIC_MAC"; do
			read_uptime_cs
			if [ "$UPTIME_CS" -ge "$nic_deadline" ]; then
				say "no network interface has MAC $NIC_MAC: NIC '$entry' not configured"
				continue 2
			fi
			sleep 0.05
		done
		configure_nic "$IFACE"
	done
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

start_restore_watch() {
	# Notices a restore or a pause (the clock far behind the RTC), steps the clock back and
	# reseeds the RNG (src/secvf/guest/restore_watch.py). It writes its own console lines.
	# Started after the agent listens (its start-up would slow the agent's) and not waited
	# for: arming takes up to a second, for the RTC's next tick.
	[ -f "$RESTORE_WATCH" ] || return 0
	(
		cd /
		# status 0: nothing to watch (no RTC); anything else: restarted
		while ! python3 -I -S -u "$RESTORE_WATCH" </dev/null >/dev/console 2>&1; do
			say "restore watch exited; restarting in 5 s"
			sleep 5
		done
	) &
}

load_channel_modules() {
	# A sandbox restored from a template gets its vsock and virtio-fs devices hot-plugged.
	# With no udev nobody loads a driver for a new device, so they must be loaded already:
	# the initramfs loads them (recipe BOOT_MODULES); this covers a recipe that does not.
	for module in $CHANNEL_MODULES; do
		[ -d "/sys/module/$module" ] && continue
		$BB modprobe "$module" 2>/dev/null || say "cannot load module $module"
	done
}

start_agent() {
	[ -f "$AGENT" ] || return 0
	load_channel_modules
	mkfifo -m 0600 "$AGENT_LOG_FIFO"
	# Opened read-write, the FIFO never reports EOF, so the prefixer outlives each agent run.
	sed -u 's/^/secvf-agent: /' <>"$AGENT_LOG_FIFO" >/dev/console 2>&1 3<&- &
	# Started with & the agent inherits SIGINT and SIGQUIT ignored; it gives its commands
	# default dispositions itself (secvf.guest.agent.__main__).
	(
		cd /
		while :; do
			python3 -I -u "$AGENT" --ready-fifo "$READY_FIFO" </dev/null >"$AGENT_LOG_FIFO" 2>&1
			say "agent exited (status $?); restarting in 1 s"
			sleep 1
		done
	) 3<&- &
}

arm_power_button() {
	# busybox acpid runs <confdir>/PWRF/00000080 on an ACPI power-button press
	# (QMP system_powerdown); it reads the button through evdev (/dev/input/event*).
	mkdir -p "$ACPI_DIR/PWRF"
	printf '#!/bin/sh\necho "secvf-init: power button pressed: shutting down" >/dev/console\nexec %s poweroff\n' \
		"$SELF" >"$ACPI_DIR/PWRF/00000080"
	chmod 0755 "$ACPI_DIR/PWRF/00000080"
	$BB acpid -c "$ACPI_DIR" -l /dev/null -p /run/acpid.pid 3<&- || say "cannot start acpid"
}

start_image_service() { # PATH COMMAND...: the detonator or fakenet, if the image has it
	[ -f "$1" ] || return 0
	shift
	(cd / && exec "$@" --ready-fifo "$READY_FIFO" </dev/null >/dev/console 2>&1) 3<&- &
}

open_ready_fifo() {
	# Opened read-write on fd 3 before the agent starts, so its non-blocking write always
	# finds a reader; what init starts meanwhile gets no copy of fd 3 (3<&-).
	READY_FROM=
	for candidate in "agent:$AGENT" "detonator:$DETONATOR" "fakenet:$FAKENET"; do
		[ -f "${candidate#*:}" ] && READY_FROM=${candidate%%:*}
	done
	[ -n "$READY_FROM" ] || return 0
	rm -f "$READY_FIFO"
	mkfifo -m 0600 "$READY_FIFO" && exec 3<>"$READY_FIFO"
}

wait_for_agent() { # SECONDS: wait for the agent's ready line on fd 3 (no polling)
	# The ready marker promises a sandbox that answers: its agent listens on vsock (a
	# device hot-plugged after a restore reaches it at once). A template is saved right
	# after the marker.
	[ -p "$READY_FIFO" ] || return 0
	(
		sleep "$1"
		echo timeout >"$READY_FIFO"
	) </dev/null >/dev/null 2>&1 3<&- &
	timer=$!
	while read -r line <&3; do
		case $line in
		"$READY_FROM" | timeout) break ;;
		esac
	done
	kill "$timer" 2>/dev/null
	exec 3<&-
	rm -f "$READY_FIFO"
	[ "$line" = "$READY_FROM" ] && return 0
	case $READY_FROM in
	agent) say "the exec agent is not listening after $1 s" ;;
	*) say "$READY_FROM is not ready after $1 s" ;;
	esac
}

announce_ready() {
	say "ready: hostname $(cat /proc/sys/kernel/hostname), $(cut -d' ' -f1 /proc/uptime) s of guest uptime"
	if [ -c /dev/ttyS0 ]; then
		echo "$READY_MARKER" >/dev/ttyS0
	else
		echo "$READY_MARKER" >/dev/console
	fi
}

root_has_password() {
	while IFS=: read -r user hash _; do
		[ "$user" = root ] || continue
		case $hash in '$'*) return 0 ;; esac
		return 1
	done </etc/shadow
	return 1
}

respawn() { # COMMAND [ARG...]: run it in the background, again each time it exits
	(
		while :; do
			"$@"
			sleep 1
		done
	) </dev/null >/dev/null 2>&1 &
}

console_hint() {
	# No getty (root has no password): whoever types on the console is told how to get one.
	while :; do
		echo "secvf: this VM has no console login: root has no password. Create the VM with"
		echo "secvf: 'secvf vm create --root-password-file FILE' (or --ask-root-password), or with"
		echo "secvf: --autologin for a root shell without a password."
		read -r _ || sleep 1
	done <>"/dev/$CONSOLE_TTY" >&0 2>&0
}

start_console() {
	[ -c "/dev/$CONSOLE_TTY" ] || return 0
	# setsid: agetty must lead a session to make the tty its controlling terminal
	getty="setsid -w agetty --noclear --local-line"
	case ${secvf_console:-} in
	login)
		if root_has_password; then
			say "console: login as root on $CONSOLE_TTY"
			# shellcheck disable=SC2086 # $getty is words
			respawn $getty "$CONSOLE_TTY" "$CONSOLE_BAUD" "$CONSOLE_TERM"
		else
			say "console: no login on $CONSOLE_TTY (root has no password)"
			respawn console_hint
		fi
		;;
	autologin)
		say "console: root shell on $CONSOLE_TTY without a password (autologin)"
		# shellcheck disable=SC2086 # $getty is words
		respawn $getty --autologin root "$CONSOLE_TTY" "$CONSOLE_BAUD" "$CONSOLE_TERM"
		;;
	*) say "console: output only" ;;
	esac
}

reap_forever() {
	# dash's wait reaps every child, including orphans re-parented to PID 1.
	while :; do
		sleep 3600 &
		wait
	done
}

boot() {
	trap shut_down USR2
	mount_filesystems
	set_clock
	grow_root_fs
	set_hostname
	start_network
	mount_shares
	open_ready_fifo
	start_agent
	start_image_service "$DETONATOR" python3 -I -S -u "$DETONATOR"
	start_image_service "$FAKENET" python3 -I -S -u "$FAKENET"
	arm_power_button
	wait_for_agent "$READY_WAIT_S"
	start_restore_watch
	announce_ready
	start_console
	reap_forever
}

# --- shutdown (PID 1, on SIGUSR2) ----------------------------------------------

other_processes_left() {
	# True while a process other than PID 1 and this shell runs (kernel threads and
	# zombies have no executable).
	for dir in /proc/[0-9]*; do
		case ${dir#/proc/} in 1 | "$$") continue ;; esac
		[ -e "$dir/exe" ] && return 0
	done
	return 1
}

wait_for_others() { # CS: wait up to CS for every other process to exit; false if some remain
	read_uptime_cs
	deadline=$((UPTIME_CS + $1))
	while other_processes_left; do
		read_uptime_cs
		[ "$UPTIME_CS" -lt "$deadline" ] || return 1
		sleep 0.1
	done
}

stop_processes() { # GRACE_CS: TERM to every process, up to GRACE_CS for them to exit, then KILL
	if [ "$$" -ne 1 ]; then
		echo "secvf-init: only PID 1 stops every process" >&2
		return 1
	fi
	kill -TERM -1 2>/dev/null
	wait_for_others "$1" && return 0
	say "processes still running after $(($1 / 100)) s: KILL"
	kill -KILL -1 2>/dev/null
	wait_for_others 100 # a killed process is gone once it has been scheduled
	return 0
}

hang_up() { # TTY: SIGHUP to every process whose controlling terminal is /dev/TTY
	# (an interactive shell ignores TERM; a hangup ends it, as on a real terminal line)
	read -r dev </sys/class/tty/"$1"/dev || return 0
	major=${dev%:*}
	minor=${dev#*:}
	tty_nr=$(((minor & 255) | (major << 8) | ((minor >> 8) << 20)))
	for stat in /proc/[0-9]*/stat; do
		pid=${stat#/proc/}
		pid=${pid%/stat}
		case $pid in 1 | "$$") continue ;; esac
		read -r line 2>/dev/null <"$stat" || continue
		# shellcheck disable=SC2086 # the fields after "(comm) ": state ppid pgrp session tty_nr
		set -- ${line##*) }
		[ "$5" = "$tty_nr" ] && kill -HUP "$pid" 2>/dev/null
	done
}

shut_down() {
	say "shutting down: TERM to every process, up to $((SHUTDOWN_GRACE_CS / 100)) s to exit, then KILL"
	hang_up "$CONSOLE_TTY"
	stop_processes "$SHUTDOWN_GRACE_CS"
	sync
	umount -a -t virtiofs 2>/dev/null
	mount -o remount,ro / || say "cannot remount / read-only"
	sync
	$BB poweroff -f
	echo o >/proc/sysrq-trigger
}

# --- helpers run by PID 1's children -----------------------------------------

dhcp_event() { # udhcpc passes the lease in: interface ip mask router dns
	case "$1" in
	deconfig)
		if [ -e "$DHCP_KEEP_ADDRESS" ]; then
			rm -f "$DHCP_KEEP_ADDRESS"
		else
			$BB ip -4 addr flush dev "$interface"
		fi
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
		rm -f "$RESOLV_CONF"
		for server in $dns; do
			echo "nameserver $server"
		done >"$RESOLV_CONF"
		say "network: $interface $ip/$mask via ${router:-no gateway}"
		;;
	esac
}

main() {
	if [ "$$" -eq 1 ]; then
		boot
	fi
	case "${1:-}" in
	poweroff) kill -USR2 1 ;;
	deconfig | bound | renew | leasefail | nak) dhcp_event "$1" ;;
	*)
		echo "usage: $SELF poweroff (as PID 1 it boots the guest)" >&2
		exit 2
		;;
	esac
}

case $0 in
*/secvf-init) main "$@" ;;
esac
