//! The publisher: drives MQTT QoS 2 from the outbox, exactly once.
//!
//! Invariants (each step's record is committed before the packet it allows
//! is written, so a crash at any instant leaves a resumable state):
//! 1. PUBLISH of packet id P is written only after the exchange row for P
//!    (stage `publish`, its topic and readings) is committed; a resend
//!    rebuilds the same payload from those readings.
//! 2. PUBREL for P is written only after stage `release` is committed; a
//!    PUBLISH for P is never written again after that.
//! 3. Readings become `delivered` only in the transaction that deletes the
//!    exchange on PUBCOMP. Only then may P be handed out again.
//! 4. After any reconnect, with the broker's session present, every open
//!    exchange is finished first with the same packet id: PUBLISH with DUP=1
//!    in stage `publish`, PUBREL in stage `release`. Which of the two is
//!    chosen depends only on our record, never on when the broker forwards.
//! 5. Without the broker's session (CONNACK `session_present = false`) the
//!    open exchanges are void: their readings are queued again (WARN, counted)
//!    and the receiver deduplicates by reading id.
//! 6. A CONNECT is recorded as pending before it is written and settled with
//!    its CONNACK in one transaction. If a CONNACK was never seen (crash or
//!    cut in between), that CONNECT may have met a broker that had lost our
//!    session and made an empty one, which answers any PUBREL with PUBCOMP.
//!    MQTT 3.1.1 cannot tell that from our own session. A broker that keeps
//!    sessions (the normal case, and all the faults the tests inject) cannot
//!    have done it, so the session is trusted; once a broker is seen to lose
//!    a session, hearth remembers it and from then on queues the readings
//!    of exchanges past PUBREC again after a missed CONNACK: a possible
//!    duplicate (deduplicated by id) rather than a possible loss.
//! 7. PUBCOMP counts only for an exchange past PUBREC; a PUBREC for an id we
//!    have no record of is not released (that could deliver twice) and the id
//!    stays unused on that connection.
//!
//! Alerts go before routine readings, and two exchanges are kept free for
//! them, so an alert never waits behind a routine backlog.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rumqttc::{Connect, LastWill, Packet, PubRel, Publish, QoS};
use rustls::ClientConfig;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::connection::{Connection, ConnectionError};
use super::payload::{self, Backlog, DeviceSeen, Reason, Status};
use crate::alarm::Alarms;
use crate::config::Config;
use crate::failpoint;
use crate::outbox::{Connack, StoreError, StoreHandle};
use crate::serial::frame::Priority;

/// Exchanges kept free for alerts when routine readings fill the window.
const RESERVED_FOR_ALERTS: usize = 2;
/// Largest batch payload: well under the connection's packet limit.
const MAX_PAYLOAD: usize = super::connection::MAX_OUTGOING - 1024;
/// A link that held this long resets the reconnect backoff.
const STABLE_LINK: Duration = Duration::from_secs(30);
/// [`SESSION_KEY`] after our clean-session reset...
const SESSION_RESET: &str = "reset";
/// ...and once the broker holds a persistent session for this store.
const SESSION_ESTABLISHED: &str = "established";
/// Set in `gateway_state` once the broker holds a session for this store.
const SESSION_KEY: &str = "broker_session";
/// How long a shutdown waits for the broker to acknowledge the offline status.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Link(#[from] ConnectionError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no PINGRESP from the broker within {0:?}")]
    PingTimeout(Duration),
}

/// What an open packet id is used for on the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// A QoS 2 exchange recorded in the store.
    Readings { released: bool },
    /// A QoS 1 status message, not recorded (a new one is sent on connect).
    Status,
    /// An id the broker holds without our record: never used on this link.
    Blocked,
}

/// What the reconnect loop does after a connection.
enum Flow {
    Stop,
    Again,
}

pub struct Publisher {
    config: Arc<Config>,
    store: StoreHandle,
    tls: Arc<ClientConfig>,
    alarms: Alarms,
    slots: BTreeMap<u16, Slot>,
    next_pkid: u16,
    /// False once the store said there is nothing queued; set again by the
    /// store's notification.
    backlog_hint: bool,
    ping_sent: Option<Instant>,
    /// A CONNACK was seen on the current connection.
    connected: bool,
    /// The store refused a new exchange (logged once until it takes one).
    store_full: bool,
}

impl Publisher {
    pub fn new(
        config: Arc<Config>,
        store: StoreHandle,
        tls: Arc<ClientConfig>,
        alarms: Alarms,
    ) -> Publisher {
        Publisher {
            config,
            store,
            tls,
            alarms,
            slots: BTreeMap::new(),
            next_pkid: 1,
            backlog_hint: true,
            ping_sent: None,
            connected: false,
            store_full: false,
        }
    }

    /// Connects, serves, reconnects with capped jittered backoff; returns
    /// on shutdown. A store error drops the link (nothing unrecorded is ever
    /// written) and is retried like a link error.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), PublishError> {
        let min = Duration::from_millis(self.config.mqtt.reconnect_min_ms);
        let max = Duration::from_secs(self.config.mqtt.reconnect_max_secs);
        let broker = format!("{}:{}", self.config.mqtt.host, self.config.mqtt.port);
        let mut attempt: u32 = 0;
        loop {
            let started = Instant::now();
            self.connected = false;
            let error = match self.connect_and_serve(&shutdown).await {
                Ok(Flow::Stop) => break,
                Ok(Flow::Again) => continue,
                Err(e) => e,
            };
            if matches!(error, PublishError::Store(_)) {
                tracing::error!(error = %error, "Store failed; dropping the broker link.");
            } else if self.connected {
                tracing::warn!(%broker, error = %error, "Broker connection lost.");
            } else if attempt == 0 {
                tracing::warn!(%broker, error = %error, "Cannot connect to broker; retrying with backoff.");
            } else {
                tracing::debug!(%broker, error = %error, attempt, "Reconnect failed.");
            }
            self.record_broker("disconnected", &error.to_string()).await;
            // Only a link that held for a while resets the backoff, so a
            // broker that drops us at once is not hammered.
            if started.elapsed() >= STABLE_LINK {
                attempt = 0;
            }
            let delay = backoff(min, max, attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.record_broker("disconnected", "shutdown").await;
        Ok(())
    }

    /// One connection: TLS, the durable pending-CONNECT record, CONNECT,
    /// settling the open exchanges with what CONNACK says, then serving.
    async fn connect_and_serve(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Flow, PublishError> {
        // A store that never had a broker session (first start, or a damaged
        // database replaced) must not inherit one: the broker may hold packet
        // ids from an earlier store that this one would hand out again.
        let session_state = self.store.call(|s| s.state(SESSION_KEY)).await?;
        let established = session_state.is_some();
        self.record_broker("connecting", "").await;
        let mut conn = tokio::select! {
            _ = shutdown.cancelled() => return Ok(Flow::Stop),
            r = Connection::handshake(
                &self.config.mqtt.host,
                self.config.mqtt.port,
                self.tls.clone(),
                self.config.keep_alive(),
            ) => r?,
        };
        let (session, unseen) = self.store.call(|s| s.begin_connect()).await?;
        let mut connect = self.connect_packet(session);
        connect.clean_session = !established;
        let connack = tokio::select! {
            _ = shutdown.cancelled() => return Ok(Flow::Stop),
            r = conn.connect(connect) => match r {
                Ok(ack) => ack,
                Err(e @ ConnectionError::Refused(_)) => {
                    self.store.call(move |s| s.connect_refused(unseen)).await?;
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            },
        };
        if !established {
            // The clean session discarded whatever the broker held for us.
            let requeued = self
                .store
                .call(move |s| s.settle_connack(Connack::Reset, unseen))
                .await?;
            conn.close().await;
            self.store
                .call(|s| s.set_state(SESSION_KEY, SESSION_RESET))
                .await?;
            tracing::info!(requeued, "Broker session reset for a new store.");
            return Ok(Flow::Again);
        }
        let present = connack.session_present;
        let requeued = self
            .store
            .call(move |s| {
                // Right after our clean session, no session is expected.
                let connack = match (present, session_state.as_deref()) {
                    (true, _) => Connack::Present,
                    (false, Some(SESSION_RESET)) => Connack::Reset,
                    (false, _) => Connack::Absent,
                };
                let n = s.settle_connack(connack, unseen)?;
                if session_state.as_deref() != Some(SESSION_ESTABLISHED) {
                    s.set_state(SESSION_KEY, SESSION_ESTABLISHED)?;
                }
                Ok(n)
            })
            .await?;
        if requeued > 0 && !present {
            tracing::warn!(
                requeued,
                "Broker has no session for this gateway; readings in flight were queued again."
            );
        } else if requeued > 0 {
            tracing::warn!(
                requeued,
                "An earlier CONNECT got no CONNACK, so the broker's session may be new; readings past PUBREC were queued again."
            );
        }
        self.connected = true;
        tracing::info!(session, session_present = present, "Connected to broker.");
        self.record_broker("connected", "").await;
        self.serve(&mut conn, session, shutdown).await?;
        conn.close().await;
        Ok(Flow::Stop)
    }

    fn connect_packet(&self, session: u64) -> Connect {
        let will = self.status(Reason::ConnectionLost, session, None, vec![]);
        let mut connect = Connect::new(self.config.gateway_id.clone());
        connect.keep_alive = self.config.mqtt.keep_alive_secs;
        connect.clean_session = false;
        connect.last_will = Some(LastWill::new(
            self.config.topic("status"),
            will.to_vec(),
            QoS::AtLeastOnce,
            true,
        ));
        connect
    }

    fn status(
        &self,
        reason: Reason,
        session: u64,
        backlog: Option<Backlog>,
        devices: Vec<DeviceSeen>,
    ) -> Status {
        let online = matches!(
            reason,
            Reason::Connected | Reason::Heartbeat | Reason::Alarm
        );
        Status {
            schema: payload::SCHEMA,
            gateway: self.config.gateway_id.clone(),
            state: if online { "online" } else { "offline" }.into(),
            reason,
            session,
            at: Utc::now(),
            backlog,
            devices,
            alarms: self.alarms.active(),
        }
    }

    async fn record_broker(&self, state: &'static str, detail: &str) {
        let value = serde_json::json!({
            "state": state,
            "since": Utc::now().timestamp_millis(),
            "detail": detail,
        });
        self.store.record("broker", value).await;
    }

    /// One connection's life; returns Ok only on shutdown.
    async fn serve(
        &mut self,
        conn: &mut Connection,
        session: u64,
        shutdown: &CancellationToken,
    ) -> Result<(), PublishError> {
        self.slots.clear();
        self.ping_sent = None;
        self.backlog_hint = true;
        self.resume(conn).await?;
        self.publish_status(conn, Reason::Connected, session)
            .await?;

        let keep_alive = self.config.keep_alive();
        let mut ping = tokio::time::interval(keep_alive / 2);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ping.reset();
        let beat = Duration::from_secs(self.config.mqtt.heartbeat_secs);
        let mut heartbeat = tokio::time::interval_at(Instant::now() + beat, beat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);

        loop {
            self.fill(conn).await?;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.goodbye(conn, session).await;
                    return Ok(());
                }
                packet = conn.read() => self.handle(conn, packet?).await?,
                _ = self.store.queued() => self.backlog_hint = true,
                _ = ping.tick() => {
                    // Also a periodic recheck, e.g. after the store was full.
                    self.backlog_hint = true;
                    if let Some(sent) = self.ping_sent {
                        if sent.elapsed() >= keep_alive {
                            return Err(PublishError::PingTimeout(keep_alive));
                        }
                    } else {
                        conn.send(&[Packet::PingReq]).await?;
                        self.ping_sent = Some(Instant::now());
                    }
                }
                _ = self.alarms.changed() => {
                    self.publish_status(conn, Reason::Alarm, session).await?;
                }
                _ = heartbeat.tick() => {
                    self.publish_status(conn, Reason::Heartbeat, session).await?;
                }
            }
        }
    }

    /// Finishes what the store says is open (invariant 4), oldest first,
    /// before anything new is sent.
    async fn resume(&mut self, conn: &mut Connection) -> Result<(), PublishError> {
        let open = self.store.call(|s| s.open_exchanges()).await?;
        if open.is_empty() {
            return Ok(());
        }
        tracing::info!(open = open.len(), "Resuming open QoS 2 exchanges.");
        let mut packets = Vec::with_capacity(open.len());
        for ex in &open {
            self.slots.insert(
                ex.pkid,
                Slot::Readings {
                    released: ex.released,
                },
            );
            packets.push(if ex.released {
                Packet::PubRel(PubRel::new(ex.pkid))
            } else {
                let body = payload::batch(&self.config.gateway_id, &ex.readings);
                let mut p = Publish::new(ex.topic.clone(), QoS::ExactlyOnce, body);
                p.pkid = ex.pkid;
                p.dup = true;
                Packet::Publish(p)
            });
        }
        let pkids: Vec<u16> = open.iter().map(|e| e.pkid).collect();
        self.store
            .call(move |s| pkids.iter().try_for_each(|p| s.exchange_resent(*p)))
            .await?;
        conn.send(&packets).await?;
        Ok(())
    }

    /// The next free packet id, round robin over 1..=65535.
    fn alloc_pkid(&mut self) -> u16 {
        loop {
            let p = self.next_pkid;
            self.next_pkid = if p == u16::MAX { 1 } else { p + 1 };
            if !self.slots.contains_key(&p) {
                return p;
            }
        }
    }

    /// Starts new exchanges while the window has room: alerts first.
    async fn fill(&mut self, conn: &mut Connection) -> Result<(), PublishError> {
        let window = self.config.mqtt.max_inflight as usize;
        let batch_max = self.config.mqtt.batch_max_readings;
        while self.backlog_hint {
            let open = self
                .slots
                .values()
                .filter(|s| matches!(s, Slot::Readings { .. }))
                .count();
            if open >= window {
                return Ok(());
            }
            let routine_allowed = open < window.saturating_sub(RESERVED_FOR_ALERTS).max(1);
            let pkid = self.alloc_pkid();
            let gateway = self.config.gateway_id.clone();
            let alerts = self.config.topic("alerts");
            let readings = self.config.topic("readings");
            let taken = match self
                .store
                .call(move |s| {
                    let mut batch = s.next_queued(Priority::Alert, batch_max)?;
                    let mut topic = alerts;
                    if batch.is_empty() && routine_allowed {
                        batch = s.next_queued(Priority::Routine, batch_max)?;
                        topic = readings;
                    }
                    if batch.is_empty() {
                        return Ok(None);
                    }
                    let mut body = payload::batch(&gateway, &batch);
                    // Long ids can make a full batch too large for one packet.
                    while body.len() > MAX_PAYLOAD && batch.len() > 1 {
                        batch.truncate(batch.len() / 2);
                        body = payload::batch(&gateway, &batch);
                    }
                    let ids: Vec<i64> = batch.iter().map(|r| r.id).collect();
                    s.begin_exchange(pkid, &topic, &ids, Utc::now())?;
                    Ok(Some((topic, body, ids.len())))
                })
                .await
            {
                Ok(taken) => taken,
                Err(e @ StoreError::Full { .. }) => {
                    // Completing open exchanges frees room; PUBCOMP and the
                    // ping tick set the hint again.
                    if !self.store_full {
                        tracing::warn!(error = %e, "No new exchange until space is freed.");
                        self.store_full = true;
                    }
                    self.backlog_hint = false;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            self.store_full = false;
            let Some((topic, body, n)) = taken else {
                if routine_allowed {
                    self.backlog_hint = false;
                }
                return Ok(());
            };
            tracing::debug!(pkid, readings = n, %topic, "Publishing.");
            failpoint::hit("publish-recorded");
            self.slots.insert(pkid, Slot::Readings { released: false });
            let mut p = Publish::new(topic, QoS::ExactlyOnce, body);
            p.pkid = pkid;
            conn.send(&[Packet::Publish(p)]).await?;
            failpoint::hit("publish-sent");
        }
        Ok(())
    }

    async fn handle(&mut self, conn: &mut Connection, packet: Packet) -> Result<(), PublishError> {
        match packet {
            Packet::PubRec(rec) => {
                let pkid = rec.pkid;
                match self.slots.get(&pkid) {
                    Some(Slot::Readings { released: false }) => {
                        if !self.store.call(move |s| s.exchange_released(pkid)).await? {
                            tracing::warn!(
                                pkid,
                                "PUBREC for an exchange the store no longer has; the id is left unused on this connection."
                            );
                            self.slots.insert(pkid, Slot::Blocked);
                            return Ok(());
                        }
                        self.slots.insert(pkid, Slot::Readings { released: true });
                    }
                    Some(Slot::Readings { released: true }) => {}
                    Some(Slot::Status | Slot::Blocked) => {
                        tracing::warn!(
                            pkid,
                            "PUBREC for a packet id with no QoS 2 exchange; ignored."
                        );
                        return Ok(());
                    }
                    None => {
                        // The broker holds a message we have no record of
                        // (e.g. it restored an old state). Releasing it could
                        // deliver it twice; keep the id out of use instead.
                        tracing::warn!(
                            pkid,
                            "PUBREC for an unknown packet id; the id is left unused on this connection."
                        );
                        self.slots.insert(pkid, Slot::Blocked);
                        return Ok(());
                    }
                }
                failpoint::hit("release-recorded");
                conn.send(&[Packet::PubRel(PubRel::new(pkid))]).await?;
                failpoint::hit("pubrel-sent");
            }
            Packet::PubComp(comp) => {
                let pkid = comp.pkid;
                if let Some(Slot::Readings { released: true }) = self.slots.get(&pkid) {
                    failpoint::hit("pubcomp-received");
                    let n = self
                        .store
                        .call(move |s| s.complete_exchange(pkid, Utc::now()))
                        .await?;
                    self.slots.remove(&pkid);
                    self.backlog_hint = true;
                    tracing::debug!(pkid, readings = n, "Delivered.");
                } else {
                    tracing::warn!(pkid, "PUBCOMP for a packet id not released; ignored.");
                }
            }
            Packet::PubAck(ack) => {
                if self.slots.get(&ack.pkid) == Some(&Slot::Status) {
                    self.slots.remove(&ack.pkid);
                }
            }
            Packet::PingResp => self.ping_sent = None,
            Packet::PubRel(rel) => {
                conn.send(&[Packet::PubComp(rumqttc::PubComp::new(rel.pkid))])
                    .await?
            }
            other => tracing::debug!(packet = ?other, "Unexpected packet from broker; ignored."),
        }
        Ok(())
    }

    async fn publish_status(
        &mut self,
        conn: &mut Connection,
        reason: Reason,
        session: u64,
    ) -> Result<u16, PublishError> {
        let (counts, seen) = self
            .store
            .call(|s| Ok((s.counts()?, s.last_heard()?)))
            .await?;
        let backlog = Backlog {
            alert: counts.queued_alert,
            routine: counts.queued_routine,
            inflight: counts.inflight,
        };
        let devices = seen
            .into_iter()
            .take(16)
            .map(|(device, last_heard)| DeviceSeen { device, last_heard })
            .collect();
        let body = self
            .status(reason, session, Some(backlog), devices)
            .to_vec();
        let pkid = self.alloc_pkid();
        self.slots.insert(pkid, Slot::Status);
        let mut p = Publish::new(self.config.topic("status"), QoS::AtLeastOnce, body);
        p.retain = true;
        p.pkid = pkid;
        conn.send(&[Packet::Publish(p)]).await?;
        Ok(pkid)
    }

    /// Publishes the retained `offline`/`shutdown` status and waits a little
    /// for its PUBACK, still serving acks of open exchanges meanwhile.
    async fn goodbye(&mut self, conn: &mut Connection, session: u64) {
        let pkid = match self.publish_status(conn, Reason::Shutdown, session).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot publish the offline status.");
                return;
            }
        };
        let deadline = Instant::now() + GOODBYE_TIMEOUT;
        while self.slots.contains_key(&pkid) {
            match tokio::time::timeout_at(deadline, conn.read()).await {
                Ok(Ok(packet)) => {
                    if let Err(e) = self.handle(conn, packet).await {
                        tracing::warn!(error = %e, "Error while closing.");
                        return;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "Error while closing.");
                    return;
                }
                Err(_) => {
                    tracing::warn!("Broker did not acknowledge the offline status in time.");
                    return;
                }
            }
        }
        tracing::info!("Offline status published.");
    }
}

/// Capped exponential backoff with equal jitter: half fixed, half random.
pub fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.min(20)).min(max);
    let half = exp / 2;
    half + half.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let min = Duration::from_millis(500);
        let max = Duration::from_secs(60);
        for attempt in 0..40 {
            let d = backoff(min, max, attempt);
            assert!(d <= max, "{d:?}");
            let exp = min.saturating_mul(1u32 << attempt.min(20)).min(max);
            assert!(d >= exp / 2, "{d:?}");
        }
    }
}
