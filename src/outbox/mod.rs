//! The durable outbox between the serial port and the broker.
//!
//! [`store::Store`] is the synchronous SQLite layer and states the
//! guarantees. [`StoreHandle`] gives async tasks access to it: the one
//! writable connection lives on its own thread, so a slow fsync never blocks
//! the runtime, and every call runs to COMMIT before its future resolves.
//! Reports (the heartbeat's counts) run on a second, read-only connection
//! on a thread of its own ([`StoreHandle::read`]), so however large the
//! store grows they never delay a serial ACK.
//!
//! [`ingest`] holds the rules by which a reading from the line is stored.
//! The store is encrypted at rest ([`cipher`]) with a key from [`key`].

pub mod cipher;
pub mod ingest;
pub mod key;
pub mod store;
pub mod views;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot};

pub use ingest::{Flag, Insert};
pub use key::Encryption;
pub use store::{
    Connack, Counts, DeviceRow, Exchange, ListFilter, Queued, ReadingRow, RejectedFrame,
    RejectedRow, Store, StoreError,
};

type Job = Box<dyn FnOnce(&mut Store) + Send>;

/// A cloneable handle to the store thread (and the report thread).
#[derive(Clone)]
pub struct StoreHandle {
    jobs: mpsc::Sender<Job>,
    /// The read-only connection's thread; `None` for a store without a file
    /// to open twice, where reports run on the store thread.
    reports: Option<mpsc::Sender<Job>>,
    queued: Arc<Notify>,
    /// The gateway's hold on its store (`{db}.lock`), while any handle
    /// lives.
    _lock: Option<Arc<std::fs::File>>,
}

/// Takes the exclusive hold of `hearth run` on the store at `path`: an
/// `flock` on `{db}.lock` (made 0644 and empty, so that root's CLI and the
/// service user can both take it), held for as long as the file stays open.
pub fn lock_store(path: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let io = |source| StoreError::Io {
        path: lock_path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .or_else(|_| std::fs::File::open(&lock_path))
        .map_err(io)?;
    // Whoever made it, both may open it again (the umask may say 0600).
    let _ = file.set_permissions(std::fs::Permissions::from_mode(0o644));
    // SAFETY: a valid open fd for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
            StoreError::Locked(path.to_owned())
        } else {
            io(e)
        });
    }
    Ok(file)
}

impl StoreHandle {
    /// Opens the gateway's store on the calling thread (so errors surface
    /// at start), then moves it to a thread of its own: its key found (or
    /// made), a plain store encrypted, integrity check (a damaged database
    /// is moved aside, see [`Store::open_checked`]) and size cap. Returns
    /// where a damaged database was moved, if one was. A plaintext store
    /// (`store.encrypt = false`) is announced with a WARN at every start.
    pub fn open_gateway(
        config: &crate::config::Config,
        max_bytes: u64,
    ) -> Result<(StoreHandle, Option<PathBuf>), StoreError> {
        let path = &config.store.path;
        // Before anything reads or changes the files: a second gateway
        // would race this one's encryption in place or damage check.
        let lock = lock_store(path)?;
        let encryption = Encryption::from_config(&config.store, &config.source);
        if let Encryption::Off = encryption {
            tracing::warn!(
                store = %path.display(),
                "Store encryption is off (`store.encrypt = false`): readings and device serials are kept in plaintext on disk."
            );
        }
        let (mut store, moved) = Store::open_checked(path, &encryption)?;
        if let (Encryption::On(ring), true) = (&encryption, store.encrypted()) {
            tracing::info!(key = %ring.source(), "Store encrypted at rest (SQLCipher).");
        }
        store.set_size_cap(max_bytes)?;
        let reader = store.open_reader(&encryption)?;
        let mut handle = Self::spawn(store);
        handle.reports = Some(job_thread("hearth-reports", reader));
        handle._lock = Some(Arc::new(lock));
        Ok((handle, moved))
    }

    pub fn spawn(store: Store) -> StoreHandle {
        StoreHandle {
            jobs: job_thread("hearth-store", store),
            reports: None,
            queued: Arc::new(Notify::new()),
            _lock: None,
        }
    }

    /// Runs the read-only `f` on the report connection: it sees the last
    /// committed state and never waits for, or delays, the store thread.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let jobs = self.reports.as_ref().unwrap_or(&self.jobs);
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |store| {
            let _ = tx.send(f(store));
        });
        jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
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

    /// Appends a security event to the audit trail as `hearth run`. A
    /// failure is logged, not returned: it must not stop the caller.
    pub async fn audit(&self, kind: &'static str, detail: serde_json::Value) {
        if let Err(e) = self
            .call(move |s| s.audit(kind, "hearth run", &detail))
            .await
        {
            tracing::warn!(kind, error = %e, "Cannot record an audit event.");
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

/// Starts a thread that runs jobs against `store` one by one.
fn job_thread(name: &str, mut store: Store) -> mpsc::Sender<Job> {
    let (jobs, mut rx) = mpsc::channel::<Job>(64);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Some(job) = rx.blocking_recv() {
                job(&mut store);
            }
        })
        .expect("spawning a store thread");
    jobs
}
