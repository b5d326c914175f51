#!/usr/bin/env bash
# Every check and test hearth has, from a clean checkout on Debian.
# Installs what the tests need (mosquitto, its clients, socat, openssl) when
# missing, then: cargo fmt --check, cargo clippy -D warnings, cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null || need+=(mosquitto)
command -v mosquitto_sub >/dev/null || need+=(mosquitto-clients)
command -v socat >/dev/null || need+=(socat)
command -v openssl >/dev/null || need+=(openssl)
if ((${#need[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "test.sh: installing ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
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
echo "test.sh: cargo test"
cargo test --all-targets --locked
