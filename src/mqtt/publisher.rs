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
//!    No new exchange starts before every resumed packet is written.
//! 5. Without the broker's session (CONNACK `session_present = false`) the
//!    open exchanges are void: their readings are queued again (WARN, counted)
//!    and the receiver deduplicates by reading id.
//! 6. A CONNECT is recorded as pending before it is written and settled with
//!    its CONNACK in one transaction. If a CONNACK was never seen (crash or
//!    cut in between), that CONNECT may have met a broker that had lost our
//!    session and made an empty one, which answers any PUBREL with PUBCOMP.
//!    MQTT 3.1.1 cannot tell that from our own session, so after any unseen
//!    CONNACK the readings of exchanges past PUBREC are queued again (WARN,
//!    counted) even when the next CONNACK says the session is present: a
//!    possible duplicate (deduplicated by id) rather than a possible loss.
//!    Their PUBRELs are still sent, so the broker's state is finished too.
//! 7. PUBCOMP counts only for an exchange past PUBREC; a PUBREC for an id we
//!    have no record of is not released (that could deliver twice) and the id
//!    stays unused on that connection.
//!
//! Liveness, on links of any speed (none of it touches the invariants):
//! - The link is judged by progress, not by totals: it is dead only when a
//!   PINGREQ is outstanding and for a whole keep-alive no packet came from
//!   the broker and our socket's send queue did not shrink. Every write is
//!   bounded per call (`connection.rs`), never per packet.
//! - Unacknowledged PUBLISH bytes are held to an adaptive `Budget`, so
//!   the acks (and the PINGRESP queued behind our data) come back within a
//!   fraction of the keep-alive even over a few kbit/s; a batch is cut to
//!   the largest prefix that fits it, and resumed PUBLISHes (which cannot be
//!   re-split) go out one by one as it allows.
//! - An exchange the broker does not answer is bounded: no PUBREC (or
//!   PUBCOMP) within `UNANSWERED_AFTER` (2) keep-alives of its packet being
//!   written, while a later PINGREQ was answered, drops the connection
//!   (WARN with the packet id and the age); the resume finishes it.
//! - A store whose thread has died ([`StoreError::Closed`]) is fatal: `run`
//!   returns the error and the gateway exits, so systemd restarts it.
//!
//! Alerts go before routine readings, and two exchanges are kept free for
//! them, so an alert never waits behind a routine backlog.
//!
//! A connection that fails in TLS (`tls.rs`, `tls/failure.rs`) or is refused
//! at CONNECT is reported once per cause: one WARN naming the cause and the
//! file to fix, one audit event, and the `tls` alarm (TLS only). A retry
//! failing for the same cause logs at DEBUG only; a new cause, or the same
//! one after a connection that worked, is news again. The alarm clears with
//! the next CONNACK: under TLS 1.3 the broker judges our certificate only
//! after our side of the handshake is done, so a handshake alone proves
//! nothing. Nothing of MQTT is written before the handshake succeeds, and
//! readings stay queued throughout.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::connection::{Connection, ConnectionError};
use super::incoming::{self, IdUse, Reaction};
use super::payload::{self, Backlog, DeviceSeen, Reason, Status};
use super::tls::{self, TlsFailure, TlsSource};
use super::wire::{self, ConnAck, In, Out, Protocol, Will};
use crate::alarm::Alarms;
use crate::audit;
use crate::config::{Config, Encoding};
use crate::failpoint;
use crate::outbox::{Connack, Queued, StoreError, StoreHandle};
use crate::reading::Priority;
use crate::watchdog::{BEAT_EVERY, Beat};

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
/// The broker (`host:port`) that holds that session.
const SESSION_BROKER_KEY: &str = "broker_session_host";
/// How long a shutdown waits for the broker to acknowledge the offline status.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);
/// An exchange unanswered this many keep-alives after its packet was
/// written (while the broker answers later packets) drops the connection.
const UNANSWERED_AFTER: u32 = 2;
/// Bytes of a PUBLISH besides topic and payload: fixed header (at most 5),
/// topic length (2) and packet id (2).
const PUBLISH_OVERHEAD: usize = 9;
/// No reading takes fewer bytes than this in a batch, so a budget of B bytes
/// never needs more than B / this readings fetched to be filled: JSON, and
/// the compact encoding (a CBOR reading is at least its array header, a
/// series index and three deltas).
fn min_reading_bytes(encoding: Encoding) -> usize {
    match encoding {
        Encoding::Json => 64,
        Encoding::Cbor => 6,
    }
}

/// The payload of a batch of readings in `encoding`.
pub fn encode_batch(encoding: Encoding, gateway: &str, readings: &[Queued]) -> Vec<u8> {
    match encoding {
        Encoding::Json => payload::batch(gateway, readings),
        Encoding::Cbor => super::compact::encode(gateway, readings),
    }
}

/// The MQTT 5 content type of readings in `encoding`.
fn content_type(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::Json => CONTENT_TYPE,
        Encoding::Cbor => super::compact::CONTENT_TYPE,
    }
}
/// Less room than this in the budget is not worth a store query.
const MIN_ROOM: usize = 256;
/// The alarm raised while the broker link fails in TLS.
pub const TLS_ALARM: &str = "tls";
/// The alarm raised while the broker refuses readings (MQTT 5 reason code
/// of 0x80 or more on PUBREC or PUBACK).
pub const REFUSED_ALARM: &str = "broker-refused";
/// The alarm raised while the broker hangs up on our CONNECT (under MQTT 5,
/// most likely a broker that speaks 3.1.1 only).
pub const PROTOCOL_ALARM: &str = "broker-protocol";
/// The alarm raised while `mqtt.qos = 2` meets a broker without QoS 2.
pub const QOS_ALARM: &str = "broker-qos";
/// First wait before readings the broker refused are offered again; it
/// doubles with each refusal, up to [`HOLD_MAX`].
const HOLD_MIN: Duration = Duration::from_secs(2);
const HOLD_MAX: Duration = Duration::from_secs(300);
/// Bytes an MQTT 5 PUBLISH adds for its properties: content type, the
/// `schema` user property, a topic alias and the property length.
const V5_PROPERTIES: usize = 52;
/// The content type of every message (MQTT 5).
pub const CONTENT_TYPE: &str = "application/json";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Link(#[from] ConnectionError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no PINGRESP, nor any other sign of progress, from the broker within {0:?}")]
    PingTimeout(Duration),
    #[error(
        "no {awaited} from the broker for packet id {pkid} within {age:.1?} of its {sent}, though it answers other packets; reconnecting to finish the exchange"
    )]
    Unanswered {
        pkid: u16,
        age: Duration,
        sent: &'static str,
        awaited: &'static str,
    },
    /// Reloaded CRLs refuse the broker of the open connection.
    #[error("the broker's certificate fails the reloaded CRLs: {}", .0.code())]
    Untrusted(TlsFailure),
}

impl PublishError {
    /// Errors that a reconnect cannot cure: the process must restart.
    fn is_fatal(&self) -> bool {
        matches!(self, PublishError::Store(StoreError::Closed))
    }
}

/// An open QoS 2 exchange on the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Open {
    /// PUBREC recorded: PUBREL sent, PUBCOMP awaited.
    released: bool,
    /// The PUBLISH's size, counted against the budget until PUBREC.
    bytes: usize,
    /// When its last packet (PUBLISH or PUBREL) was written; `None` for a
    /// resumed PUBLISH still waiting for room in the budget.
    written: Option<Instant>,
    /// It was cut to the budget or filled it: its latency says whether the
    /// budget may grow.
    limited: bool,
}

/// What an open packet id is used for on the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// A QoS 2 exchange recorded in the store.
    Readings(Open),
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

/// Why connecting fails, as far as it is reported once per cause.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Trouble {
    Tls(TlsFailure),
    Refused(u8),
    ClosedOnConnect,
}

/// The most unacknowledged PUBLISH bytes (and the largest PUBLISH) allowed
/// on a connection, adapted to the link by AIMD on the PUBLISH→PUBREC
/// latency against a target of a quarter keep-alive: halved when an ack is
/// slower, doubled when it is four times faster and the budget was what
/// limited the packet; at most one change per round trip (only a packet
/// written after the last change may cause the next). Between
/// [`Budget::FLOOR`] and [`Budget::CEILING`]. Each connection starts at the
/// floor: its link may not be the last one's.
///
/// Why it matters: the broker answers in order, so every byte queued ahead
/// of a PINGREQ or an ack delays it. With the budget near the link's rate
/// times the target, acks keep arriving and mosquitto 2.0.11, which counts
/// a packet as keep-alive activity only while more than 1000 of its bytes
/// are still to come or once it is complete (`lib/packet_mosq.c`), sees
/// every packet finish well within 1.5 keep-alives.
#[derive(Debug, Clone, Copy)]
struct Budget {
    bytes: usize,
    target: Duration,
    changed: Instant,
}

impl Budget {
    /// A few readings: one always fits, whatever the link.
    const FLOOR: usize = 1024;
    const CEILING: usize = MAX_PAYLOAD;

    fn new(keep_alive: Duration, now: Instant) -> Budget {
        Budget {
            bytes: Self::FLOOR,
            target: keep_alive / 4,
            changed: now,
        }
    }

    /// A PUBREC came `now`, for a PUBLISH written at `sent`. Returns the
    /// new budget if it changed.
    fn sample(&mut self, sent: Instant, limited: bool, now: Instant) -> Option<usize> {
        if sent < self.changed {
            return None;
        }
        let latency = now.saturating_duration_since(sent);
        let before = self.bytes;
        if latency > self.target {
            self.bytes = (self.bytes / 2).max(Self::FLOOR);
        } else if limited && latency < self.target / 4 {
            self.bytes = self.bytes.saturating_mul(2).min(Self::CEILING);
        } else {
            return None;
        }
        self.changed = now;
        (self.bytes != before).then_some(self.bytes)
    }
}

/// The bytes a PUBLISH of `payload` bytes to `topic` takes on the wire, at
/// most (MQTT 5 properties included, a topic alias not subtracted).
fn publish_size(topic: &str, payload: usize) -> usize {
    topic.len() + payload + PUBLISH_OVERHEAD + V5_PROPERTIES
}

/// The largest `n` in `0..=len` with `fits(n)`, for a `fits` that holds up
/// to some `n` and not beyond (`fits(0)` is taken as true). Asks `fits`
/// about log2(len) times, trying `len` first.
fn longest_prefix(len: usize, mut fits: impl FnMut(usize) -> bool) -> usize {
    if len == 0 || fits(len) {
        return len;
    }
    let (mut yes, mut no) = (0, len);
    while no - yes > 1 {
        let mid = yes + (no - yes) / 2;
        if fits(mid) {
            yes = mid;
        } else {
            no = mid;
        }
    }
    yes
}

/// Cuts `batch` to its longest prefix whose PUBLISH fits `room` bytes (at
/// least one reading if `at_least_one`) and returns that prefix's payload;
/// `None` if not even one reading fits and one is not required.
fn cut_to_fit(
    encoding: Encoding,
    gateway: &str,
    topic: &str,
    batch: &mut Vec<Queued>,
    room: usize,
    at_least_one: bool,
) -> Option<Vec<u8>> {
    let fits =
        |n: usize| publish_size(topic, encode_batch(encoding, gateway, &batch[..n]).len()) <= room;
    let n = match longest_prefix(batch.len(), fits) {
        0 if at_least_one => 1,
        0 => return None,
        n => n,
    };
    batch.truncate(n);
    Some(encode_batch(encoding, gateway, batch))
}

/// What the broker's CONNACK allows on one connection (MQTT 5; 3.1.1
/// says nothing, and the config's limits stand).
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Receive Maximum: QoS 1 and 2 PUBLISHes unacknowledged at once.
    receive_max: u16,
    /// Maximum Packet Size.
    max_packet: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            receive_max: u16::MAX,
            max_packet: super::connection::MAX_OUTGOING,
        }
    }
}

/// Readings held back after a refusal, until `until`; `wait` doubles with
/// each refusal in a row.
#[derive(Debug, Clone, Copy)]
struct Hold {
    until: Instant,
    wait: Duration,
}

impl Hold {
    fn after(previous: Option<Hold>, now: Instant) -> Hold {
        let wait = previous.map_or(HOLD_MIN, |h| (h.wait * 2).min(HOLD_MAX));
        Hold {
            until: now + wait,
            wait,
        }
    }
}

/// What [`Publisher::fill`] needs to take new exchanges on the store
/// thread: the room it has, and what may go.
struct Plan {
    budget: usize,
    in_flight: usize,
    max_packet: usize,
    open: usize,
    window: usize,
    alerts_held: bool,
    routine_held: bool,
    batch_max: usize,
    encoding: Encoding,
    gateway: String,
    alerts: String,
    readings: String,
}

/// One new exchange, recorded.
struct Taken {
    pkid: u16,
    topic: String,
    body: Vec<u8>,
    readings: usize,
    limited: bool,
}

/// Why [`Plan::take`] took no more.
enum Stop {
    /// Nothing queued (that an exchange may carry now).
    Nothing { routine_allowed: bool },
    /// Queued readings, but none fits the room left in the budget.
    NoRoom,
}

#[derive(Default)]
struct End {
    stop: Option<Stop>,
    /// The store refused a new exchange (full).
    full: Option<StoreError>,
}

impl Plan {
    /// Takes batches for up to `pkids.len()` new exchanges, each recorded
    /// ([`crate::outbox::Store::begin_exchange`]) inside the caller's
    /// transaction: alerts first, each batch cut to the room left. An alert
    /// never waits for the budget: one alert reading always goes out while
    /// the window has a slot, so a slow link delays it by its own bytes
    /// only.
    fn take(
        mut self,
        s: &mut crate::outbox::Store,
        pkids: &[u16],
    ) -> Result<(Vec<Taken>, End), StoreError> {
        let mut taken = Vec::new();
        let mut end = End::default();
        for &pkid in pkids {
            let room = self
                .budget
                .saturating_sub(self.in_flight)
                .min(self.max_packet);
            // Too little room for routine readings: a PUBREC frees room and
            // calls this again. Alerts go all the same.
            let short = self.in_flight > 0 && room < MIN_ROOM;
            let routine_allowed = !short
                && !self.routine_held
                && self.open < self.window.saturating_sub(RESERVED_FOR_ALERTS).max(1);
            let limit = self
                .batch_max
                .min(room / min_reading_bytes(self.encoding) + 1);
            let mut batch = if self.alerts_held {
                Vec::new()
            } else {
                s.next_queued(Priority::Alert, limit)?
            };
            let mut topic = self.alerts.clone();
            let at_least_one = self.in_flight == 0 || !batch.is_empty();
            if batch.is_empty() && routine_allowed {
                batch = s.next_queued(Priority::Routine, limit)?;
                topic = self.readings.clone();
            }
            if batch.is_empty() {
                end.stop = Some(Stop::Nothing { routine_allowed });
                break;
            }
            let fetched = batch.len();
            let Some(body) = cut_to_fit(
                self.encoding,
                &self.gateway,
                &topic,
                &mut batch,
                room,
                at_least_one,
            ) else {
                end.stop = Some(Stop::NoRoom);
                break;
            };
            let size = publish_size(&topic, body.len());
            let limited = batch.len() < fetched || self.in_flight + size > self.budget / 2;
            let ids: Vec<i64> = batch.iter().map(|r| r.id).collect();
            match s.begin_exchange_with(pkid, &topic, &ids, Utc::now(), Some(&body)) {
                Ok(()) => {}
                Err(e @ StoreError::Full { .. }) => {
                    // SQLite may have rolled the whole transaction back:
                    // then nothing taken so far is recorded either.
                    if s.rolled_back() {
                        taken.clear();
                    }
                    end.full = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            }
            self.in_flight += size;
            self.open += 1;
            taken.push(Taken {
                pkid,
                topic,
                body,
                readings: ids.len(),
                limited,
            });
        }
        Ok((taken, end))
    }
}

pub struct Publisher {
    config: Arc<Config>,
    store: StoreHandle,
    tls: TlsSource,
    /// Changes when the CRLs were reloaded (SIGHUP).
    tls_reloaded: watch::Receiver<u64>,
    /// The cause last reported (WARN and audit); `None` after a CONNACK.
    trouble: Option<Trouble>,
    alarms: Alarms,
    slots: BTreeMap<u16, Slot>,
    /// Resumed PUBLISHes (DUP=1) not yet written, oldest first.
    resend: VecDeque<wire::Publish>,
    /// What the broker's CONNACK allows on this connection.
    limits: Limits,
    /// Topics whose readings the broker refused, held until a time.
    holds: BTreeMap<String, Hold>,
    /// The broker was found without QoS 2 (`mqtt.qos = 2`): readings wait
    /// until then for a new try.
    no_qos2: Option<Hold>,
    /// Connections in a row that the broker closed while a QoS 2 PUBLISH
    /// of ours had no answer at all (3.1.1 brokers without QoS 2 may do so).
    dropped_on_qos2: u32,
    /// A PUBREC was seen on the current connection.
    pubrec_seen: bool,
    /// The brokers to try (`mqtt.hosts`, or `mqtt.host`), and the one tried
    /// now.
    brokers: Vec<(String, u16)>,
    current: usize,
    /// The broker's CONNACK caps QoS below `mqtt.qos` (MQTT 5 Maximum QoS).
    qos_capped: Option<u8>,
    next_pkid: u16,
    /// False once the store said there is nothing queued; set again by the
    /// store's notification.
    backlog_hint: bool,
    budget: Budget,
    ping_sent: Option<Instant>,
    /// When the most recently answered PINGREQ was written: the broker has
    /// read everything written before it.
    ping_answered: Option<Instant>,
    /// The last time the link was seen to move: a packet arrived, or our
    /// send queue shrank.
    progress: Instant,
    /// Our socket's send queue at the last look.
    unsent: Option<usize>,
    /// A CONNACK was seen on the current connection.
    connected: bool,
    /// The store refused a new exchange (logged once until it takes one).
    store_full: bool,
    /// The watchdog's beat (see [`crate::watchdog`]).
    beat: Arc<Beat>,
    /// When the broker link went down (ms since the epoch); `None` while
    /// connected.
    down_since: Option<i64>,
}

impl Publisher {
    /// `tls` is a [`TlsSource`] (CRLs reloaded on SIGHUP) or a fixed
    /// `Arc<ClientConfig>`.
    pub fn new(
        config: Arc<Config>,
        store: StoreHandle,
        tls: impl Into<TlsSource>,
        alarms: Alarms,
    ) -> Publisher {
        let budget = Budget::new(config.keep_alive(), Instant::now());
        let tls = tls.into();
        let brokers = config.mqtt.brokers();
        Publisher {
            config,
            store,
            tls_reloaded: tls.reloaded(),
            tls,
            trouble: None,
            alarms,
            slots: BTreeMap::new(),
            resend: VecDeque::new(),
            limits: Limits::default(),
            holds: BTreeMap::new(),
            no_qos2: None,
            dropped_on_qos2: 0,
            pubrec_seen: false,
            brokers,
            current: 0,
            qos_capped: None,
            next_pkid: 1,
            backlog_hint: true,
            budget,
            ping_sent: None,
            ping_answered: None,
            progress: Instant::now(),
            unsent: None,
            connected: false,
            store_full: false,
            beat: Beat::detached("publisher"),
            down_since: None,
        }
    }

    /// The watchdog's beat this publisher keeps.
    pub fn with_beat(mut self, beat: Arc<Beat>) -> Publisher {
        self.beat = beat;
        self
    }

    /// Connects, serves, reconnects with capped jittered backoff; returns
    /// Ok on shutdown. A link error or a failed store call drops the link
    /// (nothing unrecorded is ever written) and is retried; a store whose
    /// thread has stopped is returned as an error, as a retry cannot cure it.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), PublishError> {
        let min = Duration::from_millis(self.config.mqtt.reconnect_min_ms);
        let max = Duration::from_secs(self.config.mqtt.reconnect_max_secs);
        let mut attempt: u32 = 0;
        loop {
            let broker = self.broker_name();
            self.beat.idle_tick().await;
            let started = Instant::now();
            self.connected = false;
            let error = match self.connect_and_serve(&shutdown).await {
                Ok(Flow::Stop) => break,
                Ok(Flow::Again) => continue,
                Err(e) => e,
            };
            if error.is_fatal() {
                return Err(error);
            }
            let mut detail = error.to_string();
            if let Some(failure) = self.tls_failure(&error) {
                let dropped = matches!(error, PublishError::Untrusted(_));
                detail = self.report_tls(failure, dropped).await;
            } else if matches!(error, PublishError::Store(_)) {
                tracing::error!(error = %error, "Store failed; dropping the broker link.");
            } else if self.connected && self.lost_on_qos2(&error) {
                self.report_no_qos2(&format!(
                    "it closed the connection on our QoS 2 PUBLISH twice in a row ({error})"
                ))
                .await;
            } else if self.connected {
                tracing::warn!(%broker, error = %error, "Broker connection lost.");
            } else if let PublishError::Link(ConnectionError::Refused { code, reason }) = &error {
                self.report_refused(*code, reason, &broker).await;
            } else if let PublishError::Link(ConnectionError::ClosedOnConnect) = &error {
                self.report_closed_on_connect(&broker).await;
            } else if attempt == 0 {
                tracing::warn!(%broker, error = %error, "Cannot connect to broker; retrying with backoff.");
            } else {
                tracing::debug!(%broker, error = %error, attempt, "Reconnect failed.");
            }
            self.record_broker("disconnected", &detail).await;
            // A broker that cannot be reached (or refuses us) hands over to
            // the next in `mqtt.hosts`; a link that was lost is tried again
            // first, so that a broker's restart costs no session.
            if !self.connected && self.brokers.len() > 1 {
                self.current = (self.current + 1) % self.brokers.len();
                tracing::info!(next = %self.broker_name(), "Trying the next broker in `mqtt.hosts`.");
            }
            // Only a link that held for a while resets the backoff, so a
            // broker that drops us at once is not hammered.
            if started.elapsed() >= STABLE_LINK {
                attempt = 0;
            }
            let delay = backoff(min, max, attempt);
            attempt = attempt.saturating_add(1);
            // A broker that is down is a real reason to be idle.
            self.beat.waiting(delay);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.record_broker("disconnected", "shutdown").await;
        Ok(())
    }

    /// The broker tried now, as `host:port`.
    fn broker_name(&self) -> String {
        let (host, port) = self.current_broker();
        format!("{host}:{port}")
    }

    fn current_broker(&self) -> (&str, u16) {
        self.brokers
            .get(self.current)
            .map(|(h, p)| (h.as_str(), *p))
            .unwrap_or((self.config.mqtt.host.as_str(), self.config.mqtt.port))
    }

    /// `[mqtt]` as it applies to the broker tried now (its host and port).
    fn mqtt_now(&self) -> crate::config::MqttConfig {
        let (host, port) = self.current_broker();
        let mut mqtt = self.config.mqtt.clone();
        mqtt.host = host.to_owned();
        mqtt.port = port;
        mqtt
    }

    /// The TLS failure behind `error`: one that ended a connection before
    /// its CONNACK, or reloaded CRLs refusing the open one. A TLS error on a
    /// working link (a damaged record) is a lost link, not a TLS setup
    /// fault.
    fn tls_failure(&self, error: &PublishError) -> Option<TlsFailure> {
        match error {
            PublishError::Untrusted(failure) => Some(failure.clone()),
            PublishError::Link(e) if !self.connected => e.io().and_then(|io| self.tls.failure(io)),
            _ => None,
        }
    }

    /// Reports a TLS failure: WARN and audit once per cause, the `tls`
    /// alarm. Returns the line, for `hearth status`.
    async fn report_tls(&mut self, failure: TlsFailure, dropped: bool) -> String {
        let mqtt = self.mqtt_now();
        let cx = tls::Context {
            mqtt: &mqtt,
            config_file: &self.config.source,
            now: Utc::now(),
        };
        let line = if dropped {
            failure.describe_dropped(&cx)
        } else {
            failure.describe(&cx)
        };
        let file = failure.file(&cx).map(|p| p.display().to_string());
        if matches!(&self.trouble, Some(Trouble::Tls(f)) if *f == failure) {
            tracing::debug!(
                cause = failure.code(),
                "TLS handshake failed again, same cause."
            );
        } else {
            tracing::warn!(cause = failure.code(), "{line}");
            let detail = serde_json::json!({
                "broker": self.broker_name(),
                "cause": failure.code(),
                "key": failure.key(),
                "file": file,
                "message": line,
            });
            self.store.audit(audit::kind::TLS_FAILURE, detail).await;
            self.trouble = Some(Trouble::Tls(failure));
        }
        if self.alarms.raise(TLS_ALARM) {
            self.alarms.record(&self.store).await;
        }
        line
    }

    /// Reports a refused CONNECT: WARN and audit once per return code.
    async fn report_refused(&mut self, code: u8, reason: &str, broker: &str) {
        let trouble = Trouble::Refused(code);
        if self.trouble.as_ref() == Some(&trouble) {
            tracing::debug!(%broker, code, "Broker refused the CONNECT again.");
            return;
        }
        if code == 0x84 && self.config.mqtt.protocol == Protocol::V5 {
            if self.alarms.raise(PROTOCOL_ALARM) {
                self.alarms.record(&self.store).await;
            }
            tracing::warn!(
                %broker,
                code,
                "Broker `{broker}` refused the CONNECT ({reason}): it does not speak MQTT 5; set `mqtt.protocol = \"3.1.1\"` in {}.",
                self.config.source.display()
            );
            self.trouble = Some(trouble);
            return;
        }
        tracing::warn!(
            %broker,
            code,
            "Broker `{broker}` refused the CONNECT ({reason}): ask its operator to admit client `{}` with the certificate in `mqtt.cert_file` ({}).",
            self.config.gateway_id,
            self.config.mqtt.cert_file.display()
        );
        let detail = serde_json::json!({
            "broker": broker,
            "cause": reason,
            "code": code,
            "key": "mqtt.cert_file",
            "file": self.config.mqtt.cert_file.display().to_string(),
        });
        self.store.audit(audit::kind::AUTH_FAILURE, detail).await;
        self.trouble = Some(trouble);
    }

    /// The broker hung up on our CONNECT: one WARN per streak, the
    /// `broker-protocol` alarm. Under MQTT 5 the likely cause is a broker
    /// that speaks 3.1.1 only (RabbitMQ 3.x does so without a CONNACK).
    async fn report_closed_on_connect(&mut self, broker: &str) {
        if self.trouble.as_ref() == Some(&Trouble::ClosedOnConnect) {
            tracing::debug!(%broker, "Broker closed the connection on our CONNECT again.");
            return;
        }
        match self.config.mqtt.protocol {
            Protocol::V5 => tracing::warn!(
                %broker,
                "Broker `{broker}` closed the connection on our MQTT 5 CONNECT without an answer: if it speaks MQTT 3.1.1 only (RabbitMQ 3.x, older brokers), set `mqtt.protocol = \"3.1.1\"` in {}; otherwise ask its operator why it refuses client `{}`. Retrying with back-off.",
                self.config.source.display(),
                self.config.gateway_id
            ),
            Protocol::V311 => tracing::warn!(
                %broker,
                "Broker `{broker}` closed the connection on our CONNECT without an answer: ask its operator why it refuses client `{}` (certificate in `mqtt.cert_file`, {}). Retrying with back-off.",
                self.config.gateway_id,
                self.config.mqtt.cert_file.display()
            ),
        }
        self.trouble = Some(Trouble::ClosedOnConnect);
        if self.alarms.raise(PROTOCOL_ALARM) {
            self.alarms.record(&self.store).await;
        }
    }

    /// A CONNACK arrived: TLS and authentication work.
    async fn link_works(&mut self) {
        self.trouble = None;
        if self.alarms.clear(PROTOCOL_ALARM) {
            self.alarms.record(&self.store).await;
        }
        if self.alarms.clear(TLS_ALARM) {
            tracing::info!("TLS with the broker works again; alarm `tls` cleared.");
            self.alarms.record(&self.store).await;
        }
    }

    /// Whether new readings for `topic` wait after a refusal. Once the hold
    /// runs out, the next `fill` (at the latest on the 1 s beat) tries again;
    /// the hold itself stays until the broker accepts, so that the next
    /// refusal waits longer.
    fn held(&self, topic: &str, now: Instant) -> bool {
        self.holds.get(topic).is_some_and(|h| h.until > now)
    }

    /// The broker took an exchange on `topic`: a refusal there is over.
    async fn accepted(&mut self, topic: &str) {
        if self.holds.remove(topic).is_some() {
            tracing::info!(%topic, "The broker accepts readings on this topic again.");
            if self.holds.is_empty() && self.alarms.clear(REFUSED_ALARM) {
                self.alarms.record(&self.store).await;
                self.store
                    .record("broker_refusal", serde_json::Value::Null)
                    .await;
            }
        }
        if self.no_qos2.take().is_some() && self.alarms.clear(QOS_ALARM) {
            self.alarms.record(&self.store).await;
        }
    }

    /// The broker refused an exchange on `topic` with MQTT 5 reason `code`:
    /// its `n` readings are queued again, the topic is held with back-off,
    /// one ERROR per refusal streak, the `broker-refused` alarm.
    async fn refused(&mut self, topic: String, code: u8, n: usize) {
        let now = Instant::now();
        let first = !self.holds.contains_key(&topic);
        let hold = Hold::after(self.holds.get(&topic).copied(), now);
        self.holds.insert(topic.clone(), hold);
        let reason = wire::reason_name(code);
        if first {
            tracing::error!(
                %topic,
                code,
                "The broker refused readings on `{topic}` with reason code 0x{code:02X} ({reason}): they stay queued and are offered again with back-off; ask the broker's operator to allow client `{}` to publish there (its ACL).",
                self.config.gateway_id
            );
        } else {
            tracing::debug!(%topic, code, retry_in = ?hold.wait, requeued = n, "Refused again.");
        }
        let detail = serde_json::json!({
            "code": code,
            "reason": reason,
            "topic": topic,
            "since": Utc::now().timestamp_millis(),
            "retry_in_secs": hold.wait.as_secs(),
        });
        self.store.record("broker_refusal", detail).await;
        if self.alarms.raise(REFUSED_ALARM) {
            self.alarms.record(&self.store).await;
        }
    }

    /// The broker has no QoS 2 while `mqtt.qos = 2` (`how` says how that
    /// showed): one ERROR naming the setting, the `broker-qos` alarm, and
    /// new readings held with back-off (never a loop of resends).
    async fn report_no_qos2(&mut self, how: &str) {
        let first = self.no_qos2.is_none();
        self.no_qos2 = Some(Hold::after(self.no_qos2, Instant::now()));
        if first {
            tracing::error!(
                "Broker `{}` has no QoS 2: {how}. hearth cannot deliver exactly once through it; readings stay queued. Set `mqtt.qos = 1` in {} for at-least-once delivery (each reading keeps its id, so the receiver drops duplicates), or ask the broker's operator for QoS 2.",
                self.broker_name(),
                self.config.source.display()
            );
        }
        if self.alarms.raise(QOS_ALARM) {
            self.alarms.record(&self.store).await;
        }
    }

    /// Whether the lost link looks like a broker that drops the connection
    /// on a QoS 2 PUBLISH (some 3.1.1 brokers without QoS 2): closed by
    /// the broker while a PUBLISH of ours had no answer and no PUBREC came
    /// on that link, twice in a row.
    fn lost_on_qos2(&mut self, error: &PublishError) -> bool {
        if self.config.mqtt.qos < 2 || self.pubrec_seen {
            return false;
        }
        let closed = matches!(
            error,
            PublishError::Link(ConnectionError::Closed | ConnectionError::Io(_))
        );
        // Only a close soon after the PUBLISH counts: a link that dies
        // later, or a flaky one, says nothing about QoS 2.
        let soon = self.config.keep_alive().min(Duration::from_secs(5));
        let unanswered = self.slots.values().any(|s| {
            matches!(
                s,
                Slot::Readings(Open {
                    released: false,
                    written: Some(w),
                    ..
                }) if w.elapsed() < soon
            )
        });
        if !(closed && unanswered) {
            self.dropped_on_qos2 = 0;
            return false;
        }
        self.dropped_on_qos2 += 1;
        self.dropped_on_qos2 >= 2
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
        // TCP, TLS, CONNACK and the resume: each I/O step is bounded by
        // the keep-alive.
        self.beat.waiting(self.config.keep_alive() * 4);
        let (session_state, session_broker) = self
            .store
            .call(|s| Ok((s.state(SESSION_KEY)?, s.state(SESSION_BROKER_KEY)?)))
            .await?;
        let broker_now = self.broker_name();
        // Another broker (failover in `mqtt.hosts`) does not hold our
        // session, whatever it says: a session it kept from long ago would
        // know other packet ids. Start clean there; what was in flight is
        // queued again, counted as a lost session.
        // A store from before `mqtt.hosts` kept no broker: its session was
        // at `mqtt.host:mqtt.port`.
        let session_broker = session_broker.or_else(|| {
            (!self.config.mqtt.hosts.is_empty())
                .then(|| format!("{}:{}", self.config.mqtt.host, self.config.mqtt.port))
        });
        let moved_from = session_broker.filter(|b| session_state.is_some() && *b != broker_now);
        let established = session_state.is_some() && moved_from.is_none();
        self.record_broker("connecting", "").await;
        // This handshake uses the CRLs as they are now: no recheck owed.
        self.tls_reloaded.mark_unchanged();
        let (host, port) = self.current_broker();
        let (host, port) = (host.to_owned(), port);
        let mut conn = tokio::select! {
            _ = shutdown.cancelled() => return Ok(Flow::Stop),
            r = Connection::handshake(
                &host,
                port,
                self.tls.for_handshake(),
                self.config.keep_alive(),
                self.config.mqtt.protocol,
            ) => r?,
        };
        conn.set_beat(self.beat.clone());
        let qos = self.config.mqtt.qos;
        let encoding = match self.config.mqtt.encoding {
            crate::config::Encoding::Json => "json",
            crate::config::Encoding::Cbor => "cbor",
        };
        let (session, unseen) = self
            .store
            .call(move |s| {
                // What the journeys of this connection's exchanges record.
                s.set_publish_profile(qos, encoding);
                s.begin_connect()
            })
            .await?;
        let mut connect = self.connect_packet(session);
        connect.clean = !established;
        let connack = tokio::select! {
            _ = shutdown.cancelled() => return Ok(Flow::Stop),
            r = async {
                conn.send(&[Out::Connect(Box::new(connect))]).await?;
                failpoint::hit("connect-sent");
                conn.connack().await
            } => match r {
                Ok(ack) => ack,
                // TLS held, so the broker read the CONNECT and hung up.
                Err(ConnectionError::Closed) => {
                    return Err(ConnectionError::ClosedOnConnect.into());
                }
                Err(ConnectionError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(ConnectionError::ClosedOnConnect.into());
                }
                Err(e @ ConnectionError::Refused { .. }) => {
                    self.store.call(move |s| s.connect_refused(unseen)).await?;
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            },
        };
        self.link_works().await;
        if !established {
            // The clean session discarded whatever the broker held for us.
            let connack = if moved_from.is_some() {
                Connack::Absent
            } else {
                Connack::Reset
            };
            // One transaction: the requeue and the record of which broker
            // now holds the (new, empty) session. Split, a crash between
            // them would leave the store without its exchanges yet still
            // "established" at the old broker, whose packet ids it would
            // then reuse.
            let now = broker_now.clone();
            let requeued = self
                .store
                .call(move |s| {
                    s.in_transaction(|s| {
                        let n = s.settle_connack(connack, unseen)?;
                        s.set_state(SESSION_KEY, SESSION_RESET)?;
                        s.set_state(SESSION_BROKER_KEY, &now)?;
                        Ok(n)
                    })
                })
                .await?;
            conn.close().await;
            match moved_from {
                Some(from) => tracing::warn!(
                    from = %from,
                    to = %broker_now,
                    requeued,
                    "Moved to another broker: it does not hold this gateway's session, so readings in flight were queued again."
                ),
                None => tracing::info!(requeued, "Broker session reset for a new store."),
            }
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
                // A store from before `mqtt.hosts` learns its broker now.
                if s.state(SESSION_BROKER_KEY)?.is_none() {
                    s.set_state(SESSION_BROKER_KEY, &broker_now)?;
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
        self.apply_limits(&mut conn, &connack);
        tracing::info!(session, session_present = present, protocol = %self.config.mqtt.protocol, "Connected to broker.");
        self.record_broker("connected", "").await;
        self.serve(&mut conn, session, shutdown).await?;
        conn.close().await;
        Ok(Flow::Stop)
    }

    fn connect_packet(&self, session: u64) -> wire::Connect {
        let will = self.status(Reason::ConnectionLost, session, None, vec![]);
        wire::Connect {
            client_id: self.config.gateway_id.clone(),
            keep_alive: self.config.mqtt.keep_alive_secs,
            clean: false,
            will: Will {
                topic: self.config.topic("status"),
                payload: Bytes::from(will.to_vec()),
                retain: true,
                delay_secs: self.config.mqtt.will_delay_secs,
                content_type: Some(CONTENT_TYPE),
            },
            session_expiry_secs: self.config.mqtt.session_expiry_secs,
        }
    }

    /// A PUBLISH of readings, at `mqtt.qos`, in `mqtt.encoding`.
    fn reading_message(&self, topic: String, body: Vec<u8>, pkid: u16) -> wire::Publish {
        let mut p = self.message(topic, body, self.config.mqtt.qos, pkid);
        p.content_type = Some(content_type(self.config.mqtt.encoding));
        p
    }

    /// A PUBLISH of hearth's: content type and schema on every message.
    fn message(&self, topic: String, body: Vec<u8>, qos: u8, pkid: u16) -> wire::Publish {
        wire::Publish {
            topic,
            payload: Bytes::from(body),
            qos,
            pkid,
            dup: false,
            retain: false,
            content_type: Some(CONTENT_TYPE),
            properties: vec![("schema", payload::SCHEMA.to_string())],
        }
    }

    /// Takes in what the broker's CONNACK allows (MQTT 5): the window, the
    /// largest packet, topic aliases, and whether it has QoS 2 at all.
    fn apply_limits(&mut self, conn: &mut Connection, ack: &ConnAck) {
        self.limits = Limits {
            receive_max: ack.receive_max.unwrap_or(u16::MAX).max(1),
            max_packet: ack
                .max_packet_size
                .map_or(super::connection::MAX_OUTGOING, |m| {
                    (m as usize).min(super::connection::MAX_OUTGOING)
                }),
        };
        conn.allow_aliases(ack.topic_alias_max.unwrap_or(0));
        if ack.receive_max.is_some() || ack.max_packet_size.is_some() {
            tracing::debug!(
                receive_max = ?ack.receive_max,
                max_packet_size = ?ack.max_packet_size,
                topic_alias_max = ?ack.topic_alias_max,
                session_expiry = ?ack.session_expiry_secs,
                "Broker limits."
            );
        }
        // No QoS 2 PUBLISH may go to a broker that caps QoS below it; the
        // status (QoS 1) still tells the hospital why.
        self.qos_capped = ack.max_qos.filter(|q| self.config.mqtt.qos >= 2 && *q < 2);
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

    /// Records the link's state for `hearth status`. `since` is when the
    /// link went down for every state but `connected`: reconnect attempts
    /// do not reset it, so the health check sees how long an outage lasts.
    async fn record_broker(&mut self, state: &'static str, detail: &str) {
        let now = Utc::now().timestamp_millis();
        let since = if state == "connected" {
            self.down_since = None;
            now
        } else {
            *self.down_since.get_or_insert(now)
        };
        let value = serde_json::json!({
            "state": state,
            "since": since,
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
        let now = Instant::now();
        self.slots.clear();
        self.resend.clear();
        self.pubrec_seen = false;
        if let Some(max) = self.qos_capped {
            self.report_no_qos2(&format!("its CONNACK says Maximum QoS {max} (MQTT 5)"))
                .await;
        }
        self.budget = Budget::new(self.config.keep_alive(), now);
        self.ping_sent = None;
        self.ping_answered = None;
        self.progress = now;
        self.unsent = None;
        self.backlog_hint = true;
        self.resume(conn).await?;
        self.publish_status(conn, Reason::Connected, session)
            .await?;
        self.test_faults().await?;

        let keep_alive = self.config.keep_alive();
        let mut ping = tokio::time::interval(keep_alive / 2);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ping.reset();
        let beat = Duration::from_secs(self.config.mqtt.heartbeat_secs);
        let mut heartbeat = tokio::time::interval_at(Instant::now() + beat, beat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut beat = tokio::time::interval(BEAT_EVERY);
        beat.set_missed_tick_behavior(MissedTickBehavior::Delay);

        loop {
            // Writes are bounded by the keep-alive each.
            self.beat.waiting(keep_alive);
            self.fill(conn).await?;
            self.beat.tick();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.goodbye(conn, session).await;
                    return Ok(());
                }
                packet = conn.read() => {
                    let mut packets = vec![packet?];
                    self.progress = Instant::now();
                    // What came with it: its acks share one commit. A bad
                    // packet after them ends the link, but only once the
                    // acks before it are taken in.
                    let mut trailing = None;
                    loop {
                        match conn.buffered() {
                            Ok(Some(p)) => packets.push(p),
                            Ok(None) => break,
                            Err(e) => {
                                trailing = Some(e);
                                break;
                            }
                        }
                    }
                    self.handle_all(conn, packets).await?;
                    if let Some(e) = trailing {
                        return Err(e.into());
                    }
                }
                _ = self.store.queued() => self.backlog_hint = true,
                _ = ping.tick() => {
                    // Also a periodic recheck, e.g. after the store was full.
                    self.backlog_hint = true;
                    self.check_liveness(conn)?;
                    if self.ping_sent.is_none() {
                        conn.send(&[Out::PingReq]).await?;
                        self.ping_sent = Some(Instant::now());
                    }
                }
                _ = self.alarms.changed() => {
                    self.publish_status(conn, Reason::Alarm, session).await?;
                }
                _ = reloaded(&mut self.tls_reloaded) => {
                    // A revoked broker key may be an attacker's: stop
                    // sending at once, not at the next reconnect.
                    self.tls
                        .recheck(self.current_broker().0, &conn.peer_chain())
                        .map_err(PublishError::Untrusted)?;
                    tracing::info!("The broker's certificate passes the reloaded CRLs.");
                }
                _ = heartbeat.tick() => {
                    self.publish_status(conn, Reason::Heartbeat, session).await?;
                }
                // An idle link (nothing queued, nothing to answer) is a
                // real reason to wait.
                _ = beat.tick() => self.beat.idle_tick().await,
            }
        }
    }

    /// Fails the connection if the link stopped moving, or if the broker
    /// answers later packets but leaves an exchange unanswered.
    fn check_liveness(&mut self, conn: &Connection) -> Result<(), PublishError> {
        let keep_alive = self.config.keep_alive();
        let now = Instant::now();
        // A shrinking send queue is progress too: a large packet crawling
        // over a slow uplink holds back the broker's answers, not the link.
        let unsent = conn.unsent();
        if let (Some(before), Some(after)) = (self.unsent, unsent)
            && after < before
        {
            self.progress = now;
        }
        self.unsent = unsent;
        if let Some(sent) = self.ping_sent
            && now.saturating_duration_since(sent.max(self.progress)) >= keep_alive
        {
            return Err(PublishError::PingTimeout(keep_alive));
        }
        let Some(answered) = self.ping_answered else {
            return Ok(());
        };
        let bound = keep_alive * UNANSWERED_AFTER;
        let oldest = self
            .slots
            .iter()
            .filter_map(|(pkid, slot)| match slot {
                Slot::Readings(open) => open.written.map(|w| (*pkid, w, open.released)),
                _ => None,
            })
            // The broker has read it: a PINGREQ written later was answered.
            .filter(|(_, written, _)| *written < answered)
            .min_by_key(|(_, written, _)| *written);
        match oldest {
            Some((pkid, written, released)) if now.saturating_duration_since(written) >= bound => {
                Err(PublishError::Unanswered {
                    pkid,
                    age: now.saturating_duration_since(written),
                    sent: if released { "PUBREL" } else { "PUBLISH" },
                    awaited: if released { "PUBCOMP" } else { "PUBREC" },
                })
            }
            _ => Ok(()),
        }
    }

    /// Test-only faults (`src/failpoint.rs`): a panic in this task, or a
    /// store thread that dies under it.
    async fn test_faults(&self) -> Result<(), PublishError> {
        failpoint::panic_at("publisher-panics");
        if failpoint::armed("store-thread-panics") {
            self.store
                .call(|_| -> Result<(), StoreError> {
                    panic!("failpoint `store-thread-panics` reached: panicking as a bug would")
                })
                .await?;
        }
        Ok(())
    }

    /// Finishes what the store says is open (invariant 4), oldest first,
    /// before anything new is sent: PUBRELs at once, each in its own write;
    /// PUBLISHes (DUP=1) queued for [`Publisher::send_resumed`], which
    /// writes them one by one as the budget allows. A resumed PUBLISH is
    /// never re-split: the broker may hold it under its packet id.
    async fn resume(&mut self, conn: &mut Connection) -> Result<(), PublishError> {
        let open = self.store.call(|s| s.open_exchanges()).await?;
        if open.is_empty() {
            return Ok(());
        }
        tracing::info!(open = open.len(), "Resuming open QoS 2 exchanges.");
        let pkids: Vec<u16> = open.iter().map(|e| e.pkid).collect();
        self.store
            .call(move |s| pkids.iter().try_for_each(|p| s.exchange_resent(*p)))
            .await?;
        let mut releases = Vec::new();
        for ex in open {
            let mut open = Open {
                released: ex.released,
                bytes: 0,
                written: None,
                limited: false,
            };
            if ex.released {
                releases.push(ex.pkid);
            } else {
                let body = encode_batch(
                    self.config.mqtt.encoding,
                    &self.config.gateway_id,
                    &ex.readings,
                );
                open.bytes = publish_size(&ex.topic, body.len());
                let mut p = self.reading_message(ex.topic, body, ex.pkid);
                p.dup = true;
                self.resend.push_back(p);
            }
            self.slots.insert(ex.pkid, Slot::Readings(open));
        }
        for (i, pkid) in releases.iter().enumerate() {
            conn.send(&[Out::PubRel(*pkid)]).await?;
            self.mark_written(*pkid);
            if i + 1 < releases.len() || !self.resend.is_empty() {
                failpoint::hit("resume-partly-sent");
            }
        }
        self.send_resumed(conn).await
    }

    /// Writes queued resumed PUBLISHes while the budget has room for them.
    async fn send_resumed(&mut self, conn: &mut Connection) -> Result<(), PublishError> {
        while let Some(p) = self.resend.front() {
            let bytes = publish_size(&p.topic, p.payload.len());
            let in_flight = self.in_flight();
            if in_flight > 0 && in_flight + bytes > self.budget.bytes {
                return Ok(());
            }
            let p = self.resend.pop_front().expect("a front");
            let pkid = p.pkid;
            conn.send(&[Out::Publish(p)]).await?;
            self.mark_written(pkid);
            if let Some(Slot::Readings(open)) = self.slots.get_mut(&pkid) {
                open.limited = in_flight + bytes > self.budget.bytes / 2;
            }
            if !self.resend.is_empty() {
                failpoint::hit("resume-partly-sent");
            }
        }
        Ok(())
    }

    fn mark_written(&mut self, pkid: u16) {
        if let Some(Slot::Readings(open)) = self.slots.get_mut(&pkid) {
            open.written = Some(Instant::now());
        }
    }

    /// PUBLISH bytes written and not yet answered with PUBREC.
    fn in_flight(&self) -> usize {
        self.slots
            .values()
            .map(|slot| match slot {
                Slot::Readings(open) if !open.released && open.written.is_some() => open.bytes,
                _ => 0,
            })
            .sum()
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

    /// Starts new exchanges while the window and the budget have room:
    /// alerts first, each batch cut to the room left. An alert never waits
    /// for the budget: one alert reading always goes out while the window
    /// has a slot, so a slow link delays it by its own bytes only.
    async fn fill(&mut self, conn: &mut Connection) -> Result<(), PublishError> {
        self.send_resumed(conn).await?;
        if !self.resend.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        if self.qos_capped.is_some() || self.no_qos2.is_some_and(|h| h.until > now) {
            return Ok(());
        }
        let alerts_held = self.held(&self.config.topic("alerts"), now);
        let routine_held = self.held(&self.config.topic("readings"), now);
        if alerts_held && routine_held {
            return Ok(());
        }
        // The status message (QoS 1) counts against Receive Maximum too.
        let window = (self.config.mqtt.max_inflight as usize).min(
            usize::from(self.limits.receive_max)
                .saturating_sub(1)
                .max(1),
        );
        let batch_max = self.config.mqtt.batch_max_readings;
        while self.backlog_hint {
            let open = self
                .slots
                .values()
                .filter(|s| matches!(s, Slot::Readings(_)))
                .count();
            if open >= window {
                return Ok(());
            }
            // Every exchange the window has room for is taken in one store
            // transaction (one fsync), then their PUBLISHes are written.
            let pkids: Vec<u16> = (0..window - open).map(|_| self.alloc_pkid()).collect();
            let plan = Plan {
                budget: self.budget.bytes,
                in_flight: self.in_flight(),
                max_packet: self.limits.max_packet,
                open,
                window,
                alerts_held,
                routine_held,
                batch_max,
                encoding: self.config.mqtt.encoding,
                gateway: self.config.gateway_id.clone(),
                alerts: self.config.topic("alerts"),
                readings: self.config.topic("readings"),
            };
            let (taken, end) = match self
                .store
                .call(move |s| s.in_transaction(|s| plan.take(s, &pkids)))
                .await
            {
                Ok(taken) => taken,
                Err(e) => return Err(e.into()),
            };
            if let Some(e) = &end.full {
                // Completing open exchanges frees room; PUBCOMP and the
                // ping tick set the hint again.
                if !self.store_full {
                    tracing::warn!(error = %e, "No new exchange until space is freed.");
                    self.store_full = true;
                }
                self.backlog_hint = false;
            } else if !taken.is_empty() {
                self.store_full = false;
            }
            if !taken.is_empty() {
                failpoint::hit("publish-recorded");
            }
            for t in taken {
                tracing::debug!(pkid = t.pkid, readings = t.readings, bytes = t.body.len(), topic = %t.topic, "Publishing.");
                let open = Open {
                    released: false,
                    bytes: publish_size(&t.topic, t.body.len()),
                    written: None,
                    limited: t.limited,
                };
                self.slots.insert(t.pkid, Slot::Readings(open));
                let p = self.reading_message(t.topic, t.body, t.pkid);
                conn.send(&[Out::Publish(p)]).await?;
                self.mark_written(t.pkid);
                failpoint::hit("publish-sent");
            }
            match end.stop {
                Some(Stop::Nothing { routine_allowed }) => {
                    if routine_allowed {
                        self.backlog_hint = false;
                    }
                    return Ok(());
                }
                Some(Stop::NoRoom) => return Ok(()),
                None if end.full.is_some() => return Ok(()),
                // The window filled: the loop looks again (it returns).
                None => {}
            }
        }
        Ok(())
    }

    /// Handles packets that arrived together. PUBRECs are recorded in one
    /// transaction (one fsync) before their PUBRELs go out in one write,
    /// and PUBCOMPs are completed in one transaction: at a full drain the
    /// broker's acks come in bursts, and a commit per ack would make the
    /// disk the limit. Everything else goes through [`Publisher::handle`],
    /// in order.
    async fn handle_all(
        &mut self,
        conn: &mut Connection,
        packets: Vec<In>,
    ) -> Result<(), PublishError> {
        if packets.len() == 1 {
            let packet = packets.into_iter().next().expect("one packet");
            return self.handle(conn, packet).await;
        }
        let qos = self.config.mqtt.qos;
        let mut releases = Vec::new();
        let mut completes = Vec::new();
        for packet in packets {
            match incoming::react(&packet, qos, |pkid| self.id_use(pkid)) {
                Reaction::Release(pkid) if !releases.contains(&pkid) => {
                    let Some(Slot::Readings(open)) = self.slots.get(&pkid).copied() else {
                        unreachable!("react said PUBREC for a published exchange");
                    };
                    if let Some(sent) = open.written {
                        self.budget.sample(sent, open.limited, Instant::now());
                    }
                    releases.push(pkid);
                }
                Reaction::Complete(pkid)
                    if self.id_use(pkid) == IdUse::Released && !completes.contains(&pkid) =>
                {
                    completes.push(pkid);
                }
                _ => {
                    // In order: what was grouped before it goes first.
                    self.flush_acks(conn, &mut releases, &mut completes).await?;
                    self.handle(conn, packet).await?;
                }
            }
        }
        self.flush_acks(conn, &mut releases, &mut completes).await
    }

    /// Records and answers grouped PUBRECs and PUBCOMPs (see
    /// [`Publisher::handle_all`]); leaves both lists empty.
    async fn flush_acks(
        &mut self,
        conn: &mut Connection,
        releases: &mut Vec<u16>,
        completes: &mut Vec<u16>,
    ) -> Result<(), PublishError> {
        let releases = std::mem::take(releases);
        let completes = std::mem::take(completes);
        if !completes.is_empty() {
            failpoint::hit("pubcomp-received");
            let topics = self.topics_if_held(&completes).await?;
            let ids = completes.clone();
            let n = self
                .store
                .call(move |s| s.complete_exchanges(&ids, Utc::now()))
                .await?;
            for pkid in &completes {
                self.slots.remove(pkid);
            }
            self.backlog_hint = true;
            tracing::debug!(pkids = ?completes, readings = n, "Delivered.");
            for topic in topics {
                self.accepted(&topic).await;
            }
        }
        if !releases.is_empty() {
            self.pubrec_seen = true;
            self.dropped_on_qos2 = 0;
            let ids = releases.clone();
            let found = self.store.call(move |s| s.exchanges_released(&ids)).await?;
            let mut out = Vec::new();
            for (pkid, found) in releases.iter().zip(found) {
                if !found {
                    tracing::warn!(
                        pkid,
                        "PUBREC for an exchange the store no longer has; the id is left unused on this connection."
                    );
                    self.slots.insert(*pkid, Slot::Blocked);
                    continue;
                }
                // Invariant 2: never PUBLISH again after PUBREL.
                self.resend.retain(|p| p.pkid != *pkid);
                if let Some(Slot::Readings(open)) = self.slots.get_mut(pkid) {
                    open.released = true;
                }
                out.push(Out::PubRel(*pkid));
            }
            if !out.is_empty() {
                failpoint::hit("release-recorded");
                conn.send(&out).await?;
                for pkid in &releases {
                    self.mark_written(*pkid);
                }
                failpoint::hit("pubrel-sent");
            }
        }
        Ok(())
    }

    /// The topics of exchanges `pkids`, when a refusal or a missing QoS 2
    /// is being watched (else none: no store query per ack).
    async fn topics_if_held(&self, pkids: &[u16]) -> Result<Vec<String>, PublishError> {
        if self.holds.is_empty() && self.no_qos2.is_none() {
            return Ok(Vec::new());
        }
        let ids = pkids.to_vec();
        let mut topics: Vec<String> = self
            .store
            .call(move |s| {
                ids.iter()
                    .filter_map(|p| s.exchange_topic(*p).transpose())
                    .collect::<Result<Vec<String>, StoreError>>()
            })
            .await?;
        topics.sort();
        topics.dedup();
        Ok(topics)
    }

    /// What a packet id is used for, as `incoming::react` sees it.
    fn id_use(&self, pkid: u16) -> IdUse {
        match self.slots.get(&pkid) {
            None => IdUse::Free,
            Some(Slot::Readings(Open {
                released: false, ..
            })) => IdUse::Published,
            Some(Slot::Readings(Open { released: true, .. })) => IdUse::Released,
            Some(Slot::Status) => IdUse::Status,
            Some(Slot::Blocked) => IdUse::Blocked,
        }
    }

    /// Carries out the reaction `incoming::react` (pure, fuzzed) decides.
    async fn handle(&mut self, conn: &mut Connection, packet: In) -> Result<(), PublishError> {
        match incoming::react(&packet, self.config.mqtt.qos, |pkid| self.id_use(pkid)) {
            Reaction::Release(pkid) => {
                self.pubrec_seen = true;
                self.dropped_on_qos2 = 0;
                let Some(Slot::Readings(open)) = self.slots.get(&pkid).copied() else {
                    unreachable!("react said PUBREC for a published exchange");
                };
                if let Some(sent) = open.written
                    && let Some(budget) = self.budget.sample(sent, open.limited, Instant::now())
                {
                    tracing::debug!(
                        budget,
                        latency_ms = sent.elapsed().as_millis() as u64,
                        "Send budget adapted to the link."
                    );
                }
                if !self.store.call(move |s| s.exchange_released(pkid)).await? {
                    tracing::warn!(
                        pkid,
                        "PUBREC for an exchange the store no longer has; the id is left unused on this connection."
                    );
                    self.slots.insert(pkid, Slot::Blocked);
                    return Ok(());
                }
                // A PUBREC before its resumed PUBLISH went out: the broker
                // holds it already, and after PUBREL it must never be
                // written again (invariant 2).
                self.resend.retain(|p| p.pkid != pkid);
                let open = Open {
                    released: true,
                    ..open
                };
                self.slots.insert(pkid, Slot::Readings(open));
                self.write_pubrel(conn, pkid).await?;
            }
            Reaction::ReleaseAgain(pkid) => self.write_pubrel(conn, pkid).await?,
            Reaction::IgnoreRec(pkid) => {
                tracing::warn!(
                    pkid,
                    "PUBREC for a packet id with no QoS 2 exchange; ignored."
                );
            }
            Reaction::Block(pkid) => {
                // The broker holds a message we have no record of (e.g. it
                // restored an old state). Releasing it could deliver it
                // twice; keep the id out of use instead.
                tracing::warn!(
                    pkid,
                    "PUBREC for an unknown packet id; the id is left unused on this connection."
                );
                self.slots.insert(pkid, Slot::Blocked);
            }
            Reaction::Complete(pkid) => {
                failpoint::hit("pubcomp-received");
                let released = self.id_use(pkid) == IdUse::Released;
                let topic = self.topics_if_held(&[pkid]).await?.pop();
                let n = if released {
                    self.store
                        .call(move |s| s.complete_exchange(pkid, Utc::now()))
                        .await?
                } else {
                    // QoS 1: PUBACK ends the exchange.
                    self.store
                        .call(move |s| s.acknowledge_exchange(pkid, Utc::now()))
                        .await?
                };
                self.slots.remove(&pkid);
                self.backlog_hint = true;
                tracing::debug!(pkid, readings = n, "Delivered.");
                if let Some(topic) = topic {
                    self.accepted(&topic).await;
                }
            }
            Reaction::Refused { pkid, code } => {
                let topic = self.store.call(move |s| s.exchange_topic(pkid)).await?;
                let n = self.store.call(move |s| s.exchange_refused(pkid)).await?;
                self.slots.remove(&pkid);
                self.refused(topic.unwrap_or_default(), code, n).await;
            }
            Reaction::NoQos2(pkid) => {
                // The broker took the message at QoS 1: delivered, at
                // least once.
                let n = self
                    .store
                    .call(move |s| s.acknowledge_exchange(pkid, Utc::now()))
                    .await?;
                self.slots.remove(&pkid);
                self.backlog_hint = true;
                tracing::debug!(pkid, readings = n, "Delivered at QoS 1.");
                self.report_no_qos2("it answered a QoS 2 PUBLISH with PUBACK (QoS 1)")
                    .await;
            }
            Reaction::Disconnected(code) => {
                let reason = match &packet {
                    In::Disconnect { reason, .. } => reason.clone(),
                    _ => None,
                };
                if code == 0x9B && self.config.mqtt.qos >= 2 {
                    self.report_no_qos2(
                        "it closed the connection with reason 0x9B (QoS not supported)",
                    )
                    .await;
                }
                return Err(ConnectionError::Disconnected { code, reason }.into());
            }
            Reaction::Unknown(pkid) => {
                let n = self.store.call(move |s| s.requeue_released(pkid)).await?;
                self.slots.remove(&pkid);
                self.backlog_hint = true;
                tracing::warn!(
                    pkid,
                    requeued = n,
                    "The broker did not know our PUBREL (reason 0x92): delivered or lost, nobody can tell, so its readings are queued again under their ids."
                );
            }
            Reaction::IgnoreComp(pkid) => {
                tracing::warn!(pkid, "PUBCOMP for a packet id not released; ignored.");
            }
            Reaction::StatusAcked(pkid) => {
                self.slots.remove(&pkid);
            }
            Reaction::IgnoreAck(_) => {}
            Reaction::PingAnswered => {
                self.ping_answered = self.ping_sent.take().or(self.ping_answered);
            }
            Reaction::AnswerPubRel(pkid) => {
                conn.send(&[Out::PubComp(pkid)]).await?;
            }
            Reaction::Unexpected(kind) => {
                tracing::debug!(packet = kind, "Unexpected packet from broker; ignored.");
            }
        }
        Ok(())
    }

    /// Writes PUBREL for an exchange whose release the store has recorded.
    async fn write_pubrel(&mut self, conn: &mut Connection, pkid: u16) -> Result<(), PublishError> {
        failpoint::hit("release-recorded");
        conn.send(&[Out::PubRel(pkid)]).await?;
        self.mark_written(pkid);
        failpoint::hit("pubrel-sent");
        Ok(())
    }

    async fn publish_status(
        &mut self,
        conn: &mut Connection,
        reason: Reason,
        session: u64,
    ) -> Result<u16, PublishError> {
        // The counts may take a while on a large store: a bounded wait.
        self.beat.waiting(self.config.keep_alive());
        let (counts, seen, audit) = self
            .store
            // On the report connection: however large the store, the
            // heartbeat never delays a serial ACK.
            .read(|s| {
                // The audit head comes from a walk of the whole chain (a few
                // entries a day), so the hospital also learns of a break.
                // Without it the status still goes out.
                let audit = s.audit_verify().inspect_err(|e| {
                    tracing::warn!(error = %e, "Cannot read the audit trail's head for the status.")
                });
                Ok((s.counts()?, s.last_heard()?, audit.ok()))
            })
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
        let body = payload::StatusReport {
            status: &self.status(reason, session, Some(backlog), devices),
            audit_head: audit.as_ref().and_then(payload::AuditHead::from_verdict),
        }
        .to_vec();
        let pkid = self.alloc_pkid();
        self.slots.insert(pkid, Slot::Status);
        let mut p = self.message(self.config.topic("status"), body, 1, pkid);
        p.retain = true;
        conn.send(&[Out::Publish(p)]).await?;
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

/// Resolves when the CRLs were reloaded; never, if they cannot be any more.
async fn reloaded(rx: &mut watch::Receiver<u64>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
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

    const KEEP_ALIVE: Duration = Duration::from_secs(8);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn budget_starts_at_the_floor_and_doubles_once_per_round_on_fast_acks() {
        let t0 = Instant::now();
        let mut b = Budget::new(KEEP_ALIVE, t0);
        assert_eq!(b.bytes, Budget::FLOOR);
        // Two fast acks of packets written in the same round: one doubling.
        assert_eq!(
            b.sample(t0 + MS, true, t0 + 5 * MS),
            Some(2 * Budget::FLOOR)
        );
        assert_eq!(b.sample(t0 + 2 * MS, true, t0 + 6 * MS), None);
        // A packet written after the change may change it again.
        assert_eq!(
            b.sample(t0 + 7 * MS, true, t0 + 9 * MS),
            Some(4 * Budget::FLOOR)
        );
        // A fast ack of a packet the budget did not limit says nothing.
        assert_eq!(b.sample(t0 + 10 * MS, false, t0 + 11 * MS), None);
        assert_eq!(b.bytes, 4 * Budget::FLOOR);
    }

    #[test]
    fn budget_halves_on_slow_acks_down_to_the_floor_and_stops_at_the_ceiling() {
        let t0 = Instant::now();
        let mut b = Budget::new(KEEP_ALIVE, t0);
        b.bytes = 64 * 1024;
        let slow = KEEP_ALIVE / 4 + MS;
        assert_eq!(b.sample(t0, true, t0 + slow), Some(32 * 1024));
        // Written before the halving: already accounted for.
        assert_eq!(b.sample(t0 + MS, true, t0 + slow + MS), None);
        let mut t = t0 + slow + MS;
        for _ in 0..10 {
            b.sample(t, true, t + slow);
            t += slow + MS;
        }
        assert_eq!(b.bytes, Budget::FLOOR);
        // Between a quarter of the target and the target: held.
        assert_eq!(b.sample(t, true, t + KEEP_ALIVE / 8), None);
        b.bytes = Budget::CEILING;
        t += KEEP_ALIVE;
        assert_eq!(b.sample(t, true, t + MS), None);
        assert_eq!(b.bytes, Budget::CEILING);
    }

    #[test]
    fn longest_prefix_finds_the_largest_fitting_count() {
        for len in 0..40 {
            for limit in 0..=len + 1 {
                let mut asked = 0;
                let n = longest_prefix(len, |n| {
                    asked += 1;
                    n <= limit
                });
                assert_eq!(n, limit.min(len), "len {len} limit {limit}");
                assert!(asked <= 2 + (len as f64).log2().ceil() as usize, "{asked}");
            }
        }
    }
}
