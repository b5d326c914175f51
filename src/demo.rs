//! `hearth demo`: the whole pipeline on a fresh machine, no broker and no
//! device needed.
//!
//! Throwaway certificates ([`DevCerts`]), an embedded broker (rumqttd, TLS
//! with client certificates) on a free loopback port, a simulated implant on
//! a pseudo-terminal, the real [`Gateway`] exactly as `hearth run` starts it,
//! and a QoS 2 subscriber that prints what the hospital receives. rumqttd is
//! fine for this plain run; the fault tests use mosquitto (see crates.md).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio_util::sync::CancellationToken;

use crate::certs::DevCerts;
use crate::config::{Config, MqttConfig, SerialConfig, StoreConfig};
use crate::gateway::Gateway;
use crate::mqtt::payload::{Batch, Status};
use crate::simulator::{PortSpec, SimulatorOptions, Summary};

const GATEWAY_ID: &str = "gw-demo";
const DEVICE_ID: &str = "PM-DEMO-01";

pub fn run(count: u64, interval: Duration) -> anyhow::Result<()> {
    crate::cli::init_logging("warn,rumqttd=off,hearth::serial::reader=error");
    crate::mqtt::tls::install_crypto_provider();
    let dir = tempfile_dir()?;
    let result = run_in(dir.path(), count, interval);
    drop(dir);
    result
}

/// A temporary folder removed on drop (std has none; avoids a dependency).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> anyhow::Result<TempDir> {
    let path = std::env::temp_dir().join(format!(
        "hearth-demo-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&path)
        .with_context(|| format!("cannot create `{}`", path.display()))?;
    Ok(TempDir(path))
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

fn start_broker(certs: &DevCerts, port: u16) -> anyhow::Result<()> {
    use rumqttd::{ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};
    let server = ServerSettings {
        name: "demo".into(),
        listen: ([127, 0, 0, 1], port).into(),
        tls: Some(TlsConfig::Rustls {
            capath: Some(certs.ca_cert.display().to_string()),
            certpath: certs.server_cert.display().to_string(),
            keypath: certs.server_key.display().to_string(),
        }),
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        router: RouterConfig {
            max_connections: 16,
            max_outgoing_packet_count: 200,
            max_segment_size: 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some([("demo".to_string(), server)].into_iter().collect()),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("demo-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                eprintln!("hearth: demo broker stopped: {e}");
            }
        })?;
    // Wait until it listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the demo broker did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn run_in(dir: &Path, count: u64, interval: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let certs = DevCerts::generate(&dir.join("certs"), GATEWAY_ID)?;
    println!(
        "certificates  throwaway CA, broker and client certificates in {}",
        certs.dir.display()
    );
    let port = free_port()?;
    start_broker(&certs, port)?;
    println!(
        "broker        embedded rumqttd on 127.0.0.1:{port} (TLS, client certificates required)"
    );

    // The implant, on a pseudo-terminal.
    let (path_tx, path_rx) = std::sync::mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let sim_opts = SimulatorOptions {
        device_id: DEVICE_ID.into(),
        count,
        interval,
        start_seq: 1,
        seed: fastrand::u64(..),
        alert_rate: 0.1,
        window: 8,
        ack_timeout: Duration::from_secs(1),
        faults: crate::simulator::Faults {
            corrupt_rate: 0.03,
            garbage_rate: 0.02,
            truncate_rate: 0.02,
        },
    };
    let simulator = {
        let stop = stop.clone();
        let opts = sim_opts.clone();
        std::thread::Builder::new()
            .name("demo-implant".into())
            .spawn(move || -> anyhow::Result<Summary> {
                Ok(crate::simulator::run(
                    PortSpec::Pty,
                    &opts,
                    &mut |p: &str| {
                        let _ = path_tx.send(p.to_owned());
                    },
                    &stop,
                )?)
            })?
    };
    let pty = path_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the simulated implant did not open a pseudo-terminal")?;
    println!(
        "implant       simulated {DEVICE_ID} on {pty}, {count} readings, some frames damaged on purpose"
    );

    let config = Config {
        gateway_id: GATEWAY_ID.into(),
        log_level: "warn".into(),
        serial: SerialConfig {
            port: pty.into(),
            baud_rate: 115_200,
            device_alarm_secs: crate::config::defaults::device_alarm_secs(),
            silence_alarm_secs: crate::config::defaults::silence_alarm_secs(),
        },
        store: StoreConfig {
            path: dir.join("hearth.db"),
            retention_days: 30,
            max_size_mb: 64.0,
            encrypt: crate::config::defaults::encrypt(),
            key_file: None,
        },
        mqtt: MqttConfig {
            host: "localhost".into(),
            hosts: Vec::new(),
            port,
            ca_file: certs.ca_cert.clone(),
            cert_file: certs.gateway_cert.clone(),
            key_file: certs.gateway_key.clone(),
            crl_file: None,
            topic_prefix: "hearth/v1".into(),
            keep_alive_secs: 10,
            heartbeat_secs: 60,
            max_inflight: 16,
            batch_max_readings: 16,
            reconnect_min_ms: 200,
            reconnect_max_secs: 5,
            // The embedded broker (rumqttd's v4 listener) speaks 3.1.1.
            protocol: crate::mqtt::wire::Protocol::V311,
            qos: 2,
            session_expiry_secs: crate::config::defaults::session_expiry_secs(),
            will_delay_secs: 0,
            encoding: crate::config::Encoding::Json,
        },
        source: dir.join("demo.toml"),
    };
    config.validate()?;
    println!(
        "gateway       {GATEWAY_ID}, store {}",
        config.store.path.display()
    );
    println!();

    let rt = tokio::runtime::Runtime::new()?;
    let outcome = rt.block_on(async {
        let received = subscribe_and_run(config, &certs, port, count).await;
        stop.store(true, Ordering::SeqCst);
        received
    });
    let summary = simulator
        .join()
        .map_err(|_| anyhow::anyhow!("the simulated implant panicked"))??;
    let received = outcome?;

    let unique: HashSet<&str> = received.ids.iter().map(String::as_str).collect();
    println!();
    println!("summary");
    println!(
        "  implant sent       {} readings, all ACKed: {}",
        summary.acked,
        summary.acked == count
    );
    println!(
        "  line faults        {} corrupted, {} garbage, {} truncated -> {} NAKs, {} resends",
        summary.corrupted, summary.garbage, summary.truncated, summary.naks, summary.resent
    );
    println!(
        "  hospital received  {} readings ({} alerts) in {} messages, {} duplicates",
        received.ids.len(),
        received.alerts,
        received.messages,
        received.ids.len() - unique.len()
    );
    println!("  status messages    {}", received.statuses.join(", "));
    println!(
        "  wall time          {:.1} s",
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        unique.len() as u64 == count && received.ids.len() == unique.len(),
        "the demo did not deliver every reading exactly once"
    );
    Ok(())
}

#[derive(Default)]
struct Received {
    ids: Vec<String>,
    alerts: usize,
    messages: usize,
    statuses: Vec<String>,
}

async fn subscribe_and_run(
    config: Config,
    certs: &DevCerts,
    port: u16,
    count: u64,
) -> anyhow::Result<Received> {
    let tls =
        crate::mqtt::tls::client_config(&certs.ca_cert, &certs.hospital_cert, &certs.hospital_key)?;
    let mut opts = MqttOptions::new("hospital-demo", "localhost", port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_max_packet_size(256 * 1024, 256 * 1024);
    let (client, mut events) = AsyncClient::new(opts, 64);
    client
        .subscribe(format!("hearth/v1/{GATEWAY_ID}/#"), QoS::ExactlyOnce)
        .await?;
    // Wait for SUBACK before the gateway starts, so nothing is missed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("demo subscriber cannot connect: {e}"),
            Err(_) => anyhow::bail!("demo subscriber got no SUBACK"),
        }
    }

    let shutdown = CancellationToken::new();
    let gateway = tokio::spawn(Gateway::new(config).run(shutdown.clone(), || {}));
    let mut got = Received::default();
    let mut per_device: BTreeMap<String, u32> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60 + count / 10);
    while (got.ids.len() as u64) < count {
        let event = match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => anyhow::bail!("demo subscriber lost the broker: {e}"),
            Err(_) => break,
        };
        let Event::Incoming(Packet::Publish(p)) = event else {
            continue;
        };
        if p.topic.ends_with("/status") {
            if let Ok(s) = serde_json::from_slice::<Status>(&p.payload) {
                println!("status   {} (session {})", s.state, s.session);
                got.statuses.push(format!("{} #{}", s.state, s.session));
            }
            continue;
        }
        let batch: Batch = serde_json::from_slice(&p.payload)
            .with_context(|| format!("unreadable payload on `{}`", p.topic))?;
        got.messages += 1;
        let topic = p.topic.rsplit('/').next().unwrap_or_default().to_owned();
        for r in batch.readings {
            if r.priority == "alert" {
                got.alerts += 1;
            }
            per_device.insert(r.device.clone(), r.seq);
            println!(
                "{:<8} {} #{:<4} {:<16} {:>7} {:<4} {}",
                topic,
                r.device,
                r.seq,
                r.kind,
                r.value,
                r.unit,
                r.detail.as_deref().unwrap_or("")
            );
            got.ids.push(r.id);
        }
    }
    shutdown.cancel();
    gateway.await??;
    // Drain the offline status the gateway published on its way out.
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_millis(500), events.poll()).await
    {
        if let Event::Incoming(Packet::Publish(p)) = event
            && let Ok(s) = serde_json::from_slice::<Status>(&p.payload)
        {
            println!(
                "status   {} (session {}, {:?})",
                s.state, s.session, s.reason
            );
            got.statuses.push(format!("{} #{}", s.state, s.session));
        }
    }
    Ok(got)
}
