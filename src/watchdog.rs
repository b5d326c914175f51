//! The service manager's view of hearth: `WATCHDOG=1` only while every
//! long-lived task shows progress, `STATUS=` lines, and
//! `EXTEND_TIMEOUT_USEC` while a slow start is still making progress.
//!
//! A hung gateway is worse than a crashed one: systemd restarts a crash, but
//! a task stuck in a lost wakeup or a wedged fsync leaves the process alive
//! and the readings in the store. So the watchdog does not ping from a timer
//! of its own, which would go on while the work has stopped. Each task holds
//! a [`Beat`] and promises when it will next be heard from:
//! - [`Beat::tick`] after progress, or on the task's idle timer (every
//!   [`BEAT_EVERY`]), promises the next beat within [`WINDOW`];
//! - [`Beat::waiting`] before a wait with its own bound (the reconnect
//!   backoff, the port reopen delay, an I/O timeout) stretches the promise
//!   by that bound: an outage is a real reason to be idle, not a hang.
//!
//! The store thread cannot beat while it waits for work, so the watchdog
//! sends it an empty job every [`BEAT_EVERY`] and beats for it when the job
//! comes back: that proves the thread takes jobs, not just that it exists.
//!
//! [`run`] pings `WATCHDOG=1` while every promise holds and stops as soon as
//! one is broken; systemd kills and restarts hearth `WatchdogSec` later. A
//! promise broken for less than `WatchdogSec` (a store call slower than
//! [`WINDOW`]) only skips pings and costs nothing. So no single store job or
//! unannounced wait may take longer than [`WINDOW`] + `WatchdogSec` (35 s
//! with the shipped unit): long work is done in bounded steps (the prune).
//!
//! The tests freeze one task on purpose (`HEARTH_TEST_FAILPOINT=NAME:N`, a
//! fake hang named as such, see [`crate::failpoint`]): `reader-freezes`,
//! `publisher-freezes` and `store-freezes` stop that task for good at its
//! Nth beat.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::outbox::{Store, StoreError, StoreHandle};

/// How often an idle task beats.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
/// How long a beat holds: a task not heard from for this long (beyond a
/// bounded wait it announced) counts as hung.
pub const WINDOW: Duration = Duration::from_secs(5);
/// How often `STATUS=` is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(10);
/// How much start-up time each `EXTEND_TIMEOUT_USEC` asks for, and how often
/// it is sent while the store is checked.
const EXTEND_BY: Duration = Duration::from_secs(30);
const EXTEND_EVERY: Duration = Duration::from_secs(10);

/// Milliseconds on the process's monotonic clock.
fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One task's promise of its next sign of life.
#[derive(Debug)]
pub struct Beat {
    name: &'static str,
    /// The failpoint that freezes this task (tests only).
    freeze: &'static str,
    /// Until when (ms, [`now_ms`]) the task counts as alive.
    until: AtomicU64,
}

impl Beat {
    fn new(name: &'static str, freeze: &'static str) -> Arc<Beat> {
        Arc::new(Beat {
            name,
            freeze,
            until: AtomicU64::new(now_ms() + WINDOW.as_millis() as u64),
        })
    }

    /// A beat that no watchdog reads, for a task run on its own (tests).
    pub fn detached(name: &'static str) -> Arc<Beat> {
        Beat::new(name, "")
    }

    /// Progress: the task promises its next beat within [`WINDOW`].
    pub fn tick(&self) {
        self.promise(WINDOW);
    }

    /// The task enters a wait bounded by `bound`; it promises to beat once
    /// the wait is over.
    pub fn waiting(&self, bound: Duration) {
        self.promise(bound + WINDOW);
    }

    /// [`Beat::tick`] from an async task's idle timer, where a test may
    /// freeze the task for good (a lost wakeup: the task never runs again).
    pub async fn idle_tick(&self) {
        if crate::failpoint::armed(self.freeze) {
            tracing::warn!(task = self.name, "Failpoint: freezing this task for good.");
            std::future::pending::<()>().await;
        }
        self.tick();
    }

    fn promise(&self, d: Duration) {
        let until = now_ms().saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.until.store(until, Ordering::Relaxed);
    }

    fn alive(&self, now: u64) -> bool {
        self.until.load(Ordering::Relaxed) > now
    }
}

/// The beats of the gateway's tasks.
#[derive(Debug, Clone)]
pub struct Beats {
    pub reader: Arc<Beat>,
    pub publisher: Arc<Beat>,
    store: Arc<Beat>,
}

impl Default for Beats {
    fn default() -> Beats {
        Beats {
            reader: Beat::new("serial reader", "reader-freezes"),
            publisher: Beat::new("publisher", "publisher-freezes"),
            store: Beat::new("store thread", "store-freezes"),
        }
    }
}

impl Beats {
    /// The first task whose promise is broken, if any.
    fn hung(&self) -> Option<&'static str> {
        let now = now_ms();
        [&self.reader, &self.publisher, &self.store]
            .into_iter()
            .find(|b| !b.alive(now))
            .map(|b| b.name)
    }
}

/// Runs until `shutdown`: probes the store thread, pings `WATCHDOG=1` while
/// every task keeps its promise (when systemd asked for a watchdog), and
/// refreshes `STATUS=` (when started by a service manager).
pub async fn run(
    beats: Beats,
    store: StoreHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let notify = std::env::var_os("NOTIFY_SOCKET").is_some();
    let watchdog = sd_notify::watchdog_enabled();
    if let Some(period) = watchdog {
        tracing::info!(
            ?period,
            "Watchdog enabled: pinging while every task shows progress."
        );
    }
    // Pings well inside the period, so one late tick never trips it.
    let ping_every = watchdog.map_or(BEAT_EVERY, |p| {
        (p / 4).clamp(Duration::from_millis(100), BEAT_EVERY)
    });
    let probe = tokio::spawn(probe_store(
        store.clone(),
        beats.store.clone(),
        shutdown.clone(),
    ));
    let mut ping = tokio::time::interval(ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // STATUS= runs a report query; it has a task of its own, so that a slow
    // query on a large store never delays a ping.
    let status = notify.then(|| tokio::spawn(report_status(store.clone(), shutdown.clone())));
    let mut reported: Option<&'static str> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ping.tick(), if watchdog.is_some() => {
                match beats.hung() {
                    None => {
                        if let Some(task) = reported.take() {
                            tracing::info!(task, "Task shows progress again; watchdog pings resumed.");
                        }
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    }
                    Some(task) => {
                        if reported.is_none() {
                            tracing::error!(task, "Task shows no progress; watchdog pings stopped (systemd restarts hearth if it stays so).");
                            reported = Some(task);
                        }
                    }
                }
            }
        }
    }
    probe.abort();
    if let Some(status) = status {
        status.abort();
    }
    Ok(())
}

/// Refreshes `STATUS=` every [`STATUS_EVERY`] until `shutdown`.
async fn report_status(store: StoreHandle, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(STATUS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Ok(line) = store.read(status_line).await {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]);
        }
    }
}

/// `STATUS=`: the two links and the backlog, e.g. `broker connected,
/// serial open, backlog 0 alert + 12 routine, 3 in flight`.
fn status_line(store: &Store) -> Result<String, StoreError> {
    let link = |key: &str| -> Result<String, StoreError> {
        Ok(store
            .state(key)?
            .and_then(|v| serde_json::from_str::<serde_json::Value>(&v).ok())
            .and_then(|v| v["state"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "starting".into()))
    };
    let c = store.counts()?;
    Ok(format!(
        "broker {}, serial {}, backlog {} alert + {} routine, {} in flight",
        link("broker")?,
        link("serial")?,
        c.queued_alert,
        c.queued_routine,
        c.inflight
    ))
}

/// Sends the store thread an empty job every [`BEAT_EVERY`] and beats for
/// it when the job has run.
async fn probe_store(store: StoreHandle, beat: Arc<Beat>, shutdown: CancellationToken) {
    let freeze = beat.freeze;
    loop {
        let done = store
            .call(move |_| {
                if crate::failpoint::armed(freeze) {
                    tracing::warn!("Failpoint: freezing the store thread for good.");
                    loop {
                        std::thread::park();
                    }
                }
                Ok(())
            })
            .await;
        if done.is_err() {
            // The store thread has ended: its callers report that.
            return;
        }
        beat.tick();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(BEAT_EVERY) => {}
        }
    }
}

/// Asks the service manager for more start-up time, again and again, while
/// a slow step (the integrity check of a large store on a slow SD card) runs
/// on this thread: dropping the guard stops it. Without a service manager it
/// does nothing.
pub struct Extending {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Extending {
    pub fn start(what: &'static str) -> Extending {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Extending {
                stop: None,
                thread: None,
            };
        }
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hearth-extend".into())
            .spawn(move || {
                let usec = u32::try_from(EXTEND_BY.as_micros()).unwrap_or(u32::MAX);
                loop {
                    let _ = sd_notify::notify(&[
                        sd_notify::NotifyState::ExtendTimeoutUsec(usec),
                        sd_notify::NotifyState::Status(what),
                    ]);
                    match stopped.recv_timeout(EXTEND_EVERY) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                        _ => return,
                    }
                }
            })
            .ok();
        Extending {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for Extending {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
