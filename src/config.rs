//! The one TOML configuration file.
//!
//! Unknown keys are refused, every key has a default where one is safe, and
//! [`Config::load`] validates everything it can at start: a mistake is
//! reported as one line naming the key and the file, never discovered at
//! 3 a.m. by a reading that cannot be sent.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where `hearth run` looks when neither `--config` nor `$HEARTH_CONFIG` says.
pub const DEFAULT_PATH: &str = "/etc/hearth/hearth.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config `{path}`: {source} (pass --config PATH or set HEARTH_CONFIG)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config `{path}`: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config `{path}`: key `{key}` {problem}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
}

/// The whole configuration (`hearth config default` prints it commented).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This gateway's id: MQTT client id, topic level and reading-id prefix.
    pub gateway_id: String,
    /// Log filter when `RUST_LOG` is unset (`error`, `warn`, `info`, `debug`).
    #[serde(default = "defaults::log_level")]
    pub log_level: String,
    pub serial: SerialConfig,
    pub store: StoreConfig,
    pub mqtt: MqttConfig,
    /// The file this was read from, for messages.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// The bedside device's serial port.
    pub port: PathBuf,
    /// Line speed.
    #[serde(default = "defaults::baud_rate")]
    pub baud_rate: u32,
    /// Seconds a device restart (a v1 device counting again) or a seq
    /// conflict keeps its alarm (`device-restart`, `seq-conflict`) before it
    /// clears by itself; `hearth devices reset` clears it at once.
    #[serde(default = "defaults::device_alarm_secs")]
    pub device_alarm_secs: u64,
    /// Seconds without a reading after which `hearth status` says the
    /// implant is silent (a health-check failure).
    #[serde(default = "defaults::silence_alarm_secs")]
    pub silence_alarm_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The SQLite database file (its folder must exist and be writable).
    pub path: PathBuf,
    /// Days a delivered reading is kept for the CLI before it is pruned.
    #[serde(default = "defaults::retention_days")]
    pub retention_days: u32,
    /// Size cap of the database in MiB (fractions allowed). At 90% of it new
    /// readings are refused with BUSY (the device keeps them) while the
    /// backlog drains; undelivered readings are never dropped.
    #[serde(default = "defaults::max_size_mb")]
    pub max_size_mb: f64,
    /// Encrypt the store at rest (SQLCipher). Only an explicit `false`
    /// gives a plaintext store, with a WARN at every start.
    #[serde(default = "defaults::encrypt")]
    pub encrypt: bool,
    /// The store's key file; `None`: a systemd credential
    /// `hearth-store-key` if present, else `{path}.key`, generated at first
    /// start with mode 0600.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker host name; also the name its certificate must carry. May be
    /// left out when `hosts` is given.
    #[serde(default)]
    pub host: String,
    /// Brokers to fail over between, tried in order: `["a.example:8883",
    /// "b.example"]` (a missing port is `port`). A list replaces `host`.
    /// Moving to another broker counts as a lost session: readings in
    /// flight are queued again (counted), never lost.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Broker TLS port.
    #[serde(default = "defaults::mqtt_port")]
    pub port: u16,
    /// PEM file of the CA that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM file of this gateway's client certificate (chain).
    pub cert_file: PathBuf,
    /// PEM file of this gateway's private key; must not be readable by others.
    pub key_file: PathBuf,
    /// PEM file of certificate revocation lists (CRLs) for the broker's
    /// chain; read at start and on SIGHUP. `None`: no revocation check.
    #[serde(default)]
    pub crl_file: Option<PathBuf>,
    /// First topic levels: `{topic_prefix}/{gateway_id}/readings` etc.
    #[serde(default = "defaults::topic_prefix")]
    pub topic_prefix: String,
    /// MQTT keep-alive; the broker declares us gone after 1.5 times this.
    #[serde(default = "defaults::keep_alive_secs")]
    pub keep_alive_secs: u16,
    /// How often the retained status is refreshed while online.
    #[serde(default = "defaults::heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// Most QoS 2 exchanges open at once. Keep it below the broker's limit
    /// on incoming messages in flight (mosquitto: `max_inflight_messages`,
    /// default 20): over MQTT 3.1.1 a broker may drop what exceeds it.
    #[serde(default = "defaults::max_inflight")]
    pub max_inflight: u16,
    /// Most readings in one message (routine or alerts).
    #[serde(default = "defaults::batch_max_readings")]
    pub batch_max_readings: usize,
    /// First reconnect delay; doubles up to `reconnect_max_secs`, with jitter.
    #[serde(default = "defaults::reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay.
    #[serde(default = "defaults::reconnect_max_secs")]
    pub reconnect_max_secs: u64,
    /// `"5"` (MQTT 5, the default: the broker can say no) or `"3.1.1"` for
    /// brokers that refuse MQTT 5.
    #[serde(default)]
    pub protocol: crate::mqtt::wire::Protocol,
    /// 2: exactly once (the default). 1: at least once, for brokers without
    /// QoS 2 (AWS IoT Core, Azure IoT Hub, RabbitMQ); readings keep their
    /// ids, so the receiver drops duplicates.
    #[serde(default = "defaults::qos")]
    pub qos: u8,
    /// MQTT 5 Session Expiry Interval: how long the broker keeps this
    /// gateway's session (and its QoS 2 state) after the link drops.
    #[serde(default = "defaults::session_expiry_secs")]
    pub session_expiry_secs: u32,
    /// MQTT 5 Will Delay Interval: how long the broker waits before it
    /// publishes the last will. 0: at once (within 1.5 keep-alives).
    #[serde(default)]
    pub will_delay_secs: u32,
    /// How readings are encoded: `"json"` (the default) or `"cbor"`, the
    /// compact batch of docs/compact-encoding.md (about 15 bytes a reading
    /// in a batch of 50, for metered links). Status messages stay JSON.
    #[serde(default)]
    pub encoding: Encoding,
}

impl MqttConfig {
    /// The brokers to try, in order: `hosts`, or else `host` and `port`.
    /// Entries are checked by [`Config::validate`]; one that does not
    /// parse is left out.
    pub fn brokers(&self) -> Vec<(String, u16)> {
        if self.hosts.is_empty() {
            return vec![(self.host.clone(), self.port)];
        }
        self.hosts
            .iter()
            .filter_map(|e| parse_broker(e, self.port).ok())
            .collect()
    }
}

/// `name`, `name:port`, `[v6]` or `[v6]:port`.
fn parse_broker(entry: &str, default_port: u16) -> Result<(String, u16), String> {
    let bad = |why: &str| {
        format!(
            "entry `{}` {why}: write `name:port` or `name`",
            printable(entry.to_owned())
        )
    };
    let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("has no closing `]`"))?;
        match after.strip_prefix(':') {
            Some(p) => (v6, Some(p)),
            None if after.is_empty() => (v6, None),
            None => return Err(bad("has text after `]`")),
        }
    } else {
        match entry.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (entry, None),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(bad("has no host name"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad("has a port that is not 1 to 65535"))?,
        None => default_port,
    };
    Ok((host.to_owned(), port))
}

/// The payload encoding of `readings` and `alerts` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Json,
    Cbor,
}

pub(crate) mod defaults {
    pub fn log_level() -> String {
        "info".into()
    }
    pub fn baud_rate() -> u32 {
        115_200
    }
    pub fn device_alarm_secs() -> u64 {
        3600
    }
    pub fn silence_alarm_secs() -> u64 {
        900
    }
    pub fn encrypt() -> bool {
        true
    }
    pub fn retention_days() -> u32 {
        30
    }
    pub fn max_size_mb() -> f64 {
        1024.0
    }
    pub fn mqtt_port() -> u16 {
        8883
    }
    pub fn topic_prefix() -> String {
        "hearth/v1".into()
    }
    pub fn keep_alive_secs() -> u16 {
        30
    }
    pub fn heartbeat_secs() -> u64 {
        60
    }
    pub fn max_inflight() -> u16 {
        10
    }
    pub fn qos() -> u8 {
        2
    }
    /// 30 days: longer than any outage the store is sized for.
    pub fn session_expiry_secs() -> u32 {
        30 * 24 * 3600
    }
    pub fn batch_max_readings() -> usize {
        64
    }
    pub fn reconnect_min_ms() -> u64 {
        500
    }
    pub fn reconnect_max_secs() -> u64 {
        60
    }
}

/// A commented default configuration (`hearth config default`).
pub const DEFAULT_TOML: &str = include_str!("../systemd/hearth.toml");

/// True for ids that are safe in topics, reading ids and file names.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Config {
    /// Reads, parses and validates the file; file checks included.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        config.source = path.to_owned();
        config.validate()?;
        Ok(config)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: printable(describe_toml_error(text, &e)),
        })
    }

    fn invalid(&self, key: &'static str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.clone(),
            key,
            problem: printable(problem.into()),
        }
    }

    /// Checks values and files. The serial port may be absent (unplugged):
    /// that is a runtime state the reader waits out, not a config error.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !valid_id(&self.gateway_id) {
            return Err(self.invalid(
                "gateway_id",
                format!("is `{}`: use 1 to 64 of A-Z a-z 0-9 - _ .", self.gateway_id),
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(self.invalid(
                "log_level",
                format!("is `{}`: use error, warn, info or debug", self.log_level),
            ));
        }
        if self.serial.port.as_os_str().is_empty() {
            return Err(self.invalid(
                "serial.port",
                "is empty: name the device, e.g. /dev/ttyUSB0",
            ));
        }
        if self.serial.baud_rate == 0 {
            return Err(self.invalid("serial.baud_rate", "must be above 0"));
        }
        if self.serial.device_alarm_secs == 0 {
            return Err(self.invalid("serial.device_alarm_secs", "must be at least 1"));
        }
        if self.serial.silence_alarm_secs == 0 {
            return Err(self.invalid("serial.silence_alarm_secs", "must be at least 1"));
        }
        let dir = match self.store.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(self.invalid(
                "store.path",
                format!(
                    "is in `{}`, which is not a folder: create it",
                    dir.display()
                ),
            ));
        }
        if !(self.store.max_size_mb.is_finite() && self.store.max_size_mb >= 0.125) {
            return Err(self.invalid(
                "store.max_size_mb",
                format!(
                    "is {}: use at least 0.125 (128 KiB)",
                    self.store.max_size_mb
                ),
            ));
        }
        if let Some(file) = &self.store.key_file {
            if !self.store.encrypt {
                return Err(self.invalid(
                    "store.key_file",
                    "is set, but `store.encrypt = false` keeps the store in plaintext: remove one of the two",
                ));
            }
            if let Err(e) = crate::outbox::key::Key::read_file(file) {
                return Err(
                    self.invalid("store.key_file", format!("is unusable: {}", one_line(&e)))
                );
            }
        }
        if self.mqtt.host.is_empty() && self.mqtt.hosts.is_empty() {
            return Err(self.invalid(
                "mqtt.host",
                "is empty: name the hospital's broker (or list brokers in `mqtt.hosts`)",
            ));
        }
        if self.mqtt.port == 0 {
            return Err(self.invalid("mqtt.port", "must be above 0"));
        }
        for entry in &self.mqtt.hosts {
            if let Err(problem) = parse_broker(entry, self.mqtt.port) {
                return Err(self.invalid("mqtt.hosts", problem));
            }
        }
        let prefix = &self.mqtt.topic_prefix;
        if prefix.is_empty()
            || prefix.starts_with('/')
            || prefix.ends_with('/')
            || prefix.contains(['+', '#', '\0'])
        {
            return Err(self.invalid(
                "mqtt.topic_prefix",
                format!("is `{prefix}`: use levels like `hearth/v1`, no wildcards, no leading or trailing `/`"),
            ));
        }
        if self.mqtt.keep_alive_secs < 5 {
            return Err(self.invalid("mqtt.keep_alive_secs", "must be at least 5"));
        }
        if self.mqtt.heartbeat_secs == 0 {
            return Err(self.invalid("mqtt.heartbeat_secs", "must be at least 1"));
        }
        if !(2..=1024).contains(&self.mqtt.max_inflight) {
            return Err(self.invalid("mqtt.max_inflight", "must be between 2 and 1024"));
        }
        if !(1..=2).contains(&self.mqtt.qos) {
            return Err(self.invalid(
                "mqtt.qos",
                "must be 2 (exactly once) or 1 (at least once, for brokers without QoS 2)",
            ));
        }
        if self.mqtt.will_delay_secs > self.mqtt.session_expiry_secs {
            return Err(self.invalid(
                "mqtt.will_delay_secs",
                "must not exceed `mqtt.session_expiry_secs` (the broker sends the will when the session ends)",
            ));
        }
        if !(1..=1000).contains(&self.mqtt.batch_max_readings) {
            return Err(self.invalid("mqtt.batch_max_readings", "must be between 1 and 1000"));
        }
        if self.mqtt.reconnect_min_ms == 0 || self.mqtt.reconnect_max_secs == 0 {
            return Err(self.invalid(
                "mqtt.reconnect_min_ms",
                "and `mqtt.reconnect_max_secs` must be above 0",
            ));
        }
        self.check_readable("mqtt.ca_file", &self.mqtt.ca_file)?;
        self.check_readable("mqtt.cert_file", &self.mqtt.cert_file)?;
        self.check_readable("mqtt.key_file", &self.mqtt.key_file)?;
        if let Some(crl) = &self.mqtt.crl_file {
            self.check_readable("mqtt.crl_file", crl)?;
        }
        // Everything the handshake will use, as `hearth run` loads it: a
        // client certificate rustls would refuse (an X.509 v1 one) or a CRL
        // it cannot parse is found here, naming its key.
        if let Err(e) = crate::mqtt::tls::TlsSource::load(&self.mqtt) {
            return Err(self.invalid(e.key(), format!("is unusable: {}", one_line(&e))));
        }
        let mode = std::fs::metadata(&self.mqtt.key_file)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        if mode & 0o077 != 0 {
            return Err(self.invalid(
                "mqtt.key_file",
                format!(
                    "names `{}`, which others can read (mode {:o}): run `chmod 600` on it",
                    self.mqtt.key_file.display(),
                    mode & 0o777
                ),
            ));
        }
        Ok(())
    }

    fn check_readable(&self, key: &'static str, path: &Path) -> Result<(), ConfigError> {
        std::fs::File::open(path).map(drop).map_err(|e| {
            self.invalid(
                key,
                format!(
                    "names `{}`, which cannot be read: {}",
                    path.display(),
                    one_line(&e)
                ),
            )
        })
    }

    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.mqtt.keep_alive_secs.into())
    }

    pub fn topic(&self, leaf: &str) -> String {
        format!("{}/{}/{}", self.mqtt.topic_prefix, self.gateway_id, leaf)
    }
}

/// toml's own message spans several lines with a caret drawing; this names
/// the key (`table.key`) and the line instead, on one line.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = one_line(&e.message());
    let Some(span) = e.span() else {
        return message;
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    let table = before
        .lines()
        .rev()
        .skip(1)
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    if line.starts_with('[') {
        let t = line.trim_matches(|c| c == '[' || c == ']').trim();
        return format!("table `{t}` (line {line_no}): {message}");
    }
    match line.split_once('=') {
        Some((key, _)) if !key.trim().is_empty() => {
            let key = key.trim();
            let full = match table {
                Some(t) => format!("{t}.{key}"),
                None => key.to_owned(),
            };
            format!("key `{full}` (line {line_no}): {message}")
        }
        _ => format!("line {line_no}: {message}"),
    }
}

/// `s` with its control characters escaped (`\n`, `\u{1b}`): a value quoted
/// in a message (a `gateway_id` of `"gw\n0001"`) keeps it on one line and
/// cannot drive the terminal. Found by the fuzzer (`tests/fuzz`).
fn printable(s: String) -> String {
    if !s.contains(char::is_control) {
        return s;
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// An error's message folded onto one line.
pub fn one_line(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    let mut out = String::with_capacity(s.len());
    for part in s.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // Skip toml's source excerpt lines ("1 | foo", "  |   ^").
        if part.starts_with('|')
            || part.chars().next().is_some_and(|c| c.is_ascii_digit()) && part.contains(" | ")
        {
            continue;
        }
        if !out.is_empty() {
            out.push_str("; ");
        }
        out.push_str(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses() {
        let c = Config::parse(DEFAULT_TOML, Path::new("default.toml")).unwrap();
        assert_eq!(c.mqtt.topic_prefix, "hearth/v1");
        assert_eq!(c.store.retention_days, 30);
    }

    #[test]
    fn a_quoted_value_with_a_newline_keeps_the_message_on_one_line() {
        let text = DEFAULT_TOML.replace(r#""gw-0001""#, r#""gw\n0001\u001b[2J""#);
        let config = Config::parse(&text, Path::new("x.toml")).unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.ends_with(
                r"key `gateway_id` is `gw\n0001\u{1b}[2J`: use 1 to 64 of A-Z a-z 0-9 - _ ."
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let text = DEFAULT_TOML.replace("[store]", "[store]\nretention = 3");
        let err = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("retention"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn the_mqtt_defaults_and_brokers() {
        let c = Config::parse(DEFAULT_TOML, Path::new("d.toml")).unwrap();
        assert_eq!(c.mqtt.protocol, crate::mqtt::wire::Protocol::V5);
        assert_eq!((c.mqtt.qos, c.mqtt.will_delay_secs), (2, 0));
        assert_eq!(c.mqtt.session_expiry_secs, 2_592_000);
        assert_eq!(c.mqtt.encoding, Encoding::Json);
        assert_eq!(
            c.mqtt.brokers(),
            [("mqtt.hospital.example".to_owned(), 8883)]
        );
        let text = DEFAULT_TOML.replace("/var/lib/hearth/", "/tmp/").replace(
            "[mqtt]\n",
            "[mqtt]\nhosts = [\"a.example:1883\", \"b.example\", \"[::1]:9\", \"[fe80::1]\"]\nprotocol = \"3.1.1\"\nqos = 1\nencoding = \"cbor\"\n",
        );
        let c = Config::parse(&text, Path::new("x.toml")).unwrap();
        // Past every `[mqtt]` check; only the certificate files are missing.
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("`mqtt.ca_file`"), "{err}");
        assert_eq!(
            c.mqtt.brokers(),
            [
                ("a.example".to_owned(), 1883),
                ("b.example".to_owned(), 8883),
                ("::1".to_owned(), 9),
                ("fe80::1".to_owned(), 8883),
            ]
        );
        assert_eq!(c.mqtt.protocol, crate::mqtt::wire::Protocol::V311);
    }

    #[test]
    fn bad_mqtt_settings_are_named() {
        for (line, key) in [
            ("hosts = [\"a.example:0\"]", "mqtt.hosts"),
            ("hosts = [\"a.example:x\"]", "mqtt.hosts"),
            ("hosts = [\"[::1\"]", "mqtt.hosts"),
            ("qos = 0", "mqtt.qos"),
            ("qos = 3", "mqtt.qos"),
            (
                "will_delay_secs = 99\nsession_expiry_secs = 10",
                "mqtt.will_delay_secs",
            ),
        ] {
            let text = DEFAULT_TOML
                .replace("/var/lib/hearth/", "/tmp/")
                .replace("[mqtt]\n", &format!("[mqtt]\n{line}\n"));
            let err = Config::parse(&text, Path::new("x.toml"))
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("`{key}`")), "{line}: {err}");
        }
        let text = DEFAULT_TOML.replace("[mqtt]\n", "[mqtt]\nprotocol = \"4\"\n");
        let err = Config::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("protocol"), "{err}");
    }
}
