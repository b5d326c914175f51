//! `hearth status` as a health check, against the real binary, a real
//! mosquitto and a simulated implant on a pty: exit 0 while all is well,
//! exit 1 with the problem named when the gateway is down, an alarm is
//! active or a certificate expires within 30 days.
//!
//! A broker outage needs attention only after at least 5 minutes, too long
//! for a test: that arithmetic is unit-tested in `src/health.rs` with a
//! fixed clock, and here a stopped broker is shown not to trip at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{Datelike, Timelike, Utc};
use hearth::certs::DevCerts;
use serde_json::Value;

use crate::harness::{GatewayOpts, Hearth, Rig, Sim, hearth, status_json};
use crate::support::{Mosquitto, Subscriber, TestDir, wait_for};

/// `hearth status` as a table: exit code, stdout, stderr.
fn status_table(config: &Path) -> (i32, String, String) {
    hearth(&["status", "--config", config.to_str().unwrap()])
}

fn problem_codes(view: &Value) -> Vec<&str> {
    view["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| p["code"].as_str().unwrap())
        .collect()
}

/// Starts a gateway, lets a simulated implant send `count` readings, and
/// waits until the broker has them all.
fn delivering(rig: &Rig, id: &str, sim_args: &[&str]) -> (PathBuf, Hearth) {
    let sim = Sim::start(sim_args);
    let config = rig.config(&GatewayOpts::new(id), &sim.pty);
    let gateway = Hearth::start(&config);
    let acked = sim.finish(Duration::from_secs(60))["acked"]
        .as_u64()
        .unwrap();
    wait_for(Duration::from_secs(20), "every reading delivered", || {
        let (_, view, _) = status_json(&config);
        (view["readings"]["delivered"] == acked && view["process"]["running"] == true).then_some(())
    });
    (config, gateway)
}

const TWENTY: &[&str] = &["--count", "20", "--interval-ms", "0", "--alert-rate", "0"];

#[test]
fn status_exits_0_while_the_gateway_delivers_and_shows_its_process() {
    let rig = Rig::new("gw-well");
    let (config, gateway) = delivering(&rig, "gw-well", TWENTY);

    let (code, view, err) = status_json(&config);
    assert_eq!(code, 0, "{view:#}\n{err}");
    assert_eq!(view["healthy"], true, "{view:#}");
    assert_eq!(view["problems"], serde_json::json!([]));
    let process = &view["process"];
    assert_eq!(process["pid"], gateway.pid(), "{process}");
    assert_eq!(process["running"], true);
    assert_eq!(process["version"], env!("CARGO_PKG_VERSION"));
    assert!(process["uptime_secs"].as_i64().unwrap() >= 0, "{process}");
    assert_eq!(view["readings"]["queued_alert"], 0);
    assert_eq!(view["readings"]["queued_routine"], 0);
    assert!(view["readings"]["last_received"].is_string(), "{view:#}");
    assert!(view["readings"]["last_delivered"].is_string(), "{view:#}");
    let certs = view["certificates"].as_array().unwrap();
    assert_eq!(certs[0]["role"], "client");
    assert_eq!(
        certs[0]["file"],
        rig.certs.gateway_cert.display().to_string()
    );
    assert_eq!(certs[1]["role"], "ca");
    for c in certs {
        // The dev certificates end at midnight 365 days from today.
        let days = c["days_left"].as_i64().unwrap();
        assert!((364..=365).contains(&days), "{c}");
    }

    let (code, table, err) = status_table(&config);
    assert_eq!(code, 0, "{table}\n{err}");
    for line in [
        format!("process          pid {}, running for ", gateway.pid()),
        "broker           connected".into(),
        "queued           0 alert, 0 routine".into(),
        format!(
            "certificate      `{}` until ",
            rig.certs.gateway_cert.display()
        ),
        "health           ok".into(),
    ] {
        assert!(table.contains(&line), "no `{line}` in:\n{table}");
    }
    let received = table
        .lines()
        .find(|l| l.starts_with("last received    "))
        .unwrap();
    assert!(received.ends_with(" ago)"), "{received}");
    assert!(err.is_empty(), "{err}");
}

#[test]
fn a_stopped_broker_shows_in_status_but_needs_no_attention_at_once() {
    let mut rig = Rig::new("gw-blip");
    let (config, gateway) = delivering(&rig, "gw-blip", TWENTY);
    rig.broker.stop();
    let view = wait_for(Duration::from_secs(20), "the link down in status", || {
        let (code, view, err) = status_json(&config);
        (view["broker"]["state"] != "connected").then_some((code, view, err))
    });
    let (code, view, err) = view;
    assert_eq!(
        code, 0,
        "a broker down for seconds is no problem: {view:#}\n{err}"
    );
    assert_eq!(view["healthy"], true);
    assert!(
        ["connecting", "disconnected"].contains(&view["broker"]["state"].as_str().unwrap()),
        "{view:#}"
    );
    // The outage is timed from its start: reconnect attempts (every 2 s at
    // most here) do not restart the clock the health check reads.
    let since = view["broker"]["since"].clone();
    let tries = gateway.log_text().matches("Reconnect failed").count();
    gateway.wait_log_count("Reconnect failed", tries + 2, Duration::from_secs(30));
    let (_, later, _) = status_json(&config);
    assert_eq!(later["broker"]["since"], since, "{later:#}");
}

#[test]
fn a_killed_gateway_makes_status_exit_1_naming_its_pid() {
    let rig = Rig::new("gw-dead");
    let (config, mut gateway) = delivering(&rig, "gw-dead", TWENTY);
    let pid = gateway.pid();
    gateway.kill9();

    let (code, view, err) = status_json(&config);
    assert_eq!(code, 1, "{view:#}\n{err}");
    assert_eq!(view["healthy"], false);
    assert_eq!(problem_codes(&view), ["not-running"], "{view:#}");
    let message = format!("hearth is not running (its last process, pid {pid}, is gone)");
    assert_eq!(view["problems"][0]["message"], message);
    assert_eq!(view["process"]["running"], false);
    assert!(
        err.contains(&format!("gateway `gw-dead` needs attention: {message}")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err}");

    let (code, table, _) = status_table(&config);
    assert_eq!(code, 1);
    assert!(
        table.contains(&format!("process          pid {pid}, not running")),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "health           needs attention\n  - {message}\n"
        )),
        "{table}"
    );
}

#[test]
fn an_active_alarm_makes_status_exit_1_naming_it() {
    let rig = Rig::new("gw-alarm");
    // A v1 device that counts again after a reboot raises `device-restart`.
    let (config, _gateway) = delivering(
        &rig,
        "gw-alarm",
        &[
            "--count",
            "10",
            "--interval-ms",
            "0",
            "--alert-rate",
            "0",
            "--restart-every",
            "5",
        ],
    );
    let (code, view, err) = wait_for(Duration::from_secs(20), "the alarm in status", || {
        let (code, view, err) = status_json(&config);
        (view["alarms"] == serde_json::json!(["device-restart"])).then_some((code, view, err))
    });
    assert_eq!(code, 1, "{view:#}\n{err}");
    assert_eq!(problem_codes(&view), ["alarm"], "{view:#}");
    assert_eq!(
        view["problems"][0]["message"],
        "alarm `device-restart` is active"
    );
    assert!(err.contains("alarm `device-restart` is active"), "{err}");
}

/// Replaces the gateway's certificate with one that expires in `days` days
/// and an hour, issued by a second CA that is added to `ca.crt` (which the
/// broker trusts for clients): the dev PKI keeps no CA key to sign with.
fn expiring_gateway_cert(certs: &DevCerts, gateway_id: &str, days: i64) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let name = |cn: &str| {
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, cn);
        name
    };
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name = name("hearth short-lived test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = name(gateway_id);
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    leaf.use_authority_key_identifier_extension = true;
    let end = Utc::now() + chrono::Duration::days(days) + chrono::Duration::hours(1);
    leaf.not_after = rcgen::date_time_ymd(end.year(), end.month() as u8, end.day() as u8)
        + Duration::from_secs(end.num_seconds_from_midnight().into());
    let cert = leaf.signed_by(&key, &issuer).unwrap();

    // Both files exist with their modes (the key's is 0600); `write` keeps them.
    std::fs::write(&certs.gateway_cert, cert.pem()).unwrap();
    std::fs::write(&certs.gateway_key, key.serialize_pem()).unwrap();
    let mut bundle = std::fs::read_to_string(&certs.ca_cert).unwrap();
    bundle.push_str(&ca_cert.pem());
    std::fs::write(&certs.ca_cert, bundle).unwrap();
}

#[test]
fn a_client_certificate_expiring_in_10_days_warns_raises_the_alarm_and_fails_status() {
    let id = "gw-expiring";
    let dir = TestDir::new();
    let certs = DevCerts::generate(&dir.subdir("certs"), id).unwrap();
    expiring_gateway_cert(&certs, id, 10);
    let broker = Mosquitto::start(&dir.subdir("broker"), &certs);
    let rig = Rig { certs, broker, dir };
    let topic = format!("hearth/v1/{id}/status");
    let hospital = Subscriber::start(&rig.broker, &rig.certs, "hospital-exp", &[&topic]);
    let (config, gateway) = delivering(&rig, id, TWENTY);

    // A WARN naming the file and the days left.
    let file = rig.certs.gateway_cert.display().to_string();
    gateway.wait_log_count("Certificate expires soon", 1, Duration::from_secs(10));
    let log = gateway.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("Certificate expires soon"))
        .unwrap();
    assert!(line.contains(" WARN "), "{line}");
    assert!(line.contains(&format!("file={file}")), "{line}");
    assert!(line.contains("days_left=10"), "{line}");
    // The CA is fine: one warning only.
    assert_eq!(log.matches("Certificate expires soon").count(), 1, "{log}");

    // The hospital hears of it, and a late subscriber finds it retained.
    let alarmed = |d: &crate::support::Delivery| {
        d.payload["alarms"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "certificate-expiring"))
    };
    let all = hospital.wait_all(Duration::from_secs(20), |all| all.iter().any(alarmed));
    assert!(all.iter().any(alarmed), "{all:#?}");
    let late = Subscriber::start(&rig.broker, &rig.certs, "hospital-late", &[&topic]);
    let retained = late
        .next(Duration::from_secs(10))
        .expect("a retained status");
    assert!(alarmed(&retained), "{:#}", retained.payload);
    assert_eq!(retained.payload["state"], "online");

    let (code, view, err) = status_json(&config);
    assert_eq!(code, 1, "{view:#}\n{err}");
    assert_eq!(view["alarms"], serde_json::json!(["certificate-expiring"]));
    // One line for the certificate; its alarm says nothing more.
    assert_eq!(problem_codes(&view), ["certificate-expiring"], "{view:#}");
    assert_eq!(
        view["problems"][0]["message"],
        format!(
            "client certificate `{file}` expires in 10 days: install a renewed one and restart hearth"
        )
    );
    assert_eq!(view["certificates"][0]["days_left"], 10);
    assert!(err.contains("needs attention"), "{err}");
}
