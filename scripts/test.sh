#!/usr/bin/env bash
# Every check and test hearth has, from a clean checkout on Debian (as root, or
# with sudo for the installs and the system test).
# Installs what the tests need (mosquitto, its clients, socat, openssl,
# rabbitmq-server,
# libssl-dev and pkg-config for SQLCipher; Debian's
# systemd tools; cargo-deb and cargo-cyclonedx, and cargo-deny through
# scripts/supply-chain/check.sh) when missing, then: cargo fmt --check, cargo
# clippy -D warnings (with and without the demo), the supply-chain check
# (advisories, licences, bans, sources), the unit's hardening score and
# verify, cargo test, and hearth under a real systemd (tests/system/run.sh,
# which also builds, installs, upgrades and purges the .deb).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null || need+=(mosquitto)
command -v mosquitto_sub >/dev/null || need+=(mosquitto-clients)
command -v socat >/dev/null || need+=(socat)
command -v openssl >/dev/null || need+=(openssl)
# SQLCipher (rusqlite's bundled-sqlcipher) builds against the system's libcrypto.
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
# The broker without QoS 2 (MQTT 3.1.1 only) that tests/brokers.rs runs on
# free ports; Debian's package may also start its own service, which the
# tests leave alone.
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
if ((${#need[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "test.sh: installing ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
command -v cargo-deb >/dev/null || {
    echo "test.sh: installing cargo-deb"
    cargo install cargo-deb --locked --version 3.8.0 --quiet
}
command -v cargo-cyclonedx >/dev/null || {
    echo "test.sh: installing cargo-cyclonedx"
    cargo install cargo-cyclonedx --locked --version 0.5.9 --quiet
}
for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" \
        || rustup component add "$component"
done

echo "test.sh: cargo fmt --check"
cargo fmt --all -- --check
echo "test.sh: cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
# The production build leaves the demo and its embedded broker out.
cargo clippy --all-targets --locked --no-default-features -- -D warnings
echo "test.sh: the supply chain (scripts/supply-chain/check.sh)"
scripts/supply-chain/check.sh
echo "test.sh: the systemd unit (scripts/check-unit.sh)"
scripts/check-unit.sh
echo "test.sh: cargo test"
cargo test --all-targets --locked
echo "test.sh: hearth under a real systemd (tests/system/run.sh)"
if [ "$(id -u)" -eq 0 ]; then
    HEARTH_SYS_PACKAGE=1 tests/system/run.sh
else
    sudo --preserve-env=PATH,CARGO_HOME,RUSTUP_HOME,CARGO_TARGET_DIR HEARTH_SYS_PACKAGE=1 tests/system/run.sh
fi
