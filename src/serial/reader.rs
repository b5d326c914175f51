//! The serial reader: bytes from the bedside device in, ACK/NAK/BUSY out.
//!
//! Guarantee: a reading is ACKed only after the store has committed it. A
//! batch of frames that arrived together is committed in one transaction
//! (one fsync) and then ACKed together. A frame the decoder rejects is kept
//! in `rejected_frames` and NAKed; when the store is full the device gets
//! BUSY and keeps the reading. The port may vanish (USB unplug): the reader
//! logs the transition and reopens it with backoff.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::frame::{Decoded, Decoder, Frame, Reading, Rejected};
use crate::alarm::Alarms;
use crate::outbox::{Insert, StoreError, StoreHandle};

const REOPEN_MIN: Duration = Duration::from_millis(200);
const REOPEN_MAX: Duration = Duration::from_secs(5);
/// Longest an answer (ACK/NAK/BUSY) may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

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
}

impl SerialReader {
    pub fn new(path: PathBuf, baud: u32, store: StoreHandle, alarms: Alarms) -> SerialReader {
        SerialReader {
            path,
            baud,
            store,
            alarms,
        }
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SerialError> {
        let mut delay = REOPEN_MIN;
        let mut waiting_logged = false;
        loop {
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
        loop {
            let n = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = port.read(&mut buf) => r.map_err(io)?,
            };
            if n == 0 {
                return Err(SerialError::Closed(self.path.clone()));
            }
            decoder.extend(&buf[..n]);
            let mut readings = Vec::new();
            let mut rejected = Vec::new();
            while let Some(d) = decoder.next() {
                match d {
                    Decoded::Frame(Frame::Reading(r)) => readings.push(r),
                    Decoded::Frame(other) => rejected.push(Rejected {
                        raw: other.encode(),
                        reason: super::frame::RejectReason::Malformed(
                            "a device may only send readings".into(),
                        ),
                    }),
                    Decoded::Rejected(r) => rejected.push(r),
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
            match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(r) => r.map_err(io)?,
                Err(_) => return Err(SerialError::WriteTimeout(self.path.clone())),
            }
        }
    }

    /// Commits one batch and returns the bytes to answer with.
    async fn commit(&self, readings: Vec<Reading>, rejected: Vec<Rejected>) -> Vec<u8> {
        let port = self.path.display().to_string();
        let keys: Vec<(String, u32)> = readings
            .iter()
            .map(|r| (r.device_id.clone(), r.seq))
            .collect();
        let naks: Vec<Frame> = rejected.iter().map(Rejected::nak).collect();
        let rejected_count = rejected.len();
        for r in &rejected {
            tracing::debug!(reason = %r.reason, bytes = r.raw.len(), "Frame rejected.");
        }
        let result = self
            .store
            .call(move |s| s.commit_serial(&port, &readings, &rejected, Utc::now()))
            .await;
        let mut out = Vec::new();
        for nak in naks {
            out.extend(nak.encode());
        }
        match result {
            Ok(outcomes) => {
                if self.alarms.clear("store-full") {
                    tracing::info!("Store accepts readings again.");
                    self.alarms.record(&self.store).await;
                }
                let mut stored = 0;
                let mut conflicts = 0;
                let mut asked: Vec<String> = Vec::new();
                for ((device_id, seq), outcome) in keys.into_iter().zip(outcomes) {
                    match outcome {
                        Insert::Stored => stored += 1,
                        Insert::Gap { missing } => {
                            // Ask for the missing one first, then this one
                            // again: a device resends NAKed frames at once and
                            // in order, so they come back in seq order.
                            tracing::debug!(%device_id, seq, missing, "Reading after a gap; asking for the missing one.");
                            if !asked.contains(&device_id) {
                                asked.push(device_id.clone());
                                out.extend(
                                    Frame::Nak {
                                        device_id: Some(device_id.clone()),
                                        seq: Some(missing),
                                        reason: "missing".into(),
                                    }
                                    .encode(),
                                );
                            }
                            out.extend(
                                Frame::Nak {
                                    device_id: Some(device_id),
                                    seq: Some(seq),
                                    reason: "gap".into(),
                                }
                                .encode(),
                            );
                            continue;
                        }
                        Insert::Duplicate => {
                            tracing::debug!(%device_id, seq, "Resent reading ACKed again.")
                        }
                        Insert::Conflict => {
                            // Another reading holds this (device, seq): ACKing
                            // would let the device drop one that is never
                            // published. NAK it; it is kept in rejected_frames.
                            conflicts += 1;
                            out.extend(
                                Frame::Nak {
                                    device_id: Some(device_id),
                                    seq: Some(seq),
                                    reason: "conflict".into(),
                                }
                                .encode(),
                            );
                            continue;
                        }
                    }
                    out.extend(Frame::Ack { device_id, seq }.encode());
                }
                if conflicts > 0 && self.alarms.raise("seq-conflict") {
                    tracing::error!(
                        port = %self.path.display(),
                        conflicts,
                        "A device reused sequence numbers: NAKed `conflict` and kept in rejected_frames; the device needs attention."
                    );
                    self.alarms.record(&self.store).await;
                }
                if stored > 0 {
                    tracing::debug!(stored, "Readings stored.");
                    self.store.notify_queued();
                }
            }
            Err(e) => {
                if matches!(e, StoreError::Full { .. }) {
                    if self.alarms.raise("store-full") {
                        tracing::error!(error = %e, "Store is full: the device is told BUSY and keeps its readings.");
                        self.alarms.record(&self.store).await;
                    }
                } else {
                    tracing::error!(error = %e, "Cannot store readings: the device is told BUSY and keeps them.");
                }
                if rejected_count > 0 {
                    tracing::warn!(
                        port = %self.path.display(),
                        rejected = rejected_count,
                        "Rejected frames NAKed but not kept: the store cannot take them."
                    );
                }
                for (device_id, seq) in keys {
                    out.extend(Frame::Busy { device_id, seq }.encode());
                }
            }
        }
        out
    }
}
