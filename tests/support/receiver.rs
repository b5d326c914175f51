//! The hospital as an exactly-once QoS 2 receiver, counting every delivery
//! to its application. The chaos test compares these counts with what the
//! gateway sent, so this side must not add duplicates of its own.
//!
//! Built on hearth's [`Connection`] (TLS, rumqttc's codec), with the
//! receiver rules of MQTT 3.1.1, 4.3.3 Method B, kept in [`Inbox`]:
//! - PUBLISH QoS 2 with packet id P: deliver it unless P is held, hold P,
//!   answer PUBREC(P) either way.
//! - PUBREL(P): release P, answer PUBCOMP(P).
//! - QoS 1: deliver, PUBACK. QoS 0: deliver.
//!
//! The session is persistent (`clean_session = false`) and the receiver
//! never crashes: the held ids survive reconnects. A CONNACK without a
//! session clears them, as 3.2.2.2 requires (the broker starts packet ids
//! afresh then), and subscribes again.
//!
//! Broker retransmissions: mosquitto 2.0.11 restored from its database
//! sends a message whose PUBREL was sent but whose PUBCOMP it had not saved
//! as a whole new PUBLISH (DUP=1, same packet id), not as a PUBREL (see
//! `support::mosquitto`). Method B alone would deliver it again. So the
//! inbox keeps, per packet id, the topic and payload of the last message
//! released on this session; a DUP=1 PUBLISH that matches it exactly is
//! answered with PUBREC, not delivered, and counted in
//! [`Receiver::broker_retransmissions`]. A DUP=0 PUBLISH is always new.
//! Blind spot: a new message with the same id, topic and payload as the
//! last one released under that id, whose first (DUP=0) copy was lost on
//! the way, would be taken for a retransmission; tests use unique payloads.
//!
//! Another blind spot, shared with every client: a new [`Receiver`] with
//! the client id of an earlier one starts with no held ids, so a message
//! the earlier one had received but not seen released comes again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hearth::certs::DevCerts;
use hearth::mqtt::connection::{Connection, ConnectionError};
use rumqttc::{
    ConnAck, Connect, Packet, PubAck, PubComp, PubRec, Publish, QoS, Subscribe, SubscribeFilter,
    SubscribeReasonCode,
};
use rustls::ClientConfig;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Keep-alive sent in CONNECT; a PINGREQ goes out every half of it, and a
/// link silent for a whole one after a PINGREQ counts as dead. Short, so a
/// blackholed link is given up quickly.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Bound on each step of connecting and on each write.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// The first pause before reconnecting; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How long [`Receiver::start`] waits for the first SUBACK.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many transcript lines to keep for failure messages.
const TRANSCRIPT_LINES: usize = 300;

/// One message handed to the hospital's application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    /// The DUP flag of the PUBLISH that was delivered.
    pub dup: bool,
    pub qos: u8,
    /// Set only on a retained message sent because of a new subscription.
    pub retain: bool,
    pub pkid: u16,
    pub at: Instant,
}

/// What the receiver rules make of a QoS 2 PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// New: hand it to the application.
    Deliver,
    /// Its packet id is held (received, not yet released): a resend.
    Held,
    /// DUP=1 and equal to the last message released under its packet id:
    /// mosquitto's resend after a restart (module comment).
    BrokerRetransmission,
}

/// The QoS 2 receiver state of one session, pure and synchronous.
#[derive(Debug, Default)]
pub struct Inbox {
    /// Received and answered with PUBREC, PUBREL not yet seen.
    held: HashMap<u16, Message>,
    /// The last message released (PUBREL seen) under each packet id.
    released: HashMap<u16, Message>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Message {
    topic: String,
    payload: Bytes,
}

impl Inbox {
    /// A QoS 2 PUBLISH arrived; the caller answers PUBREC whatever the verdict.
    pub fn publish(&mut self, pkid: u16, dup: bool, topic: &str, payload: &Bytes) -> Verdict {
        if self.held.contains_key(&pkid) {
            return Verdict::Held;
        }
        let retransmitted = dup
            && self
                .released
                .get(&pkid)
                .is_some_and(|last| last.topic == topic && last.payload == payload);
        if retransmitted {
            return Verdict::BrokerRetransmission;
        }
        let message = Message {
            topic: topic.to_owned(),
            payload: payload.clone(),
        };
        self.held.insert(pkid, message);
        Verdict::Deliver
    }

    /// A PUBREL arrived; the caller answers PUBCOMP. Returns whether `pkid`
    /// was held. The message counts as completed from here on, before the
    /// PUBCOMP is written: if that write fails, the broker may still send it
    /// again, and it must be recognised then.
    pub fn release(&mut self, pkid: u16) -> bool {
        match self.held.remove(&pkid) {
            Some(message) => {
                self.released.insert(pkid, message);
                true
            }
            None => false,
        }
    }

    /// The broker has no session for us: its packet ids start afresh.
    pub fn session_lost(&mut self) {
        self.held.clear();
        self.released.clear();
    }

    /// Packet ids received and not yet released.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

pub struct Receiver {
    client_id: String,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    /// The state, also after a panic elsewhere (a failed assertion must not
    /// turn into an abort when the [`Receiver`] is dropped while unwinding).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

#[derive(Default)]
struct State {
    deliveries: Vec<Received>,
    broker_retransmissions: usize,
    held_redeliveries: usize,
    /// CONNACKs received, across all links.
    connects: usize,
    /// CONNACKs after the first one that said the session was gone.
    sessions_lost: usize,
    subacks: usize,
    /// A SUBACK that refused a topic.
    refused: Option<String>,
    transcript: VecDeque<String>,
}

impl State {
    fn note(&mut self, line: String) {
        if self.transcript.len() == TRANSCRIPT_LINES {
            self.transcript.pop_front();
        }
        self.transcript.push_back(line);
    }
}

impl Receiver {
    /// Connects as `client_id` with the hospital certificate, subscribes to
    /// `topics` with QoS 2 and returns once the broker acknowledged it.
    /// Then it keeps the link up by itself, reconnecting after any loss,
    /// until dropped.
    #[track_caller]
    pub fn start(
        host: &str,
        port: u16,
        certs: &DevCerts,
        client_id: &str,
        topics: &[&str],
    ) -> Receiver {
        assert!(!topics.is_empty(), "a receiver needs at least one topic");
        hearth::mqtt::tls::install_crypto_provider();
        let tls = hearth::mqtt::tls::client_config(
            &certs.ca_cert,
            &certs.hospital_cert,
            &certs.hospital_key,
        )
        .unwrap_or_else(|err| panic!("cannot build the hospital's TLS config: {err}"));
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let shutdown = CancellationToken::new();
        let session = Session {
            host: host.to_owned(),
            port,
            tls,
            client_id: client_id.to_owned(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            inbox: Inbox::default(),
            subscribed: false,
            next_pkid: 1,
            shared: Arc::clone(&shared),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cannot build the receiver's runtime");
        let thread = {
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name(format!("receiver {client_id}"))
                .spawn(move || runtime.block_on(session.run(shutdown)))
                .expect("cannot start a thread")
        };
        let receiver = Receiver {
            client_id: client_id.to_owned(),
            shared,
            shutdown,
            thread: Some(thread),
        };
        let ready = receiver.wait(READY_TIMEOUT, |s| s.subacks > 0 || s.refused.is_some());
        let failure = match (&ready.refused, ready.subacks) {
            (Some(refusal), _) => refusal.clone(),
            (None, 0) => format!("no SUBACK within {READY_TIMEOUT:?}"),
            _ => String::new(),
        };
        drop(ready);
        if !failure.is_empty() {
            panic!(
                "receiver `{client_id}`: {failure}\n{}",
                receiver.transcript()
            );
        }
        receiver
    }

    /// Every delivery so far, in order.
    pub fn deliveries(&self) -> Vec<Received> {
        self.shared.lock().deliveries.clone()
    }

    /// Blocks until `pred` holds for all deliveries so far, or `timeout`
    /// passes; returns whether it held.
    pub fn wait_until(&self, timeout: Duration, mut pred: impl FnMut(&[Received]) -> bool) -> bool {
        let state = self.wait(timeout, |s| pred(&s.deliveries));
        pred(&state.deliveries)
    }

    /// Blocks until the receiver has been connected `count` times in all.
    pub fn wait_connects(&self, count: usize, timeout: Duration) -> bool {
        self.wait(timeout, |s| s.connects >= count).connects >= count
    }

    /// DUP=1 PUBLISHes recognised as mosquitto's resend of a message already
    /// completed, and not delivered (module comment).
    pub fn broker_retransmissions(&self) -> usize {
        self.shared.lock().broker_retransmissions
    }

    /// QoS 2 PUBLISHes not delivered because their packet id was held: the
    /// ordinary resend after a lost PUBREC.
    pub fn held_redeliveries(&self) -> usize {
        self.shared.lock().held_redeliveries
    }

    /// CONNACKs received (1 + reconnects).
    pub fn connects(&self) -> usize {
        self.shared.lock().connects
    }

    /// CONNACKs after the first that said the broker had no session for us.
    pub fn session_present_false_count(&self) -> usize {
        self.shared.lock().sessions_lost
    }

    /// SUBACKs received: 1, plus one per session the broker lost.
    pub fn subscribed_count(&self) -> usize {
        self.shared.lock().subacks
    }

    /// Recent link events and odd packets (never payloads), for failure
    /// messages.
    pub fn transcript(&self) -> String {
        let state = self.shared.lock();
        let lines: Vec<&str> = state.transcript.iter().map(String::as_str).collect();
        format!(
            "--- receiver `{}` ({} connects) ---\n{}",
            self.client_id,
            state.connects,
            lines.join("\n")
        )
    }

    fn wait(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&State) -> bool,
    ) -> MutexGuard<'_, State> {
        super::wait_on(self.shared.lock(), &self.shared.changed, timeout, |s| {
            done(s)
        })
    }
}

impl Drop for Receiver {
    /// Disconnects cleanly; the broker keeps the session.
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The receiver's task: one persistent session over many links.
struct Session {
    host: String,
    port: u16,
    tls: Arc<ClientConfig>,
    client_id: String,
    topics: Vec<String>,
    inbox: Inbox,
    /// A SUBACK was received on the broker's current session.
    subscribed: bool,
    next_pkid: u16,
    shared: Arc<Shared>,
}

impl Session {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut connect = Connect::new(self.client_id.clone());
            connect.clean_session = false;
            connect.keep_alive = KEEP_ALIVE.as_secs() as u16;
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return,
                opened = Connection::open_v4(&self.host, self.port, self.tls.clone(), connect, IO_TIMEOUT) => opened,
            };
            let lost = match opened {
                Ok((mut conn, connack)) => {
                    backoff = BACKOFF_MIN;
                    match self.serve(&mut conn, connack, &shutdown).await {
                        Ok(()) => {
                            conn.close().await;
                            return;
                        }
                        Err(err) => format!("link lost: {err}"),
                    }
                }
                Err(err) => format!("cannot connect: {err}"),
            };
            self.shared.update(|s| s.note(lost));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One link; returns Ok only on shutdown.
    async fn serve(
        &mut self,
        conn: &mut Connection,
        connack: ConnAck,
        shutdown: &CancellationToken,
    ) -> Result<(), ConnectionError> {
        let session_present = connack.session_present;
        self.shared.update(|s| {
            s.connects += 1;
            if !session_present && s.connects > 1 {
                s.sessions_lost += 1;
            }
            s.note(format!("connected, session_present={session_present}"));
        });
        if !session_present {
            self.inbox.session_lost();
            self.subscribed = false;
        }
        if !self.subscribed {
            conn.send_v4(&[Packet::Subscribe(self.subscribe_packet())])
                .await?;
        }

        let mut ping = tokio::time::interval(KEEP_ALIVE / 2);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ping.reset();
        let mut ping_sent: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                packet = conn.read_v4() => {
                    ping_sent = None;
                    if let Some(reply) = self.handle(packet?) {
                        conn.send_v4(&[reply]).await?;
                    }
                }
                _ = ping.tick() => match ping_sent {
                    Some(sent) if sent.elapsed() >= KEEP_ALIVE => {
                        return Err(ConnectionError::Timeout(KEEP_ALIVE));
                    }
                    Some(_) => {}
                    None => {
                        conn.send_v4(&[Packet::PingReq]).await?;
                        ping_sent = Some(Instant::now());
                    }
                },
            }
        }
    }

    fn subscribe_packet(&mut self) -> Subscribe {
        let filters = self
            .topics
            .iter()
            .map(|topic| SubscribeFilter::new(topic.clone(), QoS::ExactlyOnce));
        let mut subscribe = Subscribe::new_many(filters);
        subscribe.pkid = self.next_pkid;
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        subscribe
    }

    /// Applies the receiver rules to one packet; returns the answer.
    fn handle(&mut self, packet: Packet) -> Option<Packet> {
        match packet {
            Packet::Publish(publish) => self.publish(publish),
            Packet::PubRel(pubrel) => {
                let pkid = pubrel.pkid;
                if !self.inbox.release(pkid) {
                    self.shared
                        .update(|s| s.note(format!("PUBREL for id {pkid}, which is not held")));
                }
                Some(Packet::PubComp(PubComp::new(pkid)))
            }
            Packet::SubAck(suback) => {
                let refused = suback
                    .return_codes
                    .iter()
                    .any(|code| matches!(code, SubscribeReasonCode::Failure));
                let topics = self.topics.join(", ");
                self.subscribed = !refused;
                self.shared.update(|s| {
                    s.subacks += 1;
                    if refused {
                        s.refused = Some(format!(
                            "broker refused a subscription: {:?} for {topics}",
                            suback.return_codes
                        ));
                    }
                    s.note(format!("SUBACK {:?}", suback.return_codes));
                });
                None
            }
            Packet::PingResp => None,
            other => {
                self.shared
                    .update(|s| s.note(format!("unexpected packet ignored: {other:?}")));
                None
            }
        }
    }

    fn publish(&mut self, publish: Publish) -> Option<Packet> {
        let Publish {
            dup,
            qos,
            retain,
            topic,
            pkid,
            payload,
        } = publish;
        let verdict = match qos {
            QoS::ExactlyOnce => self.inbox.publish(pkid, dup, &topic, &payload),
            QoS::AtLeastOnce | QoS::AtMostOnce => Verdict::Deliver,
        };
        let received = Received {
            topic,
            payload: payload.to_vec(),
            dup,
            qos: qos as u8,
            retain,
            pkid,
            at: Instant::now(),
        };
        self.shared.update(|s| match verdict {
            Verdict::Deliver => s.deliveries.push(received),
            Verdict::Held => {
                s.held_redeliveries += 1;
                s.note(format!(
                    "PUBLISH id {pkid} dup={dup} `{}` while held: not delivered",
                    received.topic
                ));
            }
            Verdict::BrokerRetransmission => {
                s.broker_retransmissions += 1;
                s.note(format!(
                    "PUBLISH id {pkid} dup=1 `{}` equals the message completed under \
                     that id: broker retransmission, not delivered",
                    received.topic
                ));
            }
        });
        match qos {
            QoS::ExactlyOnce => Some(Packet::PubRec(PubRec::new(pkid))),
            QoS::AtLeastOnce => Some(Packet::PubAck(PubAck::new(pkid))),
            QoS::AtMostOnce => None,
        }
    }
}
