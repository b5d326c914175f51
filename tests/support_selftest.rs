//! Proves the test kit against the real parts before other tests lean on it:
//! mosquitto with the development PKI, mosquitto_sub as the subscriber and
//! mosquitto_pub as a publisher that is not ours either.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hearth::certs::DevCerts;
use serde_json::json;

use crate::support::{Delivery, Mosquitto, Subscriber, TestDir, mosquitto::HOST};

const WAIT: Duration = Duration::from_secs(5);
/// Where [`until_sentinel`] publishes.
const SENTINEL: &str = "t/sentinel";

/// A broker with its own PKI in a fresh directory.
fn broker() -> (TestDir, DevCerts, Mosquitto) {
    let dir = TestDir::new();
    let certs = DevCerts::generate(&dir.subdir("certs"), "gw-selftest").expect("dev certs");
    let broker = Mosquitto::start(&dir.join("broker"), &certs);
    (dir, certs, broker)
}

/// Runs mosquitto_pub with QoS 2; `cert` is `Some((cert, key))` for mutual TLS.
fn mosquitto_pub(
    broker: &Mosquitto,
    ca: &Path,
    cert: Option<(&Path, &Path)>,
    topic: &str,
    payload: &str,
    retain: bool,
) -> Output {
    let mut command = Command::new("mosquitto_pub");
    command
        .args(["-h", HOST, "-p", &broker.port.to_string(), "-q", "2"])
        .arg("--cafile")
        .arg(ca)
        .args(["-t", topic, "-m", payload]);
    if let Some((cert, key)) = cert {
        command.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    if retain {
        command.arg("-r");
    }
    command.output().expect("cannot run `mosquitto_pub`")
}

/// Publishes as the gateway and insists that the broker took it.
#[track_caller]
fn publish(broker: &Mosquitto, certs: &DevCerts, topic: &str, payload: &str, retain: bool) {
    let cert = Some((certs.gateway_cert.as_path(), certs.gateway_key.as_path()));
    let out = mosquitto_pub(broker, &certs.ca_cert, cert, topic, payload, retain);
    assert!(
        out.status.success(),
        "mosquitto_pub to `{topic}` failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        broker.log_tail(20)
    );
}

/// Publishes a sentinel and gathers everything up to it, less sentinels.
/// The broker keeps a session's order, so once the sentinel is in, so is
/// all that was sent before it, and a duplicate would show up in the result.
#[track_caller]
fn until_sentinel(broker: &Mosquitto, certs: &DevCerts, sub: &Subscriber) -> Vec<Delivery> {
    static SENTINELS: AtomicU32 = AtomicU32::new(0);
    let sentinel = json!({ "sentinel": SENTINELS.fetch_add(1, Ordering::Relaxed) });
    publish(broker, certs, SENTINEL, &sentinel.to_string(), false);
    let got = sub.collect_until(WAIT, |got| got.iter().any(|d| d.payload == sentinel));
    assert_eq!(
        got.last().map(|d| &d.payload),
        Some(&sentinel),
        "{got:?}\n{}",
        sub.transcript()
    );
    got.into_iter().filter(|d| d.topic != SENTINEL).collect()
}

fn topics(got: &[Delivery]) -> Vec<(&str, bool, &serde_json::Value)> {
    got.iter()
        .map(|d| (d.topic.as_str(), d.retained, &d.payload))
        .collect()
}

#[test]
fn subscriber_gets_each_qos2_message_once_with_its_retained_flag() {
    let (_dir, certs, broker) = broker();
    let sub = Subscriber::start(&broker, &certs, "selftest-live", &["t/#"]);

    publish(&broker, &certs, "t/a", r#"{"n":1}"#, false);
    publish(&broker, &certs, "t/status", r#"{"online":true}"#, true);
    let got = until_sentinel(&broker, &certs, &sub);
    // Live forwarding clears the retain flag (MQTT 3.1.1, 3.3.1.3).
    assert_eq!(
        topics(&got),
        [
            ("t/a", false, &json!({"n": 1})),
            ("t/status", false, &json!({"online": true})),
        ]
    );
    assert!(got.iter().all(|d| d.qos == 2));

    // A new subscription gets the retained message, flagged as such.
    let late = Subscriber::start(&broker, &certs, "selftest-late", &["t/status"]);
    let retained = late.next(WAIT).expect("retained status");
    assert_eq!(
        (
            retained.topic.as_str(),
            retained.retained,
            &retained.payload
        ),
        ("t/status", true, &json!({"online": true}))
    );
    assert_eq!(sub.all().len(), 3, "the first subscriber saw nothing new");
}

#[test]
fn broker_refuses_a_client_without_a_certificate_of_its_ca() {
    let (dir, certs, broker) = broker();

    let anonymous = mosquitto_pub(&broker, &certs.ca_cert, None, "t/a", "{}", false);
    assert!(!anonymous.status.success(), "no certificate was accepted");
    broker.wait_log("peer did not return a certificate", WAIT);

    let stranger = DevCerts::generate(&dir.subdir("stranger"), "gw-stranger").expect("dev certs");
    let foreign = Some((
        stranger.gateway_cert.as_path(),
        stranger.gateway_key.as_path(),
    ));
    let out = mosquitto_pub(&broker, &certs.ca_cert, foreign, "t/a", "{}", false);
    assert!(
        !out.status.success(),
        "a certificate from another CA was accepted"
    );
    broker.wait_log("certificate verify failed", WAIT);
}

#[test]
fn subscriber_carries_on_across_a_broker_restart() {
    let (_dir, certs, mut broker) = broker();
    let sub = Subscriber::start(&broker, &certs, "selftest-restart", &["t/#"]);
    publish(&broker, &certs, "t/a", r#"{"n":1}"#, false);
    assert_eq!(
        sub.next(WAIT).expect("before restart").payload,
        json!({"n": 1})
    );
    // Restarted before the broker has the PUBCOMP, mosquitto would send the
    // message again (see `support::mosquitto`).
    broker.wait_log("Received PUBCOMP from selftest-restart (Mid: 1,", WAIT);

    broker.restart();
    sub.wait_subscribed(2, WAIT);
    publish(&broker, &certs, "t/a", r#"{"n":2}"#, false);
    let got = until_sentinel(&broker, &certs, &sub);
    assert_eq!(topics(&got), [("t/a", false, &json!({"n": 2}))]);
}

#[test]
fn message_queued_for_an_absent_subscriber_survives_a_broker_restart() {
    let (_dir, certs, mut broker) = broker();
    drop(Subscriber::start(
        &broker,
        &certs,
        "selftest-away",
        &["t/#"],
    ));

    publish(&broker, &certs, "t/a", r#"{"n":1}"#, false);
    broker.restart();

    let sub = Subscriber::start(&broker, &certs, "selftest-away", &["t/#"]);
    let got = until_sentinel(&broker, &certs, &sub);
    assert_eq!(topics(&got), [("t/a", false, &json!({"n": 1}))]);
}

#[test]
fn saved_state_survives_a_broker_kill_and_the_subscriber_comes_back() {
    let (_dir, certs, mut broker) = broker();
    let sub = Subscriber::start(&broker, &certs, "selftest-kill", &["t/#"]);
    drop(Subscriber::start(
        &broker,
        &certs,
        "selftest-kill-away",
        &["t/#"],
    ));
    publish(&broker, &certs, "t/a", r#"{"n":1}"#, false);
    assert_eq!(sub.next(WAIT).expect("live").payload, json!({"n": 1}));
    // Saved before the broker has the PUBCOMP, the message would come again
    // (see `support::mosquitto`).
    broker.wait_log("Received PUBCOMP from selftest-kill (Mid: 1,", WAIT);

    broker.save();
    broker.kill();
    broker.relaunch();

    // mosquitto_sub exits when TLS is torn down without close_notify; the
    // supervisor runs it again and it subscribes again.
    sub.wait_subscribed(2, WAIT);
    assert_eq!(sub.spawns(), 2, "{}", sub.transcript());
    let got = until_sentinel(&broker, &certs, &sub);
    assert_eq!(topics(&got), [], "nothing twice\n{}", sub.transcript());

    let away = Subscriber::start(&broker, &certs, "selftest-kill-away", &["t/#"]);
    let got = until_sentinel(&broker, &certs, &away);
    assert_eq!(topics(&got), [("t/a", false, &json!({"n": 1}))]);
}

#[test]
fn broker_kill_without_save_loses_queued_messages() {
    let (_dir, certs, mut broker) = broker();
    drop(Subscriber::start(
        &broker,
        &certs,
        "selftest-lost",
        &["t/#"],
    ));
    broker.save();
    publish(&broker, &certs, "t/a", r#"{"n":1}"#, false);

    broker.kill();
    broker.relaunch();

    let sub = Subscriber::start(&broker, &certs, "selftest-lost", &["t/#"]);
    assert_eq!(topics(&until_sentinel(&broker, &certs, &sub)), []);
}
