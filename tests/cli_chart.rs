//! `hearth readings chart` through the real binary, on a store filled
//! through the real store code: the PNG is a picture of the size asked for
//! with the line and the alert markers drawn on it, the SVG holds the line
//! and the unit, the terminal chart is plain text with the unit, and the
//! read is in the audit trail.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::Value;

use crate::harness::hearth;
use crate::support::TestDir;
use crate::support::fill::{self, FillSpec, Filled, fill};
use hearth::reading::Kind;

/// The line's colour in a picture (`hearth::cli::chart::LINE_COLOUR`).
const LINE: [u8; 3] = [31, 119, 180];
/// The alert markers' colour (`hearth::cli::chart::ALERT_COLOUR`).
const ALERT: [u8; 3] = [214, 39, 40];

/// Two devices, 600 readings each one minute apart ending now: 240 heart
/// rates and 6 alert episodes per device in the last 24 hours.
fn two_devices(dir: &TestDir) -> Filled {
    fill(dir.path(), &FillSpec::small(2, 600))
}

fn chart(filled: &Filled, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "readings",
        "chart",
        "--kind",
        "heart_rate",
        "--config",
        filled.config.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    hearth(&args)
}

/// The columns of `image` holding a pixel of `colour` (exactly: the line is
/// two pixels wide and filled without blending).
fn columns_with(image: &image::RgbImage, colour: [u8; 3]) -> Vec<u32> {
    (0..image.width())
        .filter(|&x| (0..image.height()).any(|y| image.get_pixel(x, y).0 == colour))
        .collect()
}

fn audit_reads(config: &Path) -> Vec<Value> {
    let (code, out, err) = hearth(&[
        "audit",
        "--format",
        "json",
        "--kind",
        "patient-data-read",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad audit JSON ({e}): {out}"))
}

#[test]
fn png_chart_is_an_image_of_the_requested_size_with_the_line_and_alerts_drawn() {
    let dir = TestDir::new();
    let filled = two_devices(&dir);
    let png = dir.join("trend.png");
    let (code, _, err) = chart(
        &filled,
        &[
            "--device",
            "PM-0001",
            "--output",
            png.to_str().unwrap(),
            "--width",
            "800",
            "--height",
            "400",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("drawn in"), "{err}");
    let image = image::open(&png)
        .unwrap_or_else(|e| panic!("`{}` is not a PNG: {e}", png.display()))
        .to_rgb8();
    assert_eq!(image.dimensions(), (800, 400));
    // The line crosses the plot area: most columns between the y labels
    // and the right margin hold its colour.
    let line = columns_with(&image, LINE);
    let plot: Vec<u32> = line
        .iter()
        .copied()
        .filter(|&x| (120..760).contains(&x))
        .collect();
    assert!(plot.len() > 500, "line in {} of 640 columns", plot.len());
    // Six alert episodes: vertical markers at different places.
    let alert = columns_with(&image, ALERT);
    let spread = alert.last().unwrap_or(&0) - alert.first().unwrap_or(&0);
    assert!(alert.len() >= 6 && spread > 300, "alert columns: {alert:?}");
    // The read is in the audit trail, naming the device by its reference.
    let reads = audit_reads(&filled.config);
    let read = reads.last().expect("a patient-data read");
    let command = read["detail"]["command"].as_str().unwrap();
    assert!(command.contains("readings chart"), "{read}");
    assert!(!command.contains("PM-0001"), "{read}");
    assert!(read["detail"]["rows"].as_u64().unwrap() > 200, "{read}");
}

#[test]
fn svg_chart_holds_the_line_and_the_axis_label_with_the_unit() {
    let dir = TestDir::new();
    let filled = two_devices(&dir);
    let svg = dir.join("trend.svg");
    let (code, _, err) = chart(
        &filled,
        &["--device", "PM-0002", "--output", svg.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(
        text.trim_start().starts_with("<svg") && text.trim_end().ends_with("</svg>"),
        "{text}"
    );
    assert!(text.contains(r#"width="1000""#) && text.contains(r#"height="500""#));
    // The line: a polyline of many points.
    let line = text
        .split("<polyline")
        .skip(1)
        .map(|p| {
            p.split("points=\"")
                .nth(1)
                .unwrap_or("")
                .split('"')
                .next()
                .unwrap_or("")
        })
        .map(|points| points.split_whitespace().count())
        .max()
        .unwrap_or(0);
    assert!(line >= 100, "longest polyline has {line} points");
    assert!(
        text.contains("heart_rate (bpm)"),
        "no y axis label with the unit"
    );
    assert!(text.contains("device time"), "no x axis label");
    assert!(
        text.contains("alert episode"),
        "no legend entry for the alerts"
    );
}

#[test]
fn terminal_chart_is_plain_text_with_the_unit_that_fits_the_width() {
    let dir = TestDir::new();
    let filled = two_devices(&dir);
    let out = Command::new(crate::support::hearth_bin())
        .args([
            "readings",
            "chart",
            "--kind",
            "heart_rate",
            "--device",
            "PM-0001",
        ])
        .args(["--utc", "--config", filled.config.to_str().unwrap()])
        .env("COLUMNS", "100")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "a control character in {text:?}"
    );
    // ASCII, or braille for the line.
    assert!(
        text.chars()
            .all(|c| c.is_ascii() || ('\u{2800}'..='\u{28ff}').contains(&c)),
        "{text}"
    );
    assert!(text.lines().all(|l| l.chars().count() <= 100), "{text}");
    assert!(text.contains(" bpm +"), "no y label with the unit: {text}");
    assert!(
        text.chars()
            .filter(|c| ('\u{2801}'..='\u{28ff}').contains(c))
            .count()
            > 50
    );
    assert!(
        text.lines().any(|l| l.trim_start().starts_with('^')),
        "no alert marks: {text}"
    );
    // Every heart rate PM-0001 sent (not those it skipped, nor alerts).
    let spec = FillSpec::small(2, 600);
    let sent = (0..600)
        .filter(|seq| !(50..=59).contains(seq))
        .filter(|&seq| fill::reading(&spec, 0, seq).kind == Kind::HeartRate)
        .count();
    let summary = text
        .lines()
        .find(|l| l.starts_with("n "))
        .expect("a summary");
    assert!(summary.starts_with(&format!("n {sent}  min ")), "{summary}");
    assert!(summary.contains(" bpm"), "{summary}");
}

#[test]
fn several_devices_in_the_window_need_a_device() {
    let dir = TestDir::new();
    let filled = two_devices(&dir);
    let (code, out, err) = chart(&filled, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty());
    assert!(
        err.contains("2 devices") && err.contains("--device"),
        "{err}"
    );
    // Nothing was shown: no serial, no audit entry.
    assert!(!err.contains("PM-000"), "{err}");
    assert!(audit_reads(&filled.config).is_empty());
}

#[test]
fn an_empty_window_says_so_and_writes_no_file() {
    let dir = TestDir::new();
    let filled = two_devices(&dir);
    let png = dir.join("empty.png");
    let (code, out, err) = chart(
        &filled,
        &[
            "--device",
            "PM-0001",
            "--since",
            "2020-01-01T00:00:00Z",
            "--until",
            "2020-01-02T00:00:00Z",
            "--utc",
            "--output",
            png.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.is_empty());
    assert_eq!(
        err.trim_end(),
        "no heart_rate readings of `PM-0001` received from 2020-01-01T00:00:00.000Z to 2020-01-02T00:00:00.000Z: nothing drawn"
    );
    assert!(!png.exists());
}

#[test]
fn bad_arguments_are_usage_errors_naming_what_to_fix() {
    let dir = TestDir::new();
    let filled = two_devices(&dir);
    let (code, _, err) = chart(&filled, &["--output", "trend.jpg"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`--output trend.jpg`") && err.contains("`.png` or `.svg`"),
        "{err}"
    );
    let (code, _, err) = chart(&filled, &["--since", "1h", "--until", "2h"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`--until 2h` is not after `--since 1h`"),
        "{err}"
    );
    let (code, _, err) = chart(&filled, &["--until", "soon"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`--until soon`"), "{err}");
    assert!(!dir.join("trend.jpg").exists());
}

#[test]
fn the_chart_query_reads_the_window_through_its_index() {
    let dir = TestDir::new();
    let filled = two_devices(&dir);
    assert!(series_plan(&filled).contains("readings_received"));
}

fn series_plan(filled: &Filled) -> String {
    let text = std::fs::read_to_string(&filled.config).unwrap();
    let c = hearth::config::Config::parse(&text, &filled.config).unwrap();
    let encryption = hearth::outbox::Encryption::from_config(&c.store, &filled.config);
    let store = hearth::outbox::Store::open_read_only(&filled.db, &encryption).unwrap();
    store.series_plan().unwrap()
}

/// The million-row figures (run by hand: `cargo test --release --test
/// tests cli_chart::million -- --ignored --nocapture`): ten devices, a
/// reading every 6 s each, so the last 24 hours hold 144,000 readings
/// (5,760 heart rates per device, thinned for drawing).
#[test]
#[ignore]
fn million_readings_chart_timings() {
    let dir = TestDir::new();
    let spec = FillSpec {
        step: chrono::Duration::seconds(6),
        start: Utc::now() - chrono::Duration::seconds(6 * 100_000),
        ..FillSpec::small(10, 100_000)
    };
    let filled = fill(dir.path(), &spec);
    println!("filled {} readings in {:.0} s", filled.stored, filled.secs);
    println!("plan: {}", series_plan(&filled));
    let png = dir.join("million.png");
    let svg = dir.join("million.svg");
    for (what, extra) in [
        ("terminal", vec!["--device", "PM-0003"]),
        (
            "png",
            vec!["--device", "PM-0003", "--output", png.to_str().unwrap()],
        ),
        (
            "svg",
            vec!["--device", "PM-0003", "--output", svg.to_str().unwrap()],
        ),
        (
            "7d png",
            vec![
                "--device",
                "PM-0003",
                "--since",
                "7d",
                "--output",
                png.to_str().unwrap(),
            ],
        ),
    ] {
        let mut times: Vec<Duration> = (0..5)
            .map(|_| {
                let began = Instant::now();
                let (code, _, err) = chart(&filled, &extra);
                assert_eq!(code, 0, "{err}");
                began.elapsed()
            })
            .collect();
        times.sort();
        println!(
            "chart {what}: median {:?} (min {:?}, max {:?})",
            times[2], times[0], times[4]
        );
    }
    std::fs::copy(&png, "/tmp/hearth-chart-million.png").ok();
}
