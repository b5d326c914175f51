//! The running gateway: opens the store, spawns the long-lived tasks in one
//! place and waits for them within a grace period on shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alarm::Alarms;
use crate::config::Config;
use crate::mqtt::publisher::Publisher;
use crate::mqtt::tls;
use crate::outbox::StoreHandle;
use crate::serial::reader::SerialReader;

/// How long tasks get to finish after shutdown is requested.
const GRACE: Duration = Duration::from_secs(10);
/// How often delivered readings past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

pub struct Gateway {
    config: Arc<Config>,
}

impl Gateway {
    pub fn new(config: Config) -> Gateway {
        Gateway {
            config: Arc::new(config),
        }
    }

    /// Runs until `shutdown` is cancelled. `ready` is called once the store
    /// is open and the serial reader started (systemd's READY=1).
    pub async fn run(
        self,
        shutdown: CancellationToken,
        ready: impl FnOnce(),
    ) -> anyhow::Result<()> {
        tls::install_crypto_provider();
        let config = self.config;
        let tls = tls::client_config(
            &config.mqtt.ca_file,
            &config.mqtt.cert_file,
            &config.mqtt.key_file,
        )?;
        let max_bytes = (config.store.max_size_mb * 1024.0 * 1024.0) as u64;
        let (store, moved_aside) = StoreHandle::open_gateway(&config.store.path, max_bytes)
            .with_context(|| {
                format!("cannot start with store `{}`", config.store.path.display())
            })?;
        let alarms = Alarms::default();
        if let Some(aside) = moved_aside {
            alarms.raise("store-recovered");
            let value = aside.display().to_string();
            store
                .call(move |s| s.set_state("moved_aside", &value))
                .await?;
        }
        alarms.record(&store).await;

        let tracker = TaskTracker::new();
        let reader = SerialReader::new(
            config.serial.port.clone(),
            config.serial.baud_rate,
            store.clone(),
            alarms.clone(),
        )
        .with_device_alarm(Duration::from_secs(config.serial.device_alarm_secs));
        tracker.spawn(log_exit("serial reader", reader.run(shutdown.clone())));
        let publisher = Publisher::new(config.clone(), store.clone(), tls, alarms.clone());
        tracker.spawn(log_exit("publisher", publisher.run(shutdown.clone())));
        tracker.spawn(prune(config.clone(), store.clone(), shutdown.clone()));
        tracker.close();
        ready();
        tracing::info!(gateway = %config.gateway_id, "Gateway running.");

        shutdown.cancelled().await;
        tracing::info!("Shutting down.");
        if tokio::time::timeout(GRACE, tracker.wait()).await.is_err() {
            tracing::warn!(grace = ?GRACE, "Tasks did not stop in time; exiting anyway.");
        }
        Ok(())
    }
}

async fn log_exit<E: std::fmt::Display>(
    name: &'static str,
    task: impl Future<Output = Result<(), E>>,
) {
    if let Err(e) = task.await {
        tracing::error!(task = name, error = %e, "Task failed.");
    }
}

/// Deletes delivered readings older than the retention period, hourly.
async fn prune(config: Arc<Config>, store: StoreHandle, shutdown: CancellationToken) {
    let keep = chrono::Duration::days(config.store.retention_days.into());
    loop {
        let before = Utc::now() - keep;
        match store.call(move |s| s.prune_delivered(before)).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "Delivered readings past retention pruned."),
            Err(e) => tracing::warn!(error = %e, "Pruning failed."),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
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
