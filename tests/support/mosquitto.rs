//! A real mosquitto 2.0 broker, run as a child process on a free port of
//! 127.0.0.1 with mutual TLS, persistent sessions and unlimited queues.
//!
//! Everything it owns lives in the directory given to [`Mosquitto::start`]:
//! `mosquitto.conf`, `mosquitto.log` (every packet, `log_type all`),
//! `mosquitto.stderr` and the persistence file `mosquitto.db`.
//!
//! Persistence: the broker writes `mosquitto.db` when it exits on SIGTERM
//! ([`Mosquitto::stop`], [`Mosquitto::restart`]) and when asked
//! ([`Mosquitto::save`]); there is no periodic autosave. So [`Mosquitto::kill`]
//! loses everything since the last save (sessions, queued and in-flight
//! messages, retained messages): a test that means "a durable broker crashed"
//! calls `save` first, one that means "the broker lost its state" does not.
//!
//! Broker-made duplicates: mosquitto 2.0.11 restored from `mosquitto.db`
//! sends an outgoing QoS 2 message that was waiting for the subscriber's
//! PUBCOMP as a new PUBLISH (DUP=1), not as a PUBREL, so the subscriber
//! delivers it a second time. A restart or save while a message is on its
//! way to a subscriber can thus duplicate it whatever the publisher did;
//! a test that counts deliveries across a restart waits first for
//! `Received PUBCOMP from <subscriber>` ([`Mosquitto::wait_log`]).

use std::fs::{self, OpenOptions};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hearth::certs::DevCerts;

use super::{free_port, sigkill, signal, sigterm, wait_for};

/// The address the broker listens on; the server certificate names it.
pub const HOST: &str = "127.0.0.1";

/// How long the broker may take to come up or go down.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at finding a port no one else took in the meantime.
const BIND_ATTEMPTS: usize = 5;
/// The end of the line mosquitto logs once its listeners are open
/// ("mosquitto version 2.0.11 running").
const RUNNING_LINE: &str = " running";
/// The end of the line mosquitto logs when its port is taken.
const ADDRESS_IN_USE: &str = "Error: Address already in use";

pub struct Mosquitto {
    /// The TLS listener's port on [`HOST`]; kept across restarts.
    pub port: u16,
    dir: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    stderr: PathBuf,
    db: PathBuf,
    child: Option<Child>,
    /// Lines appended to the generated config (e.g. an `acl_file`).
    extra: String,
}

/// How one launch ended.
enum Launch {
    Ready,
    PortTaken,
}

impl Mosquitto {
    /// Starts a broker that keeps its files in `dir` (created if missing) and
    /// trusts clients whose certificate `certs.ca_cert` signed. Returns once
    /// it accepts TCP connections.
    #[track_caller]
    pub fn start(dir: &Path, certs: &DevCerts) -> Mosquitto {
        Self::start_with(dir, certs, "")
    }

    /// [`Mosquitto::start`] with `extra` lines in its config from the first
    /// launch (settings a SIGHUP does not reload, such as `max_packet_size`).
    #[track_caller]
    pub fn start_with(dir: &Path, certs: &DevCerts, extra: &str) -> Mosquitto {
        fs::create_dir_all(dir)
            .unwrap_or_else(|err| panic!("cannot create `{}`: {err}", dir.display()));
        let mut broker = Mosquitto {
            port: 0,
            dir: dir.to_path_buf(),
            conf: dir.join("mosquitto.conf"),
            log: dir.join("mosquitto.log"),
            stderr: dir.join("mosquitto.stderr"),
            db: dir.join("mosquitto.db"),
            child: None,
            extra: extra.to_owned(),
        };
        for _ in 0..BIND_ATTEMPTS {
            broker.port = free_port();
            broker.write_config(certs);
            if let Launch::Ready = broker.launch() {
                return broker;
            }
        }
        panic!(
            "mosquitto found no free port in {BIND_ATTEMPTS} attempts\n{}",
            broker.diagnostics()
        );
    }

    /// Starts the broker again on the same port, with the state it saved,
    /// after [`stop`](Self::stop) or [`kill`](Self::kill).
    #[track_caller]
    pub fn relaunch(&mut self) {
        assert!(self.child.is_none(), "mosquitto is already running");
        // The port was ours a moment ago; mosquitto binds with SO_REUSEADDR,
        // so only another process grabbing it in between makes this fail.
        for _ in 0..BIND_ATTEMPTS {
            if let Launch::Ready = self.launch() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "port {} was taken while mosquitto was down\n{}",
            self.port,
            self.diagnostics()
        );
    }

    /// Stops the broker with SIGTERM and waits for it to exit, so that it
    /// has written its sessions and queues to disk.
    #[track_caller]
    pub fn stop(&mut self) {
        let pid = self.pid().expect("mosquitto is not running");
        sigterm(pid);
        self.wait_exit("SIGTERM");
    }

    /// Kills the broker with SIGKILL and waits for it to be gone. State since
    /// the last save is lost (see the module comment).
    #[track_caller]
    pub fn kill(&mut self) {
        let pid = self.pid().expect("mosquitto is not running");
        sigkill(pid);
        self.wait_exit("SIGKILL");
    }

    /// A clean restart on the same port: [`stop`](Self::stop), then
    /// [`relaunch`](Self::relaunch). Connected clients see their
    /// connection closed and must reconnect.
    #[track_caller]
    pub fn restart(&mut self) {
        self.stop();
        self.relaunch();
    }

    /// Makes the running broker write its state to `mosquitto.db` now
    /// (SIGUSR1) and waits until the new file is in place, so that a
    /// following [`kill`](Self::kill) keeps it.
    #[track_caller]
    pub fn save(&self) {
        let pid = self.pid().expect("mosquitto is not running");
        // mosquitto writes `mosquitto.db.new` and renames it over the old
        // file: a new inode means the save is complete.
        let before = inode(&self.db);
        signal(pid, libc::SIGUSR1, "SIGUSR1");
        wait_for(READY_TIMEOUT, "mosquitto to save `mosquitto.db`", || {
            let now = inode(&self.db);
            (now.is_some() && now != before).then_some(())
        });
    }

    /// Appends `extra` to the config and has the running broker reload it
    /// (SIGHUP: mosquitto re-reads its ACL file, among others). The
    /// listener stays as it is.
    #[track_caller]
    pub fn reconfigure(&mut self, certs: &DevCerts, extra: &str) {
        self.extra = extra.to_owned();
        self.write_config(certs);
        let pid = self.pid().expect("mosquitto is not running");
        let reloads = self.log().matches("Reloading config").count();
        signal(pid, libc::SIGHUP, "SIGHUP");
        wait_for(READY_TIMEOUT, "mosquitto to reload its config", || {
            (self.log().matches("Reloading config").count() > reloads).then_some(())
        });
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The directory with the broker's config, log and database.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Everything mosquitto logged, across restarts.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// Waits until the log contains `needle`, e.g. `Received PUBCOMP from
    /// hospital-1 (Mid: 3` once a handshake must be over on the broker's side.
    #[track_caller]
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let what = format!("`{needle}` in the mosquitto log");
        wait_for(timeout, &what, || self.log().contains(needle).then_some(()));
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }

    fn write_config(&self, certs: &DevCerts) {
        let dir = self.dir.display();
        let config = format!(
            "# Written by tests/support/mosquitto.rs.\n\
             # Stay root when started as root (no drop to user `mosquitto`, which\n\
             # could not read the keys); no effect when started as another user.\n\
             user root\n\
             allow_anonymous false\n\
             persistence true\n\
             persistence_location {dir}/\n\
             autosave_interval 0\n\
             # 0 = no limit: nothing queued for an offline client is dropped.\n\
             max_queued_messages 0\n\
             max_queued_bytes 0\n\
             max_inflight_messages 0\n\
             set_tcp_nodelay true\n\
             log_dest file {log}\n\
             log_type all\n\
             log_timestamp_format %Y-%m-%dT%H:%M:%S\n\
             listener {port} {HOST}\n\
             cafile {ca}\n\
             certfile {cert}\n\
             keyfile {key}\n\
             require_certificate true\n\
             use_identity_as_username true\n\
             {extra}\n",
            extra = self.extra,
            log = self.log.display(),
            port = self.port,
            ca = certs.ca_cert.display(),
            cert = certs.server_cert.display(),
            key = certs.server_key.display(),
        );
        fs::write(&self.conf, config)
            .unwrap_or_else(|err| panic!("cannot write `{}`: {err}", self.conf.display()));
    }

    /// Runs `mosquitto -c` and waits until it accepts connections, or finds
    /// its port taken. Panics on any other failure.
    #[track_caller]
    fn launch(&mut self) -> Launch {
        let runs_before = count_lines_ending(&self.log(), RUNNING_LINE);
        let taken_before = count_lines_ending(&self.log(), ADDRESS_IN_USE);
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr)
            .unwrap_or_else(|err| panic!("cannot open `{}`: {err}", self.stderr.display()));
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().expect("cannot clone a file handle"))
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot run `mosquitto` (is the Debian package `mosquitto` installed?): {err}"
                )
            });
        self.child = Some(child);

        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                if count_lines_ending(&self.log(), ADDRESS_IN_USE) > taken_before {
                    return Launch::PortTaken;
                }
                panic!(
                    "mosquitto exited at start with {status}\n{}",
                    self.diagnostics()
                );
            }
            // The log line says *our* process opened the listener; the
            // connect says it accepts. Either alone could be fooled by a
            // stranger on the port or by an old log.
            if count_lines_ending(&self.log(), RUNNING_LINE) > runs_before
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return Launch::Ready;
            }
            if Instant::now() >= deadline {
                panic!(
                    "mosquitto did not accept connections on {addr} within {READY_TIMEOUT:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the signalled broker to exit and reaps it.
    #[track_caller]
    fn wait_exit(&mut self, signal: &str) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.try_wait().is_none() {
            if Instant::now() >= deadline {
                panic!(
                    "mosquitto did not exit within {READY_TIMEOUT:?} of {signal}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status if the child has exited; it is then forgotten.
    fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child
            .try_wait()
            .expect("cannot query the mosquitto process")?;
        self.child = None;
        Some(status)
    }

    fn diagnostics(&self) -> String {
        format!(
            "--- mosquitto.stderr ---\n{}\n--- last lines of `{}` ---\n{}",
            tail(&read_lossy(&self.stderr), 10),
            self.log.display(),
            self.log_tail(30)
        )
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `mosquitto` from `PATH`, or from `/usr/sbin` where Debian puts it (not
/// in a normal user's `PATH`).
fn mosquitto_bin() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("mosquitto"))
        .find(|bin| bin.is_file())
        .unwrap_or_else(|| PathBuf::from("mosquitto"))
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).ok().map(|meta| meta.ino())
}

fn read_lossy(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    }
}

fn count_lines_ending(text: &str, end: &str) -> usize {
    text.lines().filter(|line| line.ends_with(end)).count()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
