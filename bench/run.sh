#!/usr/bin/env bash
# hearth's benchmark, one command from a clean checkout:
#
#   bench/run.sh            # full sizes: 100,000 readings, 60 s windows
#   bench/run.sh --quick    # 10,000 readings, 10 s windows (development)
#   bench/run.sh --help     # every option
#
# Installs what is missing (Debian: mosquitto, mosquitto-clients, openssl,
# python3, python3-paho-mqtt; pip's paho-mqtt if apt has none), builds the
# packaged binary (profile `dist`, no default features, as scripts/deb.sh;
# `--release` if the profile is gone) in $CARGO_TARGET_DIR (default
# /tmp/bench-target), then runs bench/bench.py, which prints the table and
# puts it on top of docs/performance.md. Progress goes to stderr.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
say() { printf '[bench] %s\n' "$*" >&2; }
export PYTHONDONTWRITEBYTECODE=1  # no __pycache__ in bench/

for arg in "$@"; do
    case $arg in
        -h|--help) exec "${BENCH_PYTHON:-/usr/bin/python3}" bench/bench.py --help --hearth x ;;
    esac
done

# --- what the benchmark needs ---------------------------------------------------
sudo_=""
[ "$(id -u)" -eq 0 ] || sudo_="sudo"
python=${BENCH_PYTHON:-/usr/bin/python3}
missing=()
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null && command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)
command -v openssl >/dev/null || missing+=(openssl)
[ -x "$python" ] || missing+=(python3)
if [ -x "$python" ] && ! "$python" -c 'import paho.mqtt' 2>/dev/null; then
    missing+=(python3-paho-mqtt)
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo_ apt-get update -qq >&2
    $sudo_ apt-get install -y -qq "${missing[@]}" >&2 || say "apt-get could not install everything"
fi
if ! "$python" -c 'import paho.mqtt' 2>/dev/null; then
    say "paho-mqtt from pip"
    "$python" -m pip install --quiet --user paho-mqtt >&2 \
        || "$python" -m pip install --quiet --user --break-system-packages paho-mqtt >&2
fi
for tool in mosquitto_pub mosquitto_sub openssl; do
    command -v $tool >/dev/null || { say "missing: $tool"; exit 1; }
done
"$python" -c 'import paho.mqtt' || { say "missing: paho-mqtt for $python"; exit 1; }

# --- the binary ---------------------------------------------------------------
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/bench-target}
if grep -q '^\[profile\.dist\]' Cargo.toml; then
    build=(--profile dist --no-default-features)
    bin=$CARGO_TARGET_DIR/dist/hearth
    desc="profile dist, --no-default-features"
else
    build=(--release)
    bin=$CARGO_TARGET_DIR/release/hearth
    desc="release"
fi
say "cargo build ${build[*]} (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --quiet --locked "${build[@]}" >&2
stripped=$bin
if ! grep -A8 "^\[profile\.${build[1]:-release}\]" Cargo.toml | grep -q '^strip = true'; then
    stripped=$CARGO_TARGET_DIR/hearth.stripped
    strip -o "$stripped" "$bin"
fi

# --- the run ------------------------------------------------------------------
# bench.py stops every process it started (on exit and on INT/TERM/HUP); this
# trap only passes a signal on to it.
"$python" bench/bench.py --hearth "$bin" --stripped "$stripped" --build-desc "$desc" \
    --python "$python" --command "bench/run.sh${*:+ $*}" "$@" &
child=$!
trap 'kill -TERM $child 2>/dev/null; wait $child' INT TERM HUP
wait $child
