//! Active alarms: conditions that need an operator, shown in the status
//! payload and by `hearth status`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// A shared, cloneable set of alarm codes such as `store-full`; a change
/// wakes [`Alarms::changed`] so the hospital hears of it at once.
#[derive(Debug, Clone, Default)]
pub struct Alarms {
    set: Arc<Mutex<BTreeSet<&'static str>>>,
    changed: Arc<Notify>,
}

impl Alarms {
    /// Raises an alarm; returns true if it was not active before.
    pub fn raise(&self, code: &'static str) -> bool {
        let new = self.lock().insert(code);
        if new {
            self.changed.notify_one();
        }
        new
    }

    /// Clears an alarm; returns true if it was active.
    pub fn clear(&self, code: &'static str) -> bool {
        let was = self.lock().remove(code);
        if was {
            self.changed.notify_one();
        }
        was
    }

    pub fn active(&self) -> Vec<String> {
        self.lock().iter().map(|s| s.to_string()).collect()
    }

    /// Resolves after an alarm was raised or cleared.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<&'static str>> {
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the active alarms to the store for `hearth status`.
    pub async fn record(&self, store: &crate::outbox::StoreHandle) {
        store
            .record("alarms", serde_json::json!(self.active()))
            .await;
    }
}
