//! How the audit trail names a device without its serial.
//!
//! An implant's serial is patient data: it never goes into the trail. An
//! entry about a device (a reset, a seq conflict, a `--device` in a
//! command line) names it by its reference instead: the first 16 hex digits
//! of HMAC-SHA256(store key, serial). The key is 32 random bytes kept in
//! the store (`gateway_state` key `audit_device_key`), made by the first
//! start of a gateway that keeps an audit trail. So:
//! - the same device has the same reference in every entry, and entries
//!   about it can be followed through the trail;
//! - the trail alone, printed or exported, does not give the serial back,
//!   not even by trying every serial (a plain hash would: serials are few);
//! - whoever holds the store (and so its serials anyway) can tie a
//!   reference to its device: `hearth audit --device SERIAL`.
//!
//! A store moved aside takes its key with it; the new store makes a new one.

use crate::outbox::{Store, StoreError};

/// The `gateway_state` key of the reference key (hex).
pub const KEY_STATE: &str = "audit_device_key";

/// The reference of `device` in the trail of `store`, making the store's
/// key first if it has none yet.
///
/// Two processes that both find no key at the same moment (a CLI command
/// on a store whose gateway is starting for the first time since the
/// upgrade) may each make one; the second write wins, and the first one's
/// entry keeps a reference that matches no other. The gateway makes the
/// key at start, before its tasks, which leaves only that narrow window.
pub fn device_ref(store: &mut Store, device: &str) -> Result<String, StoreError> {
    let key = match store.state(KEY_STATE)? {
        Some(key) => key,
        None => {
            let key = new_key();
            store.set_state(KEY_STATE, &key)?;
            key
        }
    };
    Ok(keyed(&key, device))
}

/// The reference of `device` from a read-only store; `None` while the
/// store has no key (then no entry names a device yet).
pub fn device_ref_read_only(store: &Store, device: &str) -> Result<Option<String>, StoreError> {
    Ok(store.state(KEY_STATE)?.map(|key| keyed(&key, device)))
}

/// Makes sure the store has its key, so that the CLI seldom has to make it.
pub fn ensure_key(store: &mut Store) -> Result<(), StoreError> {
    device_ref(store, "").map(drop)
}

fn new_key() -> String {
    use ring::rand::SecureRandom;
    let mut key = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut key)
        .expect("the system's random source works");
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first 64 bits of HMAC-SHA256(`key`, `device`), in hex.
fn keyed(key: &str, device: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    let tag = ring::hmac::sign(&key, device.as_bytes());
    tag.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_is_stable_per_device_and_store_and_tells_devices_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = crate::outbox::store::tests::open_at(&tmp.path().join("a.db"));
        assert_eq!(
            device_ref_read_only(&store, "PM-000001").unwrap(),
            None,
            "no key yet"
        );
        let one = device_ref(&mut store, "PM-000001").unwrap();
        assert_eq!(one.len(), 16);
        assert!(one.chars().all(|c| c.is_ascii_hexdigit()), "{one}");
        assert_eq!(device_ref(&mut store, "PM-000001").unwrap(), one);
        assert_eq!(
            device_ref_read_only(&store, "PM-000001")
                .unwrap()
                .as_deref(),
            Some(one.as_str())
        );
        assert_ne!(device_ref(&mut store, "PM-000002").unwrap(), one);

        // Another store has another key: the reference is not the serial's
        // hash, which anyone could compute.
        let mut other = crate::outbox::store::tests::open_at(&tmp.path().join("b.db"));
        assert_ne!(device_ref(&mut other, "PM-000001").unwrap(), one);
    }
}
