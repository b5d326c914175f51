//! Line faults the simulated device suffers without knowing it.
//!
//! Each transmission of a frame draws each fault independently from a seeded
//! RNG, and the fault is applied to a copy: the frame kept for a resend is
//! always the original. A damaged frame must be caught by the gateway's
//! decoder; the device only learns of it through a NAK or its ACK timeout.
//! - corrupt: one byte of the body (between `$` and `*`) becomes another
//!   printable byte, never `$` or `*`, so the frame keeps its shape and only
//!   the CRC-16 (which detects every single-byte error) can catch it;
//! - garbage: 1–8 printable bytes other than `$` before the frame;
//! - truncate: a proper prefix of the frame (CRLF excluded), then `\r\n`.

/// Fault rates, each per transmission, in 0..=1.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub corrupt_rate: f64,
    pub garbage_rate: f64,
    pub truncate_rate: f64,
}

/// Which faults one transmission got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Injected {
    pub corrupted: bool,
    pub garbage: bool,
    pub truncated: bool,
}

/// Applies [`Faults`] from its own seeded RNG.
#[derive(Debug, Clone)]
pub struct FaultInjector {
    faults: Faults,
    rng: fastrand::Rng,
}

impl FaultInjector {
    pub fn new(faults: Faults, seed: u64) -> Self {
        FaultInjector {
            faults,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// The bytes to put on the line for `frame` (`$...*CRC\r\n`).
    pub fn apply(&mut self, frame: &[u8]) -> (Vec<u8>, Injected) {
        let mut injected = Injected::default();
        let mut out = Vec::with_capacity(frame.len() + 8);
        if self.draw(self.faults.garbage_rate) {
            injected.garbage = true;
            for _ in 0..self.rng.usize(1..=8) {
                out.push(self.printable_except(b"$"));
            }
        }
        let start = out.len();
        out.extend_from_slice(frame);
        if self.draw(self.faults.corrupt_rate) {
            injected.corrupted = self.corrupt(&mut out[start..]);
        }
        if self.draw(self.faults.truncate_rate) && frame.len() > 3 {
            // Keep 1..len-2 bytes: never the whole frame before its CRLF.
            let keep = self.rng.usize(1..frame.len() - 2);
            out.truncate(start + keep);
            out.extend_from_slice(b"\r\n");
            injected.truncated = true;
        }
        (out, injected)
    }

    fn draw(&mut self, rate: f64) -> bool {
        rate > 0.0 && self.rng.f64() < rate
    }

    /// Changes one body byte; false if the frame has no body to change.
    fn corrupt(&mut self, frame: &mut [u8]) -> bool {
        let Some(star) = frame.iter().rposition(|&b| b == b'*') else {
            return false;
        };
        if frame.first() != Some(&b'$') || star < 2 {
            return false;
        }
        let at = self.rng.usize(1..star);
        let original = frame[at];
        frame[at] = self.printable_except(&[b'$', b'*', original]);
        true
    }

    fn printable_except(&mut self, excluded: &[u8]) -> u8 {
        loop {
            let b = self.rng.u8(0x20..=0x7e);
            if !excluded.contains(&b) {
                return b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: &[u8] = b"$R,PM-000001,7,2026-11-03T12:00:00Z,heart_rate,72,routine,*1A2B\r\n";

    fn injector(corrupt: f64, garbage: f64, truncate: f64) -> FaultInjector {
        let faults = Faults {
            corrupt_rate: corrupt,
            garbage_rate: garbage,
            truncate_rate: truncate,
        };
        FaultInjector::new(faults, 99)
    }

    #[test]
    fn no_faults_leave_the_frame_alone() {
        let mut faults = injector(0.0, 0.0, 0.0);
        for _ in 0..100 {
            assert_eq!(faults.apply(FRAME), (FRAME.to_vec(), Injected::default()));
        }
    }

    #[test]
    fn corruption_changes_exactly_one_body_byte() {
        let mut faults = injector(1.0, 0.0, 0.0);
        let star = FRAME.iter().rposition(|&b| b == b'*').unwrap();
        for _ in 0..500 {
            let (out, injected) = faults.apply(FRAME);
            assert!(injected.corrupted);
            assert_eq!(out.len(), FRAME.len());
            let diffs: Vec<usize> = (0..out.len()).filter(|&i| out[i] != FRAME[i]).collect();
            assert_eq!(diffs.len(), 1);
            let at = diffs[0];
            assert!(
                (1..star).contains(&at),
                "changed byte {at} outside the body"
            );
            assert!(out[at].is_ascii_graphic() || out[at] == b' ');
            assert!(!matches!(out[at], b'$' | b'*'));
        }
    }

    #[test]
    fn garbage_comes_before_the_frame_without_a_dollar() {
        let mut faults = injector(0.0, 1.0, 0.0);
        for _ in 0..200 {
            let (out, injected) = faults.apply(FRAME);
            assert!(injected.garbage);
            let junk = out.len() - FRAME.len();
            assert!((1..=8).contains(&junk));
            assert!(out.ends_with(FRAME));
            assert!(
                out[..junk]
                    .iter()
                    .all(|&b| b != b'$' && (0x20..=0x7e).contains(&b))
            );
        }
    }

    #[test]
    fn truncation_keeps_a_proper_prefix_then_crlf() {
        let mut faults = injector(0.0, 0.0, 1.0);
        for _ in 0..200 {
            let (out, injected) = faults.apply(FRAME);
            assert!(injected.truncated);
            assert!(out.ends_with(b"\r\n"));
            let prefix = &out[..out.len() - 2];
            assert!(!prefix.is_empty() && prefix.len() < FRAME.len() - 2);
            assert!(FRAME.starts_with(prefix));
        }
    }

    #[test]
    fn rates_are_roughly_honoured() {
        let mut faults = injector(0.3, 0.0, 0.0);
        let hits = (0..10_000)
            .filter(|_| faults.apply(FRAME).1.corrupted)
            .count();
        assert!((2700..3300).contains(&hits), "{hits} corrupted of 10000");
    }
}
