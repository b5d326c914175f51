#!/bin/bash
# Runs INSIDE the container root before it boots (systemd-nspawn without -b:
# no systemd running), called by tests/system/run.sh. Installs hearth (by
# hand or with dpkg -i), writes its configuration and certificates, and
# enables the probe. Everything it needs is under /stage (read-only bind).
#
#   setup-root.sh manual|deb
set -euo pipefail
mode=$1
stage=/stage

say() { echo "setup-root: $*"; }

# --- How hearth gets onto the machine ----------------------------------------
# install_manual stands in for the package until scripts/deb.sh exists: the
# same files at the same paths, the user the package would create.
install_manual() {
    install -m 0755 "$stage/hearth" /usr/bin/hearth
    install -m 0644 "$stage/hearth.service" /lib/systemd/system/hearth.service
    getent group hearth >/dev/null || groupadd --system hearth
    getent passwd hearth >/dev/null ||
        useradd --system --gid hearth --no-create-home --home-dir /var/lib/hearth \
            --shell /usr/sbin/nologin hearth
    install -d -m 0750 -o root -g hearth /etc/hearth
    install -d -m 0700 -o hearth -g hearth /var/lib/hearth
    # What the package's postinst does with no systemd running: the store's
    # key sealed for the unit's LoadCredentialEncrypted= (host key), and the
    # unit enabled.
    (
        umask 077
        { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; echo; } |
            systemd-creds encrypt --with-key=host --name=hearth-store-key - /etc/hearth/store-key.cred
    )
    systemctl enable hearth.service
}

install_deb() {
    # No systemd runs here: the maintainer scripts must cope (enable, but not
    # start). A missing dependency fails here, as it would for a user.
    DEBIAN_FRONTEND=noninteractive dpkg -i "$stage/pkg/hearth.deb"
    # What the package left, before the operator's steps below change it;
    # the probe hands these facts to the host, which checks them.
    local facts=/var/lib/hearth-systest/facts p
    mkdir -p "${facts%/*}"
    for p in /usr/bin/hearth /usr/lib/systemd/system/hearth.service /etc/hearth \
        /etc/hearth/certs /etc/hearth/hearth.toml /var/lib/hearth \
        /usr/share/bash-completion/completions/hearth /usr/share/man/man1/hearth.1.gz; do
        echo "deb_file$(echo "$p" | tr -c 'a-zA-Z0-9\n' _)=$(stat -c '%U:%G %a' "$p" 2>&1)"
    done >>"$facts"
    echo "deb_conffile=$(grep -c '^/etc/hearth/hearth.toml$' /var/lib/dpkg/info/hearth.conffiles)" >>"$facts"
    echo "deb_user_groups=$(id -nG hearth | tr ' ' ,)" >>"$facts"
    # The installed `hearth config check` on the shipped config: no
    # certificates yet, so it must refuse with one line naming the key.
    local out rc=0
    out=$(/usr/bin/hearth config check --config /etc/hearth/hearth.toml 2>&1) || rc=$?
    echo "deb_default_check_rc=$rc" >>"$facts"
    echo "deb_default_check=$(echo "$out" | head -1)" >>"$facts"
    echo "deb_default_check_lines=$(echo "$out" | wc -l)" >>"$facts"
}

case $mode in
    manual) install_manual ;;
    deb) install_deb ;;
    *) echo "setup-root: unknown mode $mode" >&2; exit 2 ;;
esac
say "hearth installed ($mode): $(/usr/bin/hearth --version)"

# A real Debian install has these (debootstrap writes no /etc/hosts); hearth
# resolves its broker's name, here `localhost`, through them.
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >/etc/hosts

# --- An earlier hearth's store ------------------------------------------------
# Plaintext, made on the host by run.sh (seed_plain_store); the first start
# must encrypt it in place.
install -m 0600 -o hearth -g hearth "$stage/hearth.db" /var/lib/hearth/hearth.db
if [[ -f $stage/hearth.db-wal ]]; then
    install -m 0600 -o hearth -g hearth "$stage/hearth.db-wal" /var/lib/hearth/hearth.db-wal
fi
say "an earlier hearth's plaintext store installed"

# --- Configuration and certificates (what an operator does) ------------------
install -d -m 0750 -o root -g hearth /etc/hearth/certs
install -m 0640 -o root -g hearth "$stage/hearth.toml" /etc/hearth/hearth.toml
install -m 0644 "$stage/certs/ca.crt" /etc/hearth/certs/ca.crt
install -m 0644 "$stage/certs/gateway.crt" /etc/hearth/certs/gateway.crt
# hearth refuses a key that group or others can read: hearth:hearth 0600.
install -m 0600 -o hearth -g hearth "$stage/certs/gateway.key" /etc/hearth/certs/gateway.key

# --- The probe -----------------------------------------------------------------
install -d /usr/local/lib/hearth-systest
install -m 0755 "$stage/probe.sh" /usr/local/lib/hearth-systest/probe.sh
install -m 0644 "$stage/watchdog.conf" /usr/local/lib/hearth-systest/watchdog.conf
install -m 0755 "$stage/pty-unlock" /usr/local/lib/hearth-systest/pty-unlock
install -m 0644 "$stage/hearth-probe.service" /etc/systemd/system/hearth-probe.service
systemctl enable hearth-probe.service
say "done"
