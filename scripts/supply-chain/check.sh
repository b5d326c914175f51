#!/usr/bin/env bash
# hearth's supply-chain check: cargo-deny's advisories, bans, licenses and
# sources checks against the RustSec advisories kept in this repository. Fails
# on any finding that deny.toml does not waive; prints one line per check.
#
#   scripts/supply-chain/check.sh
#
# 1. Installs cargo-deny (pinned, `--locked`) when it is missing or another
#    version; about 5 minutes on two cores, once per machine.
# 2. advisory-db: the in-repo copy (advisory-db/, pruned to Cargo.lock's
#    crates by update-advisories.sh) must cover Cargo.lock: every crate name
#    in Cargo.lock must be in advisory-db/lockfile-crates.txt, the names that
#    were looked up in the full snapshot, and its files must match its
#    SHA256SUMS. Where the snapshot is present
#    (../shared/advisory-db, or $HEARTH_ADVISORY_SNAPSHOT), the copy must also
#    be the same snapshot and hold the same files for every crate of
#    Cargo.lock. Otherwise: run update-advisories.sh and commit.
# 3. Makes a git repository of the copy in a scratch folder (cargo-deny reads
#    the database from a git checkout and dates it by its commit: the commit
#    carries the snapshot's date), and runs cargo-deny `--frozen`: nothing is
#    fetched, neither the database nor Cargo.lock's resolution. The crates'
#    sources must be in Cargo's cache for `cargo metadata`; `cargo fetch`
#    brings the missing ones (for every platform) from the registry first.
# 4. Two graphs (see deny.toml): the production graph (`--no-default-features
#    --exclude-dev`, what the .deb ships) with no waiver, and the full graph
#    (`demo`, dev-dependencies) with deny.toml's waivers, none of them unused.
#
# Needs cargo and git. Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."

deny_version=0.20.2
here=scripts/supply-chain
config=$here/deny.toml
copy=$here/advisory-db
snapshot=${HEARTH_ADVISORY_SNAPSHOT:-../shared/advisory-db}
# The folder name cargo-deny 0.20 derives from its default database address
# (`{last path segment}-{xxhash64 of the lower-cased address}`) under db-path.
# Another cargo-deny version may derive another; it then stops with "failed to
# get 'HEAD' metadata" and this name needs updating (`cargo deny -L debug`
# prints the one it wants: "Opening advisory database at ...").
db_name=advisory-db-3157b0e258782691

say() { echo "check.sh: $*"; }
fail() {
    echo "check.sh: $*" >&2
    exit 1
}

# 1. cargo-deny, pinned.
if [ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $deny_version" ]; then
    say "installing cargo-deny $deny_version (cargo install --locked, a few minutes)"
    cargo install cargo-deny --locked --version "$deny_version" --quiet
fi

# 2. The in-repo copy covers Cargo.lock.
[ -f "$copy/lockfile-crates.txt" ] || fail "\`$copy/lockfile-crates.txt\` is missing: run $here/update-advisories.sh"
lock_names=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.lock | sort -u)
looked_up=$(grep -v '^#' "$copy/lockfile-crates.txt" | sort -u)
not_looked_up=$(comm -23 <(echo "$lock_names") <(echo "$looked_up"))
if [ -n "$not_looked_up" ]; then
    fail "advisory-db FAILED: Cargo.lock has crates the in-repo advisory copy never looked up: $(tr '\n' ' ' <<<"$not_looked_up"); run $here/update-advisories.sh where ../shared/advisory-db is, and commit $copy"
fi
# Intact: exactly the files SHA256SUMS lists, with those contents.
if ! (cd "$copy" && sha256sum --check --quiet --strict SHA256SUMS >/dev/null 2>&1 &&
    diff <(find . -type f ! -name SHA256SUMS | LC_ALL=C sort) <(awk '{ print $2 }' SHA256SUMS) >/dev/null); then
    fail "advisory-db FAILED: \`$copy\` does not match its SHA256SUMS (a file changed, missing or added): run $here/update-advisories.sh"
fi
commit=$(sed -n 's/^\([0-9a-f]\{40\}\), dated \*\*\([0-9-]*\)\*\*.*/\1/p' "$copy/README.md")
date=$(sed -n 's/^\([0-9a-f]\{40\}\), dated \*\*\([0-9-]*\)\*\*.*/\2/p' "$copy/README.md")
if [ -z "$commit" ] || [ -z "$date" ]; then
    fail "\`$copy/README.md\` names no snapshot commit and date: run $here/update-advisories.sh"
fi
age=$((($(date -u +%s) - $(date -u -d "$date" +%s)) / 86400))
if [ -d "$snapshot/crates" ]; then
    if ! tr -s ' \n' '  ' <"$snapshot/README.md" | grep -q "commit $commit ($date)"; then
        fail "advisory-db FAILED: the in-repo copy is of snapshot $commit ($date), \`$snapshot\` is another: run $here/update-advisories.sh and commit $copy"
    fi
    differ=()
    for name in $lock_names; do
        if [ -d "$snapshot/crates/$name" ] || [ -d "$copy/crates/$name" ]; then
            diff -rq "$snapshot/crates/$name" "$copy/crates/$name" >/dev/null 2>&1 || differ+=("$name")
        fi
    done
    ((${#differ[@]} == 0)) ||
        fail "advisory-db FAILED: the in-repo copy differs from \`$snapshot\` for ${differ[*]}: run $here/update-advisories.sh and commit $copy"
    compared="same as $snapshot"
else
    compared="$snapshot absent, not compared"
fi
say "advisory-db ok: in-repo copy of RustSec snapshot ${commit:0:12} ($date, $age days old), all $(echo "$lock_names" | wc -l) crate names of Cargo.lock looked up; $compared"
((age <= 90)) || say "warning: the advisory snapshot is $age days old: advisories published since $date are not checked (a newer snapshot in ../shared/advisory-db, then $here/update-advisories.sh)"

# 3. The database as a git repository dated to the snapshot, and the crates'
# sources for `cargo metadata`.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
db=$scratch/dbs/$db_name
mkdir -p "$scratch/dbs"
cp -r "$copy" "$db"
git -C "$db" init -q
git -C "$db" add -A
GIT_AUTHOR_DATE="${date}T00:00:00Z" GIT_COMMITTER_DATE="${date}T00:00:00Z" \
    git -C "$db" -c user.name=snapshot -c user.email=snapshot@localhost -c commit.gpgsign=false \
    commit -qm "RustSec advisory-db $commit, pruned"
# cargo-deny takes the newer of the commit's date and .git/HEAD's mtime.
touch -d "${date}T00:00:00Z" "$db/.git/HEAD"
export HEARTH_ADVISORY_DBS=$scratch/dbs

cargo fetch --locked --offline --quiet 2>/dev/null || cargo fetch --locked --quiet

# 4. Each check on each graph, as its own cargo-deny run (1-2 s each), so
# that every diagnostic is attributed to its check. cargo-deny writes JSON
# lines to stderr: one per diagnostic, then a summary with the counts.
production=(--no-default-features --exclude-dev)
production_lints=(-D advisory-ignored -A advisory-not-detected -A license-not-encountered)
full_lints=(-D advisory-not-detected)
json() { # graph, check: the JSON lines of that run
    cat "$scratch/$1-$2.json"
}
run() { # graph, check
    local graph=$1 check=$2 args
    if [ "$graph" = production ]; then
        args=("${production[@]}" check "${production_lints[@]}" "$check")
    else
        args=(check "${full_lints[@]}" "$check")
    fi
    if ! cargo deny -L info --frozen -f json --config "$config" "${args[@]}" \
        2>"$scratch/$graph-$check.json" >/dev/null; then
        if ! grep -q '"type":"summary"' "$scratch/$graph-$check.json"; then
            # Stopped before checking: a bad config, a database it cannot read.
            cat "$scratch/$graph-$check.json" >&2
            fail "cargo-deny could not run \`$check\` on the $graph graph (above)"
        fi
        echo "check.sh: $check FAILED on the $graph graph; cargo-deny says:" >&2
        [ "$graph" != production ] || [ "$check" != advisories ] ||
            echo "check.sh: (on the production graph a waiver that matches is an error: the waivers are for the demo only)" >&2
        cargo deny --frozen --color never --config "$config" "${args[@]}" >&2 || true
        return 1
    fi
}
count() { # graph, check, field of the summary
    json "$1" "$2" | grep '"type":"summary"' | grep -o "\"$3\":[0-9]*" | cut -d: -f2
}
warnings() { # graph, check: "N code" for each warning code
    json "$1" "$2" | grep '"type":"diagnostic"' | grep '"severity":"warning"' |
        grep -o '"code":"[a-z-]*"' | cut -d'"' -f4 | sort | uniq -c |
        awk '{ printf "%s%s %s", (NR > 1 ? ", " : ""), $1, $2 }' || true
}
waived() { # graph: the advisories a waiver let through
    json "$1" advisories | grep '"type":"diagnostic"' | grep '"severity":"note"' |
        grep -v '"code":"advisory-ignored"' | grep -o '"id":"RUSTSEC-[0-9-]*"' |
        cut -d'"' -f4 | sort -u | paste -sd' ' - || true
}

failed=()
for check in advisories bans licenses sources; do
    status=ok
    line=""
    for graph in production full; do
        run "$graph" "$check" || status=FAILED
        detail="$(count "$graph" "$check" errors) errors"
        w=$(warnings "$graph" "$check")
        [ -z "$w" ] || detail+=", warnings: $w"
        if [ "$check" = advisories ]; then
            v=$(waived "$graph")
            if [ -n "$v" ] && [ "$graph" = production ]; then
                detail+=" (waivers hit, not allowed here: $v)"
            elif [ -n "$v" ]; then
                detail+=", waived: $v"
            fi
        fi
        line+="${line:+; }$graph $detail"
    done
    say "$check $status ($line)"
    [ "$status" = ok ] || failed+=("$check")
done
((${#failed[@]} == 0)) || fail "FAILED: unwaived findings in ${failed[*]} (above)"
