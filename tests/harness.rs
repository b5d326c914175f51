//! The hearth side of the integration tests: the real `hearth` binary run
//! as `hearth run` and `hearth simulate`, with configs written per test.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hearth::certs::DevCerts;
use serde_json::Value;

use crate::support::{self, Mosquitto, TestDir, hearth_bin};

/// A test's world: a temp dir, certificates and a running mosquitto.
pub struct Rig {
    pub certs: DevCerts,
    pub broker: Mosquitto,
    pub dir: TestDir,
}

impl Rig {
    pub fn new(gateway_id: &str) -> Rig {
        let dir = TestDir::new();
        let certs = DevCerts::generate(&dir.subdir("certs"), gateway_id).expect("dev certs");
        let broker = Mosquitto::start(&dir.subdir("broker"), &certs);
        Rig { certs, broker, dir }
    }

    /// A config file for a gateway on `serial` talking to `mqtt_port`
    /// (the broker's own port unless a proxy sits between).
    pub fn config(&self, gw: &GatewayOpts, serial: &Path) -> PathBuf {
        let path = self.dir.join(format!("{}.toml", gw.id));
        let text = format!(
            r#"gateway_id = "{id}"
log_level = "info,hearth=debug"
[serial]
port = "{serial}"
[store]
path = "{db}"
max_size_mb = {max_size_mb}
[mqtt]
host = "127.0.0.1"
port = {port}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
keep_alive_secs = {keep_alive}
heartbeat_secs = {heartbeat}
max_inflight = {inflight}
batch_max_readings = {batch}
reconnect_min_ms = 100
reconnect_max_secs = 2
{protocol}"#,
            id = gw.id,
            serial = serial.display(),
            db = self.db(gw).display(),
            max_size_mb = gw.max_size_mb,
            port = gw.mqtt_port.unwrap_or(self.broker.port),
            ca = self.certs.ca_cert.display(),
            cert = self.certs.gateway_cert.display(),
            key = self.certs.gateway_key.display(),
            keep_alive = gw.keep_alive,
            heartbeat = gw.heartbeat,
            inflight = gw.max_inflight,
            batch = gw.batch,
            // `HEARTH_TEST_PROTOCOL=3.1.1` runs a test under MQTT 3.1.1.
            protocol = std::env::var("HEARTH_TEST_PROTOCOL")
                .map(|p| format!("protocol = \"{p}\"\n"))
                .unwrap_or_default(),
        );
        std::fs::write(&path, text).expect("write config");
        path
    }

    pub fn db(&self, gw: &GatewayOpts) -> PathBuf {
        self.dir.join(format!("{}.db", gw.id))
    }
}

#[derive(Debug, Clone)]
pub struct GatewayOpts {
    pub id: String,
    pub mqtt_port: Option<u16>,
    pub keep_alive: u16,
    pub heartbeat: u64,
    pub max_inflight: u16,
    pub batch: usize,
    pub max_size_mb: f64,
}

impl GatewayOpts {
    pub fn new(id: &str) -> GatewayOpts {
        GatewayOpts {
            id: id.into(),
            mqtt_port: None,
            keep_alive: 5,
            heartbeat: 60,
            max_inflight: 16,
            batch: 32,
            max_size_mb: 64.0,
        }
    }
}

/// A running `hearth run`; killed on drop. Its stderr goes to a log file
/// that survives restarts (appended).
pub struct Hearth {
    child: Option<Child>,
    pub log: PathBuf,
    config: PathBuf,
    /// Extra environment for the next spawn only (e.g. a failpoint).
    env: Vec<(String, String)>,
}

impl Hearth {
    pub fn start(config: &Path) -> Hearth {
        Self::start_with_env(config, &[])
    }

    /// Starts with extra environment variables, for this first run only.
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Hearth {
        let log = config.with_extension("log");
        let mut h = Hearth {
            child: None,
            log,
            config: config.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        h.spawn();
        h
    }

    /// Waits (bounded) for the process to end by itself, e.g. at a failpoint.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("hearth is running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait().expect("wait hearth") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "hearth did not exit within {timeout:?}\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open hearth log");
        let child = Command::new(hearth_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .envs(std::mem::take(&mut self.env))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn hearth run");
        self.child = Some(child);
    }

    /// Whether the process is still alive (not exited, not reaped).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("hearth is running").id()
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            support::sigkill(c.id());
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded) for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("hearth is running");
        support::sigterm(c.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().expect("wait hearth") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "hearth did not stop within 20 s of SIGTERM\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self) {
        self.restart_with_env(&[]);
    }

    /// Restarts with extra environment variables, for this run only.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "hearth is still running");
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle` `n` times.
    pub fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) {
        support::wait_for(
            timeout,
            &format!("{n} x `{needle}` in hearth's log"),
            || (self.log_text().matches(needle).count() >= n).then_some(()),
        );
    }
}

impl Drop for Hearth {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running `hearth simulate --pty`; killed on drop.
pub struct Sim {
    child: Option<Child>,
    /// A link to the simulator's `/dev/pts/N`, for the gateway's config. It
    /// goes when the simulator ends: the kernel hands `N` to the next pty,
    /// perhaps another test's, and a gateway still reopening this path must
    /// not grab that one (it would take its frames and its exclusive lock).
    pub pty: PathBuf,
    /// Holds the link.
    link_dir: tempfile::TempDir,
    lines: mpsc::Receiver<String>,
    /// An open fd on the pty's slave, closed only after the link is gone:
    /// while it is open the kernel cannot free `N`, so the link never
    /// points to another test's pty. (Tests run as root, for whom the
    /// gateway's TIOCEXCL is no bar: two gateways could share one pty.)
    _hold: Option<std::fs::File>,
}

/// Opens a pty's slave without reading it and without making it a
/// controlling terminal: held only so that its number stays taken.
pub fn hold_pty(path: &Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .unwrap_or_else(|e| panic!("hold the pty `{}`: {e}", path.display()))
}

impl Sim {
    /// Starts the simulator on a new pty with extra `args`; returns once it
    /// printed the pty's path.
    pub fn start(args: &[&str]) -> Sim {
        let mut child = Command::new(hearth_bin())
            .args(["simulate", "--pty", "--json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn hearth simulate");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        let link_dir = tempfile::Builder::new()
            .prefix("hearth-sim-")
            .tempdir()
            .expect("a folder for the pty link");
        let pty = link_dir.path().join("tty");
        let link = pty.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
            // The simulator has ended and its pty number is free again.
            let _ = std::fs::remove_file(&link);
        });
        let first = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("the simulator printed no pty path");
        let target: PathBuf = first
            .strip_prefix("pty: ")
            .unwrap_or_else(|| panic!("unexpected first line from the simulator: {first}"))
            .into();
        let hold = hold_pty(&target);
        std::os::unix::fs::symlink(&target, &pty).expect("link to the pty");
        Sim {
            child: Some(child),
            pty,
            link_dir,
            lines,
            _hold: Some(hold),
        }
    }

    /// Waits for the simulator to finish; returns its JSON summary.
    pub fn finish(mut self, timeout: Duration) -> Value {
        let line = self
            .lines
            .recv_timeout(timeout)
            .unwrap_or_else(|_| panic!("the simulator did not finish within {timeout:?}"));
        let status = self
            .child
            .take()
            .expect("running")
            .wait()
            .expect("wait simulator");
        assert!(status.success(), "simulator failed: {status}");
        // The link goes before the pty's number is let go.
        let _ = std::fs::remove_file(&self.pty);
        self._hold = None;
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad summary `{line}`: {e}"))
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pty);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Only now may the pty's number be handed out again.
        self._hold = None;
    }
}

/// A connection to a gateway's store behind hearth's back, keyed with the
/// key `hearth run` made beside it (`{db}.key`): the one way the tests read
/// a store directly.
pub fn open_db(db: &Path) -> rusqlite::Connection {
    open_db_with(db, rusqlite::OpenFlags::default())
}

/// [`open_db`] with these open flags (e.g. read-only).
pub fn open_db_with(db: &Path, flags: rusqlite::OpenFlags) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open_with_flags(db, flags).expect("open the store");
    let key = hearth::outbox::key::Key::read_file(&key_of(db)).expect("read the store's key");
    hearth::outbox::cipher::unlock(&conn, &key).expect("unlock the store with its key");
    conn
}

/// Where `hearth run` keeps a store's key when none is configured.
pub fn key_of(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(".key");
    s.into()
}

/// Runs `hearth ARGS`; returns (exit code, stdout, stderr).
pub fn hearth(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(hearth_bin())
        .args(args)
        .env_remove("HEARTH_CONFIG")
        .output()
        .expect("run hearth");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `hearth status --format json` for `config`: exit code (0 healthy, 1
/// needs attention: the view is printed either way), view, stderr.
pub fn status_json(config: &Path) -> (i32, Value, String) {
    let (code, out, err) = hearth(&[
        "status",
        "--format",
        "json",
        "--config",
        config.to_str().unwrap(),
    ]);
    let view = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("no status view (exit {code}, {e}): {err}\n{out}"));
    (code, view, err)
}

/// The status view whether or not something needs attention (an alarm a
/// test raises on purpose); any other exit fails the test.
pub fn status_view(config: &Path) -> Value {
    let (code, view, err) = status_json(config);
    assert!(code == 0 || code == 1, "hearth status failed: {err}");
    view
}

/// `hearth readings list --format json` for `config`.
pub fn readings(config: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["readings", "list", "--format", "json", "--config"];
    let c = config.to_str().expect("utf-8 path");
    args.push(c);
    args.extend_from_slice(extra);
    let (code, out, err) = hearth(&args);
    assert_eq!(code, 0, "readings list failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from readings list: {e}\n{out}"))
}

/// The reading ids in a `readings`/`alerts` payload.
pub fn ids(payload: &Value) -> Vec<String> {
    payload["readings"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}
