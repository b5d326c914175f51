#!/bin/bash
# The probe of tests/system/run.sh: runs INSIDE the booted container as the
# oneshot hearth-probe.service, once multi-user.target is reached. It drives
# each step, waits for events with deadlines (polling systemd and the
# journal), and records what it saw in /results (a host folder):
#   facts             key=value lines the host checks (PASS/FAIL are decided there)
#   probe.log         what the probe did, with times
#   show-*.txt        `systemctl show hearth` at each step
#   journal*.txt/json the journal of this boot, and hearth's entries as JSON
#   security.txt      `systemd-analyze security hearth` (live)
# The probe never fails the unit on a check: the unit's SuccessAction= and
# FailureAction= power the container off either way.
set -uo pipefail

R=/results
LIB=/usr/local/lib/hearth-systest
# STEP_WATCHDOG, STEP_PACKAGE, MIN_READINGS (written by run.sh).
# shellcheck source=/dev/null
source "$R/steps.env"
BROKER_LOG=$R/broker-messages.txt
DROPIN_DIR=/run/systemd/system/hearth.service.d
DROPIN=$DROPIN_DIR/zz-systest-watchdog.conf

exec > >(tee -a "$R/probe.log") 2>&1
T0=${EPOCHREALTIME/./}

elapsed() { printf '%d.%03d' $(((${EPOCHREALTIME/./} - T0) / 1000000)) $((((${EPOCHREALTIME/./} - T0) / 1000) % 1000)); }
say() { echo "[$(elapsed)] probe: $*"; }
fact() {
    printf '%s=%s\n' "$1" "$2" >>"$R/facts"
    say "fact $1=$2"
}
prop() { systemctl show hearth.service -p "$1" --value; }

# wait_until SECONDS CMD...: polls CMD every 0.2 s until it succeeds; fails
# once the deadline has passed.
wait_until() {
    local end=$((${EPOCHREALTIME/./} + $1 * 1000000))
    shift
    until "$@"; do
        ((${EPOCHREALTIME/./} < end)) || return 1
        sleep 0.2
    done
}

running() { [[ $(prop ActiveState) == active && $(prop SubState) == running ]]; }
nrestarts_above() { (($(prop NRestarts) > $1)); }
# Distinct reading ids the host's subscriber has received so far from this
# container's device (not the earlier hearth's, delivered before the boot).
readings() { grep -o '"id":"[^"]*"' "$BROKER_LOG" 2>/dev/null | grep -v "/$OLD_DEVICE_ID/" | sort -u | wc -l; }
readings_at_least() { (($(readings) >= $1)); }
journal_has() { journalctl -b -u hearth.service -o cat --no-pager | grep -q -- "$1"; }
# hearth processes alive anywhere in the container.
hearth_procs() {
    local n=0 f
    for f in /proc/[0-9]*/comm; do
        [[ $(cat "$f" 2>/dev/null) == hearth ]] && n=$((n + 1))
    done
    echo "$n"
}
# "absent", or what a folder still holds.
leftover() { if [[ -e $1 ]]; then echo "present: $(find "$1" -mindepth 1 -maxdepth 1 -printf '%f ')"; else echo absent; fi; }
yes_no() { if "$@"; then echo yes; else echo no; fi; }

step_ready() {
    say "step ready: waiting for hearth to be active/running"
    fact ready "$(yes_no wait_until 30 running)"
    systemctl show hearth.service >"$R/show-ready.txt"
    fact enabled "$(systemctl is-enabled hearth.service 2>&1)"
    fact version "$(/usr/bin/hearth --version 2>&1)"
    local pid
    pid=$(prop MainPID)
    fact main_pid "$pid"
    cat "/proc/$pid/status" >"$R/main-status.txt" 2>&1
    getent passwd hearth >"$R/passwd-hearth.txt"
    getent group dialout >"$R/group-dialout.txt"
}

step_traffic() {
    say "step traffic: waiting for $MIN_READINGS readings at the broker"
    local t=${EPOCHREALTIME/./}
    fact readings_arrived "$(yes_no wait_until 30 readings_at_least "$MIN_READINGS")"
    fact readings_wait_ms "$(((${EPOCHREALTIME/./} - t) / 1000))"
    fact readings_seen "$(readings)"
}

# Encryption at rest: the earlier hearth's plaintext store, encrypted in
# place at the first start with the key the unit unsealed; the CLI as root
# (which unseals /etc/hearth/store-key.cred itself) and as user hearth.
step_store() {
    say "step store: the store encrypted, the CLI as root and as hearth"
    local db=/var/lib/hearth/hearth.db out rc
    fact store_migrated_line "$(journalctl -b -u hearth.service -o cat --no-pager | grep -m1 'Plain store encrypted in place' | cut -c1-120)"
    if [[ $(head -c 15 "$db") == "SQLite format 3" ]]; then fact store_plain_header yes; else fact store_plain_header no; fi
    fact store_key_beside "$(yes_no test -e "$db.key")"
    fact store_cred_mode "$(stat -c '%U:%G %a' /etc/hearth/store-key.cred 2>&1)"
    # hearth says where its key came from (a field of its "Store encrypted
    # at rest" entry); the backticks are hearth's, not a substitution.
    # shellcheck disable=SC2016
    fact store_cred_loaded "$(yes_no grep -q 'systemd credential `hearth-store-key`' <<<"$(journalctl -b -u hearth.service -o json --no-pager)")"
    rc=0
    out=$(/usr/bin/hearth readings list --device "$OLD_DEVICE_ID" --format csv 2>"$R/store-readings.err") || rc=$?
    fact store_old_rc "$rc"
    fact store_old_count "$(grep -c "^[0-9]*,$OLD_DEVICE_ID," <<<"$out" || true)"
    fact store_old_delivered "$(grep "^[0-9]*,$OLD_DEVICE_ID," <<<"$out" | grep -c ',delivered,' || true)"
    rc=0
    out=$(/usr/bin/hearth status --format json 2>"$R/store-status.err") || rc=$?
    fact store_status_rc "$rc"
    fact store_status_gateway "$(yes_no grep -Eq '"gateway": ?"gw-systest"' <<<"$out")"
    rc=0
    out=$(setpriv --reuid=hearth --regid=hearth --init-groups /usr/bin/hearth status 2>&1) || rc=$?
    fact store_user_rc "$rc"
    fact store_user_lines "$(grep -c . <<<"$out")"
    fact store_user_error "$(head -1 <<<"$out" | cut -c1-400)"
}

# `hearth store rekey` as root, the key sealed: refused while hearth runs;
# with hearth stopped it seals a new key in place, and hearth starts with it.
step_rekey() {
    say "step rekey: hearth store rekey as root"
    local out rc cred0 c0
    cred0=$(sha256sum /etc/hearth/store-key.cred)
    rc=0
    out=$(/usr/bin/hearth store rekey 2>&1) || rc=$?
    fact rekey_running_rc "$rc"
    fact rekey_running_error "$(head -1 <<<"$out" | cut -c1-300)"
    systemctl stop hearth.service
    rc=0
    out=$(/usr/bin/hearth store rekey 2>&1) || rc=$?
    fact rekey_rc "$rc"
    fact rekey_out "$(tail -1 <<<"$out" | cut -c1-300)"
    fact rekey_cred_changed "$(yes_no test "$(sha256sum /etc/hearth/store-key.cred)" != "$cred0")"
    fact rekey_cred_mode "$(stat -c '%U:%G %a' /etc/hearth/store-key.cred 2>&1)"
    fact rekey_no_pending "$(yes_no test ! -e /etc/hearth/store-key.cred.new)"
    c0=$(readings)
    systemctl start hearth.service
    fact rekey_running_after "$(yes_no wait_until 30 running)"
    fact rekey_readings_flow "$(yes_no wait_until 20 readings_at_least $((c0 + 3)))"
}

# Is device access control enforced in this container at all? (It needs
# BPF in the container's cgroup; run.sh disables nspawn's seccomp filter
# for that.) /dev/net/tun is not among what DevicePolicy=closed allows.
step_device_policy() {
    if [[ ! -c /dev/net/tun ]]; then
        fact device_policy_enforced unknown
        return
    fi
    if systemd-run --quiet --wait --collect -p DevicePolicy=closed \
        /bin/sh -c ': <>/dev/net/tun' >/dev/null 2>&1; then
        fact device_policy_enforced no
    else
        fact device_policy_enforced yes
    fi
}

step_security() {
    systemd-analyze security hearth.service --no-pager >"$R/security.txt" 2>&1
    fact security_exposure "$(grep -o 'Overall exposure level for hearth.service: .*' "$R/security.txt" | sed 's/.*: //')"
}

step_watchdog() {
    say "step watchdog: reader-freezes failpoint, WatchdogSec=3s"
    mkdir -p "$DROPIN_DIR"
    cp "$LIB/watchdog.conf" "$DROPIN"
    systemctl daemon-reload
    local n0 c0 t_start
    n0=$(prop NRestarts)
    # Returns at READY=1 of the new process.
    systemctl restart hearth.service
    systemctl show hearth.service >"$R/show-watchdog-armed.txt"
    fact wd_watchdog_usec "$(prop WatchdogUSec)"
    t_start=${EPOCHREALTIME/./}
    fact wd_restarted "$(yes_no wait_until 60 nrestarts_above "$n0")"
    fact wd_restart_after_secs "$(((${EPOCHREALTIME/./} - t_start) / 1000000))"
    fact wd_timeout_logged "$(yes_no wait_until 10 journal_has 'Watchdog timeout')"
    fact wd_sigabrt "$(yes_no journal_has 'SIGABRT')"
    fact wd_active_again "$(yes_no wait_until 30 running)"
    c0=$(readings)
    fact wd_readings_resumed "$(yes_no wait_until 20 readings_at_least $((c0 + 3)))"
    systemctl show hearth.service >"$R/show-watchdog-after.txt"
    # Back to the unit as shipped. SIGKILL first: a graceful stop would wait
    # out hearth's 10 s grace for the frozen task.
    systemctl kill --signal=SIGKILL hearth.service
    systemctl stop hearth.service
    rm -f "$DROPIN"
    systemctl daemon-reload
    # TEST RIG: see pty-unlock (a real port would not keep the flag).
    "$LIB/pty-unlock" /dev/ttyUSB0
    systemctl start hearth.service
    c0=$(readings)
    fact wd_cleaned_up "$(yes_no wait_until 30 running)"
    fact wd_clean_readings "$(yes_no wait_until 20 readings_at_least $((c0 + 3)))"
}

step_stop() {
    say "step stop: systemctl stop hearth (SIGTERM, graceful)"
    local t
    t=${EPOCHREALTIME/./}
    systemctl stop hearth.service
    fact stop_ms "$(((${EPOCHREALTIME/./} - t) / 1000))"
    systemctl show hearth.service >"$R/show-stopped.txt"
    fact stop_result "$(prop Result)"
    fact stop_exit "$(prop ExecMainCode)/$(prop ExecMainStatus)"
    fact stop_processes_left "$(hearth_procs)"
}

step_upgrade() {
    say "step upgrade: dpkg -i a version-bumped package under running systemd"
    systemctl start hearth.service
    running || wait_until 30 running
    local id0 c0 cred0
    id0=$(prop InvocationID)
    cred0=$(sha256sum /etc/hearth/store-key.cred)
    DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold /stage/pkg/hearth-upgrade.deb \
        >"$R/dpkg-upgrade.log" 2>&1
    fact up_rc $?
    fact up_pkg_version "$(dpkg-query -W -f '${Version}' hearth 2>&1)"
    fact up_running "$(yes_no wait_until 30 running)"
    if [[ $(prop InvocationID) != "$id0" ]]; then fact up_restarted yes; else fact up_restarted no; fi
    fact up_config_kept "$(yes_no cmp -s /etc/hearth/hearth.toml /stage/hearth.toml)"
    fact up_key_kept "$(yes_no cmp -s /etc/hearth/certs/gateway.key /stage/certs/gateway.key)"
    fact up_key_mode "$(stat -c '%U:%G %a' /etc/hearth/certs/gateway.key)"
    fact up_store_key_kept "$(yes_no test "$(sha256sum /etc/hearth/store-key.cred)" = "$cred0")"
    fact up_store_opens "$(yes_no sh -c '/usr/bin/hearth readings list --limit 1 --format csv >/dev/null 2>&1')"
    fact up_state_dir "$(stat -c '%U:%G %a' /var/lib/hearth 2>&1)"
    systemctl show hearth.service >"$R/show-upgraded.txt"
    c0=$(readings)
    fact up_readings_flow "$(yes_no wait_until 20 readings_at_least $((c0 + 3)))"
}

step_remove() {
    say "step remove: dpkg -r hearth keeps the data and the config"
    DEBIAN_FRONTEND=noninteractive dpkg -r hearth >"$R/dpkg-remove.log" 2>&1
    fact remove_rc $?
    fact remove_active_state "$(prop ActiveState)"
    fact remove_processes_left "$(hearth_procs)"
    fact remove_binary "$(yes_no test -e /usr/bin/hearth)"
    fact remove_db_kept "$(yes_no test -s /var/lib/hearth/hearth.db)"
    fact remove_config_kept "$(yes_no cmp -s /etc/hearth/hearth.toml /stage/hearth.toml)"
    fact remove_key_kept "$(yes_no cmp -s /etc/hearth/certs/gateway.key /stage/certs/gateway.key)"
}

step_purge() {
    say "step purge: dpkg --purge hearth"
    # TEST RIG: the drop-in postinst writes when systemd-creds cannot seal
    # the key (not the case here), so that purge is seen to delete it too.
    dropin=/etc/systemd/system/hearth.service.d/store-key-file.conf
    if [ ! -e "$dropin" ]; then
        mkdir -p "${dropin%/*}"
        printf '[Service]\nLoadCredentialEncrypted=\n' >"$dropin"
    fi
    DEBIAN_FRONTEND=noninteractive dpkg --purge hearth >"$R/dpkg-purge.log" 2>&1
    fact purge_rc $?
    systemctl daemon-reload
    fact purge_load_state "$(prop LoadState)"
    fact purge_active_state "$(prop ActiveState)"
    fact purge_processes_left "$(hearth_procs)"
    fact purge_binary "$(yes_no test -e /usr/bin/hearth)"
    fact purge_unit_file "$(yes_no test -e /usr/lib/systemd/system/hearth.service -o -e /lib/systemd/system/hearth.service -o -e /etc/systemd/system/multi-user.target.wants/hearth.service)"
    fact purge_etc_hearth "$(leftover /etc/hearth)"
    fact purge_var_lib_hearth "$(leftover /var/lib/hearth)"
    fact purge_key_dropin "$(yes_no test -e "$dropin")"
    fact purge_user "$(getent passwd hearth || echo none)"
}

step_collect() {
    journalctl -b --no-pager -o short-monotonic >"$R/journal.txt" 2>&1
    journalctl -b --no-pager -o short-monotonic -u hearth.service >"$R/journal-hearth.txt" 2>&1
    # hearth's own entries (not systemd's about it), every field.
    journalctl -b --no-pager -o json _SYSTEMD_UNIT=hearth.service _COMM=hearth \
        >"$R/journal-hearth.json" 2>&1
    systemctl list-units --failed --no-pager >"$R/failed-units.txt" 2>&1
}

# The installed `hearth config check`, as the service user, against the
# provisioned config (the port exists now: it is bound in at boot).
step_config_check() {
    local out rc=0
    out=$(setpriv --reuid=hearth --regid=hearth --init-groups \
        /usr/bin/hearth config check --config /etc/hearth/hearth.toml 2>&1) || rc=$?
    fact config_check_rc "$rc"
    fact config_check "$(echo "$out" | head -1)"
}

say "start (STEP_WATCHDOG=$STEP_WATCHDOG STEP_PACKAGE=$STEP_PACKAGE)"
# What setup-root.sh saw right after dpkg -i (package steps only).
[[ -f /var/lib/hearth-systest/facts ]] && cat /var/lib/hearth-systest/facts >>"$R/facts"
step_ready
step_config_check
step_traffic
step_store
step_rekey
step_device_policy
step_security
[[ $STEP_WATCHDOG == 1 ]] && step_watchdog
step_stop
if [[ $STEP_PACKAGE == 1 ]]; then
    step_upgrade
    step_remove
    step_purge
fi
step_collect
fact probe_done yes
say "done; powering off"
