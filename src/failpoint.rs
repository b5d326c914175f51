//! Crash and panic points for tests, named as the fake they are.
//!
//! With `HEARTH_TEST_FAILPOINT=NAME` (or `NAME:N`) in its environment, the
//! process aborts, as a kill -9 would, the first (or Nth) time it reaches
//! the crash point NAME ([`hit`]). A real crash cannot be aimed at the
//! microseconds between a commit and the packet it allows; this lets the
//! tests hit every such window on purpose (`tests/crash.rs`). The panic
//! points ([`panic_at`], [`armed`]) stand for a bug instead: a task that
//! panics, or the store thread dying under the publisher, which the
//! gateway must turn into a non-zero exit (`tests/faults.rs`). Without the
//! variable each point costs one check of an already-initialised value.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The crash points, in the order a reading meets them; the last two are
/// met on a reconnect: after CONNECT was written (its pending record
/// committed) and before its CONNACK was read, and in the resume after
/// some but not all resumed packets were written.
pub const POINTS: &[&str] = &[
    "stored-not-acked",
    "publish-recorded",
    "publish-sent",
    "release-recorded",
    "pubrel-sent",
    "pubcomp-received",
    "connect-sent",
    "resume-partly-sent",
];

/// The crash points of the store's encryption (`tests/encryption.rs`):
/// a plain store's encrypted copy written and not yet renamed over it, and
/// just renamed; a key change's new key written beside the old and the
/// store not yet re-encrypted, and the store re-encrypted with the new key
/// not yet in the old one's place. Kept apart from [`POINTS`], which
/// `tests/crash.rs` walks as the windows of the delivery protocol.
pub const STORE_POINTS: &[&str] = &[
    "encrypt-copied",
    "encrypt-renamed",
    "rekey-pending-written",
    "rekey-committed",
];

/// The panic points: the publisher task panics once connected; the store
/// thread panics in a call the publisher makes once connected.
pub const PANICS: &[&str] = &["publisher-panics", "store-thread-panics"];

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

/// Counts a visit to `name`; true on the visit the test asked for.
pub fn armed(name: &'static str) -> bool {
    matches!(spec(), Some((wanted, nth))
        if wanted == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth)
}

/// Aborts the process here if the test asked for it.
pub fn hit(name: &'static str) {
    if armed(name) {
        eprintln!("hearth: failpoint `{name}` reached: aborting as a crash would");
        std::process::abort();
    }
}

/// Panics here if the test asked for it, as a bug in this task would.
pub fn panic_at(name: &'static str) {
    if armed(name) {
        panic!("failpoint `{name}` reached: panicking as a bug would");
    }
}
