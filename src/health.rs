//! The gateway's health: what counts as needing an operator, and the task
//! that records what only the running gateway knows.
//!
//! `hearth status` gathers [`Facts`] from the store and the certificate
//! files and exits 1 when [`problems`] finds any. The limits:
//!
//! | problem                | when                                                                 |
//! |------------------------|----------------------------------------------------------------------|
//! | `not-running`          | the pid the gateway recorded is gone, or is another process by now    |
//! | `broker-unreachable`   | not connected for longer than 2 × `mqtt.reconnect_max_secs`, at least [`BROKER_FLOOR`] (5 min) |
//! | `implant-silent`       | no reading for `serial.silence_alarm_secs` (default 900 s), counted from the last reading or the gateway's start, whichever is later |
//! | `alarm`                | any active alarm (docs/mqtt-payloads.md, 4.7)                        |
//! | `certificate-expiring` | the client or CA certificate expires within [`CERTIFICATE_NOTICE`] (30 days), or has expired |
//!
//! The broker floor keeps a broker restart or a short network cut from
//! paging anyone: with the default backoff (60 s at most) the gateway has
//! tried at least five times by then.
//!
//! [`Health::run`] is the gateway's task: it records the process (pid,
//! start, version) for the liveness check, and checks the certificates at
//! start and every 12 hours, raising the `certificate-expiring` alarm
//! (and a WARN naming the file) within 30 days of their end.
//!
//! Invariant: the alarm follows the certificates the gateway loaded at
//! start, not the files as they are now. The TLS configuration is built
//! once, so a renewed file is used only after a restart, and until then
//! the alarm stays; `hearth status` says so when the file on disk is newer.

use std::convert::Infallible;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::alarm::Alarms;
use crate::config::Config;
use crate::outbox::StoreHandle;

/// The alarm raised while a certificate expires within [`CERTIFICATE_NOTICE`].
pub const CERTIFICATE_ALARM: &str = "certificate-expiring";
/// How long before a certificate's end it needs attention: time enough for
/// a hospital to issue a new one.
pub const CERTIFICATE_NOTICE: Duration = Duration::from_secs(30 * 86_400);
/// The shortest broker outage that needs attention.
pub const BROKER_FLOOR: Duration = Duration::from_secs(300);
/// How often the running gateway checks its certificates again.
const RECHECK: Duration = Duration::from_secs(12 * 3600);

/// The gateway's process as it recorded itself (state key `process`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    /// When the gateway started, in milliseconds since the Unix epoch.
    pub started: i64,
    pub version: String,
    /// The kernel's start time of the process (`/proc/PID/stat`, field 22),
    /// which tells this process from a later one that got the same pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ticks: Option<u64>,
}

impl ProcessRecord {
    fn current(now: DateTime<Utc>) -> ProcessRecord {
        let pid = std::process::id();
        ProcessRecord {
            pid,
            started: now.timestamp_millis(),
            version: env!("CARGO_PKG_VERSION").into(),
            start_ticks: proc_stat(pid).map(|(_, ticks)| ticks),
        }
    }

    pub fn started(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.started).unwrap_or_default()
    }

    /// True while the recorded process runs: it exists (EPERM counts: it
    /// may belong to the service user), is no zombie, and started when it
    /// said it did (after a reboot its pid soon belongs to another program).
    pub fn is_running(&self) -> bool {
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return false;
        };
        // 0 and below would name a process group, not a process.
        if pid <= 0 {
            return false;
        }
        // SAFETY: kill(2) with signal 0 sends nothing and touches no memory.
        let exists = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !exists {
            return false;
        }
        match proc_stat(self.pid) {
            Some((state, _)) if state == "Z" => false,
            Some((_, ticks)) => self.start_ticks.is_none_or(|t| t == ticks),
            // No /proc (or hidden): the signal check is all there is.
            None => true,
        }
    }
}

/// The state and start time of a process from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted from the last `)`, where field 3 (the state) follows.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.to_owned();
    let ticks = fields.nth(18)?.parse().ok()?;
    Some((state, ticks))
}

/// A certificate file the gateway checks, and what it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertRole {
    /// `mqtt.cert_file`: hearth's own certificate (chain).
    Client,
    /// `mqtt.ca_file`: the CA that signed the broker's certificate.
    Ca,
}

impl CertRole {
    /// `client` or `ca`, for log fields.
    pub fn name(self) -> &'static str {
        match self {
            CertRole::Client => "client",
            CertRole::Ca => "ca",
        }
    }

    /// How the file's certificates are used (see [`crate::certs::PemUse`]).
    pub fn pem_use(self) -> crate::certs::PemUse {
        match self {
            CertRole::Client => crate::certs::PemUse::Chain,
            CertRole::Ca => crate::certs::PemUse::Anchors,
        }
    }

    /// The state key under which the gateway records the certificate it loaded.
    pub fn state_key(self) -> &'static str {
        match self {
            CertRole::Client => "certificate",
            CertRole::Ca => "ca_certificate",
        }
    }

    pub fn file(self, config: &Config) -> &Path {
        match self {
            CertRole::Client => &config.mqtt.cert_file,
            CertRole::Ca => &config.mqtt.ca_file,
        }
    }
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CertRole::Client => "client certificate",
            CertRole::Ca => "CA certificate",
        })
    }
}

/// A certificate as the gateway loaded it (state keys `certificate` and
/// `ca_certificate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateRecord {
    pub file: PathBuf,
    /// The earliest notAfter in the file, in milliseconds since the epoch.
    pub not_after: i64,
}

impl CertificateRecord {
    pub fn not_after(&self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.not_after).unwrap_or_default()
    }
}

/// True if a certificate ending at `not_after` needs renewing at `now`.
pub fn expiring(not_after: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    (not_after - now)
        .to_std()
        .is_ok_and(|left| left <= CERTIFICATE_NOTICE)
        || not_after <= now
}

/// The gateway's health task: see the module comment.
pub struct Health {
    config: Arc<Config>,
    store: StoreHandle,
    alarms: Alarms,
}

impl Health {
    pub fn new(config: Arc<Config>, store: StoreHandle, alarms: Alarms) -> Health {
        Health {
            config,
            store,
            alarms,
        }
    }

    /// Runs until shutdown. It never fails: a certificate it cannot read
    /// (the gateway loaded it a moment before) is logged and skipped.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Infallible> {
        let process = ProcessRecord::current(Utc::now());
        self.store
            .record("process", serde_json::json!(process))
            .await;
        let mut loaded = Vec::new();
        for role in [CertRole::Client, CertRole::Ca] {
            let file = role.file(&self.config).to_path_buf();
            match crate::certs::not_after(&file, role.pem_use()) {
                Ok(t) => {
                    let record = CertificateRecord {
                        file,
                        not_after: t.timestamp_millis(),
                    };
                    self.store
                        .record(role.state_key(), serde_json::json!(record))
                        .await;
                    loaded.push((role, record));
                }
                Err(e) => {
                    tracing::warn!(certificate = %role.name(), error = %e, "Cannot read the certificate's expiry.")
                }
            }
        }
        loop {
            self.check(&loaded, Utc::now()).await;
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// Raises or clears the certificate alarm for the loaded certificates
    /// at `now`, with a WARN for each one that needs renewing.
    async fn check(&self, loaded: &[(CertRole, CertificateRecord)], now: DateTime<Utc>) {
        let mut any = false;
        for (role, record) in loaded {
            let end = record.not_after();
            if !expiring(end, now) {
                tracing::debug!(certificate = %role.name(), file = %record.file.display(), not_after = %end, "Certificate valid.");
                continue;
            }
            any = true;
            let file = record.file.display();
            if end <= now {
                let days_ago = (now - end).num_days();
                tracing::warn!(certificate = %role.name(), %file, days_ago, "Certificate has expired: the TLS handshake with the broker fails. Install a renewed one and restart hearth.");
            } else {
                let days_left = (end - now).num_days();
                tracing::warn!(certificate = %role.name(), %file, days_left, "Certificate expires soon: install a renewed one and restart hearth before then.");
            }
        }
        let changed = if any {
            self.alarms.raise(CERTIFICATE_ALARM)
        } else {
            self.alarms.clear(CERTIFICATE_ALARM)
        };
        if changed {
            self.alarms.record(&self.store).await;
        }
        // The audit trail: once per certificate state, across restarts too.
        crate::audit::events::certificates(&self.store, loaded, now).await;
    }
}

/// A link's state as its task recorded it (state keys `broker`, `serial`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub state: String,
    pub since: DateTime<Utc>,
    pub detail: String,
}

impl Link {
    /// Reads `{state, since (ms), detail}`; `None` if it is not that.
    pub fn from_json(value: &serde_json::Value) -> Option<Link> {
        Some(Link {
            state: value["state"].as_str()?.to_owned(),
            since: DateTime::from_timestamp_millis(value["since"].as_i64()?)?,
            detail: value["detail"].as_str().unwrap_or_default().to_owned(),
        })
    }
}

/// A certificate as `hearth status` finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFact {
    pub role: CertRole,
    pub file: PathBuf,
    /// The file's expiry as it is on disk now, if it could be read.
    pub on_disk: Option<DateTime<Utc>>,
    /// The expiry of the certificate the running gateway loaded.
    pub in_use: Option<DateTime<Utc>>,
}

/// Everything the health verdict rests on, gathered by `hearth status`.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub now: DateTime<Utc>,
    /// The process the gateway recorded, and whether it runs now.
    pub process: Option<(ProcessRecord, bool)>,
    pub broker: Option<Link>,
    pub serial: Option<Link>,
    pub last_received: Option<DateTime<Utc>>,
    pub alarms: Vec<String>,
    pub certificates: Vec<CertificateFact>,
}

/// How long each condition may last before it needs attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub broker: Duration,
    pub implant: Duration,
}

impl Limits {
    pub fn for_config(config: &Config) -> Limits {
        let retries = Duration::from_secs(config.mqtt.reconnect_max_secs.saturating_mul(2));
        Limits {
            broker: retries.max(BROKER_FLOOR),
            implant: Duration::from_secs(config.serial.silence_alarm_secs),
        }
    }
}

/// Something that needs an operator; its `Display` is the line `hearth
/// status` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The gateway is not running; `pid` is the one it last recorded.
    NotRunning {
        pid: Option<u32>,
    },
    BrokerUnreachable {
        state: String,
        detail: String,
        down_for: Duration,
        limit: Duration,
    },
    ImplantSilent {
        silent_for: Duration,
        /// Whether any reading was ever stored.
        ever_heard: bool,
        /// The serial port's state when it is not open.
        serial: Option<String>,
    },
    Alarm(String),
    Certificate {
        role: CertRole,
        file: PathBuf,
        not_after: DateTime<Utc>,
        now: DateTime<Utc>,
        /// The file on disk is newer than what the gateway uses.
        restart_needed: bool,
    },
}

impl Problem {
    /// A stable name for scripts: `not-running`, `broker-unreachable`,
    /// `implant-silent`, `alarm` or `certificate-expiring`.
    pub fn code(&self) -> &'static str {
        match self {
            Problem::NotRunning { .. } => "not-running",
            Problem::BrokerUnreachable { .. } => "broker-unreachable",
            Problem::ImplantSilent { .. } => "implant-silent",
            Problem::Alarm(_) => "alarm",
            Problem::Certificate { .. } => CERTIFICATE_ALARM,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotRunning { pid: Some(pid) } => write!(
                f,
                "hearth is not running (its last process, pid {pid}, is gone)"
            ),
            Problem::NotRunning { pid: None } => write!(
                f,
                "hearth is not running (no `hearth run` has recorded itself in this store)"
            ),
            Problem::BrokerUnreachable {
                state,
                detail,
                down_for,
                limit,
            } => {
                write!(
                    f,
                    "broker not connected for {} (limit {}): {state}",
                    human(*down_for),
                    human(*limit)
                )?;
                if !detail.is_empty() {
                    write!(f, ", {detail}")?;
                }
                Ok(())
            }
            Problem::ImplantSilent {
                silent_for,
                ever_heard,
                serial,
            } => {
                if *ever_heard {
                    write!(f, "no reading from the implant for {}", human(*silent_for))?;
                } else {
                    write!(
                        f,
                        "no reading from the implant in the {} since hearth started",
                        human(*silent_for)
                    )?;
                }
                if let Some(serial) = serial {
                    write!(f, " (serial port {serial})")?;
                }
                Ok(())
            }
            Problem::Alarm(code) => write!(f, "alarm `{code}` is active"),
            Problem::Certificate {
                role,
                file,
                not_after,
                now,
                restart_needed,
            } => {
                let file = file.display();
                match (*not_after - *now).num_days() {
                    _ if not_after <= now => write!(
                        f,
                        "{role} `{file}` expired on {}",
                        not_after.format("%Y-%m-%d")
                    )?,
                    0 => write!(f, "{role} `{file}` expires within a day")?,
                    days => write!(f, "{role} `{file}` expires in {days} days")?,
                }
                if *restart_needed {
                    write!(
                        f,
                        " as loaded by hearth; the file on disk is newer: restart hearth to use it"
                    )
                } else {
                    write!(f, ": install a renewed one and restart hearth")
                }
            }
        }
    }
}

/// What needs attention, worst first. When the gateway is not running, the
/// links and alarms it recorded are stale and are not judged.
pub fn problems(facts: &Facts, limits: &Limits) -> Vec<Problem> {
    let now = facts.now;
    let since = |t: DateTime<Utc>| (now - t).to_std().unwrap_or_default();
    let mut found = Vec::new();
    let running = match &facts.process {
        Some((process, true)) => Some(process.started()),
        Some((process, false)) => {
            found.push(Problem::NotRunning {
                pid: Some(process.pid),
            });
            None
        }
        None => {
            found.push(Problem::NotRunning { pid: None });
            None
        }
    };
    let certificates = certificate_problems(facts, running.is_some());
    let Some(started) = running else {
        found.extend(certificates);
        return found;
    };

    let (state, detail, down_since) = match &facts.broker {
        Some(link) => (link.state.as_str(), link.detail.as_str(), link.since),
        None => ("never connected", "", started),
    };
    if state != "connected" && since(down_since) > limits.broker {
        found.push(Problem::BrokerUnreachable {
            state: state.to_owned(),
            detail: detail.to_owned(),
            down_for: since(down_since),
            limit: limits.broker,
        });
    }

    // A gateway just started gives the implant its interval from then.
    let quiet_since = facts.last_received.map_or(started, |t| t.max(started));
    if since(quiet_since) > limits.implant {
        found.push(Problem::ImplantSilent {
            silent_for: since(quiet_since),
            ever_heard: facts.last_received.is_some(),
            serial: facts
                .serial
                .as_ref()
                .filter(|link| link.state != "open")
                .map(|link| match link.detail.as_str() {
                    "" => link.state.clone(),
                    detail => format!("{}: {detail}", link.state),
                }),
        });
    }

    for alarm in &facts.alarms {
        // The certificate's own line says more than its alarm.
        if alarm == CERTIFICATE_ALARM && !certificates.is_empty() {
            continue;
        }
        found.push(Problem::Alarm(alarm.clone()));
    }
    found.extend(certificates);
    found
}

/// A certificate needs attention when the one in use, or the file that the
/// next start will load, expires within the notice.
fn certificate_problems(facts: &Facts, running: bool) -> Vec<Problem> {
    let now = facts.now;
    facts
        .certificates
        .iter()
        .filter_map(|c| {
            let in_use = c.in_use.filter(|_| running);
            let not_after = c.on_disk.into_iter().chain(in_use).min()?;
            expiring(not_after, now).then(|| Problem::Certificate {
                role: c.role,
                file: c.file.clone(),
                not_after,
                now,
                restart_needed: in_use == Some(not_after)
                    && c.on_disk.is_some_and(|disk| disk > not_after),
            })
        })
        .collect()
}

/// A duration for people: `40 s`, `6 min`, `2 h 5 min`, `3 d 4 h`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn now() -> DateTime<Utc> {
        at("2026-03-01T12:00:00Z")
    }

    fn limits() -> Limits {
        Limits {
            broker: 5 * MIN,
            implant: 15 * MIN,
        }
    }

    fn link(state: &str, ago: Duration, detail: &str) -> Option<Link> {
        Some(Link {
            state: state.into(),
            since: now() - ago,
            detail: detail.into(),
        })
    }

    /// A gateway up for a day, connected, heard a minute ago.
    fn healthy() -> Facts {
        let process = ProcessRecord {
            pid: 4242,
            started: (now() - chrono::Duration::days(1)).timestamp_millis(),
            version: "0.1.0".into(),
            start_ticks: None,
        };
        Facts {
            now: now(),
            process: Some((process, true)),
            broker: link("connected", 20 * 60 * MIN, ""),
            serial: link("open", 20 * 60 * MIN, ""),
            last_received: Some(now() - MIN),
            alarms: vec![],
            certificates: vec![CertificateFact {
                role: CertRole::Client,
                file: "/etc/hearth/certs/gateway.crt".into(),
                on_disk: Some(now() + chrono::Duration::days(200)),
                in_use: Some(now() + chrono::Duration::days(200)),
            }],
        }
    }

    fn codes(facts: &Facts) -> Vec<&'static str> {
        problems(facts, &limits())
            .iter()
            .map(Problem::code)
            .collect()
    }

    #[test]
    fn a_connected_gateway_that_hears_its_implant_is_healthy() {
        assert_eq!(problems(&healthy(), &limits()), []);
    }

    #[test]
    fn a_broker_outage_is_a_problem_only_past_the_limit() {
        let mut facts = healthy();
        facts.broker = link("disconnected", 5 * MIN, "connection refused");
        assert_eq!(codes(&facts), Vec::<&str>::new());
        facts.broker = link("connecting", 6 * MIN, "");
        let found = problems(&facts, &limits());
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].to_string(),
            "broker not connected for 6 min (limit 5 min): connecting"
        );
        facts.broker = link("disconnected", 6 * MIN, "connection refused");
        assert_eq!(
            problems(&facts, &limits())[0].to_string(),
            "broker not connected for 6 min (limit 5 min): disconnected, connection refused"
        );
    }

    #[test]
    fn a_broker_never_heard_of_counts_from_the_start() {
        let mut facts = healthy();
        facts.broker = None;
        assert_eq!(codes(&facts), ["broker-unreachable"]);
        facts.process.as_mut().unwrap().0.started = (now() - MIN).timestamp_millis();
        assert_eq!(codes(&facts), Vec::<&str>::new());
    }

    /// A configuration with the given `mqtt.reconnect_max_secs`.
    fn config(reconnect_max_secs: u64) -> Config {
        let text = format!(
            "gateway_id = \"gw\"\n[serial]\nport = \"/dev/null\"\n[store]\npath = \"/tmp/x.db\"\n\
             [mqtt]\nhost = \"h\"\nca_file = \"a\"\ncert_file = \"b\"\nkey_file = \"c\"\n\
             reconnect_max_secs = {reconnect_max_secs}\n"
        );
        Config::parse(&text, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn the_broker_limit_is_twice_the_longest_backoff_but_at_least_5_min() {
        let limit = |max| Limits::for_config(&config(max)).broker;
        assert_eq!(limit(2), BROKER_FLOOR);
        assert_eq!(limit(60), BROKER_FLOOR);
        assert_eq!(limit(600), 20 * MIN);
    }

    #[tokio::test]
    async fn the_check_raises_the_alarm_within_30_days_and_clears_it_otherwise() {
        let tmp = tempfile::tempdir().unwrap();
        let store = crate::outbox::store::tests::open_at(&tmp.path().join("health.db"));
        let store = StoreHandle::spawn(store);
        let health = Health::new(Arc::new(config(60)), store.clone(), Alarms::default());
        let loaded = [(
            CertRole::Client,
            CertificateRecord {
                file: "/etc/hearth/certs/gateway.crt".into(),
                not_after: (now() + chrono::Duration::days(10)).timestamp_millis(),
            },
        )];
        let recorded = || async { store.call(|s| s.state("alarms")).await.unwrap() };

        health.check(&loaded, now()).await;
        assert_eq!(health.alarms.active(), [CERTIFICATE_ALARM]);
        assert_eq!(
            recorded().await.as_deref(),
            Some(r#"["certificate-expiring"]"#)
        );
        // Forty days before its end (a clock set right again) it clears.
        health
            .check(&loaded, now() - chrono::Duration::days(30))
            .await;
        assert_eq!(health.alarms.active(), Vec::<String>::new());
        assert_eq!(recorded().await.as_deref(), Some("[]"));
    }

    #[test]
    fn a_silent_implant_is_a_problem_past_the_limit_and_names_the_port() {
        let mut facts = healthy();
        facts.last_received = Some(now() - 15 * MIN);
        assert_eq!(codes(&facts), Vec::<&str>::new());
        facts.last_received = Some(now() - 16 * MIN);
        facts.serial = link("waiting", 16 * MIN, "No such file or directory");
        assert_eq!(
            problems(&facts, &limits())[0].to_string(),
            "no reading from the implant for 16 min (serial port waiting: No such file or directory)"
        );
    }

    #[test]
    fn a_restarted_gateway_gives_the_implant_its_interval_from_the_start() {
        let mut facts = healthy();
        facts.process.as_mut().unwrap().0.started = (now() - 10 * MIN).timestamp_millis();
        facts.last_received = Some(now() - chrono::Duration::days(2));
        assert_eq!(codes(&facts), Vec::<&str>::new());
        facts.process.as_mut().unwrap().0.started = (now() - 20 * MIN).timestamp_millis();
        assert_eq!(codes(&facts), ["implant-silent"]);
        facts.last_received = None;
        assert_eq!(
            problems(&facts, &limits())[0].to_string(),
            "no reading from the implant in the 20 min since hearth started"
        );
    }

    #[test]
    fn every_active_alarm_is_a_problem() {
        let mut facts = healthy();
        facts.alarms = vec!["device-restart".into(), "store-full".into()];
        let found = problems(&facts, &limits());
        assert_eq!(
            found.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "alarm `device-restart` is active",
                "alarm `store-full` is active"
            ]
        );
    }

    #[test]
    fn a_dead_gateway_is_the_problem_and_its_stale_state_is_not_judged() {
        let mut facts = healthy();
        facts.process.as_mut().unwrap().1 = false;
        facts.broker = link("disconnected", 60 * MIN, "");
        facts.alarms = vec!["store-full".into()];
        let found = problems(&facts, &limits());
        assert_eq!(found, [Problem::NotRunning { pid: Some(4242) }]);
        assert_eq!(
            found[0].to_string(),
            "hearth is not running (its last process, pid 4242, is gone)"
        );
        facts.process = None;
        assert_eq!(codes(&facts), ["not-running"]);
    }

    #[test]
    fn a_certificate_within_30_days_is_a_problem_and_replaces_its_alarm() {
        let mut facts = healthy();
        let end = now() + chrono::Duration::days(30);
        facts.certificates[0].on_disk = Some(end);
        facts.certificates[0].in_use = Some(end);
        facts.alarms = vec![CERTIFICATE_ALARM.into()];
        let found = problems(&facts, &limits());
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0].to_string(),
            "client certificate `/etc/hearth/certs/gateway.crt` expires in 30 days: install a renewed one and restart hearth"
        );
        let later = now() + chrono::Duration::days(31);
        facts.certificates[0].on_disk = Some(later);
        facts.certificates[0].in_use = Some(later);
        // The file is fine, so the gateway's alarm speaks for itself.
        assert_eq!(codes(&facts), ["alarm"]);
    }

    #[test]
    fn an_expired_certificate_says_expired_and_counts_even_when_hearth_is_down() {
        let mut facts = healthy();
        facts.process.as_mut().unwrap().1 = false;
        facts.certificates[0].on_disk = Some(now() - chrono::Duration::days(3));
        let found = problems(&facts, &limits());
        assert_eq!(codes(&facts), ["not-running", "certificate-expiring"]);
        assert!(
            found[1].to_string().contains("expired on 2026-02-26"),
            "{}",
            found[1]
        );
    }

    #[test]
    fn a_renewed_file_does_not_hide_the_expiring_certificate_in_use() {
        let mut facts = healthy();
        facts.certificates[0].in_use = Some(now() + chrono::Duration::days(5));
        let found = problems(&facts, &limits());
        assert_eq!(found.len(), 1);
        assert!(
            found[0].to_string().contains(
                "expires in 5 days as loaded by hearth; the file on disk is newer: restart hearth"
            ),
            "{}",
            found[0]
        );
        // Once hearth is down, only the file counts: the next start loads it.
        facts.process.as_mut().unwrap().1 = false;
        assert_eq!(codes(&facts), ["not-running"]);
    }

    #[test]
    fn expiring_is_within_30_days_or_past() {
        assert!(!expiring(now() + chrono::Duration::days(31), now()));
        assert!(expiring(now() + chrono::Duration::days(30), now()));
        assert!(expiring(now(), now()));
        assert!(expiring(now() - chrono::Duration::days(400), now()));
    }

    #[test]
    fn this_process_is_running_and_a_reaped_one_is_not() {
        let me = ProcessRecord::current(now());
        assert!(me.start_ticks.is_some(), "/proc is readable here");
        assert!(me.is_running());
        // The same pid with another start time is a different process.
        let reused = ProcessRecord {
            start_ticks: me.start_ticks.map(|t| t + 1),
            ..me.clone()
        };
        assert!(!reused.is_running());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let gone = ProcessRecord { pid, ..me.clone() };
        assert!(!gone.is_running());
        for pid in [0, u32::MAX] {
            assert!(!ProcessRecord { pid, ..me.clone() }.is_running());
        }
    }

    #[test]
    fn the_process_record_reads_back() {
        let me = ProcessRecord::current(now());
        let json = serde_json::json!(me);
        assert_eq!(json["pid"], std::process::id());
        assert_eq!(json["started"], now().timestamp_millis());
        let back: ProcessRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, me);
        assert_eq!(back.started(), now());
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(human(Duration::from_secs(40)), "40 s");
        assert_eq!(human(6 * MIN + Duration::from_secs(59)), "6 min");
        assert_eq!(human(125 * MIN), "2 h 5 min");
        assert_eq!(human(Duration::from_secs(3 * 86_400 + 4 * 3600)), "3 d 4 h");
    }
}
