//! The hospital side: a QoS 2 subscriber that is an MQTT implementation
//! independent of ours, the `mosquitto_sub` client (libmosquitto) run as a
//! child process. libmosquitto hands a QoS 2 message to the application
//! once, on PUBREL, so every line it prints is one delivery.
//!
//! The session is persistent (`-c` with a fixed client id): messages
//! published while the subscriber is away are queued by the broker and
//! arrive when it is back, including after [`Subscriber::start`] is called
//! again with the same client id.
//!
//! mosquitto_sub reconnects by itself when the broker closes connections
//! cleanly (SIGTERM), but exits when the connection dies without a TLS
//! close_notify (broker SIGKILL: "OpenSSL Error ... unexpected eof"). A
//! supervisor thread therefore starts it again whenever it exits, until the
//! [`Subscriber`] is dropped. One gap remains: a QoS 2 message whose PUBREC
//! was sent by the process that died is known only to that process, so if
//! the broker then sends PUBREL the new process acknowledges it and prints
//! nothing. Only a broker crash in the middle of a handshake causes that.
//!
//! Output format: `-F 'DELIVERY %j'` prints one JSON object per message
//! (topic, qos, retain, payload as an escaped string), so payloads can hold
//! any text, and debug lines (`-d`, all starting with `Client `) cannot pass
//! for messages. mosquitto_sub flushes stdout after each message but not
//! after debug lines, so it runs under `stdbuf -oL` to see the SUBACK at
//! once.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hearth::certs::DevCerts;

use super::mosquitto::{HOST, Mosquitto};
use super::send_signal;

/// How long [`Subscriber::start`] waits for the SUBACK.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause before running mosquitto_sub again after it exited.
const RESPAWN_DELAY: Duration = Duration::from_millis(100);
/// What marks a message line in the output.
const DELIVERY_PREFIX: &str = "DELIVERY ";
/// What mosquitto_sub prints (with `-d`) once a SUBACK arrived:
/// `Subscribed (mid: 1): 2, 2` with the granted QoS of each topic.
const SUBSCRIBED_PREFIX: &str = "Subscribed (mid: ";
/// How many lines of mosquitto_sub's own output to keep for failure messages.
const TRANSCRIPT_LINES: usize = 200;

/// One message as the application on the hospital side saw it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: String,
    /// Set only for a retained message sent because a subscription was
    /// made; a live message is forwarded with the flag cleared (MQTT 3.1.1,
    /// 3.3.1.3), even if it was published retained.
    pub retained: bool,
    pub qos: u8,
    /// The payload parsed as JSON, or a JSON string holding it if it is not
    /// JSON (e.g. empty, as when a retained message is cleared).
    pub payload: serde_json::Value,
    pub at: Instant,
}

pub struct Subscriber {
    client_id: String,
    shared: Arc<Shared>,
    /// Index of the next delivery that [`next`](Self::next) returns.
    cursor: Mutex<usize>,
    supervisor: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    /// The state, also after a panic elsewhere (a failed assertion must not
    /// turn into an abort when the [`Subscriber`] is dropped while unwinding).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct State {
    deliveries: Vec<Delivery>,
    /// SUBACKs received, across all runs of mosquitto_sub.
    subacks: usize,
    /// A topic the broker refused (granted QoS 128).
    refused: Option<String>,
    /// How many times mosquitto_sub was started.
    spawns: usize,
    /// mosquitto_sub could not be run at all.
    unrunnable: bool,
    /// The running mosquitto_sub, while it may still be signalled.
    pid: Option<u32>,
    stopping: bool,
    /// The last lines mosquitto_sub printed that were not messages.
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

impl Subscriber {
    /// Subscribes to `topics` with QoS 2 as `client_id` (persistent session),
    /// authenticated with the hospital certificate. Returns once the broker
    /// has acknowledged the subscription.
    #[track_caller]
    pub fn start(
        broker: &Mosquitto,
        certs: &DevCerts,
        client_id: &str,
        topics: &[&str],
    ) -> Subscriber {
        Self::start_on(broker.port, certs, client_id, topics)
    }

    /// [`Subscriber::start`] on any broker's TLS port on 127.0.0.1.
    #[track_caller]
    pub fn start_on(port: u16, certs: &DevCerts, client_id: &str, topics: &[&str]) -> Subscriber {
        assert!(!topics.is_empty(), "a subscriber needs at least one topic");
        let mut command = Command::new("stdbuf");
        command
            .arg("-oL")
            .arg("mosquitto_sub")
            .args(["-h", HOST, "-p", &port.to_string()])
            .arg("--cafile")
            .arg(&certs.ca_cert)
            .arg("--cert")
            .arg(&certs.hospital_cert)
            .arg("--key")
            .arg(&certs.hospital_key)
            .args(["-i", client_id, "-c", "-q", "2", "--nodelay", "-d"])
            .args(["-F", &format!("{DELIVERY_PREFIX}%j")]);
        for topic in topics {
            command.args(["-t", topic]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());

        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let supervisor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("mosquitto_sub {client_id}"))
                .spawn(move || supervise(command, &shared))
                .expect("cannot start a thread")
        };
        let subscriber = Subscriber {
            client_id: client_id.to_owned(),
            shared,
            cursor: Mutex::new(0),
            supervisor: Some(supervisor),
        };
        subscriber.wait_subscribed(1, READY_TIMEOUT);
        subscriber
    }

    /// The next delivery not yet returned by `next` or
    /// [`collect_until`](Self::collect_until), waiting up to `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Delivery> {
        let mut cursor = self.cursor.lock().unwrap_or_else(PoisonError::into_inner);
        let state = self.wait(timeout, |state| state.deliveries.len() > *cursor);
        let delivery = state.deliveries.get(*cursor).cloned()?;
        *cursor += 1;
        Some(delivery)
    }

    /// The deliveries after those already taken, gathered until `pred`
    /// holds for them or `timeout` passes; returns what it gathered either
    /// way, so the caller's assertion shows it. They count as taken.
    pub fn collect_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[Delivery]) -> bool,
    ) -> Vec<Delivery> {
        let mut cursor = self.cursor.lock().unwrap_or_else(PoisonError::into_inner);
        let from = *cursor;
        let state = self.wait(timeout, |state| pred(&state.deliveries[from..]));
        *cursor = state.deliveries.len();
        state.deliveries[from..].to_vec()
    }

    /// Waits until `pred` holds for everything received so far (taken or
    /// not) or `timeout` passes; returns everything either way.
    pub fn wait_all(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[Delivery]) -> bool,
    ) -> Vec<Delivery> {
        let state = self.wait(timeout, |state| pred(&state.deliveries));
        state.deliveries.clone()
    }

    /// Everything received so far, taken or not.
    pub fn all(&self) -> Vec<Delivery> {
        self.shared.lock().deliveries.clone()
    }

    /// Waits until the broker has acknowledged `count` subscriptions in all,
    /// e.g. 2 once the client is back after a broker restart. Panics on
    /// timeout or if the broker refused a topic.
    #[track_caller]
    pub fn wait_subscribed(&self, count: usize, timeout: Duration) {
        let state = self.wait(timeout, |state| {
            state.subacks >= count || state.refused.is_some() || state.unrunnable
        });
        let failure = if let Some(topic) = &state.refused {
            format!("broker refused subscription `{topic}`")
        } else if state.unrunnable {
            "mosquitto_sub cannot be run".to_owned()
        } else if state.subacks < count {
            format!(
                "saw {} of {count} SUBACKs within {timeout:?}",
                state.subacks
            )
        } else {
            return;
        };
        let transcript = transcript(&state);
        drop(state);
        panic!("`{}`: {failure}\n{transcript}", self.client_id);
    }

    /// SUBACKs received so far; grows by one each time the client is back.
    pub fn subscribed_count(&self) -> usize {
        self.shared.lock().subacks
    }

    /// How many times mosquitto_sub was started (1 + restarts after it exited).
    pub fn spawns(&self) -> usize {
        self.shared.lock().spawns
    }

    /// mosquitto_sub's recent debug output and errors, for failure messages.
    pub fn transcript(&self) -> String {
        transcript(&self.shared.lock())
    }

    /// Blocks until `done` holds or `timeout` passes; returns the state.
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

impl Drop for Subscriber {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.stopping = true;
            // The pid is set only while the child is unreaped (the
            // supervisor clears it before waiting), so it cannot have been
            // reused by another process.
            if let Some(pid) = state.pid {
                let _ = send_signal(pid, libc::SIGKILL);
            }
        }
        self.shared.changed.notify_all();
        if let Some(supervisor) = self.supervisor.take() {
            let _ = supervisor.join();
        }
    }
}

/// Runs mosquitto_sub, and again each time it exits, until told to stop.
fn supervise(mut command: Command, shared: &Shared) {
    loop {
        let mut child = {
            let mut state = shared.lock();
            if state.stopping {
                return;
            }
            let child = match command.spawn() {
                Ok(child) => child,
                Err(err) => {
                    state.note(format!(
                        "cannot run `stdbuf -oL mosquitto_sub` (is the Debian package \
                         `mosquitto-clients` installed?): {err}"
                    ));
                    state.unrunnable = true;
                    shared.changed.notify_all();
                    return;
                }
            };
            state.spawns += 1;
            state.pid = Some(child.id());
            child
        };
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        std::thread::scope(|scope| {
            scope.spawn(|| read_stderr(stderr, shared));
            read_stdout(stdout, shared);
        });
        // stdout closed: the process is exiting. Forget its pid before
        // reaping it (see Drop).
        shared.lock().pid = None;
        let status = child.wait();
        let mut state = shared.lock();
        state.note(format!("mosquitto_sub exited: {status:?}"));
        shared.changed.notify_all();
        if state.stopping {
            return;
        }
        // Wait before the next run, unless told to stop meanwhile.
        let _ = shared
            .changed
            .wait_timeout_while(state, RESPAWN_DELAY, |state| !state.stopping)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

fn read_stdout(stdout: impl Read, shared: &Shared) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let mut state = shared.lock();
        if let Some(json) = line.strip_prefix(DELIVERY_PREFIX) {
            match parse_delivery(json) {
                Some(delivery) => state.deliveries.push(delivery),
                None => state.note(format!("unparsable message line: {line}")),
            }
        } else if let Some(rest) = line.strip_prefix(SUBSCRIBED_PREFIX) {
            // `1): 2, 128` -> granted QoS per topic, 128 = refused.
            let granted = rest.split_once(": ").map_or("", |(_, granted)| granted);
            if granted.split(", ").any(|qos| qos.trim() == "128") {
                state.refused = Some(line.clone());
            }
            state.subacks += 1;
            state.note(line);
        } else {
            state.note(line);
        }
        shared.changed.notify_all();
    }
}

fn read_stderr(stderr: impl Read, shared: &Shared) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        shared.lock().note(format!("stderr: {line}"));
    }
}

/// Parses the `%j` object: `{"tst":..,"topic":"t","qos":2,"retain":0,
/// "payloadlen":7,"mid":1,"payload":"{\"a\":1}"}`.
fn parse_delivery(json: &str) -> Option<Delivery> {
    let at = Instant::now();
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let topic = value.get("topic")?.as_str()?.to_owned();
    let retain = value.get("retain")?;
    let retained = retain
        .as_bool()
        .or_else(|| retain.as_u64().map(|r| r != 0))?;
    let qos = u8::try_from(value.get("qos")?.as_u64()?).ok()?;
    let raw = value.get("payload")?.as_str()?;
    let payload =
        serde_json::from_str(raw).unwrap_or_else(|_| serde_json::Value::String(raw.to_owned()));
    Some(Delivery {
        topic,
        retained,
        qos,
        payload,
        at,
    })
}

fn transcript(state: &State) -> String {
    let lines: Vec<&str> = state.transcript.iter().map(String::as_str).collect();
    format!(
        "--- mosquitto_sub (started {} times) ---\n{}",
        state.spawns,
        lines.join("\n")
    )
}
