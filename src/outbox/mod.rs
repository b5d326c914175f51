//! The durable outbox between the serial port and the broker.
//!
//! [`store::Store`] is the synchronous SQLite layer and states the
//! guarantees. [`StoreHandle`] gives async tasks access to it: the one
//! writable connection lives on its own thread, so a slow fsync never blocks
//! the runtime, and every call runs to COMMIT before its future resolves.

pub mod store;

use std::path::Path;
use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot};

pub use store::{
    Connack, Counts, Exchange, Insert, ListFilter, Queued, ReadingRow, Store, StoreError,
};

type Job = Box<dyn FnOnce(&mut Store) + Send>;

/// A cloneable handle to the store thread.
#[derive(Clone)]
pub struct StoreHandle {
    jobs: mpsc::Sender<Job>,
    queued: Arc<Notify>,
}

impl StoreHandle {
    /// Opens the gateway's store on the calling thread (so errors surface
    /// at start), then moves it to a thread of its own: integrity check (a damaged database is
    /// moved aside, see [`Store::open_checked`]) and size cap. Returns where
    /// a damaged database was moved, if one was.
    pub fn open_gateway(
        path: &Path,
        max_bytes: u64,
    ) -> Result<(StoreHandle, Option<std::path::PathBuf>), StoreError> {
        let (mut store, moved) = Store::open_checked(path)?;
        store.set_size_cap(max_bytes)?;
        Ok((Self::spawn(store), moved))
    }

    pub fn spawn(mut store: Store) -> StoreHandle {
        let (jobs, mut rx) = mpsc::channel::<Job>(64);
        std::thread::Builder::new()
            .name("hearth-store".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    job(&mut store);
                }
            })
            .expect("spawning the store thread");
        StoreHandle {
            jobs,
            queued: Arc::new(Notify::new()),
        }
    }

    /// Runs `f` on the store thread and returns its result.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |store| {
            let _ = tx.send(f(store));
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Records a small fact for `hearth status` (link states, alarms). A
    /// failure is logged, not returned: it must not stop the caller.
    pub async fn record(&self, key: &'static str, value: serde_json::Value) {
        let value = value.to_string();
        if let Err(e) = self.call(move |s| s.set_state(key, &value)).await {
            tracing::warn!(key, error = %e, "Cannot record state for `hearth status`.");
        }
    }

    /// Wakes the publisher: new readings were queued.
    pub fn notify_queued(&self) {
        self.queued.notify_one();
    }

    /// Resolves once readings were queued since the last call.
    pub async fn queued(&self) {
        self.queued.notified().await
    }
}
