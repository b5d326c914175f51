//! Real parts for the integration tests (house habit 11): a mosquitto broker
//! run as a child process ([`Mosquitto`]), an independent QoS 2 subscriber
//! (`mosquitto_sub`, [`Subscriber`]), temporary directories and signals.
//!
//! Waiting is done on events where a part gives one (a line from a child, a
//! TCP accept); [`wait_for`] polls only what has no event, such as a row
//! appearing in an SQLite file.

// Each test module uses a different part of this kit: what one leaves unused
// is not dead.
#![allow(dead_code)]

pub mod fill;
pub mod mosquitto;
pub mod proxy;
pub mod rabbitmq;
pub mod receiver;
pub mod subscriber;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use mosquitto::Mosquitto;
pub use proxy::FaultProxy;
pub use rabbitmq::RabbitMq;
pub use receiver::{Received, Receiver};
pub use subscriber::{Delivery, Subscriber};

/// How often [`wait_for`] looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A TCP port on 127.0.0.1 that was free a moment ago: the kernel picks it
/// for a throwaway listener. Another process may take it before the caller
/// binds it, so whoever binds it must retry on "address in use".
pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .expect("cannot bind an ephemeral port on 127.0.0.1")
        .port()
}

/// The `hearth` binary that cargo built for this test run.
pub fn hearth_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hearth"))
}

/// Calls `f` every 20 ms until it returns `Some`, for conditions that send
/// no event. Panics naming `what` when `timeout` passes first.
#[track_caller]
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Waits on `changed` until `done` holds for the guarded state or `timeout`
/// passes; returns the guard either way (the caller's assertion shows why).
pub fn wait_on<'a, S>(
    mut state: std::sync::MutexGuard<'a, S>,
    changed: &std::sync::Condvar,
    timeout: Duration,
    mut done: impl FnMut(&S) -> bool,
) -> std::sync::MutexGuard<'a, S> {
    let deadline = Instant::now() + timeout;
    while !done(&state) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        state = changed
            .wait_timeout(state, left)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0;
    }
    state
}

/// A temporary directory, removed when dropped. Set `HEARTH_KEEP_TEST_DIRS=1`
/// to keep it for a post-mortem; its path is printed then.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("hearth-test-")
            .tempdir()
            .expect("cannot create a temporary directory");
        TestDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `name` inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A new sub-directory `name`, e.g. one per broker or per gateway.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let path = self.join(name);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|err| panic!("cannot create `{}`: {err}", path.display()));
        path
    }
}

impl Default for TestDir {
    fn default() -> Self {
        TestDir::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("HEARTH_KEEP_TEST_DIRS").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("kept test directory `{}`", self.dir.path().display());
        }
    }
}

/// Sends SIGTERM (what systemd sends on stop) to `pid`.
#[track_caller]
pub fn sigterm(pid: u32) {
    signal(pid, libc::SIGTERM, "SIGTERM");
}

/// Sends SIGKILL to `pid`: a crash, or a power cut as far as the process can tell.
#[track_caller]
pub fn sigkill(pid: u32) {
    signal(pid, libc::SIGKILL, "SIGKILL");
}

/// Sends `sig` to `pid`; panics if the process does not exist. A child that
/// exited but was not yet waited for still exists (as a zombie).
#[track_caller]
pub fn signal(pid: u32, sig: libc::c_int, name: &str) {
    if let Err(err) = send_signal(pid, sig) {
        panic!("cannot send {name} to process {pid}: {err}");
    }
}

/// Sends `sig` to `pid`, for callers that must not panic (`Drop`).
pub fn send_signal(pid: u32, sig: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
