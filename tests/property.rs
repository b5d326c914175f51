//! Properties of everything hearth parses from outside, checked on every
//! `cargo test` (proptest, a few hundred generated cases each): the serial
//! frame codec, the config parser and the MQTT packet reader. The checks
//! are the fuzz targets' own (`tests/fuzz/checks.rs`), run here on stable
//! over generated inputs and over every committed seed, crash reproducers
//! included; `tests/fuzz/run.sh` runs them under libFuzzer for hours.
//!
//! A failure prints the smallest input proptest found. Failures are not
//! persisted to a file: add the input to `tests/fuzz/seeds/TARGET` under a
//! name that says what broke (this file then runs it on every test run),
//! or make it a unit test next to the code it tests.

use std::path::Path;

use bytes::BytesMut;
use chrono::{DateTime, Utc};
use hearth::config::DEFAULT_TOML;
use hearth::mqtt::incoming::{MAX_INCOMING, MAX_PACKET, Protocol, next_packet};
use hearth::reading::{Kind, Priority, Reading};
use hearth::serial::frame::{Decoded, Decoder, Frame, MAX_FRAME_LEN};
use proptest::prelude::*;
use proptest::sample::select;

#[path = "fuzz/checks.rs"]
mod checks;

/// Every committed seed of every fuzz target passes its checks: the crash
/// reproducers among them are regression tests.
#[test]
fn committed_fuzz_seeds_pass_the_fuzz_checks() {
    type Check = fn(&[u8]);
    let targets: [(&str, Check); 3] = [
        ("frame_decoder", checks::frame_decoder),
        ("config_parse", checks::config_parse),
        ("mqtt_incoming", checks::mqtt_incoming),
    ];
    for (target, check) in targets {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fuzz/seeds")
            .join(target);
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                panic!("seed `{}` fails the `{target}` checks", path.display());
            }
            seeds += 1;
        }
        assert!(seeds >= 20, "only {seeds} seeds in `{}`", dir.display());
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- the serial frame codec -------------------------------------------

/// Decodes `stream` fed in reads of the sizes `reads` (cycled; the rest in
/// one read if `reads` is empty), draining after each read.
fn decode(stream: &[u8], reads: &[usize]) -> Vec<Decoded> {
    let mut decoder = Decoder::new();
    let mut out = Vec::new();
    let mut rest = stream;
    let mut sizes = reads.iter().copied().cycle();
    while !rest.is_empty() {
        let size = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
        let (read, tail) = rest.split_at(size);
        rest = tail;
        decoder.extend(read);
        out.extend(std::iter::from_fn(|| decoder.next()));
        assert!(decoder.buffered() < MAX_FRAME_LEN);
    }
    out
}

fn device_id() -> impl Strategy<Value = String> + Clone {
    "[A-Za-z0-9._-]{1,32}"
}

/// Any time the wire can carry: years 0000 to 9999, to the millisecond.
fn device_time() -> impl Strategy<Value = DateTime<Utc>> {
    const FIRST: i64 = -62_167_219_200_000; // 0000-01-01T00:00:00Z
    const LAST: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    (FIRST..=LAST).prop_map(|ms| DateTime::from_timestamp_millis(ms).unwrap())
}

fn reading() -> impl Strategy<Value = Reading> {
    let value = any::<f64>().prop_filter("finite", |v| v.is_finite());
    (
        device_id(),
        any::<Option<u32>>(),
        any::<u32>(),
        device_time(),
        select(Kind::ALL.to_vec()),
        value,
        any::<bool>(),
        select(vec!["AF", "VT", "VF"]),
    )
        .prop_map(
            |(device_id, epoch, seq, device_time, kind, value, alert, detail)| {
                let must_alert = matches!(kind, Kind::Episode | Kind::ShockDelivered);
                Reading {
                    device_id,
                    epoch,
                    seq,
                    device_time,
                    kind,
                    value,
                    priority: if alert || must_alert {
                        Priority::Alert
                    } else {
                        Priority::Routine
                    },
                    detail: (kind == Kind::Episode).then(|| detail.to_owned()),
                }
            },
        )
}

/// Every frame kind, with every optional field present or not. A NAK
/// carries an epoch only with a seq: the wire has no place for it alone.
fn frame() -> impl Strategy<Value = Frame> {
    let ids = (device_id(), any::<Option<u32>>(), any::<u32>());
    prop_oneof![
        reading().prop_map(Frame::Reading),
        ids.clone().prop_map(|(device_id, epoch, seq)| Frame::Ack {
            device_id,
            epoch,
            seq
        }),
        ids.prop_map(|(device_id, epoch, seq)| Frame::Busy {
            device_id,
            epoch,
            seq
        }),
        (
            proptest::option::of(device_id()),
            proptest::option::of((any::<Option<u32>>(), any::<u32>())),
            "[a-z-]{1,32}",
        )
            .prop_map(|(device_id, ids, reason)| Frame::Nak {
                device_id,
                epoch: ids.and_then(|(epoch, _)| epoch),
                seq: ids.map(|(_, seq)| seq),
                reason,
            }),
    ]
}

/// Bytes of every kind the line produces: noise, frame characters, whole
/// and damaged frames.
fn line_noise() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40),
        proptest::collection::vec(select(b"$*,\r\n 0123456789ABCDEFRANB:.-".to_vec()), 0..40),
        frame().prop_map(|f| f.encode()),
        (frame(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(f, at, bits)| {
            let mut wire = f.encode();
            let i = at.index(wire.len());
            wire[i] ^= bits.max(1);
            wire
        }),
        (frame(), any::<prop::sample::Index>()).prop_map(|(f, at)| {
            let wire = f.encode();
            wire[..at.index(wire.len())].to_vec()
        }),
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(config())]

    /// No panic, bounded memory and rejected runs, the same output however
    /// the stream is split, and the NAK for every rejection is a valid frame.
    #[test]
    fn decoder_never_panics_and_does_not_depend_on_read_sizes(
        stream in line_noise(),
        reads in proptest::collection::vec(1..=MAX_FRAME_LEN, 1..8),
    ) {
        checks::frame_decoder(&stream);
        prop_assert_eq!(decode(&stream, &[]), decode(&stream, &reads));
    }

    #[test]
    fn decoder_never_panics_on_random_bytes(
        stream in proptest::collection::vec(any::<u8>(), 0..2048),
        reads in proptest::collection::vec(1..=MAX_FRAME_LEN, 1..8),
    ) {
        checks::frame_decoder(&stream);
        prop_assert_eq!(decode(&stream, &[]), decode(&stream, &reads));
    }

    /// Whatever came before (noise, half a frame, an oversized run), a
    /// whole frame is decoded: its `$` always starts a new frame.
    #[test]
    fn decoder_resynchronises_after_garbage(
        garbage in line_noise(),
        frame in frame(),
        reads in proptest::collection::vec(1..=MAX_FRAME_LEN, 1..8),
    ) {
        let mut stream = garbage;
        stream.extend(frame.encode());
        let out = decode(&stream, &reads);
        prop_assert_eq!(out.last(), Some(&Decoded::Frame(frame)));
    }

    #[test]
    fn every_frame_round_trips_through_the_wire(frame in frame()) {
        let wire = frame.encode();
        prop_assert!(wire.len() <= MAX_FRAME_LEN, "{} bytes", wire.len());
        prop_assert_eq!(decode(&wire, &[]), vec![Decoded::Frame(frame)]);
    }
}

// ---- the config parser -------------------------------------------------

/// A value of any TOML type, or something that is almost one.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        select(vec![
            "inf", "-inf", "nan", "true", "false", "0x1F", "1_000", "1e400"
        ])
        .prop_map(str::to_owned),
        "(?s).{0,40}".prop_map(|s| format!("{s:?}")),
        "[^\"\\\\]{0,40}".prop_map(|s| format!("\"{s}\"")),
        ".{0,40}".prop_map(|s| format!("'''{s}'''")),
        "[0-9:TZ. -]{0,30}",
        proptest::collection::vec(any::<u16>(), 0..4).prop_map(|v| format!("{v:?}")),
        "[a-z_]{1,10}".prop_map(|k| format!("{{ {k} = 1 }}")),
        ".{0,20}",
    ]
}

/// The default config with random edits: values replaced, keys added or
/// renamed, tables and lines dropped or duplicated, noise inserted.
fn toml_text() -> impl Strategy<Value = String> {
    let lines: Vec<String> = DEFAULT_TOML.lines().map(str::to_owned).collect();
    let keys = select(vec![
        "gateway_id",
        "log_level",
        "port",
        "baud_rate",
        "device_alarm_secs",
        "silence_alarm_secs",
        "path",
        "retention_days",
        "max_size_mb",
        "encrypt",
        "key_file",
        "host",
        "ca_file",
        "cert_file",
        "crl_file",
        "topic_prefix",
        "keep_alive_secs",
        "heartbeat_secs",
        "max_inflight",
        "batch_max_readings",
        "reconnect_min_ms",
        "reconnect_max_secs",
        "unknown",
    ]);
    let edit = (
        0..5u8,
        any::<prop::sample::Index>(),
        keys,
        toml_value(),
        "[\\[\\]a-z.\"= #\n]{0,20}",
    );
    proptest::collection::vec(edit, 0..10).prop_map(move |edits| {
        let mut lines = lines.clone();
        for (op, at, key, value, noise) in edits {
            let i = at.index(lines.len() + 1);
            match op {
                0 if i < lines.len() => {
                    // A new value for the key on that line, if it has one.
                    if let Some((k, _)) = lines[i].split_once('=') {
                        lines[i] = format!("{k}= {value}");
                    }
                }
                1 => lines.insert(i, format!("{key} = {value}")),
                2 if i < lines.len() => drop(lines.remove(i)),
                3 => lines.insert(i, noise),
                _ => {
                    let table = select_table(i);
                    lines.insert(i, format!("[{table}]"));
                }
            }
        }
        lines.join("\n")
    })
}

fn select_table(i: usize) -> &'static str {
    ["serial", "store", "mqtt", "mqtt.tls", "serial"][i % 5]
}

proptest! {
    #![proptest_config(config())]

    /// Never a panic; always an error of one line that names the file (the
    /// certificate files do not exist, so no config passes).
    #[test]
    fn config_parser_never_panics_and_errors_are_one_line(text in toml_text()) {
        checks::config_parse(text.as_bytes());
    }

    #[test]
    fn config_parser_never_panics_on_random_text(text in "(?s).{0,400}") {
        checks::config_parse(text.as_bytes());
    }
}

// ---- the MQTT packet reader --------------------------------------------

/// A fixed header of any type and flags with any remaining length in 1 to 4
/// bytes (up to 268,435,455: 256 MB), then some of the body.
fn mqtt_stream() -> impl Strategy<Value = Vec<u8>> {
    let header = (any::<u8>(), 0..=268_435_455usize).prop_map(|(first, mut len)| {
        let mut bytes = vec![first];
        loop {
            let byte = (len % 128) as u8;
            len /= 128;
            bytes.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                return bytes;
            }
        }
    });
    (header, proptest::collection::vec(any::<u8>(), 0..300))
        .prop_map(|(h, body)| [h, body].concat())
}

proptest! {
    #![proptest_config(config())]

    /// Fed in reads as `Connection::read` feeds it: no panic, an
    /// incomplete packet consumes nothing and reserves no more than the
    /// packet needs, and the buffer never outgrows twice `MAX_PACKET`.
    #[test]
    fn mqtt_reader_never_panics_and_reserves_at_most_max_incoming(
        stream in prop_oneof![mqtt_stream(), proptest::collection::vec(any::<u8>(), 0..600)],
        read in 1..512usize,
        v5 in any::<bool>(),
    ) {
        let protocol = if v5 { Protocol::V5 } else { Protocol::V311 };
        let mut buf = BytesMut::with_capacity(64);
        let mut rest = &stream[..];
        loop {
            let before = buf.clone();
            match next_packet(protocol, &mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    prop_assert_eq!(&buf, &before);
                    prop_assert!(buf.capacity() <= 2 * MAX_PACKET, "{}", buf.capacity());
                    if rest.is_empty() {
                        break;
                    }
                    let n = read.min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
                Err(_) => break,
            }
        }
        checks::mqtt_incoming(&stream);
        // What the codec asks for never exceeds the limit.
        let mut buf = BytesMut::from(&stream[..]);
        if let Err(rumqttc::Error::InsufficientBytes(n)) = rumqttc::Packet::read(&mut buf, MAX_INCOMING) {
            prop_assert!(buf.len() + n <= MAX_PACKET, "{} + {}", buf.len(), n);
        }
    }
}
