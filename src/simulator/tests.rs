//! The simulator against a real pty, with a fake gateway on the slave end.
//!
//! The gateway here is a fake on purpose: it answers by a per-test script
//! (NAK this, BUSY that, ignore the first copy of that) to produce the
//! answers a real gateway gives rarely, at the moment a test needs them.

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serialport::SerialPort;

use super::{
    Behaviour, Faults, PortSpec, SimulatorError, SimulatorOptions, Summary, run, run_with,
};
use crate::reading::{Priority, Reading};
use crate::serial::frame::{Decoded, Decoder, Frame, MAX_FRAME_LEN};

const DEVICE: &str = "PM-000001";
/// A test that has not finished by then has hung.
const DEADLINE: Duration = Duration::from_secs(20);

/// Where a reading sits: (device, epoch, seq).
type Key = (String, Option<u32>, u32);

fn key(r: &Reading) -> Key {
    (r.device_id.clone(), r.epoch, r.seq)
}

struct Simulation {
    slave_path: String,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<Summary, SimulatorError>>,
}

impl Simulation {
    fn start(opts: SimulatorOptions) -> Self {
        Self::start_with(opts, Behaviour::default())
    }

    fn start_with(opts: SimulatorOptions, behaviour: Behaviour) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let handle = thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut on_ready = |path: &str| tx.send(path.to_owned()).unwrap();
                run_with(PortSpec::Pty, &opts, &behaviour, &mut on_ready, &stop)
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

/// One valid reading frame as the fake gateway received it.
struct Arrival {
    at: Instant,
    reading: Reading,
    frame: Vec<u8>,
}

/// What the fake gateway saw and answered.
#[derive(Default)]
struct Seen {
    /// Every valid reading frame, in arrival order.
    arrivals: Vec<Arrival>,
    /// The keys it ACKed, in order, with when.
    acks: Vec<(Key, Instant)>,
    rejected: usize,
}

impl Seen {
    /// Copies of `seq` from [`DEVICE`], any epoch.
    fn copies(&self, seq: u32) -> Vec<&Arrival> {
        self.arrivals
            .iter()
            .filter(|a| a.reading.device_id == DEVICE && a.reading.seq == seq)
            .collect()
    }

    fn times_received(&self, seq: u32) -> usize {
        self.copies(seq).len()
    }

    /// The first copy of each distinct reading, in arrival order.
    fn distinct(&self) -> Vec<&Arrival> {
        let mut frames = BTreeSet::new();
        self.arrivals
            .iter()
            .filter(|a| frames.insert(a.frame.clone()))
            .collect()
    }

    fn acked(&self, key: &Key) -> bool {
        self.acks.iter().any(|(k, _)| k == key)
    }

    /// When `key` was first ACKed.
    fn acked_at(&self, key: &Key) -> Instant {
        self.acks.iter().find(|(k, _)| k == key).unwrap().1
    }

    /// Every copy of a key is the same frame: resends are never damaged
    /// copies or new readings. Only for runs without reboots.
    fn assert_resends_identical(&self) {
        for a in &self.arrivals {
            let first = self
                .arrivals
                .iter()
                .find(|b| key(&b.reading) == key(&a.reading));
            assert!(
                first.unwrap().frame == a.frame,
                "{:?} arrived with different content",
                key(&a.reading)
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

fn ack_of(r: &Reading) -> Frame {
    Frame::Ack {
        device_id: r.device_id.clone(),
        epoch: r.epoch,
        seq: r.seq,
    }
}

fn nak_of(r: &Reading, seq: u32, reason: &str) -> Frame {
    Frame::Nak {
        device_id: Some(r.device_id.clone()),
        epoch: r.epoch,
        seq: Some(seq),
        reason: reason.to_owned(),
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
                Decoded::Frame(Frame::Reading(r)) => seen.arrivals.push(Arrival {
                    at: Instant::now(),
                    reading: r.clone(),
                    frame: Frame::Reading(r.clone()).encode(),
                }),
                Decoded::Frame(other) => panic!("a device sent {other:?}"),
                Decoded::Rejected(_) => seen.rejected += 1,
            }
            for reply in answer(&decoded, seen) {
                // Decoy ACKs (another device, an unknown seq) are not recorded.
                if let Frame::Ack {
                    device_id,
                    epoch,
                    seq,
                } = &reply
                {
                    let k = (device_id.clone(), *epoch, *seq);
                    if seen.arrivals.iter().any(|a| key(&a.reading) == k) {
                        seen.acks.push((k, Instant::now()));
                    }
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
        Decoded::Frame(Frame::Reading(r)) => vec![ack_of(r)],
        Decoded::Rejected(rejected) => vec![Frame::Nak {
            device_id: None,
            epoch: None,
            seq: None,
            reason: rejected.reason.code().to_owned(),
        }],
        Decoded::Frame(_) => vec![],
    }
}

/// Serves `sim` until it is done, answering with `answer`.
fn serve_all(
    sim: Simulation,
    answer: &mut dyn FnMut(&Decoded, &Seen) -> Vec<Frame>,
) -> (Summary, Seen) {
    let mut port = open_slave(&sim.slave_path);
    let mut seen = Seen::default();
    serve(&mut *port, &mut seen, &|_| sim.finished(), answer);
    (sim.summary(), seen)
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

/// Every reading made was received and ACKed, each once as a distinct frame.
fn assert_all_acked(summary: &Summary, seen: &Seen, count: u64) {
    assert_eq!(summary.acked, count);
    assert_eq!(summary.sent, count);
    let distinct = seen.distinct();
    assert_eq!(distinct.len() as u64, count, "distinct readings received");
    for a in distinct {
        assert!(
            seen.acked(&key(&a.reading)),
            "{:?} never ACKed",
            key(&a.reading)
        );
    }
}

/// [`assert_all_acked`] for one device counting from 1 without reboots.
fn assert_all_acked_in_order(summary: &Summary, seen: &Seen, count: u64) {
    assert_all_acked(summary, seen, count);
    let expected: BTreeSet<u32> = (1..=u32::try_from(count).unwrap()).collect();
    let received: BTreeSet<u32> = seen.arrivals.iter().map(|a| a.reading.seq).collect();
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
    let mut answer = |decoded: &Decoded, seen: &Seen| match decoded {
        Decoded::Frame(Frame::Reading(r)) if r.seq == 1 && seen.times_received(1) == 1 => {
            // Answers that must not release the frame, then the NAK.
            vec![
                Frame::Ack {
                    device_id: "PM-999999".to_owned(),
                    epoch: None,
                    seq: r.seq,
                },
                Frame::Ack {
                    device_id: DEVICE.to_owned(),
                    epoch: Some(1),
                    seq: r.seq,
                },
                Frame::Ack {
                    device_id: DEVICE.to_owned(),
                    epoch: None,
                    seq: r.seq + 1_000_000,
                },
                Frame::Busy {
                    device_id: "PM-999999".to_owned(),
                    epoch: None,
                    seq: r.seq,
                },
                nak_of(r, r.seq, "checksum"),
            ]
        }
        other => honest(other, seen),
    };
    let (summary, seen) = serve_all(Simulation::start(opts), &mut answer);

    assert_all_acked_in_order(&summary, &seen, 20);
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
    let (summary, seen) = serve_all(Simulation::start(opts), &mut honest);

    assert_all_acked_in_order(&summary, &seen, 60);
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
    let (summary, seen) = serve_all(Simulation::start(opts), &mut honest);

    assert_all_acked_in_order(&summary, &seen, 80);
    assert!(summary.corrupted > 0 && summary.garbage > 0 && summary.truncated > 0);
}

#[test]
fn busy_backs_off_10_s_doubling_scaled() {
    // Scaled by 0.01: 100 ms, 200 ms, 400 ms; the resend timeout is long.
    let opts = SimulatorOptions {
        ack_timeout: Duration::from_secs(10),
        ..options(10)
    };
    let behaviour = Behaviour {
        time_scale: 0.01,
        ..Behaviour::default()
    };
    let mut answer = |decoded: &Decoded, seen: &Seen| match decoded {
        Decoded::Frame(Frame::Reading(r)) if r.seq == 3 && seen.times_received(3) <= 3 => {
            vec![Frame::Busy {
                device_id: DEVICE.to_owned(),
                epoch: None,
                seq: 3,
            }]
        }
        other => honest(other, seen),
    };
    let (summary, seen) = serve_all(Simulation::start_with(opts, behaviour), &mut answer);

    assert_all_acked_in_order(&summary, &seen, 10);
    assert_eq!((summary.busy, summary.resent), (3, 3));
    let at: Vec<Instant> = seen.copies(3).iter().map(|a| a.at).collect();
    assert_eq!(at.len(), 4);
    for (i, expected_ms) in [100, 200, 400].into_iter().enumerate() {
        let waited = at[i + 1] - at[i];
        let expected = Duration::from_millis(expected_ms);
        assert!(
            waited >= expected - Duration::from_millis(5) && waited < expected * 2,
            "BUSY {}: resent after {waited:?}, expected about {expected:?}",
            i + 1
        );
    }
}

#[test]
fn gateway_may_close_and_reopen_the_pty_slave() {
    let sim = Simulation::start(options(30));
    let mut seen = Seen::default();
    let mut port = open_slave(&sim.slave_path);
    serve(&mut *port, &mut seen, &|s| s.acks.len() >= 10, &mut honest);
    drop(port);
    thread::sleep(Duration::from_millis(300));
    assert!(
        !sim.finished(),
        "the simulator stopped when the gateway closed"
    );
    let mut port = open_slave(&sim.slave_path);
    serve(&mut *port, &mut seen, &|_| sim.finished(), &mut honest);
    let summary = sim.summary();

    assert_all_acked_in_order(&summary, &seen, 30);
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
    let (summary, seen) = serve_all(Simulation::start(opts), &mut honest);

    assert_all_acked_in_order(&summary, &seen, 5);
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
    let behaviour = Behaviour {
        time_scale: 0.0,
        ..Behaviour::default()
    };
    let error = run_with(PortSpec::Pty, &options(1), &behaviour, &mut |_| {}, &stop).unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid simulator option `time_scale`: must be a number above 0"
    );
}

#[test]
fn seq_0_can_be_the_first() {
    let opts = SimulatorOptions {
        start_seq: 0,
        ..options(5)
    };
    let (summary, seen) = serve_all(Simulation::start(opts), &mut honest);

    assert_all_acked(&summary, &seen, 5);
    let seqs: Vec<u32> = seen.arrivals.iter().map(|a| a.reading.seq).collect();
    assert_eq!(seqs, [0, 1, 2, 3, 4]);
}

/// First transmissions as (epoch, seq), in order.
fn first_sent(seen: &Seen) -> Vec<(Option<u32>, u32)> {
    seen.distinct()
        .iter()
        .map(|a| (a.reading.epoch, a.reading.seq))
        .collect()
}

#[test]
fn a_v1_device_reboots_counts_again_and_resends_what_it_kept() {
    // The gateway sets the order of events, not the scheduler: it ACKs one
    // reading at a time, and the next only once the device has made the
    // reading the last ACK made room for. With a window of 4, boot 1 thus
    // makes exactly 1 to 8 (1-4 at once, then one per ACK of 1-4) and
    // reboots on the ACK of 5, its 5th. Seq 7's first copy goes unanswered
    // and the ACKs of 6 and 8 are kept back until then, so the device holds
    // 6, 7 and 8 when it reboots. The resend timeout is long: only the
    // reboot explains a quick resend.
    let opts = SimulatorOptions {
        window: 4,
        ack_timeout: Duration::from_secs(10),
        ..options(12)
    };
    let behaviour = Behaviour {
        restart_every: Some(5),
        ..Behaviour::default()
    };
    let mut kept_back: VecDeque<Reading> = VecDeque::new();
    let mut acks_sent = 0;
    let mut answer = |decoded: &Decoded, seen: &Seen| {
        let Decoded::Frame(Frame::Reading(r)) = decoded else {
            return honest(decoded, seen);
        };
        let known = kept_back.iter().any(|k| key(k) == key(r));
        if acks_sent >= 5 {
            // Rebooting: ACK all that arrives, and what was kept back.
            if !known {
                kept_back.push_back(r.clone());
            }
            return kept_back.drain(..).map(|k| ack_of(&k)).collect();
        }
        // Seq 7's first copy goes unanswered; every other new one waits.
        let unanswered = r.seq == 7 && seen.times_received(7) == 1;
        if !unanswered && !known {
            kept_back.push_back(r.clone());
        }
        // The device makes one reading per ACK it heard, into a window of 4.
        if seen.distinct().len() < 4 + acks_sent {
            return vec![];
        }
        acks_sent += 1;
        let next = kept_back.pop_front().expect("a reading to ACK");
        vec![ack_of(&next)]
    };
    let (summary, seen) = serve_all(Simulation::start_with(opts, behaviour), &mut answer);

    assert_all_acked(&summary, &seen, 12);
    // Boot 1 made 1 to 8; boot 2 makes the last 4, too few for another.
    assert_eq!(summary.restarts, 1);
    assert!(summary.elapsed_ms < 5_000, "seq 7 waited for its timeout");
    // Each boot counts from 1.
    let seqs: Vec<u32> = first_sent(&seen).iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4]);
    // What boot 1 still held was resent as it was, once, at the reboot.
    for seq in [6, 7, 8] {
        let copies = seen.copies(seq);
        assert_eq!(copies.len(), 2, "seq {seq} was not resent once");
        assert_eq!(
            copies[0].frame, copies[1].frame,
            "the kept {seq} was resent"
        );
    }
    assert_eq!(summary.resent, 3);
}

#[test]
fn a_v1_1_device_raises_its_epoch_at_each_reboot() {
    let opts = SimulatorOptions {
        start_seq: 0,
        window: 1,
        ..options(10)
    };
    let behaviour = Behaviour {
        epoch: Some(7),
        restart_every: Some(4),
        ..Behaviour::default()
    };
    let (summary, seen) = serve_all(Simulation::start_with(opts, behaviour), &mut honest);

    assert_all_acked(&summary, &seen, 10);
    assert_eq!(summary.restarts, 2);
    let sent = first_sent(&seen);
    let epochs: BTreeSet<Option<u32>> = sent.iter().map(|(e, _)| *e).collect();
    assert_eq!(epochs, BTreeSet::from([Some(7), Some(8), Some(9)]));
    for epoch in [8, 9] {
        let first = sent.iter().find(|(e, _)| *e == Some(epoch)).unwrap();
        assert_eq!(first.1, 0, "epoch {epoch} did not count from 0: {sent:?}");
    }
    // ACKs name the epoch, so no reading is ACKed by another's answer.
    seen.assert_resends_identical();
}

#[test]
fn late_readings_wait_for_later_acks_even_when_asked_for() {
    // Every 4th reading is held back until 2 later ones are ACKed. The
    // gateway asks for the missing one at once, as the real one does: a
    // reading held back is not sent for that.
    let opts = SimulatorOptions {
        alert_rate: 0.5,
        ..options(12)
    };
    let behaviour = Behaviour {
        late_every: Some(4),
        late_by: 2,
        ..Behaviour::default()
    };
    let mut answer = |decoded: &Decoded, seen: &Seen| match decoded {
        Decoded::Frame(Frame::Reading(r))
            if r.seq % 4 == 1 && r.seq > 1 && seen.times_received(r.seq - 1) == 0 =>
        {
            vec![ack_of(r), nak_of(r, r.seq - 1, "missing")]
        }
        other => honest(other, seen),
    };
    let (summary, seen) = serve_all(Simulation::start_with(opts, behaviour), &mut answer);

    assert_all_acked(&summary, &seen, 12);
    assert_eq!(summary.late_sent, 3);
    let mut late_alerts = 0;
    for seq in [4, 8, 12] {
        let copies = seen.copies(seq);
        let first = copies[0];
        late_alerts += usize::from(first.reading.priority == Priority::Alert);
        for later in (seq + 1..=seq + 2).filter(|s| *s <= 12) {
            let later = (DEVICE.to_owned(), None, later);
            assert!(
                seen.acked_at(&later) <= first.at,
                "seq {seq} was sent before {later:?} was ACKed"
            );
        }
    }
    assert!(late_alerts > 0, "the seeded run holds back an alert too");
    seen.assert_resends_identical();
}

#[test]
fn gap_naks_resend_at_once_but_not_faster_than_the_floor() {
    // The gateway holds seq 3 behind a gap for 1 s, NAKing each copy. Scaled
    // by 4, the floor is 200 ms: the gateway notes each copy when its thread
    // runs, up to some 10 ms late under load, so the gaps it measures are
    // only checked to within 10 % of the floor (20 ms).
    let opts = SimulatorOptions {
        ack_timeout: Duration::from_secs(10),
        ..options(6)
    };
    let behaviour = Behaviour {
        time_scale: 4.0,
        ..Behaviour::default()
    };
    let mut held_since = None;
    let mut answer = |decoded: &Decoded, seen: &Seen| match decoded {
        Decoded::Frame(Frame::Reading(r)) if r.seq == 3 => {
            let since = *held_since.get_or_insert_with(Instant::now);
            if since.elapsed() < Duration::from_secs(1) {
                vec![nak_of(r, 2, "missing"), nak_of(r, 3, "gap")]
            } else {
                honest(decoded, seen)
            }
        }
        other => honest(other, seen),
    };
    let (summary, seen) = serve_all(Simulation::start_with(opts, behaviour), &mut answer);

    assert_all_acked_in_order(&summary, &seen, 6);
    let at: Vec<Instant> = seen.copies(3).iter().map(|a| a.at).collect();
    assert!(at.len() >= 5, "seq 3 was resent {} times only", at.len());
    for pair in at.windows(2) {
        let waited = pair[1] - pair[0];
        assert!(
            waited >= Duration::from_millis(180) && waited < Duration::from_millis(500),
            "seq 3 resent after {waited:?}"
        );
    }
}

#[test]
fn missing_nak_gets_the_named_reading_resent_at_once() {
    // Seq 2's first copy is lost; the gateway asks for it when 3 comes.
    let opts = SimulatorOptions {
        ack_timeout: Duration::from_secs(10),
        ..options(5)
    };
    let mut answer = |decoded: &Decoded, seen: &Seen| match decoded {
        Decoded::Frame(Frame::Reading(r)) if r.seq == 2 && seen.times_received(2) == 1 => {
            vec![]
        }
        Decoded::Frame(Frame::Reading(r)) if r.seq == 3 && seen.times_received(3) == 1 => {
            vec![ack_of(r), nak_of(r, 2, "missing")]
        }
        other => honest(other, seen),
    };
    let (summary, seen) = serve_all(Simulation::start(opts), &mut answer);

    assert_all_acked_in_order(&summary, &seen, 5);
    assert_eq!(seen.times_received(2), 2);
    assert!(summary.elapsed_ms < 2_000, "seq 2 waited for its timeout");
}

#[test]
fn lost_acks_get_the_reading_resent_after_the_timeout() {
    let opts = SimulatorOptions {
        ack_timeout: Duration::from_secs(10),
        ..options(30)
    };
    let behaviour = Behaviour {
        drop_ack_rate: 0.3,
        time_scale: 0.02,
        ..Behaviour::default()
    };
    let (summary, seen) = serve_all(Simulation::start_with(opts, behaviour), &mut honest);

    assert_all_acked_in_order(&summary, &seen, 30);
    assert!(summary.dropped_acks > 0);
    assert_eq!(summary.resent, summary.dropped_acks);
    assert_eq!(seen.arrivals.len() as u64, 30 + summary.dropped_acks);
    // Resent after the scaled timeout (200 ms), not before. The gateway
    // notes each copy when its thread runs, up to some 10 ms late under
    // load: the gaps it measures are checked to within 10 % (20 ms).
    for seq in 1..=30 {
        for pair in seen.copies(seq).windows(2) {
            assert!(pair[1].at - pair[0].at >= Duration::from_millis(180));
        }
    }
}

#[test]
fn two_devices_share_a_port_each_with_its_own_count() {
    let opts = SimulatorOptions {
        window: 2,
        ..options(10)
    };
    let behaviour = Behaviour {
        devices: 2,
        ..Behaviour::default()
    };
    let (summary, seen) = serve_all(Simulation::start_with(opts, behaviour), &mut honest);

    assert_all_acked(&summary.devices[0], &seen_of(&seen, "PM-000001-1"), 10);
    assert_all_acked(&summary.devices[1], &seen_of(&seen, "PM-000001-2"), 10);
    assert_eq!((summary.acked, summary.sent), (20, 20));
    for device in ["PM-000001-1", "PM-000001-2"] {
        let seqs: Vec<u32> = seen
            .arrivals
            .iter()
            .filter(|a| a.reading.device_id == device)
            .map(|a| a.reading.seq)
            .collect();
        assert_eq!(seqs, (1..=10).collect::<Vec<u32>>(), "{device}");
    }
    // Interleaved: the first four readings hold both devices.
    let first: BTreeSet<&str> = seen.arrivals[..4]
        .iter()
        .map(|a| a.reading.device_id.as_str())
        .collect();
    assert_eq!(first.len(), 2);
}

/// The part of `seen` about `device`.
fn seen_of(seen: &Seen, device: &str) -> Seen {
    let ours = |a: &&Arrival| a.reading.device_id == device;
    Seen {
        arrivals: seen
            .arrivals
            .iter()
            .filter(ours)
            .map(|a| Arrival {
                at: a.at,
                reading: a.reading.clone(),
                frame: a.frame.clone(),
            })
            .collect(),
        acks: seen
            .acks
            .iter()
            .filter(|(k, _)| k.0 == device)
            .cloned()
            .collect(),
        rejected: 0,
    }
}
