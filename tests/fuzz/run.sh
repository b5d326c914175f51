#!/usr/bin/env bash
# The long fuzzing run: every target in turn for SECONDS each (default 600),
# from the committed seeds (tests/fuzz/seeds/TARGET) and the working corpus
# that earlier runs grew (tests/fuzz/corpus/TARGET, not committed), under a
# 512 MB RSS limit and a 64 MB limit on any one allocation (an input is a few
# KB: a larger allocation is a length taken on trust). Needs the nightly
# toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`). Builds in
# tests/fuzz/target, or in $HEARTH_FUZZ_TARGET_DIR.
#
# A crash stops the run, its input saved in tests/fuzz/artifacts/TARGET/.
# Replay it with `cargo +nightly fuzz run --fuzz-dir tests/fuzz TARGET FILE`,
# shrink it with `cargo +nightly fuzz tmin --fuzz-dir tests/fuzz TARGET FILE`;
# once fixed, commit it to tests/fuzz/seeds/TARGET under a name that says
# what broke: `cargo test` then replays it on every run.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-600}
targets=(frame_decoder config_parse mqtt_incoming)
target_dir=${HEARTH_FUZZ_TARGET_DIR:-tests/fuzz/target}

# The fuzz crate is its own workspace: start its lock from the main one, so
# that the code fuzzed is built from the dependency versions hearth ships.
cp Cargo.lock tests/fuzz/Cargo.lock

# AddressSanitizer keeps 256 MB of freed memory in quarantine by default,
# which alone would put the MQTT target near the RSS limit; 32 MB leaves the
# limit to measure the code under test.
export ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=32}

rustup run nightly rustc --version >/dev/null 2>&1 || {
    echo "run.sh: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
    exit 2
}
command -v cargo-fuzz >/dev/null || {
    echo "run.sh: cargo-fuzz is missing (cargo install cargo-fuzz --locked)" >&2
    exit 2
}
fuzz=(cargo +nightly fuzz)
"${fuzz[@]}" build --fuzz-dir tests/fuzz --target-dir "$target_dir"
for target in "${targets[@]}"; do
    echo "fuzz: $target for ${seconds}s"
    mkdir -p "tests/fuzz/corpus/$target"
    "${fuzz[@]}" run --fuzz-dir tests/fuzz --target-dir "$target_dir" "$target" \
        "tests/fuzz/corpus/$target" "tests/fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=512 -malloc_limit_mb=64 -timeout=10 -print_final_stats=1
done
