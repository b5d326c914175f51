//! The service manager's side of hearth (src/watchdog.rs): READY=1,
//! EXTEND_TIMEOUT_USEC while the store is checked, STATUS= lines, and
//! WATCHDOG=1 only while every task shows progress.
//!
//! The test plays systemd's part of the notify protocol: a real unix
//! datagram socket named in NOTIFY_SOCKET, with WATCHDOG_USEC set as systemd
//! sets it. A hang is the one fake: `HEARTH_TEST_FAILPOINT=TASK-freezes:N`
//! stops that task for good at its Nth beat (a real hang cannot be aimed).
//! tests/system/ repeats the frozen-task case under a real systemd, which
//! then restarts hearth.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{GatewayOpts, Hearth, Rig, Sim};

/// `WATCHDOG_USEC` as systemd would set it for `WatchdogSec=2s`.
const WATCHDOG_USEC: &str = "2000000";

/// A notify socket: what hearth tells its service manager, with arrival times.
struct Notified {
    sock: UnixDatagram,
    seen: Vec<(Instant, String)>,
}

impl Notified {
    fn bind(path: &Path) -> Notified {
        let sock = UnixDatagram::bind(path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Notified {
            sock,
            seen: Vec::new(),
        }
    }

    /// Takes what arrived so far; each datagram may carry several lines.
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            for line in text.lines() {
                self.seen.push((Instant::now(), line.to_owned()));
            }
        }
    }

    /// Waits until a line starting with `prefix` arrived; returns it.
    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, line)) = self.seen.iter().find(|(_, l)| l.starts_with(prefix)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no `{prefix}` within {timeout:?}; got {:?}",
                self.lines()
            );
            self.drain();
        }
    }

    fn lines(&self) -> Vec<&str> {
        self.seen.iter().map(|(_, l)| l.as_str()).collect()
    }

    fn last_ping(&self) -> Option<Instant> {
        self.seen
            .iter()
            .rev()
            .find(|(_, l)| l == "WATCHDOG=1")
            .map(|(t, _)| *t)
    }

    /// Receives for `period`; returns the longest time without a ping in
    /// it, counted from the last ping before it.
    fn longest_silence(&mut self, period: Duration) -> Duration {
        let start = Instant::now();
        let mut last = self.last_ping().unwrap_or(start);
        let mut longest = Duration::ZERO;
        while start.elapsed() < period {
            let before = self.seen.len();
            self.drain();
            for (t, line) in &self.seen[before..] {
                if line == "WATCHDOG=1" {
                    longest = longest.max(t.duration_since(last));
                    last = *t;
                }
            }
        }
        longest.max(last.elapsed())
    }
}

fn start(rig: &Rig, id: &str, serial: &Path, failpoint: Option<&str>) -> (Hearth, Notified) {
    let gw = GatewayOpts::new(id);
    let config = rig.config(&gw, serial);
    let socket = rig.dir.join(format!("{id}.notify"));
    let notified = Notified::bind(&socket);
    let socket = socket.display().to_string();
    let mut env = vec![
        ("NOTIFY_SOCKET", socket.as_str()),
        ("WATCHDOG_USEC", WATCHDOG_USEC),
    ];
    if let Some(f) = failpoint {
        env.push(("HEARTH_TEST_FAILPOINT", f));
    }
    (Hearth::start_with_env(&config, &env), notified)
}

/// A task frozen for good: the pings stop while the process lives on.
fn frozen(task: &str) {
    let rig = Rig::new(&format!("gw-wd-{task}"));
    // Readings keep coming, so the reader and the publisher have work.
    let sim = Sim::start(&["--count", "100000", "--interval-ms", "100"]);
    let failpoint = format!("{task}-freezes:4");
    let (mut hearth, mut notified) =
        start(&rig, &format!("gw-wd-{task}"), &sim.pty, Some(&failpoint));
    notified.wait_line("READY=1", Duration::from_secs(20));
    notified.wait_line("WATCHDOG=1", Duration::from_secs(20));
    hearth.wait_log_count("Failpoint: freezing", 1, Duration::from_secs(30));
    // The frozen task's promise runs out within WINDOW (5 s): after that,
    // silence. Wait for the pings to stop (bounded), then watch a silence
    // longer than any healthy gap.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        notified.drain();
        let last = notified.last_ping().expect("pinged before the freeze");
        if last.elapsed() >= Duration::from_secs(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pings went on 20 s after `{task}` froze"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let silence = notified.longest_silence(Duration::from_secs(6));
    assert!(
        silence >= Duration::from_secs(8),
        "`{task}` is frozen, yet a WATCHDOG=1 came after {silence:?} of silence"
    );
    hearth.wait_log_count(
        "shows no progress; watchdog pings stopped",
        1,
        Duration::ZERO,
    );
    assert!(
        hearth.running(),
        "the watchdog itself must not end hearth: systemd does"
    );
}

#[test]
fn a_frozen_serial_reader_stops_the_pings() {
    frozen("reader");
}

#[test]
fn a_frozen_publisher_stops_the_pings() {
    frozen("publisher");
}

#[test]
fn a_frozen_store_thread_stops_the_pings() {
    frozen("store");
}

/// An outage is no hang: with the broker down and the serial port
/// unplugged, every task waits for a real reason and the pings go on.
#[test]
fn an_outage_does_not_stop_the_pings() {
    let mut rig = Rig::new("gw-wd-outage");
    rig.broker.stop();
    let unplugged = rig.dir.join("ttyUSB-unplugged");
    let (hearth, mut notified) = start(&rig, "gw-wd-outage", &unplugged, None);
    notified.wait_line("READY=1", Duration::from_secs(20));
    notified.wait_line("WATCHDOG=1", Duration::from_secs(20));
    // WatchdogSec=2s: hearth pings every 0.5 s. Over 12 s of outage (the
    // reconnect backoff and the port's reopen delay both reach their caps)
    // no gap may come near the period.
    let silence = notified.longest_silence(Duration::from_secs(12));
    assert!(
        silence < Duration::from_millis(1500),
        "a gap of {silence:?} between pings during an outage"
    );
    let log = hearth.log_text();
    assert!(
        !log.contains("shows no progress"),
        "an outage was taken for a hang:\n{log}"
    );
}

/// Start-up talks to systemd in order: more time while the store is
/// checked, then READY=1, then STATUS= with the links and the backlog.
#[test]
fn start_extends_the_timeout_then_reports_ready_and_status() {
    let rig = Rig::new("gw-wd-start");
    let sim = Sim::start(&["--count", "20", "--interval-ms", "10"]);
    let (_hearth, mut notified) = start(&rig, "gw-wd-start", &sim.pty, None);
    notified.wait_line("READY=1", Duration::from_secs(20));
    let status = notified.wait_line("STATUS=broker", Duration::from_secs(20));
    assert!(status.contains("backlog"), "{status}");
    let lines = notified.lines();
    let extend = lines
        .iter()
        .position(|l| l.starts_with("EXTEND_TIMEOUT_USEC="))
        .unwrap_or_else(|| panic!("no EXTEND_TIMEOUT_USEC: {lines:?}"));
    let ready = lines.iter().position(|l| *l == "READY=1").unwrap();
    assert!(extend < ready, "EXTEND_TIMEOUT_USEC after READY: {lines:?}");
}
