//! The serial reader: bytes from the bedside device in, ACK/NAK/BUSY out.
//!
//! Guarantee: a reading is ACKed only after the store has committed it. A
//! batch of frames that arrived together is committed in one transaction
//! (one fsync) and then ACKed together. Where a reading goes is decided by
//! [`crate::outbox::ingest`]; no well-formed reading is refused for good. A
//! frame the decoder rejects is kept in `rejected_frames`, NAKed, and its
//! field and cause logged at INFO (at most one line per [`REJECT_LOG_EVERY`],
//! never with its bytes). When the store is full the device gets BUSY and
//! keeps the reading, but a resend of a stored one is still ACKed. Answer
//! frames (`A`, `N`, `B`) from the device are ignored, as the protocol says
//! (they are the gateway's own, e.g. a line that echoes). The port may
//! vanish (USB unplug): the reader logs the transition and reopens it with
//! backoff.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::frame::{Decoded, Decoder, Frame, Rejected};
use crate::alarm::Alarms;
use crate::outbox::ingest::{CONFLICT_ALARM, RESTART_ALARM};
use crate::outbox::{Flag, Insert, RejectedFrame, StoreHandle};
use crate::reading::Reading;
use crate::watchdog::{BEAT_EVERY, Beat};

const REOPEN_MIN: Duration = Duration::from_millis(200);
const REOPEN_MAX: Duration = Duration::from_secs(5);
/// Longest an answer (ACK/NAK/BUSY) may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one INFO line about rejected frames this often (the rest are
/// counted in the next line, and all are in `rejected_frames`).
pub const REJECT_LOG_EVERY: Duration = Duration::from_secs(10);
/// How often device alarms are looked at again, so that they clear on time
/// on a quiet line.
const ALARM_CHECK_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot open serial port `{path}`: {source}{hint}")]
    Open {
        path: PathBuf,
        source: tokio_serial::Error,
        hint: &'static str,
    },
    #[error("serial port `{path}` failed: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serial port `{0}` took no answer within 5 s (is the device reading?)")]
    WriteTimeout(PathBuf),
    #[error("serial port `{0}` closed")]
    Closed(PathBuf),
}

/// Opens the port in raw mode at `baud`.
pub fn open_port(path: &Path, baud: u32) -> Result<tokio_serial::SerialStream, SerialError> {
    use tokio_serial::SerialPortBuilderExt;
    tokio_serial::new(path.to_string_lossy(), baud)
        .timeout(Duration::from_millis(100))
        .open_native_async()
        .map_err(|source| {
            let hint = match source.kind {
                tokio_serial::ErrorKind::Io(std::io::ErrorKind::PermissionDenied) => {
                    " (is the user in group `dialout`?)"
                }
                tokio_serial::ErrorKind::NoDevice
                | tokio_serial::ErrorKind::Io(std::io::ErrorKind::NotFound) => {
                    " (is the device plugged in?)"
                }
                _ => "",
            };
            SerialError::Open {
                path: path.to_owned(),
                source,
                hint,
            }
        })
}

pub struct SerialReader {
    path: PathBuf,
    baud: u32,
    store: StoreHandle,
    alarms: Alarms,
    device_alarm: Duration,
    beat: Arc<Beat>,
}

/// Rate limit of the INFO lines about rejected frames, per reject code, so
/// that a flood of one kind never hides another.
#[derive(Default)]
struct RejectLog {
    /// Per code: when its last line went out, and how many were not logged
    /// since.
    last: std::collections::HashMap<&'static str, (std::time::Instant, u64)>,
}

impl SerialReader {
    pub fn new(path: PathBuf, baud: u32, store: StoreHandle, alarms: Alarms) -> SerialReader {
        SerialReader {
            path,
            baud,
            store,
            alarms,
            device_alarm: crate::outbox::store::DEVICE_ALARM,
            beat: Beat::detached("serial reader"),
        }
    }

    /// The watchdog's beat this reader keeps (see [`crate::watchdog`]).
    pub fn with_beat(mut self, beat: Arc<Beat>) -> SerialReader {
        self.beat = beat;
        self
    }

    /// How long a device restart or seq conflict keeps its alarm.
    pub fn with_device_alarm(mut self, period: Duration) -> SerialReader {
        self.device_alarm = period;
        self
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SerialError> {
        let period = self.device_alarm;
        if let Err(e) = self
            .store
            .call(move |s| {
                s.set_device_alarm(period);
                Ok(())
            })
            .await
        {
            tracing::warn!(error = %e, "Cannot set the device alarm period.");
        }
        self.refresh_device_alarms().await;
        let mut delay = REOPEN_MIN;
        let mut waiting_logged = false;
        loop {
            self.beat.idle_tick().await;
            match open_port(&self.path, self.baud) {
                Ok(port) => {
                    tracing::info!(port = %self.path.display(), "Serial port opened.");
                    self.record("open", "").await;
                    delay = REOPEN_MIN;
                    waiting_logged = false;
                    match self.serve(port, &shutdown).await {
                        Ok(()) => return Ok(()),
                        Err(e) => {
                            tracing::warn!(port = %self.path.display(), error = %e, "Serial port lost; reopening.");
                            self.record("lost", &e.to_string()).await;
                        }
                    }
                }
                Err(e) => {
                    if !waiting_logged {
                        tracing::warn!(error = %e, "Waiting for the serial port.");
                        self.record("waiting", &e.to_string()).await;
                        waiting_logged = true;
                    }
                }
            }
            // Waiting for the port is a real reason to be idle.
            self.beat.waiting(delay);
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(REOPEN_MAX);
        }
    }

    async fn record(&self, state: &'static str, detail: &str) {
        let value = serde_json::json!({
            "state": state,
            "port": self.path.display().to_string(),
            "since": Utc::now().timestamp_millis(),
            "detail": detail,
        });
        self.store.record("serial", value).await;
    }

    /// Serves one open port until it fails (Err) or shutdown (Ok).
    pub async fn serve<P: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut port: P,
        shutdown: &CancellationToken,
    ) -> Result<(), SerialError> {
        let io = |source| SerialError::Io {
            path: self.path.clone(),
            source,
        };
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; 4096];
        let mut log = RejectLog::default();
        let mut alarm_check = tokio::time::interval(ALARM_CHECK_EVERY);
        alarm_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beat = tokio::time::interval(BEAT_EVERY);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let n = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = port.read(&mut buf) => r.map_err(io)?,
                _ = alarm_check.tick() => {
                    self.refresh_device_alarms().await;
                    continue;
                }
                // A silent device is a real reason to be idle.
                _ = beat.tick() => {
                    self.beat.idle_tick().await;
                    continue;
                }
            };
            self.beat.tick();
            if n == 0 {
                return Err(SerialError::Closed(self.path.clone()));
            }
            decoder.extend(&buf[..n]);
            let mut readings = Vec::new();
            let mut rejected = Vec::new();
            while let Some(d) = decoder.next() {
                match d {
                    Decoded::Frame(Frame::Reading(r)) => readings.push(r),
                    Decoded::Frame(other) => {
                        // Section 5, rule 9: answers are never answered.
                        tracing::debug!(frame = ?other, "Answer frame from the device ignored.");
                        log.note(
                            &self.path,
                            "answer",
                            "an answer frame (A, N or B) from the device was ignored: only the gateway sends those (does the line echo?)",
                        );
                    }
                    Decoded::Rejected(r) => {
                        tracing::debug!(reason = %r.reason, raw = %r.raw.escape_ascii(), "Frame rejected.");
                        log.note(&self.path, r.reason.code(), &r.reason.to_string());
                        rejected.push(r);
                    }
                }
            }
            if readings.is_empty() && rejected.is_empty() {
                continue;
            }
            let replies = self.commit(readings, rejected).await;
            crate::failpoint::hit("stored-not-acked");
            // A device that stops reading must not freeze the reader.
            let write = async {
                port.write_all(&replies).await?;
                port.flush().await
            };
            self.beat.waiting(WRITE_TIMEOUT);
            match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(r) => r.map_err(io)?,
                Err(_) => return Err(SerialError::WriteTimeout(self.path.clone())),
            }
        }
    }

    /// Commits one batch and returns the bytes to answer with.
    async fn commit(&self, readings: Vec<Reading>, rejected: Vec<Rejected>) -> Vec<u8> {
        let port = self.path.display().to_string();
        let keys: Vec<(String, Option<u32>, u32)> = readings
            .iter()
            .map(|r| (r.device_id.clone(), r.epoch, r.seq))
            .collect();
        let naks: Vec<Frame> = rejected.iter().map(Rejected::nak).collect();
        let rejected_count = rejected.len();
        // When the batch came off the line: its `received_at`. The store
        // thread may be busy (a drain), so `stored_at` can be later.
        let read_at = Utc::now();
        let rejected: Vec<RejectedFrame> = rejected
            .into_iter()
            .map(|r| RejectedFrame {
                code: r.reason.code(),
                detail: r.reason.to_string(),
                raw: r.raw,
            })
            .collect();
        let result = self
            .store
            .call(move |s| {
                let outcomes = s.commit_serial(&port, &readings, &rejected, read_at)?;
                Ok((outcomes, s.device_alarms(Utc::now())?))
            })
            .await;
        let mut out = Vec::new();
        for nak in naks {
            out.extend(nak.encode());
        }
        let (outcomes, device_alarms) = match result {
            Ok(done) => done,
            Err(e) => {
                tracing::error!(error = %e, "Cannot store readings: the device is told BUSY and keeps them.");
                if rejected_count > 0 {
                    tracing::warn!(
                        port = %self.path.display(),
                        rejected = rejected_count,
                        "Rejected frames NAKed but not kept: the store cannot take them."
                    );
                }
                for (device_id, epoch, seq) in keys {
                    out.extend(
                        Frame::Busy {
                            device_id,
                            epoch,
                            seq,
                        }
                        .encode(),
                    );
                }
                return out;
            }
        };
        let mut stored = 0;
        let mut busy = 0;
        let mut asked: Vec<(String, Option<u32>)> = Vec::new();
        let mut conflicts: Vec<crate::audit::events::Conflict> = Vec::new();
        for ((device_id, epoch, seq), outcome) in keys.into_iter().zip(outcomes) {
            // Asks once per device and batch for the seq it has not got; a
            // device resends NAKed frames at once and in order.
            let mut ask = |missing: u32, out: &mut Vec<u8>| {
                tracing::debug!(%device_id, seq, missing, "Reading after a gap; asking for the missing one.");
                if !asked.contains(&(device_id.clone(), epoch)) {
                    asked.push((device_id.clone(), epoch));
                    out.extend(
                        Frame::Nak {
                            device_id: Some(device_id.clone()),
                            epoch,
                            seq: Some(missing),
                            reason: "missing".into(),
                        }
                        .encode(),
                    );
                }
            };
            let answer = match outcome {
                Insert::Stored(flag) => {
                    stored += 1;
                    if flag != Flag::None {
                        tracing::debug!(%device_id, seq, ?flag, "Reading stored out of the ordinary.");
                    }
                    if flag == Flag::Conflict {
                        conflicts.push((device_id.clone(), epoch, seq));
                    }
                    Frame::Ack {
                        device_id,
                        epoch,
                        seq,
                    }
                }
                Insert::StoredAhead { missing } => {
                    stored += 1;
                    ask(missing, &mut out);
                    Frame::Ack {
                        device_id,
                        epoch,
                        seq,
                    }
                }
                Insert::Duplicate => {
                    tracing::debug!(%device_id, seq, "Resent reading ACKed again.");
                    Frame::Ack {
                        device_id,
                        epoch,
                        seq,
                    }
                }
                Insert::Gap { missing } => {
                    ask(missing, &mut out);
                    Frame::Nak {
                        device_id: Some(device_id),
                        epoch,
                        seq: Some(seq),
                        reason: "gap".into(),
                    }
                }
                Insert::Busy => {
                    busy += 1;
                    Frame::Busy {
                        device_id,
                        epoch,
                        seq,
                    }
                }
            };
            out.extend(answer.encode());
        }
        if busy > 0 && self.alarms.raise("store-full") {
            tracing::error!(
                path = %self.path.display(),
                busy,
                "Store is full: the device is told BUSY and keeps its readings."
            );
            self.alarms.record(&self.store).await;
        } else if stored > 0 && self.alarms.clear("store-full") {
            tracing::info!("Store accepts readings again.");
            self.alarms.record(&self.store).await;
        }
        self.sync_device_alarms(&device_alarms).await;
        if !conflicts.is_empty() {
            crate::audit::events::seq_conflicts(&self.store, conflicts, self.device_alarm).await;
        }
        if stored > 0 {
            tracing::debug!(stored, "Readings stored.");
            self.store.notify_queued();
        }
        out
    }

    /// Looks at the device alarms again (they clear on their own in time).
    async fn refresh_device_alarms(&self) {
        match self.store.call(|s| s.device_alarms(Utc::now())).await {
            Ok(active) => self.sync_device_alarms(&active).await,
            Err(e) => tracing::warn!(error = %e, "Cannot read device alarms."),
        }
    }

    /// Raises or clears `device-restart` and `seq-conflict` to match the store.
    async fn sync_device_alarms(&self, active: &[&'static str]) {
        let mut changed = false;
        for code in [RESTART_ALARM, CONFLICT_ALARM] {
            if active.contains(&code) {
                if self.alarms.raise(code) {
                    tracing::warn!(alarm = code, "Device alarm raised: see `hearth devices`.");
                    changed = true;
                }
            } else if self.alarms.clear(code) {
                tracing::info!(alarm = code, "Device alarm cleared.");
                changed = true;
            }
        }
        if changed {
            self.alarms.record(&self.store).await;
        }
    }
}

impl RejectLog {
    /// Logs `what` at INFO unless a line with the same `code` went out
    /// within [`REJECT_LOG_EVERY`].
    fn note(&mut self, port: &Path, code: &'static str, what: &str) {
        let now = std::time::Instant::now();
        if let Some((last, skipped)) = self.last.get_mut(code)
            && now - *last < REJECT_LOG_EVERY
        {
            *skipped += 1;
            return;
        }
        let skipped = self.last.insert(code, (now, 0)).map_or(0, |(_, n)| n);
        tracing::info!(
            port = %port.display(),
            cause = what,
            same_kind_not_logged = skipped,
            "Frame from the device not taken; see docs/serial-protocol.md section 7."
        );
    }
}
