#!/usr/bin/env bash
# Builds hearth's Debian package: the production binary (profile `dist`,
# without the `demo` feature), its shell completions and man pages, then the
# .deb by cargo-deb from `[package.metadata.deb]` in Cargo.toml. Prints the
# .deb's path and the binary's size, and fails if the binary is over 6 MiB.
# Beside the .deb it writes the CycloneDX SBOM of the packaged binary's crate
# graph, `hearth_<version>_<arch>.cdx.json`; the package holds the same file as
# /usr/share/doc/hearth/sbom.cdx.json.
#
#   scripts/deb.sh                                     # this machine's architecture
#   scripts/deb.sh --target aarch64-unknown-linux-gnu  # cross-build, e.g. arm64
#
# Needs cargo-deb (`cargo install cargo-deb --locked`), cargo-cyclonedx
# (`cargo install cargo-cyclonedx --locked --version 0.5.9`) and dpkg-dev (its
# dpkg-shlibdeps fills in the libc dependency). Honours CARGO_TARGET_DIR and
# SOURCE_DATE_EPOCH (the SBOM's time stamp; by default the last commit's time,
# so that the same commit makes the same SBOM).
#
# `--target TRIPLE` is passed to both `cargo build` and `cargo deb`, which then
# package `$CARGO_TARGET_DIR/TRIPLE/dist/hearth` for the matching Debian
# architecture. That needs what any cross-build of hearth needs: the rustup
# target, a cross linker set for Cargo (e.g. `[target.aarch64-unknown-linux-gnu]
# linker = "aarch64-linux-gnu-gcc"`), a C cross compiler for the bundled SQLite
# (`CC_aarch64_unknown_linux_gnu`), and the target's libc6 (`dpkg
# --add-architecture arm64; apt-get install libc6:arm64`) for dpkg-shlibdeps.
# The completions and man pages do not depend on the architecture; they are
# made by a host build of the same binary.
set -euo pipefail
cd "$(dirname "$0")/.."

target=""
while (($#)); do
    case "$1" in
    --target)
        (($# >= 2)) || { echo "deb.sh: --target needs a triple" >&2; exit 2; }
        target=$2
        shift 2
        ;;
    --target=*)
        target=${1#--target=}
        shift
        ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "deb.sh: unknown argument \`$1\` (only --target TRIPLE)" >&2
        exit 2
        ;;
    esac
done

command -v cargo-deb >/dev/null || {
    echo "deb.sh: cargo-deb is missing: cargo install cargo-deb --locked" >&2
    exit 1
}
command -v cargo-cyclonedx >/dev/null || {
    echo "deb.sh: cargo-cyclonedx is missing: cargo install cargo-cyclonedx --locked --version 0.5.9" >&2
    exit 1
}

build=(cargo build --profile dist --no-default-features --locked)
target_dir=$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
host=$(rustc -vV | sed -n 's/^host: //p')

if [ -n "$target" ]; then
    echo "deb.sh: building hearth for $target"
    "${build[@]}" --target "$target"
    binary=$target_dir/$target/dist/hearth
else
    echo "deb.sh: building hearth"
    "${build[@]}"
    binary=$target_dir/dist/hearth
fi
generator=$binary
if [ -n "$target" ] && [ "$target" != "$host" ]; then
    echo "deb.sh: building hearth for this machine, to write the completions and man pages"
    "${build[@]}"
    generator=$target_dir/dist/hearth
fi

# The assets' paths are the ones in [package.metadata.deb] assets.
assets=target/dist-assets
rm -rf "$assets"
mkdir -p "$assets/completions" "$assets/man"
"$generator" completions bash >"$assets/completions/hearth"
"$generator" completions zsh >"$assets/completions/_hearth"
"$generator" completions fish >"$assets/completions/hearth.fish"
"$generator" man --out "$assets/man"
# -n: no name or time stamp in the archive, so the same pages make the same bytes.
gzip -9n "$assets"/man/*.1

# The SBOM: the crates of the packaged build (no default features, so no demo
# and no rumqttd; no dev-dependencies), for the target built. Build-time crates
# (build scripts' dependencies) are listed with scope `excluded`.
# cargo-cyclonedx writes next to Cargo.toml; the file is moved into the assets.
sbom_name="target-dist-sbom"
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)} \
    cargo cyclonedx --quiet --format json --spec-version 1.5 --no-default-features \
    --target "${target:-$host}" --override-filename "$sbom_name"
mv "$sbom_name.json" "$assets/sbom.cdx.json"
# The packaged graph must not hold the demo's broker.
if grep -q '"name": "rumqttd"' "$assets/sbom.cdx.json"; then
    echo "deb.sh: the SBOM lists rumqttd: the packaged graph has the demo in it" >&2
    exit 1
fi

size=$(stat -c %s "$binary")
limit=$((6 * 1024 * 1024))
if ((size > limit)); then
    echo "deb.sh: $binary is $size bytes, over the 6 MiB limit ($limit)" >&2
    exit 1
fi

deb_args=(--no-build --profile dist)
[ -z "$target" ] || deb_args+=(--target "$target")
# cargo-deb prints the path of the package it wrote as its last line.
deb=$(cargo deb "${deb_args[@]}" | tail -n 1)
sbom=${deb%.deb}.cdx.json
cp "$assets/sbom.cdx.json" "$sbom"

echo "deb.sh: package $deb"
echo "deb.sh: SBOM $sbom ($(grep -c '"bom-ref": "registry+' "$sbom") registry crates, CycloneDX 1.5)"
echo "deb.sh: binary $binary: $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }') MiB, limit 6 MiB)"
