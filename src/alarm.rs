//! Active alarms: conditions that need an operator, shown in the status
//! payload and by `hearth status`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// A shared, cloneable set of alarm codes such as `store-full`.
#[derive(Debug, Clone, Default)]
pub struct Alarms(Arc<Mutex<BTreeSet<&'static str>>>);

impl Alarms {
    /// Raises an alarm; returns true if it was not active before.
    pub fn raise(&self, code: &'static str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(code)
    }

    /// Clears an alarm; returns true if it was active.
    pub fn clear(&self, code: &'static str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(code)
    }

    pub fn active(&self) -> Vec<String> {
        let set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        set.iter().map(|s| s.to_string()).collect()
    }
}

impl Alarms {
    /// Writes the active alarms to the store for `hearth status`.
    pub async fn record(&self, store: &crate::outbox::StoreHandle) {
        let value = serde_json::to_string(&self.active()).unwrap_or_default();
        if let Err(e) = store.call(move |s| s.set_state("alarms", &value)).await {
            tracing::warn!(error = %e, "Cannot record alarms.");
        }
    }
}
