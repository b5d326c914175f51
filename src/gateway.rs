//! The running gateway: opens the store, spawns the long-lived tasks in one
//! place and waits for them within a grace period on shutdown.
//!
//! Every task runs until shutdown is requested. One that ends before that,
//! with an error, with Ok, or by panicking, leaves hearth half-alive (a
//! gateway that stores but never publishes is worse than one that is
//! down), so it is fatal: it is logged at ERROR with the task's name and
//! cause, the other tasks are cancelled, and `hearth run` exits non-zero,
//! so that systemd (`Restart=always`) starts it again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::alarm::Alarms;
use crate::config::Config;
use crate::mqtt::publisher::Publisher;
use crate::mqtt::tls;
use crate::outbox::store::PRUNE_CHUNK;
use crate::outbox::{StoreError, StoreHandle};
use crate::serial::reader::SerialReader;
use crate::watchdog::{self, Beats, Extending};

/// How long tasks get to finish after shutdown is requested.
const GRACE: Duration = Duration::from_secs(10);
/// How often delivered readings past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

pub struct Gateway {
    config: Arc<Config>,
}

/// A task that stopped on its own: why `hearth run` exits non-zero.
#[derive(Debug, thiserror::Error)]
#[error(
    "task `{task}` stopped unexpectedly: {cause} (hearth exits so that its service manager restarts it)"
)]
pub struct TaskFailed {
    pub task: &'static str,
    pub cause: Ended,
}

/// How a task ended.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    #[error("it returned without an error")]
    Returned,
    #[error("{0}")]
    Failed(String),
    #[error("it panicked: {0}")]
    Panicked(String),
}

impl Gateway {
    pub fn new(config: Config) -> Gateway {
        Gateway {
            config: Arc::new(config),
        }
    }

    /// Runs until `shutdown` is cancelled, or until a task stops on its
    /// own, which is returned as [`TaskFailed`]. `ready` is called once the
    /// store is open and the serial reader started (systemd's READY=1).
    pub async fn run(
        self,
        shutdown: CancellationToken,
        ready: impl FnOnce(),
    ) -> anyhow::Result<()> {
        tls::install_crypto_provider();
        let config = self.config;
        let tls = tls::TlsSource::load(&config.mqtt)?;
        // SIGHUP re-reads `mqtt.crl_file`. Taken over before READY: its
        // default action would end the process.
        let hangup =
            tls::HangupReload::install(tls.clone()).context("cannot install the SIGHUP handler")?;
        let max_bytes = (config.store.max_size_mb * 1024.0 * 1024.0) as u64;
        // The integrity check of a large store on a slow SD card may outlast
        // systemd's start timeout: ask for more time while it runs.
        let extending = Extending::start("Checking the store's integrity");
        let (store, moved_aside) =
            StoreHandle::open_gateway(&config, max_bytes).with_context(|| {
                format!("cannot start with store `{}`", config.store.path.display())
            })?;
        drop(extending);
        crate::audit::events::at_start(&store, &config, moved_aside.as_deref()).await;
        let alarms = Alarms::default();
        if let Some(aside) = moved_aside {
            alarms.raise("store-recovered");
            let value = aside.display().to_string();
            store
                .call(move |s| s.set_state("moved_aside", &value))
                .await?;
        }
        alarms.record(&store).await;

        // The tasks get a child token: a failed task cancels its siblings
        // without pretending that a signal asked for it.
        let stop = shutdown.child_token();
        let mut tasks = Tasks::default();
        let beats = Beats::default();
        let reader = SerialReader::new(
            config.serial.port.clone(),
            config.serial.baud_rate,
            store.clone(),
            alarms.clone(),
        )
        .with_device_alarm(Duration::from_secs(config.serial.device_alarm_secs))
        .with_beat(beats.reader.clone());
        tasks.spawn("serial reader", reader.run(stop.clone()));
        let publisher = Publisher::new(config.clone(), store.clone(), tls, alarms.clone())
            .with_beat(beats.publisher.clone());
        tasks.spawn("publisher", publisher.run(stop.clone()));
        tasks.spawn("crl reload", hangup.run(stop.clone()));
        let pruner = Pruner::new(config.clone(), store.clone());
        tasks.spawn("pruner", pruner.run(stop.clone()));
        tasks.spawn(
            "health",
            crate::health::Health::new(config.clone(), store.clone(), alarms.clone())
                .run(stop.clone()),
        );
        tasks.spawn(
            "watchdog",
            watchdog::run(beats, store.clone(), stop.clone()),
        );
        ready();
        tracing::info!(gateway = %config.gateway_id, "Gateway running.");

        let failed = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            ended = tasks.next_end() => ended,
        };
        // A task may see the shutdown before this does: then it is no failure.
        let failed = match failed {
            Some(ended) if shutdown.is_cancelled() => {
                ended.log_during_shutdown();
                None
            }
            failed => failed,
        };
        match &failed {
            Some(f) => tracing::error!(
                task = f.task,
                cause = %f.cause,
                "Task stopped unexpectedly; stopping the others and exiting non-zero so that the service manager restarts hearth."
            ),
            None => tracing::info!("Shutting down."),
        }
        stop.cancel();
        if tokio::time::timeout(GRACE, tasks.wait_all()).await.is_err() {
            // An unclean stop must not look clean to the service manager;
            // the store is safe as after a kill -9.
            let running = tasks.running().join(", ");
            tracing::error!(grace = ?GRACE, tasks = %running, "Tasks did not stop in time; exiting non-zero.");
            if failed.is_none() {
                anyhow::bail!(
                    "tasks did not stop within {GRACE:?} of the shutdown request: {running} (nothing is lost: the store is safe as after a kill -9)"
                );
            }
        }
        match failed {
            Some(f) => Err(f.into()),
            None => Ok(()),
        }
    }
}

/// The long-lived tasks by name, so that whichever ends first can be named.
#[derive(Default)]
struct Tasks {
    set: JoinSet<Result<(), String>>,
    names: HashMap<Id, &'static str>,
}

impl Tasks {
    fn spawn<E: std::fmt::Display>(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<(), E>> + Send + 'static,
    ) {
        let handle = self
            .set
            .spawn(async move { task.await.map_err(|e| e.to_string()) });
        self.names.insert(handle.id(), name);
    }

    /// Waits for the first task to end; `None` if there are none.
    async fn next_end(&mut self) -> Option<TaskFailed> {
        let joined = self.set.join_next_with_id().await?;
        Some(self.ended(joined))
    }

    fn ended(&mut self, joined: Result<(Id, Result<(), String>), JoinError>) -> TaskFailed {
        let (id, cause) = match joined {
            Ok((id, Ok(()))) => (id, Ended::Returned),
            Ok((id, Err(e))) => (id, Ended::Failed(e)),
            Err(e) => (e.id(), Ended::Panicked(panic_message(e))),
        };
        let task = self.names.remove(&id).unwrap_or("unnamed");
        TaskFailed { task, cause }
    }

    /// The names of the tasks still running (not yet joined).
    fn running(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.names.values().copied().collect();
        names.sort_unstable();
        names
    }

    /// Waits for the others to end, logging any that failed meanwhile.
    async fn wait_all(&mut self) {
        while let Some(joined) = self.set.join_next_with_id().await {
            self.ended(joined).log_during_shutdown();
        }
    }
}

impl TaskFailed {
    /// A task ending after shutdown was requested is expected, unless it
    /// failed on its way out.
    fn log_during_shutdown(&self) {
        match &self.cause {
            Ended::Returned => {}
            Ended::Failed(e) => {
                tracing::warn!(task = self.task, error = %e, "Task ended with an error while stopping.")
            }
            Ended::Panicked(_) => {
                tracing::error!(task = self.task, cause = %self.cause, "Task panicked while stopping.")
            }
        }
    }
}

/// A panic's message, or why the task was cancelled.
fn panic_message(e: JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let panic = e.into_panic();
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text payload".to_owned())
}

/// Deletes delivered readings older than the retention period, hourly.
struct Pruner {
    config: Arc<Config>,
    store: StoreHandle,
}

impl Pruner {
    fn new(config: Arc<Config>, store: StoreHandle) -> Pruner {
        Pruner { config, store }
    }

    /// Runs until shutdown; a failed prune is retried next hour, but a store
    /// whose thread has stopped is returned: nothing works without it.
    async fn run(self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let keep = chrono::Duration::days(self.config.store.retention_days.into());
        loop {
            let before = Utc::now() - keep;
            // Step by step: each store call is short, so readings from the
            // device are committed between the steps.
            let mut pruned = 0;
            loop {
                let step = self
                    .store
                    .call(move |s| s.prune_delivered_chunk(before, PRUNE_CHUNK))
                    .await;
                match step {
                    Ok((n, more)) => {
                        pruned += n;
                        if !more || shutdown.is_cancelled() {
                            break;
                        }
                    }
                    Err(StoreError::Closed) => return Err(StoreError::Closed),
                    Err(e) => {
                        tracing::warn!(error = %e, "Pruning failed.");
                        break;
                    }
                }
            }
            if pruned > 0 {
                tracing::info!(pruned, "Delivered readings past retention pruned.");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(PRUNE_EVERY) => {}
            }
        }
    }
}

/// Cancels `token` on SIGTERM (what systemd sends) or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received."),
            _ = int.recv() => tracing::info!("SIGINT received."),
        }
        token.cancel();
    });
    Ok(())
}
