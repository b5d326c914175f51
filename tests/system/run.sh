#!/usr/bin/env bash
# hearth under a real systemd. Boots a minimal Debian 12 (debootstrap minbase
# with systemd) in systemd-nspawn, installs hearth with the unit as shipped
# (the .deb, or by hand from systemd/hearth.service when there is no package),
# and proves, one PASS/FAIL line per check:
#   - READY: the Type=notify unit reaches active/running, started by the boot
#     (enabled), at the first try;
#   - the hardened unit opens its serial port (a pty bound in as /dev/ttyUSB0,
#     `hearth simulate` on the other end) and reaches the broker (mosquitto,
#     mutual TLS, a free port of the host's 127.0.0.1; hearth resolves it as
#     `localhost`): readings arrive, all with this gateway's and device's ids,
#     and the retained status;
#   - hearth runs as user hearth with group dialout; the sandbox refuses
#     nothing it does (no "Permission denied" / "Operation not permitted" in
#     its journal); `systemctl stop` ends it with exit 0 in under 5 s;
#   - journald: hearth's own entries carry SYSLOG_IDENTIFIER=hearth,
#     _SYSTEMD_UNIT=hearth.service, PRIORITY and _UID=hearth, and (unless
#     HEARTH_SYS_JOURNAL_STRICT=0) TARGET, CODE_FILE/CODE_LINE and hearth's
#     own HEARTH_* fields (tracing-journald);
#   - step WATCHDOG: with HEARTH_TEST_FAILPOINT=reader-freezes:5 and
#     WatchdogSec=3s (a test drop-in), systemd logs "Watchdog timeout", kills
#     hearth with SIGABRT and restarts it; it is active again and readings
#     flow; without the drop-in it runs normally again;
#   - encryption at rest: an earlier hearth's plaintext store (made on the
#     host by this hearth with `encrypt = false`: 20 readings of device
#     ICD-OLD, delivered) is installed before the boot; the first start
#     encrypts it in place with the key the unit unseals
#     (LoadCredentialEncrypted=, sealed with systemd-creds by postinst, or
#     by setup-root.sh without the package): afterwards the file has no
#     plain SQLite header and no key lies beside it, root's `hearth
#     readings list` shows the 20 readings and `hearth status` works, user
#     hearth's gets one line saying root can unseal the key, and the broker
#     got each old reading once (none sent again); root's `hearth store
#     rekey` is refused while hearth runs, and with it stopped seals a new
#     key with which hearth starts again and readings flow;
#   - step PACKAGE: `dpkg -i` with no systemd running (enables, does not
#     start; hearth starts at boot), `dpkg -i` of a version-bumped repack under
#     the running systemd (restarts hearth, keeps the edited hearth.toml and
#     the key, readings flow), `dpkg --purge` (stops hearth, unit and binary
#     gone; what is left is reported).
# INFO lines: the live `systemd-analyze security hearth` score, whether device
# access control is enforced in the container, warnings hearth logged.
#
# Test-only rigs (each marked TEST RIG where it is done):
#   - the pty gets root:dialout 0660, as udev gives a real /dev/ttyUSB0;
#   - the watchdog step's drop-in (watchdog.conf) runs pty-unlock before each
#     start, and the probe runs it once more: a pty keeps the exclusive-open
#     flag (TIOCEXCL) of a killed hearth, a real port does not (see pty-unlock);
#   - nspawn runs with SYSTEMD_SECCOMP=0 and the unified cgroup hierarchy, so
#     that the container's systemd can enforce DevicePolicy= (see nspawn_env);
#   - the root gets a Debian /etc/hosts (debootstrap writes none).
# No DeviceAllow= drop-in is needed: DevicePolicy=closed always allows ptys.
#
# Files here: run.sh (host side), setup-root.sh (runs in the root before the
# boot), probe.sh + hearth-probe.service (in the booted container),
# watchdog.conf and pty-unlock (watchdog step).
#
# Usage (root, Debian 12): tests/system/run.sh
#   HEARTH_SYS_WATCHDOG=0|1  the watchdog step (default 1)
#   HEARTH_SYS_PACKAGE=0|1|auto  the package steps (default auto: on when
#                            HEARTH_SYS_DEB is set or cargo-deb is installed for
#                            scripts/deb.sh, else a SKIP line and hearth is
#                            installed by hand)
#   HEARTH_SYS_JOURNAL_STRICT=0|1  require tracing-journald's fields (default 1)
#   HEARTH_SYS_BIN=PATH      this hearth binary instead of `cargo build --profile dist`
#   HEARTH_SYS_DEB=PATH      this .deb instead of running scripts/deb.sh
#   HEARTH_SYS_CACHE=DIR     the pristine root's cache (default target/system-root)
#   HEARTH_SYS_MIRROR=URL    Debian mirror for debootstrap
#   HEARTH_SYS_KEEP=1        keep the run folder, container root included, even on success
# Installs debootstrap, systemd-container, mosquitto, mosquitto-clients,
# openssl and procps with apt-get when missing. Honours CARGO_TARGET_DIR.
#
# Time, measured on 2 vCPUs: about 21 s with the root cached and hearth built
# (the container runs about 20 s, 17 s of it the watchdog step; without it
# 1 s); a first run adds debootstrap (about 35 s, then cached) and the dist
# build (about 100 s from scratch; scripts/deb.sh reuses it): about 3 min.
#
# On failure the run folder (printed) keeps every log: shared/ (the probe's
# facts and log, the container's journal, hearth's entries as JSON,
# `systemctl show` at each step, what the broker delivered), broker/,
# simulator.*, console.log, setup-root.log, build and package logs.
set -euo pipefail

# --- Steps and settings ----------------------------------------------------------
STEP_WATCHDOG=${HEARTH_SYS_WATCHDOG:-1}
# auto: on when there is a package to test (HEARTH_SYS_DEB, or cargo-deb for
# scripts/deb.sh), else skipped with a SKIP line.
STEP_PACKAGE=${HEARTH_SYS_PACKAGE:-auto}
if [[ $STEP_PACKAGE == auto ]]; then
    if [[ -n ${HEARTH_SYS_DEB:-} ]] || command -v cargo-deb >/dev/null; then
        STEP_PACKAGE=1
    else
        STEP_PACKAGE=skip
    fi
fi
JOURNAL_STRICT=${HEARTH_SYS_JOURNAL_STRICT:-1}
for setting in "STEP_WATCHDOG=$STEP_WATCHDOG" "STEP_PACKAGE=$STEP_PACKAGE" "JOURNAL_STRICT=$JOURNAL_STRICT"; do
    [[ $setting =~ =(0|1|skip)$ ]] || {
        echo "system-test: error: bad setting $setting (0 or 1)" >&2
        exit 2
    }
done
# How hearth gets into the container: by hand (files at the package's paths)
# or with dpkg -i. The package steps need the package.
INSTALL=manual
[[ $STEP_PACKAGE == 1 ]] && INSTALL=deb

readonly GATEWAY_ID=gw-systest
readonly DEVICE_ID=ICD-SYS1
# The device of the earlier hearth's plaintext store.
readonly OLD_DEVICE_ID=ICD-OLD
readonly OLD_READINGS=20
readonly MIN_READINGS=10
readonly SUITE=bookworm
readonly INCLUDE=systemd,systemd-sysv,dbus
readonly MIRROR=${HEARTH_SYS_MIRROR:-http://deb.debian.org/debian}
readonly BOOT_TIMEOUT=300

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
cache=${HEARTH_SYS_CACHE:-$repo/target/system-root}

# --- Output ----------------------------------------------------------------------
failures=0
t_start=$(date +%s)
pass() { echo "PASS $1${2:+: $2}"; }
fail() {
    echo "FAIL $1${2:+: $2}"
    failures=$((failures + 1))
}
info() { echo "INFO $1: $2"; }
note() { echo "system-test: $*"; }
die() {
    echo "system-test: error: $*" >&2
    exit 1
}
# check NAME DETAIL CMD...: PASS if CMD succeeds, else FAIL.
check() {
    local name=$1 detail=$2
    shift 2
    if "$@"; then pass "$name" "$detail"; else fail "$name" "$detail"; fi
}

# --- Cleanup ---------------------------------------------------------------------
run=""
pids=()      # background processes started here, stopped in reverse order
boot_pid=""  # the booted container (timeout + systemd-nspawn)
building=""  # a debootstrap target being built (its mounts go on exit)

stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# Stops the booted container: SIGTERM to timeout, which passes it on to
# systemd-nspawn, which powers the container off; SIGKILL to both if that
# takes over 20 s.
stop_boot() {
    local nspawn i
    nspawn=$(pgrep -P "$boot_pid" -x systemd-nspawn || true)
    kill -TERM "$boot_pid" 2>/dev/null
    for ((i = 0; i < 200; i++)); do
        kill -0 "$boot_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$boot_pid" ${nspawn:+"$nspawn"} 2>/dev/null
    wait "$boot_pid" 2>/dev/null
    boot_pid=""
}

cleanup() {
    local rc=$?
    set +e
    [[ -z $boot_pid ]] || stop_boot
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        stop_pid "${pids[i]}"
    done
    if [[ -n $building ]]; then
        findmnt -rn -o TARGET | grep -F "$building/" | sort -r | xargs -r -n1 umount -l
        rm -rf "$building"
    fi
    if [[ -n $run && -d $run ]]; then
        if [[ $rc -eq 0 && $failures -eq 0 && ${HEARTH_SYS_KEEP:-0} != 1 ]]; then
            rm -rf "$run"
        else
            # Not while a container may still run in it.
            if [[ ${HEARTH_SYS_KEEP:-0} != 1 ]] && ! pgrep -f -- "-D $run/root" >/dev/null; then
                rm -rf "$run/root"
            fi
            echo "system-test: logs in $run"
        fi
    fi
    return "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- Host prerequisites ----------------------------------------------------------
[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, systemd-nspawn)"

install_host_packages() {
    local need=()
    command -v debootstrap >/dev/null || [[ -x /usr/sbin/debootstrap ]] || need+=(debootstrap)
    command -v systemd-nspawn >/dev/null || need+=(systemd-container)
    [[ -x /usr/sbin/mosquitto ]] || command -v mosquitto >/dev/null || need+=(mosquitto)
    command -v mosquitto_sub >/dev/null || need+=(mosquitto-clients)
    command -v openssl >/dev/null || need+=(openssl)
    command -v pgrep >/dev/null || need+=(procps)
    if ((${#need[@]})); then
        note "installing ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    fi
}

# The binary that ships: the dist profile without the demo.
build_hearth() {
    if [[ -n ${HEARTH_SYS_BIN:-} ]]; then
        bin=$HEARTH_SYS_BIN
    else
        note "building hearth (cargo build --profile dist --no-default-features)"
        (cd "$repo" && cargo build --quiet --profile dist --no-default-features --locked) \
            >"$run/build.log" 2>&1 || {
            tail -30 "$run/build.log"
            die "the dist build failed (full log: $run/build.log)"
        }
        bin=$target/dist/hearth
    fi
    [[ -x $bin ]] || die "no hearth binary at $bin"
}

# The package and its version-bumped repack (the upgrade), into $run/stage/pkg.
get_packages() {
    local deb=${HEARTH_SYS_DEB:-}
    if [[ -z $deb ]]; then
        [[ -x $repo/scripts/deb.sh ]] || die "the package steps need scripts/deb.sh or HEARTH_SYS_DEB"
        note "building the package (scripts/deb.sh)"
        "$repo/scripts/deb.sh" >"$run/deb.log" 2>&1 || {
            tail -30 "$run/deb.log"
            die "scripts/deb.sh failed (full log: $run/deb.log)"
        }
        deb=$(sed -n 's/^deb.sh: package //p' "$run/deb.log" | tail -1)
        [[ -f $deb ]] || die "scripts/deb.sh named no package (full log: $run/deb.log)"
    fi
    mkdir -p "$run/stage/pkg"
    cp "$deb" "$run/stage/pkg/hearth.deb"
    local x=$run/repack version
    rm -rf "$x"
    dpkg-deb -R "$deb" "$x"
    version=$(dpkg-deb -f "$deb" Version)
    upgrade_version="$version+systest1"
    sed -i "s/^Version: .*/Version: $upgrade_version/" "$x/DEBIAN/control"
    dpkg-deb --build "$x" "$run/stage/pkg/hearth-upgrade.deb" >/dev/null
    rm -rf "$x"
    note "package $version, upgrade $upgrade_version"
}

# --- The container root ----------------------------------------------------------
# A pristine debootstrap root, cached under target/ (rebuilt when the recipe
# changes); every run boots a copy of it.
make_root() {
    local stamp="suite=$SUITE variant=minbase include=$INCLUDE recipe=1"
    mkdir -p "$(dirname "$cache")"
    exec 9>"$cache.lock"
    flock 9
    if [[ ! -f $cache/stamp || $(cat "$cache/stamp") != "$stamp" ]]; then
        note "building the container root (debootstrap $SUITE, once; cached in $cache)"
        local t=$SECONDS
        rm -rf "$cache" "$cache.new"
        building=$cache.new
        mkdir -p "$building"
        debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$building/root" "$MIRROR" \
            >"$run/debootstrap.log" 2>&1 || {
            tail -20 "$run/debootstrap.log"
            die "debootstrap failed (full log: $run/debootstrap.log)"
        }
        rm -f "$building"/root/var/cache/apt/archives/*.deb
        echo "$stamp" >"$building/stamp"
        mv "$building" "$cache"
        building=""
        note "root built in $((SECONDS - t)) s"
    fi
    cp -a --reflink=auto "$cache/root" "$run/root"
    flock -u 9
    exec 9>&-
}

# --- Host side: certificates, broker, subscriber, simulated device ---------------
make_certs() {
    bash "$repo/certs/make-dev-certs.sh" "$run/certs" "$GATEWAY_ID" >"$run/certs.log" 2>&1 ||
        die "certs/make-dev-certs.sh failed: $(cat "$run/certs.log")"
}

mosquitto_bin() { command -v mosquitto || echo /usr/sbin/mosquitto; }

# mosquitto with mutual TLS on a free port of 127.0.0.1 (never 1883/8883):
# a random port, again if it was taken.
start_broker() {
    local dir=$run/broker i
    mkdir -p "$dir"
    for _ in 1 2 3 4 5; do
        port=$((20000 + RANDOM % 40000))
        cat >"$dir/mosquitto.conf" <<EOF
# Written by tests/system/run.sh. Stays root (reads the root-owned keys).
user root
allow_anonymous false
persistence false
log_dest file $dir/mosquitto.log
log_type all
log_timestamp_format %Y-%m-%dT%H:%M:%S
listener $port 127.0.0.1
cafile $run/certs/ca.crt
certfile $run/certs/server.crt
keyfile $run/certs/server.key
require_certificate true
use_identity_as_username true
EOF
        : >"$dir/mosquitto.log"
        "$(mosquitto_bin)" -c "$dir/mosquitto.conf" >>"$dir/mosquitto.stderr" 2>&1 &
        local pid=$!
        for ((i = 0; i < 100; i++)); do
            if ! kill -0 "$pid" 2>/dev/null; then
                wait "$pid" 2>/dev/null || true
                grep -q "Address already in use" "$dir/mosquitto.log" "$dir/mosquitto.stderr" && continue 2
                die "mosquitto exited at start: $(tail -5 "$dir/mosquitto.stderr" "$dir/mosquitto.log")"
            fi
            if grep -q " running$" "$dir/mosquitto.log" && (: </dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
                pids+=("$pid")
                note "mosquitto on 127.0.0.1:$port"
                return
            fi
            sleep 0.1
        done
        stop_pid "$pid"
        die "mosquitto did not come up on 127.0.0.1:$port: $(tail -5 "$dir/mosquitto.log")"
    done
    die "mosquitto found no free port in 5 attempts"
}

# The hospital side: every message under the gateway's topics, as
# "TOPIC PAYLOAD" lines, in the folder the container sees as /results.
start_subscriber() {
    local i
    mosquitto_sub -h 127.0.0.1 -p "$port" --cafile "$run/certs/ca.crt" \
        --cert "$run/certs/hospital.crt" --key "$run/certs/hospital.key" \
        -i systest-sub -q 2 -v -t "hearth/v1/$GATEWAY_ID/#" \
        >"$run/shared/broker-messages.txt" 2>"$run/broker/sub.stderr" &
    pids+=("$!")
    for ((i = 0; i < 100; i++)); do
        grep -q "Received SUBSCRIBE from systest-sub" "$run/broker/mosquitto.log" && return
        sleep 0.1
    done
    die "mosquitto_sub did not subscribe: $(cat "$run/broker/sub.stderr")"
}

# The bedside device: `hearth simulate --pty` makes the pty pair and keeps
# both ends open, so hearth may close and reopen its end (restarts).
start_simulator() {
    local i
    "$bin" simulate --pty --json --device-id "$DEVICE_ID" --count 1000000 \
        --interval-ms 100 --alert-rate 0.1 \
        >"$run/simulator.out" 2>"$run/simulator.err" &
    pids+=("$!")
    for ((i = 0; i < 100; i++)); do
        pty=$(sed -n 's/^pty: //p' "$run/simulator.out" 2>/dev/null || true)
        [[ -n $pty ]] && break
        sleep 0.1
    done
    [[ -n $pty && -c $pty ]] || die "the simulator printed no pty: $(cat "$run/simulator.err")"
    # TEST RIG: what udev does for a real /dev/ttyUSB0 (root:dialout 0660);
    # a pty starts as root-only. dialout's gid is the container's.
    local dialout
    dialout=$(awk -F: '$1 == "dialout" { print $3 }' "$run/root/etc/group")
    chgrp "$dialout" "$pty"
    chmod 0660 "$pty"
    note "simulated device $DEVICE_ID on $pty (the container's /dev/ttyUSB0)"
}

# An earlier hearth's store: plaintext (`encrypt = false`), with
# $OLD_READINGS readings of $OLD_DEVICE_ID delivered to the broker, made by
# this hearth on the host (the schema is this version's). Staged as
# stage/hearth.db for setup-root.sh.
seed_plain_store() {
    local dir=$run/seed i sim_pid hearth_pid pty_old="" delivered=0
    mkdir -p "$dir"
    "$bin" simulate --pty --json --device-id "$OLD_DEVICE_ID" --count "$OLD_READINGS" \
        --interval-ms 0 --alert-rate 0 >"$dir/simulator.out" 2>"$dir/simulator.err" &
    sim_pid=$!
    pids+=("$sim_pid")
    for ((i = 0; i < 100; i++)); do
        pty_old=$(sed -n 's/^pty: //p' "$dir/simulator.out" 2>/dev/null || true)
        [[ -n $pty_old ]] && break
        sleep 0.1
    done
    [[ -n $pty_old ]] || die "the seeding simulator printed no pty: $(cat "$dir/simulator.err")"
    cat >"$dir/hearth.toml" <<EOF
gateway_id = "$GATEWAY_ID"
[serial]
port = "$pty_old"
[store]
path = "$dir/hearth.db"
encrypt = false
[mqtt]
host = "127.0.0.1"
port = $port
ca_file = "$run/certs/ca.crt"
cert_file = "$run/certs/gateway.crt"
key_file = "$run/certs/gateway.key"
EOF
    "$bin" run --config "$dir/hearth.toml" >"$dir/hearth.log" 2>&1 &
    hearth_pid=$!
    pids+=("$hearth_pid")
    for ((i = 0; i < 300; i++)); do
        delivered=$("$bin" readings list --config "$dir/hearth.toml" --state delivered --format csv 2>/dev/null |
            grep -c "^[0-9]*,$OLD_DEVICE_ID," || true)
        ((delivered >= OLD_READINGS)) && break
        sleep 0.1
    done
    stop_pid "$hearth_pid"
    stop_pid "$sim_pid"
    ((delivered >= OLD_READINGS)) ||
        die "the plaintext store got $delivered of $OLD_READINGS readings delivered: $(tail -5 "$dir/hearth.log")"
    [[ $(head -c 15 "$dir/hearth.db") == "SQLite format 3" ]] || die "the seeded store is not plaintext"
    cp "$dir/hearth.db" "$run/stage/hearth.db"
    [[ ! -s $dir/hearth.db-wal ]] || cp "$dir/hearth.db-wal" "$run/stage/hearth.db-wal"
    note "an earlier hearth's plaintext store: $OLD_READINGS readings of $OLD_DEVICE_ID, delivered"
}

# --- Into the container ------------------------------------------------------------
stage_files() {
    local s=$run/stage
    mkdir -p "$s/certs"
    cp "$bin" "$s/hearth"
    cp "$repo/systemd/hearth.service" "$s/hearth.service"
    cp "$here/probe.sh" "$here/setup-root.sh" "$here/hearth-probe.service" "$here/watchdog.conf" \
        "$here/pty-unlock" "$s/"
    cp "$run/certs/ca.crt" "$run/certs/gateway.crt" "$run/certs/gateway.key" "$s/certs/"
    cat >"$s/hearth.toml" <<EOF
# Written by tests/system/run.sh.
gateway_id = "$GATEWAY_ID"

[serial]
port = "/dev/ttyUSB0"

[store]
path = "/var/lib/hearth/hearth.db"

[mqtt]
# A name, resolved through /etc/hosts (127.0.0.1 and ::1; the broker listens
# on 127.0.0.1 only), as a hospital broker's name would be through DNS.
host = "localhost"
port = $port
ca_file = "/etc/hearth/certs/ca.crt"
cert_file = "/etc/hearth/certs/gateway.crt"
key_file = "/etc/hearth/certs/gateway.key"
EOF
    cat >"$run/shared/steps.env" <<EOF
STEP_WATCHDOG=$STEP_WATCHDOG
STEP_PACKAGE=$STEP_PACKAGE
MIN_READINGS=$MIN_READINGS
OLD_DEVICE_ID=$OLD_DEVICE_ID
OLD_READINGS=$OLD_READINGS
EOF
}

nspawn_env() {
    # nspawn's own seccomp filter refuses bpf(): systemd in the container then
    # silently skips device access control (DevicePolicy=, DeviceAllow=) and IP
    # firewalling. Without it, and with the unified cgroup hierarchy (BPF
    # device programs need cgroup v2), the unit is enforced as on a real
    # machine; the unit's own SystemCallFilter= is applied by that systemd.
    local env=(SYSTEMD_SECCOMP=0)
    if [[ -e /sys/fs/cgroup/cgroup.controllers || -d /sys/fs/cgroup/unified ]]; then
        env+=(SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1)
    fi
    echo "${env[@]}"
}

# Installs hearth, its config and the probe into the root, with no systemd
# running (systemd-nspawn without -b).
setup_root() {
    # shellcheck disable=SC2046
    env $(nspawn_env) systemd-nspawn --quiet --keep-unit --register=no --link-journal=no \
        -D "$run/root" --bind-ro="$run/stage:/stage" \
        /bin/bash /stage/setup-root.sh "$INSTALL" </dev/null >"$run/setup-root.log" 2>&1
}

boot() {
    # shellcheck disable=SC2046
    env $(nspawn_env) timeout --kill-after=15 "$BOOT_TIMEOUT" \
        systemd-nspawn --quiet --keep-unit --register=no --link-journal=no \
        -D "$run/root" -b --console=pipe --machine=hearth-systest \
        --bind="$pty:/dev/ttyUSB0" --bind="$run/shared:/results" --bind-ro="$run/stage:/stage" \
        </dev/null >"$run/console.log" 2>&1 &
    boot_pid=$!
    local rc=0
    wait "$boot_pid" || rc=$?
    boot_pid=""
    return "$rc"
}

# --- Checks on what the probe recorded ---------------------------------------------
fact() { sed -n "s/^$1=//p" "$run/shared/facts" 2>/dev/null | tail -1; }
is_fact() { [[ $(fact "$1") == "$2" ]]; }
shown() { sed -n "s/^$2=//p" "$run/shared/$1" 2>/dev/null | head -1; }

check_ready() {
    check "ready" "Type=notify unit reached active/running (READY=1)" is_fact ready yes
    check "config-check" "installed \`hearth config check\` as user hearth on the provisioned config: exit $(fact config_check_rc), '$(fact config_check)'" \
        is_fact config_check_rc 0
    local type active_at nrestarts
    type=$(shown show-ready.txt Type)
    active_at=$(shown show-ready.txt ActiveEnterTimestamp)
    nrestarts=$(shown show-ready.txt NRestarts)
    check "ready-notify" "Type=$type, ActiveEnterTimestamp=$active_at" \
        test "$type" = notify -a -n "$active_at"
    check "ready-first-try" "NRestarts=$nrestarts at READY" test "$nrestarts" = 0
    check "enabled" "is-enabled: $(fact enabled); started by the boot" is_fact enabled enabled
    info "status" "$(shown show-ready.txt StatusText)"
}

check_identity() {
    local uid dialout puid groups
    uid=$(cut -d: -f3 "$run/shared/passwd-hearth.txt" 2>/dev/null)
    dialout=$(cut -d: -f3 "$run/shared/group-dialout.txt" 2>/dev/null)
    puid=$(awk '/^Uid:/ { print $2 }' "$run/shared/main-status.txt" 2>/dev/null)
    groups=$(awk '/^Groups:/ { $1 = ""; print }' "$run/shared/main-status.txt" 2>/dev/null)
    check "user" "main process uid $puid, user hearth is $uid" test -n "$uid" -a "$puid" = "$uid"
    check "dialout" "supplementary groups:$groups (dialout is $dialout)" \
        grep -qw -- "$dialout" <<<"$groups"
}

# Not counting the earlier hearth's readings (check_store counts those).
reading_ids() {
    grep -o '"id":"[^"]*"' "$run/shared/broker-messages.txt" | grep -v "/$OLD_DEVICE_ID/" |
        sort -u | wc -l || true
}

check_traffic() {
    local msgs ids mine alerts status
    msgs=$run/shared/broker-messages.txt
    ids=$(reading_ids)
    mine=$(grep -o "\"id\":\"$GATEWAY_ID/$DEVICE_ID/[^\"]*\"" "$msgs" | sort -u | wc -l)
    alerts=$(grep -c "^hearth/v1/$GATEWAY_ID/alerts " "$msgs" || true)
    status=$(grep "^hearth/v1/$GATEWAY_ID/status " "$msgs" | tail -1 | cut -d' ' -f2-)
    check "serial-to-broker" "$ids distinct readings from the serial port at the broker (need $MIN_READINGS; waited $(fact readings_wait_ms) ms after READY)" \
        test "$ids" -ge "$MIN_READINGS"
    check "reading-ids" "all $ids from $GATEWAY_ID/$DEVICE_ID" test "$ids" -gt 0 -a "$mine" -eq "$ids"
    info "alerts" "$alerts alerts messages"
    check "status-topic" "last status: ${status:0:160}" test -n "$status"
}

# Lines hearth itself logged (not systemd's lines about it).
hearth_lines() { grep -E ' hearth\[[0-9]+\]: ' "$run/shared/journal-hearth.txt" || true; }

check_sandbox() {
    local denied
    # In the message or in any field (tracing-journald puts an error's text
    # in a field of its own).
    denied=$({
        hearth_lines
        cat "$run/shared/journal-hearth.json"
    } | grep -Eio '.{0,80}(permission denied|operation not permitted|EACCES|EPERM).{0,40}' || true)
    check "sandbox" "'Permission denied'/'Operation not permitted' in hearth's journal: $(grep -c . <<<"$denied") entries" \
        test -z "$denied"
    [[ -z $denied ]] || echo "$denied" | head -5 | sed 's/^/    /'
    # Warnings and errors (PRIORITY 0-4) hearth logged; the watchdog step
    # causes some on purpose.
    local warned
    warned=$(grep -E '"PRIORITY":"[0-4]"' "$run/shared/journal-hearth.json" |
        sed -E 's/.*"MESSAGE":"([^"]*)"(.*"HEARTH_ERROR":"([^"]*)")?.*/\1 \3/' |
        sort | uniq -c | sort -rn || true)
    [[ -z $warned ]] || info "hearth-warnings" "$(echo "$warned" | head -4 | sed 's/^ *//' | paste -sd ';')"
    info "security" "systemd-analyze security hearth.service (live): $(fact security_exposure)"
    case $(fact device_policy_enforced) in
        yes) info "device-policy" "enforced in this container (a DevicePolicy=closed unit cannot open /dev/net/tun); a pty is always allowed by DevicePolicy=closed, so DeviceAllow=char-ttyUSB itself is not exercised" ;;
        *) info "device-policy" "NOT enforced in this container ($(fact device_policy_enforced)): DevicePolicy=/DeviceAllow= are untested here" ;;
    esac
}

check_journal() {
    local json=$run/shared/journal-hearth.json uid n
    uid=$(cut -d: -f3 "$run/shared/passwd-hearth.txt" 2>/dev/null)
    n=$(grep -c . "$json" 2>/dev/null || true)
    check "journal-entries" "$n entries from hearth (_SYSTEMD_UNIT=hearth.service _COMM=hearth)" test "${n:-0}" -gt 0
    local field bad
    for field in '"SYSLOG_IDENTIFIER":"hearth"' '"_SYSTEMD_UNIT":"hearth.service"' \
        '"PRIORITY":"[0-7]"' "\"_UID\":\"$uid\""; do
        bad=$(grep -cv -- "$field" "$json" || true)
        check "journal-field" "$field in every entry ($bad without)" test "${n:-0}" -gt 0 -a "$bad" -eq 0
    done
    # tracing-journald: TARGET, CODE_FILE, CODE_LINE and hearth's own fields
    # (HEARTH_*). Strict: required; otherwise reported.
    local target code hearth_fields
    target=$(grep -c '"TARGET":"' "$json" || true)
    code=$(grep -c '"CODE_LINE":"' "$json" || true)
    hearth_fields=$(grep -o '"HEARTH_[A-Z0-9_]*"' "$json" | sort -u | tr -d '"' | tr '\n' ' ' || true)
    if [[ $JOURNAL_STRICT == 1 ]]; then
        check "journal-structured" "$target/$n entries with TARGET, $code with CODE_LINE" \
            test "${n:-0}" -gt 0 -a "$target" -eq "$n" -a "$code" -eq "$n"
        check "journal-hearth-fields" "hearth's own fields: ${hearth_fields:-none}" test -n "$hearth_fields"
    else
        info "journal-structured" "$target/$n entries with TARGET, $code with CODE_LINE; hearth's fields: ${hearth_fields:-none} (HEARTH_SYS_JOURNAL_STRICT=1 requires them)"
    fi
}

check_watchdog() {
    check "watchdog-armed" "WatchdogUSec=$(fact wd_watchdog_usec) with the drop-in" is_fact wd_watchdog_usec 3s
    check "watchdog-restart" "NRestarts went up $(fact wd_restart_after_secs) s after the frozen start" is_fact wd_restarted yes
    check "watchdog-timeout" "systemd logged 'Watchdog timeout'" is_fact wd_timeout_logged yes
    check "watchdog-sigabrt" "systemd killed hearth with SIGABRT" is_fact wd_sigabrt yes
    check "watchdog-active-again" "active/running after the restart" is_fact wd_active_again yes
    check "watchdog-readings-resume" "readings reach the broker after the restart" is_fact wd_readings_resumed yes
    check "watchdog-cleanup" "active again without the drop-in, readings flow" \
        test "$(fact wd_cleaned_up)" = yes -a "$(fact wd_clean_readings)" = yes
}

check_store() {
    local old_ids old_copies
    old_ids=$(grep -o "\"id\":\"$GATEWAY_ID/$OLD_DEVICE_ID/[^\"]*\"" "$run/shared/broker-messages.txt" | sort -u | wc -l)
    old_copies=$(grep -o "\"id\":\"$GATEWAY_ID/$OLD_DEVICE_ID/[^\"]*\"" "$run/shared/broker-messages.txt" | wc -l)
    check "store-migrated" "the plaintext store was encrypted in place at the first start: journal '$(fact store_migrated_line)'" \
        test -n "$(fact store_migrated_line)"
    check "store-encrypted" "/var/lib/hearth/hearth.db starts with the plain SQLite header: $(fact store_plain_header); key beside it: $(fact store_key_beside)" \
        test "$(fact store_plain_header)" = no -a "$(fact store_key_beside)" = no
    check "store-sealed-key" "/etc/hearth/store-key.cred $(fact store_cred_mode) (want root:root 600), hearth's key from the credential: $(fact store_cred_loaded)" \
        test "$(fact store_cred_mode)" = "root:root 600" -a "$(fact store_cred_loaded)" = yes
    check "store-old-readings" "root's \`hearth readings list --device $OLD_DEVICE_ID\`: rc $(fact store_old_rc), $(fact store_old_count) readings (want $OLD_READINGS, all delivered: $(fact store_old_delivered))" \
        test "$(fact store_old_rc)" = 0 -a "$(fact store_old_count)" = "$OLD_READINGS" -a "$(fact store_old_delivered)" = "$OLD_READINGS"
    check "store-old-once" "the broker got $old_ids of the $OLD_READINGS old readings, $old_copies copies (none sent again)" \
        test "$old_ids" -eq "$OLD_READINGS" -a "$old_copies" -eq "$OLD_READINGS"
    check "store-status-root" "root's \`hearth status\`: rc $(fact store_status_rc), names the gateway: $(fact store_status_gateway)" \
        test "$(fact store_status_gateway)" = yes
    check "store-status-hearth" "user hearth's \`hearth status\`: rc $(fact store_user_rc), $(fact store_user_lines) line: '$(fact store_user_error)'" \
        bash -c "[[ '$(fact store_user_rc)' != 0 && '$(fact store_user_lines)' == 1 && '$(fact store_user_error)' == *'only root can unseal'* ]]"
}

# has TEXT PART: TEXT contains PART.
has() { [[ $1 == *"$2"* ]]; }

check_rekey() {
    check "rekey-refused-running" "root's \`hearth store rekey\` under the running service: rc $(fact rekey_running_rc), '$(fact rekey_running_error)'" \
        has "$(fact rekey_running_rc) $(fact rekey_running_error)" "1 hearth: store \`/var/lib/hearth/hearth.db\` is open in another process"
    check "rekey" "root's \`hearth store rekey\` with the service stopped: rc $(fact rekey_rc), '$(fact rekey_out)'" \
        test "$(fact rekey_rc)" = 0
    check "rekey-sealed" "store-key.cred sealed anew: $(fact rekey_cred_changed), $(fact rekey_cred_mode), no .new left: $(fact rekey_no_pending)" \
        test "$(fact rekey_cred_changed)" = yes -a "$(fact rekey_cred_mode)" = "root:root 600" -a "$(fact rekey_no_pending)" = yes
    check "rekey-service" "hearth starts with the new key: $(fact rekey_running_after), readings flow: $(fact rekey_readings_flow)" \
        test "$(fact rekey_running_after)" = yes -a "$(fact rekey_readings_flow)" = yes
}

check_stop() {
    # An idle gateway stops at once; hearth's own grace for its tasks is 10 s
    # (then it exits anyway), systemd's TimeoutStopSec 20 s.
    check "stop" "systemctl stop: Result=$(fact stop_result), exit $(fact stop_exit), $(fact stop_ms) ms (limit 5000)" \
        test "$(fact stop_result)" = success -a "$(fact stop_exit)" = 1/0 -a "$(fact stop_ms)" -lt 5000
    check "stop-no-process" "$(fact stop_processes_left) hearth processes left" is_fact stop_processes_left 0
}

check_package() {
    check "deb-install" "dpkg -i with no systemd running, then enabled and started at boot" \
        is_fact enabled enabled
    # Owners and modes right after dpkg -i (facts from setup-root.sh).
    local want path expect
    for want in "/usr/bin/hearth root:root 755" \
        "/usr/lib/systemd/system/hearth.service root:root 644" \
        "/etc/hearth root:hearth 750" "/etc/hearth/certs root:hearth 750" \
        "/etc/hearth/hearth.toml root:hearth 640" "/var/lib/hearth hearth:hearth 700" \
        "/usr/share/bash-completion/completions/hearth root:root 644" \
        "/usr/share/man/man1/hearth.1.gz root:root 644"; do
        path=${want%% *}
        expect=${want#* }
        check "deb-file" "$path $(fact "deb_file$(echo "$path" | tr -c 'a-zA-Z0-9\n' _)") (want $expect)" \
            is_fact "deb_file$(echo "$path" | tr -c 'a-zA-Z0-9\n' _)" "$expect"
    done
    check "deb-conffile" "/etc/hearth/hearth.toml is a conffile" is_fact deb_conffile 1
    check "deb-user" "user hearth in groups $(fact deb_user_groups)" \
        bash -c "[[ '$(fact deb_user_groups)' == *dialout* ]]"
    check "deb-default-config-check" "installed \`hearth config check\` on the shipped config: exit $(fact deb_default_check_rc), '$(fact deb_default_check)'" \
        bash -c "[[ '$(fact deb_default_check_rc)' == 2 && '$(fact deb_default_check_lines)' == 1 && '$(fact deb_default_check)' == *mqtt.ca_file* ]]"
    check "deb-upgrade" "dpkg -i $upgrade_version: rc $(fact up_rc), now $(fact up_pkg_version)" \
        test "$(fact up_rc)" = 0 -a "$(fact up_pkg_version)" = "$upgrade_version"
    check "deb-upgrade-restart" "the upgrade restarted hearth (new invocation)" is_fact up_restarted yes
    check "deb-upgrade-running" "active/running after the upgrade" is_fact up_running yes
    check "deb-upgrade-config" "hearth.toml and the key kept (key $(fact up_key_mode))" \
        test "$(fact up_config_kept)" = yes -a "$(fact up_key_kept)" = yes
    check "deb-upgrade-store-key" "the sealed store key kept: $(fact up_store_key_kept); the store still opens: $(fact up_store_opens)" \
        test "$(fact up_store_key_kept)" = yes -a "$(fact up_store_opens)" = yes
    check "deb-upgrade-readings" "readings reach the broker after the upgrade" is_fact up_readings_flow yes
    check "deb-remove" "dpkg -r: rc $(fact remove_rc), $(fact remove_active_state), $(fact remove_processes_left) processes, binary left: $(fact remove_binary)" \
        test "$(fact remove_rc)" = 0 -a "$(fact remove_processes_left)" = 0 -a "$(fact remove_binary)" = no
    check "deb-remove-keeps-data" "database kept: $(fact remove_db_kept), config: $(fact remove_config_kept), key: $(fact remove_key_kept)" \
        test "$(fact remove_db_kept)" = yes -a "$(fact remove_config_kept)" = yes -a "$(fact remove_key_kept)" = yes
    check "deb-purge" "dpkg --purge: rc $(fact purge_rc)" is_fact purge_rc 0
    check "deb-purge-unit" "LoadState=$(fact purge_load_state) ActiveState=$(fact purge_active_state), $(fact purge_processes_left) processes" \
        test "$(fact purge_load_state)" = not-found -a "$(fact purge_processes_left)" = 0
    check "deb-purge-files" "binary left: $(fact purge_binary), unit file left: $(fact purge_unit_file)" \
        test "$(fact purge_binary)" = no -a "$(fact purge_unit_file)" = no
    check "deb-purge-data" "/etc/hearth: $(fact purge_etc_hearth); /var/lib/hearth: $(fact purge_var_lib_hearth)" \
        test "$(fact purge_etc_hearth)" = absent -a "$(fact purge_var_lib_hearth)" = absent
    check "deb-purge-key-dropin" "store-key drop-in left: $(fact purge_key_dropin)" \
        test "$(fact purge_key_dropin)" = no
    info "purge-user" "kept, as Debian does: $(fact purge_user)"
}

# --- Main ----------------------------------------------------------------------------
run=$(mktemp -d /var/tmp/hearth-systest.XXXXXX)
mkdir -p "$run/shared" "$run/stage"
note "run folder $run (WATCHDOG=$STEP_WATCHDOG PACKAGE=$STEP_PACKAGE JOURNAL_STRICT=$JOURNAL_STRICT install=$INSTALL)"

install_host_packages
build_hearth
upgrade_version=""
[[ $STEP_PACKAGE == 1 ]] && get_packages
t_prep=$(date +%s)
make_root
make_certs
start_broker
start_subscriber
start_simulator
seed_plain_store
stage_files
setup_root || die "installing into the root failed: $(tail -20 "$run/setup-root.log")"
note "prepared in $(($(date +%s) - t_start)) s ($(($(date +%s) - t_prep)) s after the build); booting"

t_boot=$(date +%s)
boot_rc=0
boot || boot_rc=$?
note "container ran $(($(date +%s) - t_boot)) s"

# The checks read what the probe left, which may be missing or empty after a
# failure: every one of them must run and say PASS or FAIL.
set +e
check "boot" "container booted, ran the probe and powered off (exit $boot_rc)" \
    test "$boot_rc" -eq 0 -a "$(fact probe_done)" = yes
if [[ -s $run/shared/facts ]]; then
    check_ready
    check_identity
    check_traffic
    check_sandbox
    check_journal
    check_store
    check_rekey
    [[ $STEP_WATCHDOG == 1 ]] && check_watchdog
    check_stop
    [[ $STEP_PACKAGE == 1 ]] && check_package
fi

[[ $STEP_PACKAGE == skip ]] &&
    echo "SKIP package steps: cargo-deb is not installed (cargo install cargo-deb --locked) and HEARTH_SYS_DEB is unset"
note "$failures failed; total $(($(date +%s) - t_start)) s"
if ((failures)); then
    echo "--- last lines of the probe log ---"
    tail -15 "$run/shared/probe.log" 2>/dev/null
    echo "--- hearth's journal (last lines) ---"
    tail -25 "$run/shared/journal-hearth.txt" 2>/dev/null
    echo "--- console (last lines) ---"
    tail -10 "$run/console.log" 2>/dev/null
    exit 1
fi
