#!/usr/bin/env bash
# Refreshes the in-repo advisory copy (scripts/supply-chain/advisory-db/) from
# a snapshot of the RustSec advisory database, by default the one beside the
# repository (../shared/advisory-db; another folder may be given).
#
#   scripts/supply-chain/update-advisories.sh [SNAPSHOT_DIR]
#
# The copy holds `crates/NAME/` for every crate name in Cargo.lock that the
# snapshot has advisories for, and `lockfile-crates.txt`: every crate name in
# Cargo.lock at the time, i.e. every name that was looked up, and SHA256SUMS
# of every file. check.sh fails when Cargo.lock names a crate that is not in
# that list (it was never looked up), when a file does not match SHA256SUMS
# and, when the snapshot is there, when the copy differs from it. So the
# pruning can hide no advisory that applies to a crate in Cargo.lock.
#
# Run it after changing dependencies (check.sh says when) or when a newer
# snapshot arrives, and commit what it changes.
set -euo pipefail
cd "$(dirname "$0")/../.."

snapshot=${1:-../shared/advisory-db}
out=scripts/supply-chain/advisory-db

if [ ! -d "$snapshot/crates" ]; then
    echo "update-advisories.sh: no advisory database at \`$snapshot\` (expected a \`crates/\` folder)" >&2
    exit 1
fi
# The snapshot's README names its upstream commit and date, maybe across a
# line break: "... at commit <40 hex> (YYYY-MM-DD) ...".
stamp=$(tr -s ' \n' '  ' <"$snapshot/README.md" |
    grep -o 'commit [0-9a-f]\{40\} ([0-9]\{4\}-[0-9]\{2\}-[0-9]\{2\})' | head -n 1 || true)
commit=$(echo "$stamp" | sed -n 's/^commit \([0-9a-f]*\) .*/\1/p')
date=$(echo "$stamp" | sed -n 's/.*(\(.*\))$/\1/p')
if [ -z "$commit" ] || [ -z "$date" ]; then
    echo "update-advisories.sh: \`$snapshot/README.md\` names no commit and date (\"at commit HASH (YYYY-MM-DD)\")" >&2
    exit 1
fi

# Every package name in Cargo.lock, whatever the target or feature: the copy
# must serve every graph cargo-deny is asked about.
names=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.lock | sort -u)

rm -rf "$out"
mkdir -p "$out/crates"
cp "$snapshot/LICENSE.txt" "$snapshot/support.toml" "$out/"
{
    echo "# Every crate name in Cargo.lock when the copy was made: each was looked up"
    echo "# in snapshot $commit ($date). Written by update-advisories.sh."
    echo "$names"
} >"$out/lockfile-crates.txt"

with=()
files=0
for name in $names; do
    if [ -d "$snapshot/crates/$name" ]; then
        cp -r "$snapshot/crates/$name" "$out/crates/"
        with+=("$name")
        files=$((files + $(find "$snapshot/crates/$name" -type f | wc -l)))
    fi
done
# Copied from a read-only snapshot: make the copy writable for the next refresh.
chmod -R u+w "$out"

total_names=$(echo "$names" | wc -l)
total_advisories=$(find "$snapshot/crates" -type f -name '*.md' | wc -l)
cat >"$out/README.md" <<EOF
# RustSec advisories for hearth's Cargo.lock

A pruned copy of the RustSec advisory database (upstream: RustSec's
\`advisory-db\` repository), at upstream commit
$commit, dated **$date**. Licence: CC0 (LICENSE.txt).
Written by \`scripts/supply-chain/update-advisories.sh\` from
\`$snapshot\`; do not edit by hand.

- Crate names in Cargo.lock, all looked up: $total_names (\`lockfile-crates.txt\`).
- Of them with advisories, copied to \`crates/\`: ${#with[@]} crates, $files files
  (the whole snapshot has $total_advisories advisories).

Why pruned: CI starts from a clean clone where the snapshot may be absent, and
the whole database (about 5 MB in 1,200 files) is mostly about crates hearth
does not use. \`scripts/supply-chain/check.sh\` turns this folder into the
git repository cargo-deny reads, dated to the snapshot. It fails when
Cargo.lock names a crate missing from \`lockfile-crates.txt\` and, where the
snapshot is present, when this copy differs from it in any crate of
Cargo.lock: then run \`scripts/supply-chain/update-advisories.sh\` and commit.

The findings are only as new as $date: an advisory published after that is
not here.

Crates with advisories: ${with[*]}
EOF

# Every file's checksum, so that check.sh can tell an intact copy from a
# damaged one even where the snapshot is absent.
sums=$(cd "$out" && find . -type f | LC_ALL=C sort | xargs sha256sum)
echo "$sums" >"$out/SHA256SUMS"

echo "update-advisories.sh: $out: ${#with[@]} of $total_names crate names have advisories ($files files), snapshot $commit ($date)"
echo "update-advisories.sh: size $(du -sh --apparent-size "$out" | cut -f1) ($(find "$out" -type f | wc -l) files)"
