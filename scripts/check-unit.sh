#!/usr/bin/env bash
# Checks the service unit (default systemd/hearth.service, paths relative to
# the repository root; another unit file may be given to try the checks on it):
# 1. `systemd-analyze security --offline=yes`: the exposure score must be at
#    most 1.5 (threshold 15, in tenths).
# 2. `systemd-analyze verify`: must print nothing at all (it warns about unknown
#    keys or bad values but still exits 0). It runs on a scratch root holding
#    the unit, this machine's systemd units (the ones hearth.service depends on)
#    and a stub /usr/bin/hearth, so that a build machine without hearth
#    installed gets no "Command /usr/bin/hearth is not executable".
# Installs Debian's systemd package (it holds systemd-analyze) when missing.
set -euo pipefail

unit=systemd/hearth.service
[ -z "${1:-}" ] || unit=$(realpath -- "$1")
cd "$(dirname "$0")/.."
if [ ! -f "$unit" ]; then
    echo "check-unit.sh: no such unit file: $unit" >&2
    exit 2
fi

if ! command -v systemd-analyze >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "check-unit.sh: installing systemd (for systemd-analyze)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends systemd
    command -v systemd-analyze >/dev/null || {
        echo "check-unit.sh: systemd-analyze still missing after installing systemd" >&2
        exit 1
    }
fi

# 1. Exposure score. Above the threshold systemd-analyze exits non-zero
# without saying why, hence the table on failure.
if ! out=$(systemd-analyze security --offline=yes --threshold=15 "$unit" 2>&1); then
    printf '%s\n' "$out" | grep -v '✓' >&2 || true
    echo "check-unit.sh: security: FAILED, exposure above 1.5 (or the unit did not load)" >&2
    exit 1
fi
score=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
echo "check-unit.sh: security: exposure ${score:-?} (at most 1.5): ok"

# 2. verify, on a scratch root.
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
for dir in /usr/lib/systemd/system /lib/systemd/system; do
    [ -d "$dir" ] || continue
    # Merged /usr: /lib is /usr/lib, already copied.
    if [ "$dir" = /lib/systemd/system ] && [ /lib -ef /usr/lib ]; then continue; fi
    mkdir -p "$root$dir"
    cp -a "$dir/." "$root$dir/"
done
mkdir -p "$root/usr/bin" "$root/etc/systemd/system"
printf '#!/bin/sh\nexit 0\n' >"$root/usr/bin/hearth"
chmod 0755 "$root/usr/bin/hearth"
installed="$root/etc/systemd/system/$(basename "$unit")"
cp "$unit" "$installed"
rc=0
out=$(systemd-analyze verify --root="$root" "$installed" 2>&1) || rc=$?
if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
    printf '%s\n' "$out" | sed "s|$root||g" >&2
    echo "check-unit.sh: verify: FAILED (exit status $rc)" >&2
    exit 1
fi
echo "check-unit.sh: verify: clean: ok"
