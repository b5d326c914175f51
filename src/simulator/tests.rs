//! The simulator against a real pty, with a fake gateway on the slave end.
//!
//! The gateway here is a fake on purpose: it answers by a per-test script
//! (NAK this, BUSY that) to produce the answers a real gateway gives rarely.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serialport::SerialPort;

use super::{Faults, PortSpec, SimulatorError, SimulatorOptions, Summary, run};
use crate::serial::frame::{Decoded, Decoder, Frame, MAX_FRAME_LEN};

const DEVICE: &str = "PM-000001";
/// A test that has not finished by then has hung.
const DEADLINE: Duration = Duration::from_secs(20);

struct Simulation {
    slave_path: String,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Summary, SimulatorError>>,
}

impl Simulation {
    fn start(opts: SimulatorOptions) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let handle = thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut on_ready = |path: &str| tx.send(path.to_owned()).unwrap();
                run(PortSpec::Pty, &opts, &mut on_ready, &stop)
            }
        });
        let slave_path = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Simulation {
            slave_path,
            stop,
            handle,
        }
    }

    fn finished(&self) -> bool {
        self.handle.is_finished()
    }

    fn summary(self) -> Summary {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap().unwrap()
    }
}

/// What the fake gateway saw, by seq: every copy of each valid reading frame.
#[derive(Default)]
struct Seen {
    copies: BTreeMap<u32, Vec<(Instant, Vec<u8>)>>,
    acked: BTreeSet<u32>,
    rejected: usize,
}

impl Seen {
    fn times_received(&self, seq: u32) -> usize {
        self.copies.get(&seq).map_or(0, Vec::len)
    }

    /// Every copy of a seq is the same frame: resends are never damaged copies.
    fn assert_resends_identical(&self) {
        for (seq, copies) in &self.copies {
            assert!(
                copies.iter().all(|(_, f)| *f == copies[0].1),
                "seq {seq} arrived with different content"
            );
        }
    }
}

/// Opens the slave as a gateway would.
fn open_slave(path: &str) -> Box<dyn SerialPort> {
    serialport::new(path, 115_200)
        .timeout(Duration::from_millis(20))
        .open()
        .unwrap()
}

fn ack(seq: u32) -> Frame {
    Frame::Ack {
        device_id: DEVICE.to_owned(),
        epoch: None,
        seq,
    }
}

/// Serves until `done(seen)` or the simulator hangs up (it closes the master
/// as soon as it has its last ACK), answering each decoded item with `answer`.
fn serve(
    port: &mut dyn SerialPort,
    seen: &mut Seen,
    done: &dyn Fn(&Seen) -> bool,
    answer: &mut dyn FnMut(&Decoded, &Seen) -> Vec<Frame>,
) {
    let started = Instant::now();
    let mut decoder = Decoder::new();
    let mut buf = [0u8; MAX_FRAME_LEN];
    while !done(seen) {
        assert!(started.elapsed() < DEADLINE, "the simulation hung");
        let n = match port.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return,
            Err(e) => panic!("gateway read failed: {e}"),
        };
        decoder.extend(&buf[..n]);
        while let Some(decoded) = decoder.next() {
            match &decoded {
                Decoded::Frame(Frame::Reading(r)) => {
                    let frame = Frame::Reading(r.clone()).encode();
                    let copies = seen.copies.entry(r.seq).or_default();
                    copies.push((Instant::now(), frame));
                }
                Decoded::Frame(other) => panic!("a device sent {other:?}"),
                Decoded::Rejected(_) => seen.rejected += 1,
            }
            for reply in answer(&decoded, seen) {
                // Decoy ACKs (another device, an unknown seq) are not recorded.
                if let Frame::Ack { device_id, seq, .. } = &reply
                    && device_id == DEVICE
                    && seen.copies.contains_key(seq)
                {
                    seen.acked.insert(*seq);
                }
                if port.write_all(&reply.encode()).is_err() {
                    return; // Hung up: the next read says so too.
                }
            }
        }
    }
}

/// ACKs every valid reading and NAKs (without a seq) every rejected run.
fn honest(decoded: &Decoded, _: &Seen) -> Vec<Frame> {
    match decoded {
        Decoded::Frame(Frame::Reading(r)) => vec![ack(r.seq)],
        Decoded::Rejected(rejected) => vec![Frame::Nak {
            device_id: None,
            epoch: None,
            seq: None,
            reason: rejected.reason.code().to_owned(),
        }],
        Decoded::Frame(_) => vec![],
    }
}

fn options(count: u64) -> SimulatorOptions {
    SimulatorOptions {
        count,
        interval: Duration::ZERO,
        seed: 7,
        ack_timeout: Duration::from_millis(200),
        ..SimulatorOptions::default()
    }
}

fn assert_all_acked(summary: &Summary, seen: &Seen, count: u64) {
    assert_eq!(summary.acked, count);
    assert_eq!(summary.sent, count);
    let expected: BTreeSet<u32> = (1..=u32::try_from(count).unwrap()).collect();
    assert_eq!(seen.acked, expected);
    let received: BTreeSet<u32> = seen.copies.keys().copied().collect();
    assert_eq!(received, expected, "seqs are not consecutive from 1");
    seen.assert_resends_identical();
}

#[test]
fn nak_naming_a_seq_gets_it_resent_at_once() {
    // A long timeout: only the NAK can explain a quick resend.
    let opts = SimulatorOptions {
        ack_timeout: Duration::from_secs(10),
        ..options(20)
    };
    let sim = Simulation::start(opts);
    let mut port = open_slave(&sim.slave_path);
    let mut seen = Seen::default();
    let mut answer = |decoded: &Decoded, seen: &Seen| match decoded {
        Decoded::Frame(Frame::Reading(r)) if r.seq == 1 && seen.times_received(1) == 1 => {
            // Answers that must not release the frame, then the NAK.
            vec![
                Frame::Ack {
                    device_id: "PM-999999".to_owned(),
                    epoch: None,
                    seq: r.seq,
                },
                ack(r.seq + 1_000_000),
                Frame::Busy {
                    device_id: "PM-999999".to_owned(),
                    epoch: None,
                    seq: r.seq,
                },
                Frame::Nak {
                    device_id: Some(DEVICE.to_owned()),
                    epoch: None,
                    seq: Some(r.seq),
                    reason: "checksum".to_owned(),
                },
            ]
        }
        other => honest(other, seen),
    };
    serve(&mut *port, &mut seen, &|_| sim.finished(), &mut answer);
    let summary = sim.summary();

    assert_all_acked(&summary, &seen, 20);
    assert_eq!(seen.times_received(1), 2, "the NAKed frame was not resent");
    assert_eq!((summary.naks, summary.resent, summary.busy), (1, 1, 0));
    assert!(
        summary.elapsed_ms < 5_000,
        "resent on timeout, not on the NAK"
    );
}

#[test]
fn corrupted_frames_are_recovered_without_a_gap() {
    let opts = SimulatorOptions {
        faults: Faults {
            corrupt_rate: 0.3,
            ..Faults::default()
        },
        ..options(60)
    };
    let sim = Simulation::start(opts);
    let mut port = open_slave(&sim.slave_path);
    let mut seen = Seen::default();
    serve(&mut *port, &mut seen, &|_| sim.finished(), &mut honest);
    let summary = sim.summary();

    assert_all_acked(&summary, &seen, 60);
    assert!(summary.corrupted > 0 && seen.rejected > 0);
    assert!(summary.resent >= summary.corrupted.min(1));
    assert!(summary.naks > 0);
}

#[test]
fn every_line_fault_at_once_still_delivers_every_reading() {
    let opts = SimulatorOptions {
        faults: Faults {
            corrupt_rate: 0.2,
            garbage_rate: 0.2,
            truncate_rate: 0.2,
        },
        window: 4,
        ..options(80)
    };
    let sim = Simulation::start(opts);
    let mut port = open_slave(&sim.slave_path);
    let mut seen = Seen::default();
    serve(&mut *port, &mut seen, &|_| sim.finished(), &mut honest);
    let summary = sim.summary();

    assert_all_acked(&summary, &seen, 80);
    assert!(summary.corrupted > 0 && summary.garbage > 0 && summary.truncated > 0);
}

#[test]
fn busy_frame_is_kept_and_resent_after_ack_timeout() {
    let opts = SimulatorOptions {
        ack_timeout: Duration::from_millis(300),
        ..options(10)
    };
    let sim = Simulation::start(opts);
    let mut port = open_slave(&sim.slave_path);
    let mut seen = Seen::default();
    let mut answer = |decoded: &Decoded, seen: &Seen| match decoded {
        Decoded::Frame(Frame::Reading(r)) if r.seq == 3 && seen.times_received(3) == 1 => {
            vec![Frame::Busy {
                device_id: DEVICE.to_owned(),
                epoch: None,
                seq: 3,
            }]
        }
        other => honest(other, seen),
    };
    serve(&mut *port, &mut seen, &|_| sim.finished(), &mut answer);
    let summary = sim.summary();

    assert_all_acked(&summary, &seen, 10);
    assert_eq!((summary.busy, summary.resent), (1, 1));
    let copies = &seen.copies[&3];
    assert_eq!(copies.len(), 2);
    let waited = copies[1].0 - copies[0].0;
    assert!(
        waited >= Duration::from_millis(250),
        "resent after {waited:?}"
    );
}

#[test]
fn gateway_may_close_and_reopen_the_pty_slave() {
    let sim = Simulation::start(options(30));
    let mut seen = Seen::default();
    let mut port = open_slave(&sim.slave_path);
    serve(&mut *port, &mut seen, &|s| s.acked.len() >= 10, &mut honest);
    drop(port);
    thread::sleep(Duration::from_millis(300));
    assert!(
        !sim.finished(),
        "the simulator stopped when the gateway closed"
    );
    let mut port = open_slave(&sim.slave_path);
    serve(&mut *port, &mut seen, &|_| sim.finished(), &mut honest);
    let summary = sim.summary();

    assert_all_acked(&summary, &seen, 30);
}

#[test]
fn unanswered_frames_are_kept_until_stopped() {
    let opts = SimulatorOptions {
        ack_timeout: Duration::from_millis(50),
        ..options(100)
    };
    let sim = Simulation::start(opts);
    thread::sleep(Duration::from_millis(400));
    let summary = sim.summary();

    assert_eq!(
        (summary.acked, summary.sent),
        (0, 8),
        "the window was not honoured"
    );
    assert!(summary.resent >= 8, "only {} resends", summary.resent);
}

#[test]
fn interval_paces_new_readings() {
    let opts = SimulatorOptions {
        interval: Duration::from_millis(100),
        ..options(5)
    };
    let sim = Simulation::start(opts);
    let mut port = open_slave(&sim.slave_path);
    let mut seen = Seen::default();
    serve(&mut *port, &mut seen, &|_| sim.finished(), &mut honest);
    let summary = sim.summary();

    assert_all_acked(&summary, &seen, 5);
    assert!(
        summary.elapsed_ms >= 400,
        "5 readings took {} ms",
        summary.elapsed_ms
    );
}

#[test]
fn missing_port_error_names_the_path_and_a_hint() {
    let port = PortSpec::Path(PathBuf::from("/dev/ttyUSB9"), 115_200);
    let stop = AtomicBool::new(false);
    let error = run(port, &options(1), &mut |_| {}, &stop).unwrap_err();
    assert_eq!(
        error.to_string(),
        "cannot open serial port `/dev/ttyUSB9`: No such file or directory (is the device plugged in?)"
    );
}

#[test]
fn invalid_options_are_refused_by_name() {
    let opts = SimulatorOptions {
        window: 0,
        ..options(1)
    };
    let stop = AtomicBool::new(false);
    let error = run(PortSpec::Pty, &opts, &mut |_| {}, &stop).unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid simulator option `window`: must be at least 1"
    );
}
