//! The faults beyond a crash: a broker that lost our session, a store that
//! reaches its size cap, a damaged database at start, a broker that leaves
//! an exchange unanswered, and a task that dies.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{GatewayOpts, Hearth, Rig, Sim, readings, status_view as status};
use crate::support::{FaultProxy, Received, Receiver, wait_for};

fn delivered_ids(all: &[Received]) -> Vec<String> {
    all.iter()
        .flat_map(|d| {
            let v: Value = serde_json::from_slice(&d.payload).unwrap();
            crate::harness::ids(&v)
        })
        .collect()
}

#[test]
fn a_lost_session_requeues_what_was_in_flight_once_with_a_warning() {
    let mut rig = Rig::new("gw-lost");
    let proxy = FaultProxy::start(([127, 0, 0, 1], rig.broker.port).into());
    let mut gw = GatewayOpts::new("gw-lost");
    gw.mqtt_port = Some(proxy.port);
    gw.batch = 4;
    let receiver = Receiver::start(
        "127.0.0.1",
        rig.broker.port,
        &rig.certs,
        "hospital-lost",
        &["hearth/v1/gw-lost/readings", "hearth/v1/gw-lost/alerts"],
    );
    let sim = Sim::start(&["--count", "60", "--interval-ms", "20", "--alert-rate", "0"]);
    let config = rig.config(&gw, &sim.pty);
    let _hearth = Hearth::start(&config);
    assert!(receiver.wait_until(Duration::from_secs(20), |all| delivered_ids(all).len() >= 5));

    // Stall the link so exchanges stay open, then lose the broker's state:
    // SIGKILL with nothing saved (autosave is off in the test broker).
    proxy.blackhole(true);
    wait_for(Duration::from_secs(20), "exchanges in flight", || {
        (status(&config)["readings"]["inflight"].as_u64().unwrap() > 0).then_some(())
    });
    rig.broker.kill();
    rig.broker.relaunch();
    proxy.cut_now();
    proxy.blackhole(false);

    let summary = sim.finish(Duration::from_secs(60));
    assert_eq!(summary["acked"], 60);
    assert!(
        receiver.wait_until(Duration::from_secs(30), |all| {
            delivered_ids(all).into_iter().collect::<HashSet<_>>().len() == 60
        }),
        "not every reading arrived after the lost session"
    );
    let log = std::fs::read_to_string(config.with_extension("log")).unwrap();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Broker has no session"))
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains(" WARN "), "{}", warnings[0]);
    let requeued: u64 = warnings[0]
        .split("requeued=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("the warning gives the count");
    assert!(requeued > 0);
    assert_eq!(status(&config)["requeued_after_lost_session"], requeued);
}

#[test]
fn a_full_store_says_busy_keeps_draining_and_takes_readings_again() {
    let rig = Rig::new("gw-full");
    let proxy = FaultProxy::start(([127, 0, 0, 1], rig.broker.port).into());
    let mut gw = GatewayOpts::new("gw-full");
    gw.mqtt_port = Some(proxy.port);
    gw.max_size_mb = 0.25;
    let receiver = Receiver::start(
        "127.0.0.1",
        rig.broker.port,
        &rig.certs,
        "hospital-full",
        &["hearth/v1/gw-full/readings", "hearth/v1/gw-full/alerts"],
    );
    // The hospital is out of reach while the device sends far more than
    // 256 KiB holds.
    proxy.blackhole(true);
    let count = 3000;
    let sim = Sim::start(&[
        "--count",
        "3000",
        "--interval-ms",
        "0",
        // A 10 s resend timeout and the BUSY back-off (from 10 s
        // doubling to 5 min), 50 times faster.
        "--ack-timeout-ms",
        "10000",
        "--time-scale",
        "0.02",
        "--alert-rate",
        "0.05",
    ]);
    let config = rig.config(&gw, &sim.pty);
    let mut hearth_run = Hearth::start(&config);
    hearth_run.wait_log_count("Store is full", 1, Duration::from_secs(60));
    let full = status(&config);
    assert_eq!(full["alarms"], serde_json::json!(["store-full"]), "{full}");
    let held = full["readings"]["queued_alert"].as_u64().unwrap()
        + full["readings"]["queued_routine"].as_u64().unwrap()
        + full["readings"]["inflight"].as_u64().unwrap();
    assert!(held > 100 && held < count, "{full}");
    let log = hearth_run.log_text();
    assert!(
        log.contains(" ERROR ") && log.contains("Store is full"),
        "an ERROR names it"
    );

    // The hospital is back: the backlog drains, space is freed, the device
    // gets its ACKs again and every reading arrives once.
    proxy.blackhole(false);
    proxy.cut_now();
    let summary = sim.finish(Duration::from_secs(180));
    assert_eq!(summary["acked"], count);
    assert!(summary["busy"].as_u64().unwrap() > 0, "{summary}");
    assert!(
        receiver.wait_until(Duration::from_secs(60), |all| delivered_ids(all).len()
            as u64
            >= count)
    );
    wait_for(Duration::from_secs(20), "the alarm cleared", || {
        (status(&config)["alarms"] == serde_json::json!([])).then_some(())
    });
    // Counted after hearth stopped, so a late duplicate would show.
    assert!(hearth_run.stop().success());
    let ids = delivered_ids(&receiver.deliveries());
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        (ids.len(), unique.len()),
        (count as usize, count as usize),
        "exactly once"
    );
    // Space came from delivered routine readings only: alerts stay.
    let alerts = summary["alerts"].as_u64().unwrap();
    let kept_alerts = readings(&config, &["--state", "delivered"])
        .iter()
        .filter(|r| r["priority"] == "alert")
        .count() as u64;
    assert_eq!(kept_alerts, alerts);
}

#[test]
fn a_damaged_database_is_moved_aside_and_a_fresh_one_started() {
    let rig = Rig::new("gw-rot");
    let gw = GatewayOpts::new("gw-rot");
    let db = rig.db(&gw);
    {
        let sim = Sim::start(&["--count", "200", "--interval-ms", "0"]);
        let config = rig.config(&gw, &sim.pty);
        let mut h = Hearth::start(&config);
        sim.finish(Duration::from_secs(60));
        assert!(h.stop().success());
    }
    // Everything into the main file (hearth leaves a WAL behind), then
    // scribble over the middle of it, as failing storage would.
    crate::harness::open_db(&db)
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(
        bytes.len() > 3 * 4096,
        "the database is {} bytes",
        bytes.len()
    );
    for b in &mut bytes[4096..3 * 4096] {
        *b = 0xA5;
    }
    std::fs::write(&db, &bytes).unwrap();

    let sim = Sim::start(&[
        "--count",
        "20",
        "--interval-ms",
        "0",
        "--device-id",
        "PM-NEW",
    ]);
    let config = rig.config(&gw, &sim.pty);
    let h = Hearth::start(&config);
    h.wait_log_count("Database is damaged", 1, Duration::from_secs(20));
    let line = h
        .log_text()
        .lines()
        .find(|l| l.contains("Database is damaged"))
        .unwrap()
        .to_owned();
    assert!(line.contains(" ERROR "), "{line}");
    let aside = std::fs::read_dir(rig.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.to_string_lossy().contains("gw-rot.db.corrupt-")
                && !p.to_string_lossy().ends_with("-wal")
                && !p.to_string_lossy().ends_with("-shm")
        })
        .expect("the damaged file is kept");
    assert!(
        line.contains(&aside.display().to_string()),
        "the ERROR names `{}`: {line}",
        aside.display()
    );
    assert_eq!(
        std::fs::read(&aside).unwrap()[4096..3 * 4096],
        bytes[4096..3 * 4096]
    );

    // The fresh database takes readings and says what happened.
    sim.finish(Duration::from_secs(60));
    let st = status(&config);
    assert!(
        st["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "store-recovered"),
        "{st}"
    );
    assert_eq!(st["moved_aside"], aside.display().to_string());
    wait_for(
        Duration::from_secs(20),
        "20 readings in the fresh store",
        || (readings(&config, &[]).len() == 20).then_some(()),
    );
}

#[test]
fn a_silent_link_brings_the_will_within_a_few_keepalives() {
    use crate::support::Subscriber;
    let rig = Rig::new("gw-mute");
    let proxy = FaultProxy::start(([127, 0, 0, 1], rig.broker.port).into());
    let mut gw = GatewayOpts::new("gw-mute");
    gw.mqtt_port = Some(proxy.port);
    let keep_alive = Duration::from_secs(gw.keep_alive.into());
    let sub = Subscriber::start(
        &rig.broker,
        &rig.certs,
        "hospital-mute",
        &["hearth/v1/gw-mute/status"],
    );
    let sim = Sim::start(&["--count", "10", "--interval-ms", "0"]);
    let config = rig.config(&gw, &sim.pty);
    let _hearth = Hearth::start(&config);
    let online = |d: &crate::support::Delivery| d.payload["state"] == "online";
    sub.wait_all(Duration::from_secs(20), |all| all.iter().any(online));

    // The link goes silent: no FIN, no RST, nothing.
    proxy.blackhole(true);
    let muted = std::time::Instant::now();
    // MQTT says 1.5 keep-alives after the last packet; mosquitto 2.0.11 was
    // seen here to take about 2.3 (its keep-alive check runs in coarse
    // steps). A kill -9 closes the socket and the will is immediate
    // (crash.rs); this is the case only a keep-alive can catch.
    let limit = keep_alive * 3;
    let all = sub.wait_all(limit + Duration::from_secs(5), |all| {
        all.iter().any(|d| d.payload["reason"] == "connection-lost")
    });
    let will = all
        .iter()
        .find(|d| d.payload["reason"] == "connection-lost")
        .expect("the will");
    let after = will.at.duration_since(muted);
    assert!(after <= limit, "will after {after:?}, limit {limit:?}");
    assert_eq!(will.payload["state"], "offline");

    // hearth found out by itself: its PINGREQ went unanswered.
    _hearth.wait_log_count("no PINGRESP", 1, Duration::from_secs(1));
    // Back again: online with a higher session.
    let before = will.payload["session"].as_u64().unwrap();
    proxy.blackhole(false);
    let all = sub.wait_all(Duration::from_secs(30), |all| {
        all.iter()
            .any(|d| online(d) && d.payload["session"].as_u64().unwrap() > before)
    });
    assert!(
        all.iter()
            .any(|d| online(d) && d.payload["session"].as_u64().unwrap() > before)
    );
}

#[test]
fn after_a_long_outage_alerts_go_first_then_the_backlog_in_order() {
    let mut rig = Rig::new("gw-away");
    let gw = GatewayOpts::new("gw-away");
    let receiver = Receiver::start(
        "127.0.0.1",
        rig.broker.port,
        &rig.certs,
        "hospital-away",
        &["hearth/v1/gw-away/readings", "hearth/v1/gw-away/alerts"],
    );
    // The broker is away while the device sends its readings.
    rig.broker.stop();
    let sim = Sim::start(&[
        "--count",
        "400",
        "--interval-ms",
        "0",
        "--alert-rate",
        "0.05",
        "--seed",
        "3",
    ]);
    let config = rig.config(&gw, &sim.pty);
    let _hearth = Hearth::start(&config);
    let summary = sim.finish(Duration::from_secs(60));
    let alerts = summary["alerts"].as_u64().unwrap();
    assert!(alerts > 5, "{summary}");
    let st = status(&config);
    assert_eq!(st["readings"]["queued_alert"], alerts, "{st}");

    rig.broker.relaunch();
    assert!(
        receiver.wait_until(Duration::from_secs(30), |all| delivered_ids(all).len()
            >= 400)
    );
    let deliveries = receiver.deliveries();
    let first_routine = deliveries
        .iter()
        .position(|d| d.topic.ends_with("/readings"))
        .expect("routine readings arrived");
    let alerts_before: u64 = deliveries[..first_routine]
        .iter()
        .map(|d| delivered_ids(std::slice::from_ref(d)).len() as u64)
        .sum();
    assert_eq!(
        alerts_before, alerts,
        "every queued alert before the routine backlog"
    );
    // The backlog itself arrives in seq order.
    let seqs: Vec<u64> = deliveries[first_routine..]
        .iter()
        .flat_map(|d| {
            let v: Value = serde_json::from_slice(&d.payload).unwrap();
            v["readings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["seq"].as_u64().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "routine backlog out of order"
    );
    assert_eq!(seqs.len() as u64 + alerts, 400);
}

/// A fake for a fault no real broker produces, named as such: a broker that
/// answers PINGREQ (and everything else) but never PUBREC. It sits between
/// hearth and the real mosquitto, ends hearth's TLS with the broker's own
/// certificate, opens its own TLS to mosquitto with the gateway's, passes
/// every byte from hearth on, and reads the broker's MQTT packets to drop
/// each PUBREC on every connection made before the first PUBREC was
/// dropped (so on the first connection that carries one; later connections
/// pass everything).
struct PubrecSwallower {
    port: u16,
    swallowed: Arc<AtomicUsize>,
    shutdown: tokio_util::sync::CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PubrecSwallower {
    fn start(broker_port: u16, certs: &hearth::certs::DevCerts) -> PubrecSwallower {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        hearth::mqtt::tls::install_crypto_provider();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.server_cert)
            .expect("server certificate")
            .collect::<Result<_, _>>()
            .expect("server certificate");
        let key = PrivateKeyDer::from_pem_file(&certs.server_key).expect("server key");
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server TLS config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let client = hearth::mqtt::tls::client_config(
            &certs.ca_cert,
            &certs.gateway_cert,
            &certs.gateway_key,
        )
        .expect("gateway TLS config");
        let connector = tokio_rustls::TlsConnector::from(client);
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind the fake");
        listener.set_nonblocking(true).expect("non-blocking");
        let port = listener.local_addr().unwrap().port();
        let swallowed = Arc::new(AtomicUsize::new(0));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let thread = {
            let swallowed = Arc::clone(&swallowed);
            let shutdown = shutdown.clone();
            std::thread::spawn(move || {
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    loop {
                        let (tcp, _) = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            a = listener.accept() => match a {
                                Ok(a) => a,
                                Err(_) => continue,
                            },
                        };
                        let swallow = swallowed.load(Ordering::SeqCst) == 0;
                        let (acceptor, connector) = (acceptor.clone(), connector.clone());
                        let (swallowed, shutdown) = (Arc::clone(&swallowed), shutdown.clone());
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = shutdown.cancelled() => {}
                                _ = Self::relay(tcp, broker_port, acceptor, connector, swallow, swallowed) => {}
                            }
                        });
                    }
                })
            })
        };
        PubrecSwallower {
            port,
            swallowed,
            shutdown,
            thread: Some(thread),
        }
    }

    fn swallowed(&self) -> usize {
        self.swallowed.load(Ordering::SeqCst)
    }

    async fn relay(
        tcp: tokio::net::TcpStream,
        broker_port: u16,
        acceptor: tokio_rustls::TlsAcceptor,
        connector: tokio_rustls::TlsConnector,
        swallow: bool,
        swallowed: Arc<AtomicUsize>,
    ) -> std::io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let hearth_side = acceptor.accept(tcp).await?;
        let upstream = tokio::net::TcpStream::connect(("127.0.0.1", broker_port)).await?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let broker_side = connector.connect(name, upstream).await?;
        let (mut from_hearth, mut to_hearth) = tokio::io::split(hearth_side);
        let (mut from_broker, mut to_broker) = tokio::io::split(broker_side);
        let up = async {
            tokio::io::copy(&mut from_hearth, &mut to_broker).await?;
            to_broker.shutdown().await
        };
        let down = async {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = from_broker.read(&mut chunk).await?;
                if n == 0 {
                    return to_hearth.shutdown().await;
                }
                buf.extend_from_slice(&chunk[..n]);
                // Whole packets only: type byte, remaining length, body.
                while let Some(len) = packet_len(&buf) {
                    let packet: Vec<u8> = buf.drain(..len).collect();
                    if swallow && packet[0] >> 4 == 5 {
                        swallowed.fetch_add(1, Ordering::SeqCst);
                        continue;
                    }
                    to_hearth.write_all(&packet).await?;
                }
                to_hearth.flush().await?;
            }
        };
        tokio::try_join!(up, down).map(drop)
    }
}

/// The length of the MQTT packet at the start of `buf`, once all of it is there.
fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let total = 1 + i + 1 + remaining;
            return (buf.len() >= total).then_some(total);
        }
    }
    None
}

impl Drop for PubrecSwallower {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn an_exchange_the_broker_never_answers_is_finished_on_a_new_connection() {
    let rig = Rig::new("gw-norec");
    let fake = PubrecSwallower::start(rig.broker.port, &rig.certs);
    let mut gw = GatewayOpts::new("gw-norec");
    gw.mqtt_port = Some(fake.port);
    let keep_alive = Duration::from_secs(gw.keep_alive.into());
    let receiver = Receiver::start(
        "127.0.0.1",
        rig.broker.port,
        &rig.certs,
        "hospital-norec",
        &["hearth/v1/gw-norec/readings", "hearth/v1/gw-norec/alerts"],
    );
    let sim = Sim::start(&["--count", "1", "--interval-ms", "0", "--alert-rate", "0"]);
    let config = rig.config(&gw, &sim.pty);
    let mut hearth_run = Hearth::start(&config);
    sim.finish(Duration::from_secs(20));

    // The PUBREC is swallowed while PINGRESPs come back: hearth gives the
    // exchange two keep-alives, drops the link and finishes it on the next.
    hearth_run.wait_log_count("no PUBREC from the broker", 1, keep_alive * 4);
    assert!(fake.swallowed() >= 1);
    let line = hearth_run
        .log_text()
        .lines()
        .find(|l| l.contains("no PUBREC from the broker"))
        .unwrap()
        .to_owned();
    assert!(line.contains(" WARN "), "{line}");
    let pkid: u16 = line
        .split("packet id ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("the warning names the packet id: {line}"));
    let age: f64 = line
        .split(" within ")
        .nth(1)
        .and_then(|v| v.split('s').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("the warning gives the age: {line}"));
    assert!(
        age >= 2.0 * keep_alive.as_secs_f64(),
        "gave up after {age} s: {line}"
    );
    assert!(
        receiver.wait_until(Duration::from_secs(20), |all| delivered_ids(all).len() == 1),
        "the reading did not arrive after the reconnect"
    );
    // The resume used the same packet id: DUP=1 PUBLISH, then PUBREL.
    assert!(
        rig.broker.log().contains(&format!(
            "Received PUBLISH from gw-norec (d1, q2, r0, m{pkid}"
        )),
        "{}",
        rig.broker.log_tail(40)
    );
    // Counted after hearth stopped, so a late duplicate would show.
    let status = hearth_run.stop();
    assert!(status.success(), "{status}\n{}", hearth_run.log_text());
    assert_eq!(
        delivered_ids(&receiver.deliveries()),
        vec!["gw-norec/PM-000001/1".to_owned()]
    );
}

/// A task that ends before shutdown (here: panics, by a test-only
/// failpoint) takes the whole process down with a non-zero exit and an
/// ERROR naming it, so that systemd restarts it.
#[test]
fn a_task_that_panics_or_loses_its_store_exits_the_process_non_zero() {
    for (point, task, cause) in [
        (
            "publisher-panics",
            "task=\"publisher\"",
            "cause=it panicked: failpoint `publisher-panics` reached",
        ),
        (
            "store-thread-panics",
            "task=\"publisher\"",
            "cause=the store thread has stopped",
        ),
    ] {
        let id = format!("gw-{}", point.replace('-', ""));
        let rig = Rig::new(&id);
        let gw = GatewayOpts::new(&id);
        let sim = Sim::start(&["--count", "5", "--interval-ms", "0"]);
        let config = rig.config(&gw, &sim.pty);
        let mut hearth_run = Hearth::start_with_env(&config, &[("HEARTH_TEST_FAILPOINT", point)]);
        let status = hearth_run.wait_exit(Duration::from_secs(30));
        let log = hearth_run.log_text();
        assert_eq!(status.code(), Some(1), "{point}: {status}\n{log}");
        let line = log
            .lines()
            .find(|l| l.contains("Task stopped unexpectedly"))
            .unwrap_or_else(|| panic!("{point}: no ERROR for the task\n{log}"));
        assert!(line.contains(" ERROR "), "{point}: {line}");
        assert!(line.contains(task), "{point}: {line}");
        assert!(line.contains(cause), "{point}: {line}");
        let last = log.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("hearth: task `publisher` stopped unexpectedly"),
            "{point}: the last line says why hearth exits: {last}"
        );
    }
}

/// A technician's `hearth run` beside the service: the second gateway is
/// refused at once, before it reads the store, and the first one goes on
/// (two would race an encryption in place or the damage check, and move a
/// healthy store aside).
#[test]
fn a_second_gateway_on_the_same_store_is_refused_and_the_first_goes_on() {
    let rig = Rig::new("gw-lock");
    let gw = GatewayOpts::new("gw-lock");
    let sim = Sim::start(&["--count", "5", "--interval-ms", "200"]);
    let config = rig.config(&gw, &sim.pty);
    let first = Hearth::start(&config);
    first.wait_log_count("Gateway running.", 1, Duration::from_secs(30));
    let mut second = Hearth::start(&config);
    let exit = second.wait_exit(Duration::from_secs(30));
    assert!(!exit.success(), "the second gateway ran: {exit}");
    let log = second.log_text();
    assert!(
        log.contains("is used by another `hearth run`"),
        "no clear error: {log}"
    );
    // The rig's log is shared: one start only.
    assert_eq!(log.matches("Gateway running.").count(), 1, "{log}");
    sim.finish(Duration::from_secs(30));
    assert_eq!(readings(&config, &[]).len(), 5, "{}", first.log_text());
}
