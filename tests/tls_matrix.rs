//! The TLS failure matrix (issue 8): `hearth run` against real TLS servers,
//! each case with the certificates it makes (rcgen, and `openssl x509 -req`
//! for an X.509 v1 one).
//!
//! The server is a real mosquitto 2.0 (Debian), except where mosquitto
//! cannot play the part: `openssl s_server` offers only TLS 1.1, and
//! accepts only RSA-PSS client signatures (so that rustls, holding an ECDSA
//! key, sends no client certificate). Both are real TLS servers; neither is
//! a fake.
//!
//! Every failing case checks five promises ([`refused`]):
//! 1. no MQTT byte reaches the server: mosquitto logs hearth's failed TLS
//!    attempts but never `New client connected` (which the valid case
//!    shows it writes); s_server, which prints what a client sends, never
//!    shows the CONNECT's protocol name `MQTT` (a control case,
//!    [`s_server_shows_the_connect_of_a_client_it_accepts`], shows that it
//!    would);
//! 2. the readings of a simulated implant stay queued;
//! 3. one WARN line names the cause and the file to fix, however many
//!    retries follow (each retry logs at DEBUG, which the test waits for);
//! 4. one `tls-failure` audit event names the cause;
//! 5. `hearth status` shows the `tls` alarm and exits 1.
//!
//! Run with `--nocapture` to see each case's WARN line.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use chrono::{Datelike, Days, NaiveDate, Utc};
use hearth::certs::DevCerts;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use serde_json::Value;

use crate::harness::{Hearth, Sim, hearth};
use crate::support::{Mosquitto, TestDir, free_port, signal, wait_for};

/// Readings that must be queued (or delivered) before a case looks.
const READINGS: u64 = 3;
/// Longest wait for anything in a case.
const WAIT: Duration = Duration::from_secs(15);
/// The debug line of a retry that failed for the reason already reported.
const SAME_CAUSE: &str = "TLS handshake failed again, same cause.";

/// A CA whose key stays in memory, so that each case can issue what it
/// needs; every file goes into `dir`.
struct Pki {
    dir: PathBuf,
    ca: Issuer<'static, KeyPair>,
    ca_cert: PathBuf,
    ca_key: PathBuf,
    /// The last serial number (certificates) and CRL number used.
    serial: u64,
}

/// Midnight UTC `days` from today (negative: in the past).
fn day(days: i64) -> NaiveDate {
    let today = Utc::now().date_naive();
    if days >= 0 {
        today + Days::new(days as u64)
    } else {
        today - Days::new(days.unsigned_abs())
    }
}

fn set_validity(params: &mut CertificateParams, from: i64, to: i64) {
    let midnight = |d: NaiveDate| rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8);
    params.not_before = midnight(day(from));
    params.not_after = midnight(day(to));
}

fn named(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    // Longer than the health check's 30-day notice: no other alarm.
    set_validity(&mut params, -1, 365);
    params
}

/// A broker certificate as a hospital would issue it: SAN 127.0.0.1 and
/// localhost, serverAuth, CA:FALSE, valid from yesterday for a year.
fn server_params() -> CertificateParams {
    let mut params = named("broker.test");
    params.subject_alt_names = vec![
        SanType::IpAddress([127, 0, 0, 1].into()),
        SanType::DnsName("localhost".try_into().unwrap()),
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf(params)
}

/// A gateway's client certificate: CN = its id, clientAuth.
fn client_params(gateway: &str) -> CertificateParams {
    let mut params = named(gateway);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    leaf(params)
}

fn leaf(mut params: CertificateParams) -> CertificateParams {
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params
}

/// A key pair's files, PEM.
#[derive(Debug, Clone)]
struct Issued {
    cert: PathBuf,
    key: PathBuf,
    serial: u64,
}

impl Pki {
    fn new(dir: &Path, cn: &str) -> Pki {
        fs::create_dir_all(dir).unwrap();
        let mut params = named(cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let ca_cert = dir.join(format!("{cn}.crt").replace(' ', "-"));
        let ca_key = dir.join(format!("{cn}.key").replace(' ', "-"));
        fs::write(&ca_cert, params.self_signed(&key).unwrap().pem()).unwrap();
        write_key(&ca_key, &key.serialize_pem());
        Pki {
            dir: dir.to_owned(),
            ca: Issuer::new(params, key),
            ca_cert,
            ca_key,
            serial: 100,
        }
    }

    /// Signs `params` (a fresh key, the next serial) into `{name}.crt`
    /// and `{name}.key`.
    fn issue(&mut self, name: &str, mut params: CertificateParams) -> Issued {
        self.serial += 1;
        params.serial_number = Some(SerialNumber::from(self.serial));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        self.write(name, &cert.pem(), &key, self.serial)
    }

    fn write(&self, name: &str, pem: &str, key: &KeyPair, serial: u64) -> Issued {
        let issued = Issued {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
            serial,
        };
        fs::write(&issued.cert, pem).unwrap();
        write_key(&issued.key, &key.serialize_pem());
        issued
    }

    /// A self-signed certificate from `params` (no CA involved).
    fn self_signed(&self, name: &str, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        self.write(name, &cert.pem(), &key, 0)
    }

    /// This CA's CRL revoking `serials`, written to `path` (atomically:
    /// a reload never reads half a file).
    fn crl(&mut self, path: &Path, serials: &[u64]) {
        self.serial += 1;
        let now = rcgen::date_time_ymd(day(0).year(), day(0).month() as u8, day(0).day() as u8);
        let day = Duration::from_secs(86_400);
        let crl = CertificateRevocationListParams {
            this_update: now - day,
            next_update: now + 7 * day,
            crl_number: SerialNumber::from(self.serial),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - day,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.ca)
        .unwrap();
        replace(path, &crl.pem().unwrap());
    }
}

/// Writes `text` to `path` through a temporary file and a rename.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// A private key, mode 0600 from the start (hearth refuses anything looser).
fn write_key(path: &Path, pem: &str) {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(pem.as_bytes()).unwrap();
}

/// The TLS side of a gateway's config.
struct Gateway {
    id: String,
    port: u16,
    host: &'static str,
    ca: PathBuf,
    client: Issued,
    crl: Option<PathBuf>,
}

impl Gateway {
    /// Writes `{dir}/{id}.toml` for a device on `serial`.
    fn config(&self, dir: &Path, serial: &Path) -> PathBuf {
        self.config_named(dir, &self.id, serial)
    }

    /// Writes `{dir}/{stem}.toml`, with the store `{stem}.db` (the log
    /// goes to `{stem}.log`).
    fn config_named(&self, dir: &Path, stem: &str, serial: &Path) -> PathBuf {
        let path = dir.join(format!("{stem}.toml"));
        let crl = self
            .crl
            .as_ref()
            .map(|p| format!("crl_file = \"{}\"\n", p.display()))
            .unwrap_or_default();
        let text = format!(
            r#"gateway_id = "{id}"
log_level = "info,hearth=debug"
[serial]
port = "{serial}"
[store]
path = "{db}"
[mqtt]
host = "{host}"
port = {port}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
{crl}keep_alive_secs = 5
reconnect_min_ms = 100
reconnect_max_secs = 1
"#,
            id = self.id,
            serial = serial.display(),
            db = dir.join(format!("{stem}.db")).display(),
            host = self.host,
            port = self.port,
            ca = self.ca.display(),
            cert = self.client.cert.display(),
            key = self.client.key.display(),
        );
        fs::write(&path, text).unwrap();
        path
    }
}

/// mosquitto with `server` as its certificate, trusting clients of `client_ca`.
fn mosquitto(dir: &Path, client_ca: &Path, server: &Issued) -> Mosquitto {
    let certs = DevCerts {
        dir: dir.to_owned(),
        ca_cert: client_ca.to_owned(),
        server_cert: server.cert.clone(),
        server_key: server.key.clone(),
        gateway_cert: PathBuf::new(),
        gateway_key: PathBuf::new(),
        hospital_cert: PathBuf::new(),
        hospital_key: PathBuf::new(),
    };
    Mosquitto::start(&dir.join("broker"), &certs)
}

/// `openssl s_server`, a real TLS server that prints what a client sends
/// once the handshake is done. Killed on drop.
struct SServer {
    child: Child,
    /// Kept open: s_server stops at the end of its input.
    _stdin: ChildStdin,
    port: u16,
    output: PathBuf,
}

impl SServer {
    fn start(dir: &Path, args: &[&str]) -> SServer {
        fs::create_dir_all(dir).unwrap();
        let output = dir.join("s_server.out");
        for _ in 0..5 {
            let port = free_port();
            let out = fs::File::create(&output).unwrap();
            let mut child = Command::new("openssl")
                .arg("s_server")
                .arg("-accept")
                .arg(format!("127.0.0.1:{port}"))
                .args(args)
                .stdin(Stdio::piped())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .expect("cannot run `openssl` (Debian package `openssl`)");
            let stdin = child.stdin.take().unwrap();
            let ready = wait_for(WAIT, "s_server to print ACCEPT or exit", || {
                if fs::read_to_string(&output)
                    .unwrap_or_default()
                    .contains("ACCEPT")
                {
                    return Some(true);
                }
                child.try_wait().unwrap().map(|_| false)
            });
            if ready {
                return SServer {
                    child,
                    _stdin: stdin,
                    port,
                    output,
                };
            }
        }
        panic!(
            "s_server did not start:\n{}",
            fs::read_to_string(&output).unwrap_or_default()
        );
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.output).unwrap_or_default()).into_owned()
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a case's TLS server is, and how to tell that no MQTT reached it.
enum Server<'a> {
    Mosquitto(&'a Mosquitto),
    SServer(&'a SServer),
}

impl Server<'_> {
    fn port(&self) -> u16 {
        match self {
            Server::Mosquitto(m) => m.port,
            Server::SServer(s) => s.port,
        }
    }

    /// Panics unless hearth reached the server at least twice and no MQTT
    /// byte got through TLS.
    #[track_caller]
    fn assert_no_mqtt(&self, gateway: &str) {
        match self {
            Server::Mosquitto(m) => {
                let log = m.log();
                // Each of hearth's attempts ends in an OpenSSL error,
                // logged on its own line or in "Client connection from ...
                // failed". The readiness probe of `support` (a bare TCP
                // connect) ends in an unexpected EOF instead.
                let attempts = log
                    .lines()
                    .filter(|l| {
                        (l.contains("OpenSSL Error")
                            || l.contains("Client connection from 127.0.0.1 failed"))
                            && !l.contains("unexpected eof")
                    })
                    .count();
                assert!(
                    attempts >= 1,
                    "hearth's handshakes never reached mosquitto:\n{}",
                    m.log_tail(20)
                );
                assert!(
                    !log.contains("New client connected") && !log.contains(gateway),
                    "an MQTT CONNECT got through:\n{}",
                    m.log_tail(20)
                );
            }
            Server::SServer(s) => {
                let out = s.output();
                assert!(out.contains("ACCEPT"), "{out}");
                assert!(!out.contains("MQTT"), "an MQTT CONNECT got through:\n{out}");
            }
        }
    }
}

/// What a failing case expects hearth to report.
struct Expect<'a> {
    cause: &'a str,
    /// Parts of the WARN line.
    says: &'a [&'a str],
}

/// `hearth status --format json`: exit code and view.
fn status(config: &Path) -> (i32, Value) {
    let (code, out, err) = hearth(&[
        "status",
        "--format",
        "json",
        "--config",
        config.to_str().unwrap(),
    ]);
    let view = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("no status view (exit {code}, {e}): {err}\n{out}"));
    (code, view)
}

/// The audit trail's entries of `kind`, through the store's own API.
fn audit(config: &Path, kind: &str) -> Vec<hearth::audit::Entry> {
    let text = fs::read_to_string(config).unwrap();
    let c = hearth::config::Config::parse(&text, config).unwrap();
    let encryption = hearth::outbox::Encryption::from_config(&c.store, config);
    let store = hearth::outbox::Store::open_read_only(&c.store.path, &encryption).unwrap();
    store
        .audit_entries(None)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == kind)
        .collect()
}

/// The audit trail's `tls-failure` entries.
fn tls_audit(config: &Path) -> Vec<hearth::audit::Entry> {
    audit(config, hearth::audit::kind::TLS_FAILURE)
}

/// The publisher's WARN lines about TLS in hearth's log.
fn tls_warnings(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" WARN hearth::mqtt::publisher: TLS "))
        .map(str::to_owned)
        .collect()
}

fn queued(view: &Value) -> u64 {
    let r = &view["readings"];
    r["queued_alert"].as_u64().unwrap() + r["queued_routine"].as_u64().unwrap()
}

/// Runs hearth against `server`, which must refuse it, with readings from
/// a simulated implant, and checks the five promises of the module
/// comment. Returns the WARN line.
fn refused(dir: &TestDir, gw: &Gateway, server: Server<'_>, expect: Expect<'_>) -> String {
    assert_eq!(gw.port, server.port());
    let run = start(gw, dir.path());
    let (hearth, config) = (&run.hearth, run.config.clone());
    // A retry that failed for the same reason: reported once means once.
    hearth.wait_log_count(SAME_CAUSE, 1, WAIT);
    let view = status_when(&config, "readings queued", |v| queued(v) >= READINGS);

    let log = hearth.log_text();
    let warnings = tls_warnings(&log);
    assert_eq!(warnings.len(), 1, "one WARN per cause:\n{log}");
    let line = warnings[0].clone();
    for part in expect.says {
        assert!(line.contains(part), "`{part}` missing from:\n{line}");
    }
    assert!(
        line.contains(&format!("cause=\"{}\"", expect.cause)),
        "{line}"
    );
    assert!(!log.contains("Cannot connect to broker"), "{log}");

    let audit = tls_audit(&config);
    assert_eq!(audit.len(), 1, "one audit event per cause: {audit:?}");
    let detail: Value = serde_json::from_str(&audit[0].detail).unwrap();
    assert_eq!(detail["cause"], expect.cause, "{detail}");
    assert_eq!(
        detail["broker"],
        format!("{}:{}", gw.host, gw.port),
        "{detail}"
    );

    // Readings keep coming and stay queued: none delivered, none in flight.
    assert_eq!(delivered(&view), 0, "{view}");
    assert_eq!(view["readings"]["inflight"], 0, "{view}");
    let (code, view) = status(&config);
    assert_eq!(code, 1, "{view}");
    assert!(has_tls_alarm(&view), "{view}");
    let problems = view["problems"].as_array().unwrap();
    assert!(
        problems
            .iter()
            .any(|p| p["message"] == "alarm `tls` is active"),
        "{view}"
    );

    server.assert_no_mqtt(&gw.id);
    eprintln!("{}: {line}\n  audit: {detail}", gw.id);
    line
}

/// A simulated implant that sends a reading every 50 ms until dropped.
///
/// It must outlive the gateway reading it ([`Running`]): a simulator that
/// ends frees its pty, which another test's simulator may get next, and a
/// gateway still running would open it again and take that test's readings.
fn implant() -> Sim {
    Sim::start(&["--count", "1000000", "--interval-ms", "50"])
}

/// A gateway and the simulated implant it reads; the gateway stops first
/// (fields drop in order).
struct Running {
    hearth: Hearth,
    config: PathBuf,
    _sim: Sim,
}

/// Starts a gateway on a new simulated implant, once the port is its own.
///
/// A gateway locks its serial port. One of another test, or of another
/// test run on this machine, whose simulator has ended keeps reopening its
/// port's path, and the kernel gives that pty number to the next
/// simulator: if that gateway takes the port first, ours waits and the
/// readings go there. That hazard is the test kit's, not hearth's; each try
/// gets a new pty and its own config, store and log.
fn start(gw: &Gateway, dir: &Path) -> Running {
    for attempt in 1..=5 {
        let sim = implant();
        let config = gw.config_named(dir, &format!("{}-{attempt}", gw.id), &sim.pty);
        let hearth = Hearth::start(&config);
        let opened = wait_for(WAIT, "the serial port opened, or waited for", || {
            let log = hearth.log_text();
            if log.contains("Serial port opened.") {
                Some(true)
            } else if log.contains("Waiting for the serial port.") {
                Some(false)
            } else {
                None
            }
        });
        if opened {
            return Running {
                hearth,
                config,
                _sim: sim,
            };
        }
        eprintln!(
            "{}: another process holds `{}`; trying a new pty",
            gw.id,
            sim.pty.display()
        );
        drop(hearth);
    }
    panic!("{}: no pty of our own in 5 tries", gw.id);
}

/// The status view once `done` holds for it.
fn status_when(config: &Path, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    wait_for(WAIT, what, || {
        let (_, view) = status(config);
        done(&view).then_some(view)
    })
}

fn delivered(view: &Value) -> u64 {
    view["readings"]["delivered"].as_u64().unwrap()
}

fn has_tls_alarm(view: &Value) -> bool {
    view["alarms"]
        .as_array()
        .unwrap()
        .contains(&Value::from("tls"))
}

/// A world for one case: a CA that issues the broker's and the gateway's
/// certificates, and the gateway's certificate.
struct Case {
    dir: TestDir,
    pki: Pki,
    client: Issued,
    id: String,
}

impl Case {
    fn new(id: &str) -> Case {
        let dir = TestDir::new();
        let mut pki = Pki::new(&dir.subdir("pki"), "hearth matrix CA");
        let client = pki.issue("gateway", client_params(id));
        Case {
            dir,
            pki,
            client,
            id: id.to_owned(),
        }
    }

    fn gateway(&self, port: u16) -> Gateway {
        Gateway {
            id: self.id.clone(),
            port,
            host: "127.0.0.1",
            ca: self.pki.ca_cert.clone(),
            client: self.client.clone(),
            crl: None,
        }
    }

    /// mosquitto with `server`, trusting this case's CA for clients.
    fn broker(&self, server: &Issued) -> Mosquitto {
        mosquitto(self.dir.path(), &self.pki.ca_cert, server)
    }
}

#[test]
fn a_valid_chain_connects_and_delivers() {
    let mut case = Case::new("gw-tls-valid");
    let server = case.pki.issue("server", server_params());
    let broker = case.broker(&server);
    let gw = case.gateway(broker.port);
    let run = start(&gw, case.dir.path());
    let (hearth, config) = (&run.hearth, run.config.clone());
    hearth.wait_log_count("Connected to broker.", 1, WAIT);
    let view = status_when(&config, "readings delivered", |v| delivered(v) >= READINGS);
    assert!(!has_tls_alarm(&view), "{view}");
    assert!(tls_warnings(&hearth.log_text()).is_empty());
    assert!(tls_audit(&config).is_empty());
    // The needle the failing cases look for is the one a success writes.
    assert!(
        broker.log().contains("New client connected from 127.0.0.1"),
        "{}",
        broker.log_tail(20)
    );
}

#[test]
fn a_broker_certificate_from_another_ca_names_mqtt_ca_file() {
    let case = Case::new("gw-tls-wrong-ca");
    let mut other = Pki::new(&case.dir.subdir("other"), "other hospital CA");
    let server = other.issue("server", server_params());
    let broker = case.broker(&server);
    let gw = case.gateway(broker.port);
    let ca = case.pki.ca_cert.display().to_string();
    refused(
        &case.dir,
        &gw,
        Server::Mosquitto(&broker),
        Expect {
            cause: "unknown-issuer",
            says: &[&format!(
                "is issued by `other hospital CA`, not by the CA in `mqtt.ca_file` ({ca})"
            )],
        },
    );
}

#[test]
fn a_self_signed_broker_certificate_is_called_self_signed() {
    let case = Case::new("gw-tls-self-signed");
    let server = case.pki.self_signed("server", server_params());
    let broker = case.broker(&server);
    let gw = case.gateway(broker.port);
    refused(
        &case.dir,
        &gw,
        Server::Mosquitto(&broker),
        Expect {
            cause: "self-signed",
            says: &["`broker.test` is self-signed", "`mqtt.ca_file` ("],
        },
    );
}

#[test]
fn an_expired_broker_certificate_says_when_and_who_renews_it() {
    let mut case = Case::new("gw-tls-expired");
    let mut params = server_params();
    set_validity(&mut params, -30, -1);
    let server = case.pki.issue("server", params);
    let broker = case.broker(&server);
    let gw = case.gateway(broker.port);
    let not_after = format!("{}T00:00:00Z", day(-1));
    refused(
        &case.dir,
        &gw,
        Server::Mosquitto(&broker),
        Expect {
            cause: "expired",
            says: &[
                &format!("expired at {not_after}"),
                "the broker's operator must renew it",
            ],
        },
    );
}

#[test]
fn a_broker_certificate_not_yet_valid_points_at_the_clock() {
    let mut case = Case::new("gw-tls-not-yet-valid");
    let mut params = server_params();
    set_validity(&mut params, 2, 365);
    let server = case.pki.issue("server", params);
    let broker = case.broker(&server);
    let gw = case.gateway(broker.port);
    let not_before = format!("{}T00:00:00Z", day(2));
    refused(
        &case.dir,
        &gw,
        Server::Mosquitto(&broker),
        Expect {
            cause: "not-yet-valid",
            says: &[&format!("starts at {not_before}"), "set it (NTP)"],
        },
    );
}

#[test]
fn a_broker_certificate_for_another_host_names_mqtt_host() {
    let mut case = Case::new("gw-tls-hostname");
    let mut params = server_params();
    params.subject_alt_names = vec![SanType::DnsName(
        "broker.elsewhere.example".try_into().unwrap(),
    )];
    let server = case.pki.issue("server", params);
    let broker = case.broker(&server);
    let gw = case.gateway(broker.port);
    // The config file of the run: `{id}-{try}.toml`.
    let config = case.dir.join(format!("{}-", gw.id));
    refused(
        &case.dir,
        &gw,
        Server::Mosquitto(&broker),
        Expect {
            cause: "name-mismatch",
            says: &[
                "is for `broker.elsewhere.example`, not for `127.0.0.1`",
                &format!("(`mqtt.host` in {}", config.display()),
            ],
        },
    );
}

#[test]
fn a_broker_certificate_for_clients_only_is_not_a_server_certificate() {
    let mut case = Case::new("gw-tls-client-eku");
    let mut params = server_params();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let server = case.pki.issue("server", params);
    let broker = case.broker(&server);
    let gw = case.gateway(broker.port);
    refused(
        &case.dir,
        &gw,
        Server::Mosquitto(&broker),
        Expect {
            cause: "not-a-server-certificate",
            says: &[
                "allows client authentication only",
                "extendedKeyUsage serverAuth",
            ],
        },
    );
}

#[test]
fn a_revoked_broker_certificate_is_refused_with_a_crl_configured() {
    let mut case = Case::new("gw-tls-revoked");
    let server = case.pki.issue("server", server_params());
    let crl = case.pki.dir.join("crl.pem");
    case.pki.crl(&crl, &[server.serial]);
    let broker = case.broker(&server);
    let mut gw = case.gateway(broker.port);
    gw.crl = Some(crl.clone());
    refused(
        &case.dir,
        &gw,
        Server::Mosquitto(&broker),
        Expect {
            cause: "revoked",
            says: &[&format!(
                "is revoked by a CRL in `mqtt.crl_file` ({})",
                crl.display()
            )],
        },
    );
}

#[test]
fn a_broker_that_does_not_trust_our_client_certificate_names_mqtt_cert_file() {
    let mut case = Case::new("gw-tls-wrong-client");
    let server = case.pki.issue("server", server_params());
    // The broker trusts clients of another CA only.
    let clients = Pki::new(&case.dir.subdir("clients"), "broker client CA");
    let broker = mosquitto(case.dir.path(), &clients.ca_cert, &server);
    let gw = case.gateway(broker.port);
    let cert = case.client.cert.display().to_string();
    refused(
        &case.dir,
        &gw,
        Server::Mosquitto(&broker),
        Expect {
            cause: "client-certificate-rejected",
            says: &[
                &format!(
                    "does not trust the CA that issued the client certificate in `mqtt.cert_file` ({cert})"
                ),
                "TLS alert `unknown_ca`",
                // mosquitto names no CAs in its certificate request.
                "ours is from `hearth matrix CA`",
            ],
        },
    );
}

#[test]
fn a_broker_that_accepts_no_signature_our_key_makes_gets_no_certificate_and_says_so() {
    let mut case = Case::new("gw-tls-no-client-cert");
    let server = case.pki.issue("server", server_params());
    // Client certificates must be signed with RSA-PSS; ours is ECDSA, so
    // rustls sends none and the broker demands one.
    let s = SServer::start(
        &case.dir.subdir("s_server"),
        &[
            "-cert",
            server.cert.to_str().unwrap(),
            "-key",
            server.key.to_str().unwrap(),
            "-CAfile",
            case.pki.ca_cert.to_str().unwrap(),
            "-Verify",
            "1",
            "-client_sigalgs",
            "rsa_pss_rsae_sha256",
        ],
    );
    let gw = case.gateway(s.port);
    let key = case.client.key.display().to_string();
    refused(
        &case.dir,
        &gw,
        Server::SServer(&s),
        Expect {
            cause: "client-certificate-not-sent",
            says: &[
                "demands a client certificate signed with RSA_PSS_SHA256",
                &format!("the key in `mqtt.key_file` ({key}) can make none"),
            ],
        },
    );
}

#[test]
fn a_config_without_a_client_certificate_is_refused_at_start() {
    let case = Case::new("gw-tls-no-cert-file");
    let gw = case.gateway(free_port());
    let config = gw.config(case.dir.path(), &case.dir.join("no-device"));
    let text = fs::read_to_string(&config).unwrap();
    let without: String = text
        .lines()
        .filter(|l| !l.starts_with("cert_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&config, without).unwrap();
    let (code, _, err) = hearth(&["config", "check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("cert_file"), "{err}");
    eprintln!("{}: {}", gw.id, err.trim());
}

#[test]
fn a_broker_offering_only_tls_1_1_is_told_to_enable_tls_1_2() {
    let mut case = Case::new("gw-tls-1-1");
    let server = case.pki.issue("server", server_params());
    let s = SServer::start(
        &case.dir.subdir("s_server"),
        &[
            "-cert",
            server.cert.to_str().unwrap(),
            "-key",
            server.key.to_str().unwrap(),
            "-tls1_1",
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
        ],
    );
    let gw = case.gateway(s.port);
    refused(
        &case.dir,
        &gw,
        Server::SServer(&s),
        Expect {
            cause: "tls-version",
            says: &[
                "offers only TLS versions older than 1.2",
                "must enable TLS 1.2 or 1.3",
            ],
        },
    );
}

/// The control for [`Server::assert_no_mqtt`] on s_server: a CONNECT that
/// does get through shows in its output.
#[test]
fn s_server_shows_the_connect_of_a_client_it_accepts() {
    let mut case = Case::new("gw-tls-s-server-control");
    let server = case.pki.issue("server", server_params());
    let s = SServer::start(
        &case.dir.subdir("s_server"),
        &[
            "-cert",
            server.cert.to_str().unwrap(),
            "-key",
            server.key.to_str().unwrap(),
        ],
    );
    let gw = case.gateway(s.port);
    let config = gw.config(case.dir.path(), &case.dir.join("no-device"));
    let _hearth = Hearth::start(&config);
    wait_for(WAIT, "the CONNECT in s_server's output", || {
        s.output().contains("MQTT").then_some(())
    });
}

#[test]
fn an_x509_v1_client_certificate_is_named_as_such_at_config_check_and_start() {
    let case = Case::new("gw-tls-v1");
    let pki = &case.pki;
    let csr = pki.dir.join("v1.csr");
    let v1 = pki.dir.join("v1.crt");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let p = |p: &Path| p.to_str().unwrap().to_owned();
    openssl(&[
        "req",
        "-new",
        "-key",
        &p(&case.client.key),
        "-subj",
        "/CN=gw-tls-v1",
        "-out",
        &p(&csr),
    ]);
    // `x509 -req` without `-extfile` issues a v1 certificate.
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p(&csr),
        "-CA",
        &p(&pki.ca_cert),
        "-CAkey",
        &p(&pki.ca_key),
        "-set_serial",
        "4242",
        "-days",
        "30",
        "-out",
        &p(&v1),
    ]);
    let text = openssl(&["x509", "-in", &p(&v1), "-noout", "-text"]);
    assert!(text.contains("Version: 1 (0x0)"), "{text}");

    // Where the broker would be: a listening socket that counts on no one.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut gw = case.gateway(listener.local_addr().unwrap().port());
    gw.client.cert = v1.clone();
    let config = gw.config(case.dir.path(), &case.dir.join("no-device"));
    let expected = format!(
        "key `mqtt.cert_file` is unusable: `{}` is an X.509 v1 certificate (it has no extensions), which rustls/webpki refuse",
        v1.display()
    );

    let (code, _, err) = hearth(&["config", "check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&expected), "{err}");
    assert!(!err.contains("do not fit together"), "{err}");

    let mut run = Hearth::start(&config);
    let status = run.wait_exit(WAIT);
    assert_eq!(status.code(), Some(2), "{}", run.log_text());
    assert!(run.log_text().contains(&expected), "{}", run.log_text());
    // Not even TCP: hearth stopped before opening any connection.
    let accepted = listener.accept();
    assert!(
        matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{accepted:?}"
    );
    eprintln!("{}: {}", gw.id, err.trim());
}

#[test]
fn a_crl_file_that_holds_no_crl_stops_hearth_at_start_naming_it() {
    let case = Case::new("gw-tls-bad-crl");
    let mut gw = case.gateway(free_port());
    let crl = case.pki.dir.join("crl.pem");
    // A certificate where the CRLs should be: a PEM file, but no CRL.
    fs::copy(&case.client.cert, &crl).unwrap();
    gw.crl = Some(crl.clone());
    let config = gw.config(case.dir.path(), &case.dir.join("no-device"));
    let mut run = Hearth::start(&config);
    assert_eq!(run.wait_exit(WAIT).code(), Some(2));
    let log = run.log_text();
    assert_eq!(log.trim().lines().count(), 1, "{log}");
    assert!(
        log.contains(&format!(
            "key `mqtt.crl_file` is unusable: no CRL in `{}`",
            crl.display()
        )),
        "{log}"
    );
    eprintln!("{}: {}", gw.id, log.trim());
}

#[test]
fn the_tls_alarm_clears_and_the_backlog_drains_once_the_broker_certificate_is_renewed() {
    let mut case = Case::new("gw-tls-renewed");
    let mut params = server_params();
    set_validity(&mut params, -30, -1);
    let expired = case.pki.issue("server", params);
    let mut broker = case.broker(&expired);
    let gw = case.gateway(broker.port);
    let run = start(&gw, case.dir.path());
    let (hearth, config) = (&run.hearth, run.config.clone());
    hearth.wait_log_count(SAME_CAUSE, 1, WAIT);
    let view = status_when(&config, "readings queued", |v| queued(v) >= READINGS);
    let backlog = queued(&view);

    // The broker's operator renews: same files, new contents, restart.
    let renewed = case.pki.issue("renewed", server_params());
    fs::copy(&renewed.cert, &expired.cert).unwrap();
    fs::copy(&renewed.key, &expired.key).unwrap();
    broker.restart();

    hearth.wait_log_count("alarm `tls` cleared", 1, WAIT);
    let view = status_when(&config, "the backlog delivered", |v| {
        delivered(v) >= backlog
    });
    assert!(!has_tls_alarm(&view), "{view}");
    assert_eq!(tls_warnings(&hearth.log_text()).len(), 1);
    assert_eq!(tls_audit(&config).len(), 1);
}

#[test]
fn a_crl_reloaded_on_sighup_drops_a_revoked_broker_and_a_bad_one_is_ignored() {
    let mut case = Case::new("gw-tls-sighup");
    let server = case.pki.issue("server", server_params());
    let crl = case.pki.dir.join("crl.pem");
    case.pki.crl(&crl, &[9999]);
    let broker = case.broker(&server);
    let mut gw = case.gateway(broker.port);
    gw.crl = Some(crl.clone());
    let mut run = start(&gw, case.dir.path());
    let config = run.config.clone();
    let hearth = &mut run.hearth;
    hearth.wait_log_count("Connected to broker.", 1, WAIT);
    status_when(&config, "readings delivered", |v| delivered(v) >= 2);

    // The hospital revokes the broker's certificate.
    case.pki.crl(&crl, &[9999, server.serial]);
    signal(hearth.pid(), libc::SIGHUP, "SIGHUP");
    hearth.wait_log_count("SIGHUP: CRLs reloaded", 1, WAIT);
    hearth.wait_log_count(SAME_CAUSE, 1, WAIT);
    broker.wait_log(&format!("Client {} disconnected", gw.id), WAIT);
    let warnings = tls_warnings(&hearth.log_text());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0]
            .contains("dropped after the CRL reload: the broker's certificate is revoked by a CRL"),
        "{}",
        warnings[0]
    );
    assert_eq!(tls_audit(&config).len(), 1);
    // Nothing more is delivered; what comes in stays queued.
    let (code, view) = status(&config);
    assert_eq!(code, 1, "{view}");
    assert!(has_tls_alarm(&view), "{view}");
    let sent = delivered(&view);
    let view = status_when(&config, "readings queued after the drop", |v| {
        queued(v) >= READINGS
    });
    assert_eq!(delivered(&view), sent, "{view}");
    eprintln!("{} (SIGHUP): {}", gw.id, warnings[0]);

    // A damaged file on SIGHUP: one WARN, and the lists before stay.
    fs::write(&crl, "not a CRL").unwrap();
    signal(hearth.pid(), libc::SIGHUP, "SIGHUP");
    hearth.wait_log_count("SIGHUP: cannot reload `mqtt.crl_file`", 1, WAIT);
    let count = hearth.log_text().matches(SAME_CAUSE).count();
    hearth.wait_log_count(SAME_CAUSE, count + 1, WAIT);
    assert!(hearth.running());
    assert_eq!(tls_audit(&config).len(), 1);
    let line = hearth
        .log_text()
        .lines()
        .find(|l| l.contains("SIGHUP: cannot reload"))
        .unwrap()
        .to_owned();
    assert!(line.contains(" WARN "), "{line}");
    assert!(line.contains(&crl.display().to_string()), "{line}");
    eprintln!("{} (bad CRL on SIGHUP): {line}", gw.id);

    // The revocation is lifted: the next handshake works, the alarm
    // clears, the backlog drains.
    case.pki.crl(&crl, &[9999]);
    signal(hearth.pid(), libc::SIGHUP, "SIGHUP");
    hearth.wait_log_count("alarm `tls` cleared", 1, WAIT);
    let backlog = sent + READINGS;
    status_when(&config, "the backlog delivered", |v| {
        delivered(v) >= backlog
    });
    assert_eq!(hearth.stop().code(), Some(0));
}

#[test]
fn a_broker_that_refuses_the_connect_is_audited_once_as_an_auth_failure() {
    let mut case = Case::new("gw-tls-refused");
    let server = case.pki.issue("server", server_params());
    // mosquitto takes the certificate's CN as the user name: one without a
    // CN passes TLS and is refused at CONNECT.
    let mut params = client_params("unused");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "no CN");
    case.client = case.pki.issue("gateway-no-cn", params);
    let broker = case.broker(&server);
    let gw = case.gateway(broker.port);
    let run = start(&gw, case.dir.path());
    let (hearth, config) = (&run.hearth, run.config.clone());
    hearth.wait_log_count("Broker refused the CONNECT again.", 1, WAIT);
    let view = status_when(&config, "readings queued", |v| queued(v) >= READINGS);
    assert_eq!(delivered(&view), 0, "{view}");
    assert!(!has_tls_alarm(&view), "{view}");
    let log = hearth.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("refused the CONNECT"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(tls_warnings(&log).is_empty(), "{log}");
    let refusals = audit(&config, hearth::audit::kind::AUTH_FAILURE);
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(tls_audit(&config).is_empty());
    eprintln!(
        "{}: {}\n  audit: {}",
        gw.id, warnings[0], refusals[0].detail
    );
}
