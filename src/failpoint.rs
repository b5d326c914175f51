//! Crash points for tests, named as the fake they are.
//!
//! With `HEARTH_TEST_FAILPOINT=NAME` (or `NAME:N`) in its environment, the
//! process aborts, as a kill -9 would, the first (or Nth) time it reaches
//! the point NAME. A real crash cannot be aimed at the microseconds between
//! a commit and the packet it allows; this lets the tests hit every such
//! window on purpose (`tests/crash.rs`). Without the variable each point
//! costs one check of an already-initialised value.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The points, in the order a reading meets them.
pub const POINTS: &[&str] = &[
    "stored-not-acked",
    "publish-recorded",
    "publish-sent",
    "release-recorded",
    "pubrel-sent",
    "pubcomp-received",
];

static SPEC: OnceLock<Option<(String, u32)>> = OnceLock::new();
static HITS: AtomicU32 = AtomicU32::new(0);

fn spec() -> &'static Option<(String, u32)> {
    SPEC.get_or_init(|| {
        let value = std::env::var("HEARTH_TEST_FAILPOINT").ok()?;
        let (name, nth) = match value.split_once(':') {
            Some((name, n)) => (name.to_owned(), n.parse().unwrap_or(1)),
            None => (value, 1),
        };
        Some((name, nth))
    })
}

/// Aborts the process here if the test asked for it.
pub fn hit(name: &'static str) {
    if let Some((wanted, nth)) = spec()
        && wanted == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth
    {
        eprintln!("hearth: failpoint `{name}` reached: aborting as a crash would");
        std::process::abort();
    }
}
