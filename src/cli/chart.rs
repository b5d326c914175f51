//! `hearth readings chart`: the trend of one kind of reading for one device,
//! over a window of received time, with its alert episodes marked: as text
//! in the terminal, or as a PNG or SVG picture (plotters) to attach to a
//! ticket.
//!
//! x is the device time (when the implant measured), y the value in its
//! unit. More readings than the drawing has columns are thinned to the
//! lowest and the highest of each column, so a spike is never lost. A
//! silence much longer than the usual spacing breaks the line. The read is
//! recorded in the audit trail before anything is shown or written.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use chrono::{DateTime, Local, Utc};
use clap::Args;
use clap::builder::PossibleValuesParser;
use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::chart_text::BitmapText;
use super::readings::{open, parse_since};
use super::render::{self, TimeArgs};
use super::{ConfigArg, UsageError};
use crate::outbox::store::from_ms;
use crate::outbox::views::series::{AlertMark, EPISODE_KINDS};
use crate::reading::Kind;

/// The line's colour in a picture (tests look for it).
pub const LINE_COLOUR: RGBColor = RGBColor(31, 119, 180);
/// The alert episodes' markers in a picture.
pub const ALERT_COLOUR: RGBColor = RGBColor(214, 39, 40);

/// Text rows of the terminal chart's plot.
const TERMINAL_ROWS: usize = 10;

#[derive(Debug, Args)]
pub struct ChartArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The kind of reading to draw.
    #[arg(long, value_parser = PossibleValuesParser::new(Kind::ALL.map(Kind::as_str)))]
    pub kind: String,
    /// The device (implant serial); needed when the window holds readings of
    /// the kind from more than one.
    #[arg(long)]
    pub device: Option<String>,
    /// Readings received since TIME: RFC 3339 (`2026-11-25T08:00:00Z`) or an
    /// age such as `90s`, `15m`, `2h`, `7d`.
    #[arg(long, default_value = "24h", value_name = "TIME")]
    pub since: String,
    /// Readings received before TIME (RFC 3339 or an age); default now.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Write a picture instead of drawing in the terminal: `FILE.png` or
    /// `FILE.svg`. A PNG's text is set in a built-in 8x8 bitmap font; an
    /// SVG's is left to the viewer's sans-serif.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The picture's width in pixels (with `--output`).
    #[arg(long, value_name = "PX", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(200..=4000))]
    pub width: u32,
    /// The picture's height in pixels (with `--output`).
    #[arg(long, value_name = "PX", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(150..=4000))]
    pub height: u32,
    #[command(flatten)]
    pub time: TimeArgs,
}

/// A picture's format, by its file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Picture {
    Png,
    Svg,
}

impl Picture {
    fn of(path: &Path) -> Result<Picture, UsageError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("png") => Ok(Picture::Png),
            Some("svg") => Ok(Picture::Svg),
            _ => Err(UsageError(format!(
                "`--output {}`: a chart is written as `.png` or `.svg`; name the file with one of those",
                path.display()
            ))),
        }
    }
}

/// What is drawn: one device's line and its alert episodes.
struct Chart {
    kind: String,
    device: String,
    unit: String,
    /// (device time ms, value), in time order.
    points: Vec<(i64, f64)>,
    alerts: Vec<AlertMark>,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    /// The x range (ms): every point and alert.
    x: (i64, i64),
    /// The values' range.
    y: (f64, f64),
}

pub fn run(args: ChartArgs) -> anyhow::Result<()> {
    let now = Utc::now();
    let since = parse_since(&args.since, now)?;
    let until = match &args.until {
        Some(s) => parse_since(s, now).map_err(|_| {
            UsageError(format!(
                "`--until {s}` is neither an RFC 3339 time (2026-11-25T08:00:00Z) nor an age (90s, 15m, 2h, 7d)"
            ))
        })?,
        None => now,
    };
    if until <= since {
        anyhow::bail!(UsageError(format!(
            "`--until {}` is not after `--since {}`: give a window that ends after it begins",
            args.until.as_deref().unwrap_or("now"),
            args.since
        )));
    }
    let picture = args
        .output
        .as_deref()
        .map(|path| Picture::of(path).map(|format| (format, path)))
        .transpose()?;
    let (config, store) = open(&args.config)?;
    let series = store.series(&args.kind, args.device.as_deref(), since, until)?;
    if args.device.is_none() && series.lines.len() > 1 {
        anyhow::bail!(UsageError(format!(
            "`{}` readings of {} devices were received in the window: choose one with `--device ID` (`hearth devices list` names them)",
            args.kind,
            series.lines.len()
        )));
    }
    let device = series
        .lines
        .keys()
        .next()
        .cloned()
        .or_else(|| args.device.clone());
    let series = match &device {
        Some(d) => series.only(d),
        None => series,
    };
    let line = series.lines.into_values().next().unwrap_or_default();
    // Patient data: shown (or written) only once the read is recorded.
    let shown = if line.points.is_empty() {
        0
    } else {
        line.points.len() + series.alerts.len()
    };
    super::audit::record_read(&config, shown, device.as_deref())?;
    let Some(device) = device.filter(|_| !line.points.is_empty()) else {
        let of = args
            .device
            .as_deref()
            .map(|d| format!(" of `{d}`"))
            .unwrap_or_default();
        eprintln!(
            "no {} readings{of} received from {} to {}: nothing drawn",
            args.kind,
            args.time.show(since),
            args.time.show(until)
        );
        return Ok(());
    };
    let chart = Chart::new(args.kind.clone(), device, line, series.alerts, since, until);
    let Some((format, path)) = picture else {
        let width = render::terminal_width().unwrap_or(80);
        let mut out = std::io::stdout().lock();
        out.write_all(terminal(&chart, &args.time, width).as_bytes())?;
        out.flush()?;
        return Ok(());
    };
    // A plain I/O error for a folder that is missing or not writable
    // (plotters' own would come wrapped twice).
    std::fs::File::create(path)
        .with_context(|| format!("cannot write the chart `{}`", path.display()))?;
    let size = (args.width, args.height);
    match format {
        Picture::Png => {
            let mut rgb = vec![0u8; args.width as usize * args.height as usize * 3];
            // No TTF font: the text is set in our 8x8 bitmap font.
            draw(
                BitmapText(BitMapBackend::with_buffer(&mut rgb, size)).into_drawing_area(),
                &chart,
                &args.time,
                true,
            )
            .and_then(|()| Ok(std::fs::write(path, super::png::encode(&rgb, size))?))
        }
        Picture::Svg => draw(
            SVGBackend::new(path, size).into_drawing_area(),
            &chart,
            &args.time,
            false,
        ),
    }
    .with_context(|| format!("cannot write the chart `{}`", path.display()))?;
    eprintln!(
        "{} readings and {} alert episodes drawn in `{}`",
        chart.points.len(),
        chart.alerts.len(),
        path.display()
    );
    Ok(())
}

impl Chart {
    fn new(
        kind: String,
        device: String,
        line: crate::outbox::views::series::Line,
        alerts: Vec<AlertMark>,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Chart {
        let points = line.points;
        let times = points
            .iter()
            .map(|p| p.0)
            .chain(alerts.iter().map(|a| a.device_time.timestamp_millis()));
        let (mut x0, mut x1) = times.fold((i64::MAX, i64::MIN), |(a, b), t| (a.min(t), b.max(t)));
        if x1 <= x0 {
            x0 -= 30_000;
            x1 += 30_000;
        }
        let (lo, hi) = points
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.1), b.max(p.1))
            });
        Chart {
            kind,
            device,
            unit: line.unit,
            points,
            alerts,
            since,
            until,
            x: (x0, x1),
            y: (lo, hi),
        }
    }

    /// The y range to draw: the values' own, widened when they are all one.
    fn y_range(&self) -> (f64, f64) {
        let (lo, hi) = self.y;
        if hi - lo > f64::EPSILON * hi.abs().max(1.0) {
            (lo, hi)
        } else {
            let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.01 };
            (lo - pad, hi + pad)
        }
    }

    /// Decimals that tell the y labels apart.
    fn decimals(&self) -> usize {
        let (lo, hi) = self.y_range();
        (-((hi - lo) / 5.0).log10()).ceil().clamp(0.0, 6.0) as usize
    }

    /// The line's pieces, thinned for `columns` columns: breaks where the
    /// device was silent for more than ten times its usual spacing (the
    /// median) and more than two columns.
    fn segments(&self, columns: usize) -> Vec<Vec<(i64, f64)>> {
        let (x0, x1) = self.x;
        let column = (x1 - x0) as f64 / columns.max(1) as f64;
        let mut steps: Vec<i64> = self.points.windows(2).map(|w| w[1].0 - w[0].0).collect();
        steps.sort_unstable();
        let usual = steps.get(steps.len() / 2).copied().unwrap_or(0) as f64;
        let silence = (usual * 10.0).max(column * 2.0);
        let mut segments = vec![];
        let mut current: Vec<(i64, f64)> = vec![];
        for p in thin(&self.points, x0, x1, columns) {
            if let Some(last) = current.last()
                && (p.0 - last.0) as f64 > silence
            {
                segments.push(std::mem::take(&mut current));
            }
            current.push(p);
        }
        segments.push(current);
        segments
    }

    /// The summary's items: count, lowest, highest, last, alerts.
    fn summary(&self, time: &TimeArgs) -> [String; 5] {
        let last = self.points.last().copied().unwrap_or_default();
        [
            format!("n {}", self.points.len()),
            format!("min {}", render::value(self.y.0, &self.unit)),
            format!("max {}", render::value(self.y.1, &self.unit)),
            format!(
                "last {} at {}",
                render::value(last.1, &self.unit),
                time.show(from_ms(last.0))
            ),
            format!("alert episodes {}", self.alerts.len()),
        ]
    }
}

/// `points` (in time order) thinned to at most the lowest and the highest
/// of each of `columns` columns over `x0..=x1`, in time order: a spike
/// stays. Fewer than two per column are kept as they are.
fn thin(points: &[(i64, f64)], x0: i64, x1: i64, columns: usize) -> Vec<(i64, f64)> {
    if points.len() <= 2 * columns || columns == 0 {
        return points.to_vec();
    }
    let span = (x1 - x0).max(1) as f64;
    let column_of = |t: i64| (((t - x0) as f64 / span * columns as f64) as usize).min(columns - 1);
    let mut out = Vec::with_capacity(2 * columns);
    let mut i = 0;
    while i < points.len() {
        let c = column_of(points[i].0);
        let (mut low, mut high) = (points[i], points[i]);
        let mut j = i + 1;
        while j < points.len() && column_of(points[j].0) == c {
            if points[j].1 < low.1 {
                low = points[j];
            }
            if points[j].1 > high.1 {
                high = points[j];
            }
            j += 1;
        }
        if low.0 == high.0 && low.1 == high.1 {
            out.push(low);
        } else if low.0 <= high.0 {
            out.extend([low, high]);
        } else {
            out.extend([high, low]);
        }
        i = j;
    }
    out
}

/// The terminal chart: a braille line under y labels with the unit, the
/// alert episodes as `^` under the x axis, the first and last device time,
/// and a summary line. Plain ASCII and braille only; `width` columns.
fn terminal(chart: &Chart, time: &TimeArgs, width: usize) -> String {
    let width = width.max(40);
    let (lo, hi) = chart.y_range();
    let decimals = chart.decimals();
    let label = |v: f64| format!("{v:.decimals$} {}", chart.unit);
    let rows = TERMINAL_ROWS;
    let dots_y = rows * 4;
    let label_at = |row: usize| -> Option<f64> {
        let dot = match row {
            0 => return Some(hi),
            r if r == rows - 1 => return Some(lo),
            r if r == rows / 2 => r as f64 * 4.0 + 1.5,
            _ => return None,
        };
        Some(hi - dot / (dots_y - 1) as f64 * (hi - lo))
    };
    let labels: Vec<Option<String>> = (0..rows).map(|r| label_at(r).map(label)).collect();
    let pad = labels.iter().flatten().map(String::len).max().unwrap_or(0);
    let plot = width.saturating_sub(pad + 2).max(10);
    let dots_x = plot * 2;
    let (x0, x1) = chart.x;
    let to_x = |t: i64| -> i64 {
        ((t - x0) as f64 / (x1 - x0) as f64 * (dots_x - 1) as f64).round() as i64
    };
    let to_y = |v: f64| -> i64 {
        ((hi - v) / (hi - lo) * (dots_y - 1) as f64)
            .round()
            .clamp(0.0, (dots_y - 1) as f64) as i64
    };
    let mut cells = vec![vec![0u8; plot]; rows];
    let mut dot = |x: i64, y: i64| {
        let (x, y) = (x.clamp(0, dots_x as i64 - 1), y.clamp(0, dots_y as i64 - 1));
        const BITS: [[u8; 4]; 2] = [[0x01, 0x02, 0x04, 0x40], [0x08, 0x10, 0x20, 0x80]];
        cells[y as usize / 4][x as usize / 2] |= BITS[x as usize % 2][y as usize % 4];
    };
    for segment in chart.segments(dots_x) {
        let mut previous: Option<(i64, i64)> = None;
        for &(t, v) in &segment {
            let here = (to_x(t), to_y(v));
            match previous {
                // A straight line of dots from the previous point.
                Some((px, py)) => {
                    let n = (here.0 - px).abs().max((here.1 - py).abs()).max(1);
                    for k in 0..=n {
                        dot(px + (here.0 - px) * k / n, py + (here.1 - py) * k / n);
                    }
                }
                None => dot(here.0, here.1),
            }
            previous = Some(here);
        }
    }
    let mut out = String::new();
    let title = [
        format!("{} of {},", chart.kind, chart.device),
        format!("received {}", time.show(chart.since)),
        format!("to {}", time.show(chart.until)),
    ];
    for line in fit(&title, " ", width) {
        let _ = writeln!(out, "{line}");
    }
    for (r, row) in cells.iter().enumerate() {
        let text: String = row
            .iter()
            .map(|&bits| match bits {
                0 => ' ',
                b => char::from_u32(0x2800 + u32::from(b)).unwrap_or(' '),
            })
            .collect();
        let tick = if labels[r].is_some() { '+' } else { '|' };
        let l = labels[r].as_deref().unwrap_or("");
        let _ = writeln!(out, "{l:>pad$} {tick}{}", text.trim_end());
    }
    let _ = writeln!(out, "{:pad$} +{}", "", "-".repeat(plot));
    if !chart.alerts.is_empty() {
        let mut marks = vec![' '; plot];
        for a in &chart.alerts {
            let c = (to_x(a.device_time.timestamp_millis()) / 2).clamp(0, plot as i64 - 1);
            marks[c as usize] = '^';
        }
        let marks: String = marks.into_iter().collect();
        let _ = writeln!(out, "{:pad$}  {}", "", marks.trim_end());
    }
    let (start, end) = (time.show(from_ms(x0)), time.show(from_ms(x1)));
    if start.len() + end.len() < plot {
        let gap = plot - start.len();
        let _ = writeln!(out, "{:pad$}  {start}{end:>gap$}", "");
    } else {
        // Indented under the plot when that fits, else from the margin.
        let indent = if pad + 7 + start.len().max(end.len()) <= width {
            pad + 2
        } else {
            0
        };
        let _ = writeln!(out, "{:indent$}from {start}", "");
        let _ = writeln!(out, "{:indent$}to   {end}", "");
    }
    let _ = writeln!(out, "{:pad$}  device time", "");
    for line in fit(&chart.summary(time), "  ", width) {
        let _ = writeln!(out, "{line}");
    }
    if !chart.alerts.is_empty() {
        // The list names the kinds (`episode`, `shock_delivered`).
        let mut legend = vec!["^ alert episodes:".to_owned()];
        legend.extend(alert_list(&chart.alerts));
        for line in fit(&legend, " ", width) {
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

/// `items` joined by `sep` into lines of at most `width` characters (an
/// item longer than that gets a line of its own).
fn fit(items: &[String], sep: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = vec![];
    for item in items {
        match lines.last_mut() {
            Some(line) if line.chars().count() + sep.len() + item.chars().count() <= width => {
                line.push_str(sep);
                line.push_str(item);
            }
            _ => lines.push(item.clone()),
        }
    }
    lines
}

/// `episode VT x2,`, `shock_delivered x1`.
fn alert_list(alerts: &[AlertMark]) -> Vec<String> {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for a in alerts {
        let name = match &a.detail {
            Some(d) => format!("{} {}", a.kind, super::readings::safe_bytes(d.as_bytes())),
            None => a.kind.clone(),
        };
        *counts.entry(name).or_default() += 1;
    }
    let n = counts.len();
    counts
        .into_iter()
        .enumerate()
        .map(|(i, (name, count))| {
            let comma = if i + 1 < n { "," } else { "" };
            format!("{name} x{count}{comma}")
        })
        .collect()
}

/// The x axis: device time in ms, mapped linearly, with the round times of
/// [`time_ticks`] as its only key points (grid lines and labels).
struct TimeAxis {
    range: std::ops::Range<i64>,
    ticks: Vec<i64>,
}

impl Ranged for TimeAxis {
    // Labelled by `x_label_formatter`.
    type FormatOption = DefaultFormatting;
    type ValueType = i64;

    fn map(&self, value: &i64, limit: (i32, i32)) -> i32 {
        let (start, end) = (self.range.start, self.range.end);
        let share = (*value - start) as f64 / (end - start).max(1) as f64;
        limit.0 + (share * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<i64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<i64> {
        self.range.clone()
    }
}

/// Round times for the x axis of `x0..=x1` (ms), at most `most` of them, in
/// the zone `offset` ms from UTC, with their labels: `HH:MM` (`:SS` for
/// steps under a minute), the date `MM-DD` on the first and at each new day.
fn time_ticks(x0: i64, x1: i64, offset: i64, most: usize) -> Vec<(i64, String)> {
    const S: i64 = 1000;
    const STEPS: [i64; 19] = [
        S,
        5 * S,
        10 * S,
        30 * S,
        60 * S,
        120 * S,
        300 * S,
        600 * S,
        900 * S,
        1800 * S,
        3600 * S,
        7200 * S,
        10_800 * S,
        21_600 * S,
        43_200 * S,
        86_400 * S,
        172_800 * S,
        604_800 * S,
        2_592_000 * S,
    ];
    let span = x1 - x0;
    let step = STEPS
        .into_iter()
        .find(|step| span / step < most as i64)
        .unwrap_or(span.max(1));
    let format = if step < 60 * S { "%H:%M:%S" } else { "%H:%M" };
    let mut ticks = vec![];
    let mut day = None;
    let mut t = (x0 + offset).div_euclid(step) * step + step - offset;
    if t - step >= x0 {
        t -= step;
    }
    while t <= x1 {
        // The shown zone's wall time, as if it were UTC.
        let wall = from_ms(t + offset);
        let date = wall.date_naive();
        let label = if day != Some(date) {
            wall.format(&format!("%m-%d {format}")).to_string()
        } else {
            wall.format(format).to_string()
        };
        day = Some(date);
        ticks.push((t, label));
        t += step;
    }
    ticks
}

/// Draws `chart` on a picture: title, axes with units, the line, the alert
/// episodes as red vertical markers, a legend. `separate_steps`: each step
/// of the line is a stroke of its own (bitmaps; SVG joins its polylines).
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    chart: &Chart,
    time: &TimeArgs,
    separate_steps: bool,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    root.fill(&WHITE).map_err(fail)?;
    let (w, h) = root.dim_in_pixel();
    let small = (h / 40).clamp(10, 24);
    let (lo, hi) = chart.y_range();
    let margin = (hi - lo) * 0.05;
    let (lo, hi) = (lo - margin, hi + margin);
    let (x0, x1) = chart.x;
    // The x axis's ticks are round times of the shown zone.
    let offset = if time.utc {
        0
    } else {
        i64::from(from_ms(x0).with_timezone(&Local).offset().local_minus_utc()) * 1000
    };
    let ticks: std::collections::BTreeMap<i64, String> =
        time_ticks(x0, x1, offset, (w as usize / 100).max(2))
            .into_iter()
            .collect();
    let caption = format!(
        "{} of {}, received {} to {}",
        chart.kind,
        chart.device,
        time.show(chart.since),
        time.show(chart.until)
    );
    let mut plot = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", small + 4))
        .margin(small)
        .x_label_area_size(small * 3 + 6)
        .y_label_area_size(small * 5)
        .build_cartesian_2d(
            TimeAxis {
                range: x0..x1,
                ticks: ticks.keys().copied().collect(),
            },
            lo..hi,
        )
        .map_err(fail)?;
    let x_label = |t: &i64| ticks.get(t).cloned().unwrap_or_default();
    let decimals = chart.decimals();
    let y_label = |v: &f64| format!("{v:.decimals$}");
    let zone = if time.utc {
        "UTC".to_owned()
    } else {
        from_ms(x0)
            .with_timezone(&Local)
            .format("UTC%:z")
            .to_string()
    };
    plot.configure_mesh()
        .x_desc(format!("device time ({zone})"))
        .y_desc(format!("{} ({})", chart.kind, chart.unit))
        .x_label_formatter(&x_label)
        .y_labels((h as usize / 60).max(3))
        .y_label_formatter(&y_label)
        .label_style(("sans-serif", small))
        .axis_desc_style(("sans-serif", small))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(210, 210, 210))
        .draw()
        .map_err(fail)?;
    // Alert episodes: a faint vertical line under the line, and a marker
    // above the plot, one per pixel column.
    let mut alerts: Vec<(i32, i64)> = chart
        .alerts
        .iter()
        .map(|a| a.device_time.timestamp_millis())
        .map(|t| (plot.backend_coord(&(t, lo)).0, t))
        .collect();
    alerts.dedup_by_key(|c| c.0);
    plot.draw_series(
        alerts
            .iter()
            .map(|&(_, t)| PathElement::new(vec![(t, lo), (t, hi)], ALERT_COLOUR.mix(0.6))),
    )
    .map_err(fail)?;
    let style = LINE_COLOUR.stroke_width(2);
    let columns = plot.plotting_area().dim_in_pixel().0 as usize;
    for segment in chart.segments(columns) {
        match segment.as_slice() {
            // A reading alone between silences: a dot.
            [one] => plot.draw_series([Circle::new(*one, 2, style.filled())]),
            // Each step its own stroke: plotters joins a wide polyline with
            // mitres that shoot far off at the sharp turns of a thinned line.
            _ if separate_steps => plot.draw_series(
                segment
                    .windows(2)
                    .map(|w| PathElement::new(vec![w[0], w[1]], style)),
            ),
            _ => plot.draw_series(LineSeries::new(segment, style)),
        }
        .map_err(fail)?;
    }
    if !alerts.is_empty() {
        plot.draw_series(
            alerts
                .iter()
                .map(|&(_, t)| TriangleMarker::new((t, hi), 6, ALERT_COLOUR.filled())),
        )
        .map_err(fail)?;
    }
    let mut entries = vec![(None, format!("{} ({})", chart.kind, chart.unit))];
    if !alerts.is_empty() {
        entries.push((
            Some(ALERT_COLOUR),
            format!(
                "alert episode ({}): {}",
                EPISODE_KINDS.join(", "),
                chart.alerts.len()
            ),
        ));
    }
    legend(
        &plot.plotting_area().strip_coord_spec(),
        &entries,
        style,
        small,
    )
    .map_err(fail)?;
    root.present().map_err(fail)?;
    Ok(())
}

/// The legend in the plot's upper right corner, one line per entry: the
/// line's stroke (`None`) or an alert marker of its colour, then the text.
/// Sized by the backend's own text metrics (plotters' series labels size
/// their box by a font estimate that the PNG's bitmap font overflows).
fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[(Option<RGBColor>, String)],
    line: ShapeStyle,
    size: u32,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let font = ("sans-serif", size)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Left, VPos::Center));
    let (mut text_w, mut text_h) = (0, 0);
    for (_, text) in entries {
        let (w, h) = area.estimate_text_size(text, &font)?;
        (text_w, text_h) = (text_w.max(w as i32), text_h.max(h as i32));
    }
    let (pad, symbol) = (size as i32 / 2, 30);
    let row = text_h + pad;
    let (w, h) = (symbol + text_w + 2 * pad, row * entries.len() as i32 + pad);
    let x0 = area.dim_in_pixel().0 as i32 - w - size as i32;
    let y0 = size as i32;
    let corners = [(x0, y0), (x0 + w, y0 + h)];
    area.draw(&Rectangle::new(corners, WHITE.mix(0.85).filled()))?;
    area.draw(&Rectangle::new(corners, BLACK))?;
    for (i, (marker, text)) in entries.iter().enumerate() {
        let (x, y) = (x0 + pad, y0 + pad + row * i as i32 + text_h / 2);
        match marker {
            Some(colour) => area.draw(&TriangleMarker::new((x + 10, y), 5, colour.filled()))?,
            None => area.draw(&PathElement::new(vec![(x, y), (x + 20, y)], line))?,
        }
        area.draw_text(text, &font, (x + symbol, y))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(points: Vec<(i64, f64)>, alerts: Vec<i64>) -> Chart {
        let alerts = alerts
            .into_iter()
            .map(|t| AlertMark {
                device: "PM-1".into(),
                kind: "episode".into(),
                detail: Some("VT".into()),
                device_time: from_ms(t),
            })
            .collect();
        let line = crate::outbox::views::series::Line {
            unit: "bpm".into(),
            points,
        };
        Chart::new(
            "heart_rate".into(),
            "PM-1".into(),
            line,
            alerts,
            from_ms(0),
            from_ms(86_400_000),
        )
    }

    #[test]
    fn thinning_keeps_the_spike_of_each_column() {
        let mut points: Vec<(i64, f64)> = (0..10_000).map(|i| (i * 1000, 70.0)).collect();
        points[5_123].1 = 180.0;
        points[7_000].1 = 30.0;
        let thin = thin(&points, 0, 9_999_000, 100);
        assert!(thin.len() <= 200, "{}", thin.len());
        assert!(thin.contains(&(5_123_000, 180.0)));
        assert!(thin.contains(&(7_000_000, 30.0)));
        assert!(thin.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn a_long_silence_breaks_the_line() {
        let mut points: Vec<(i64, f64)> = (0..100).map(|i| (i * 60_000, 70.0)).collect();
        points.extend((200..300).map(|i| (i * 60_000, 72.0)));
        assert_eq!(chart(points, vec![]).segments(1000).len(), 2);
    }

    #[test]
    fn the_terminal_chart_fits_its_width_and_is_plain() {
        let points: Vec<(i64, f64)> = (0..500)
            .map(|i| (i * 60_000, 60.0 + (i % 40) as f64))
            .collect();
        let c = chart(points, vec![100 * 60_000, 400 * 60_000]);
        for width in [40, 80, 200] {
            let text = terminal(&c, &TimeArgs { utc: true }, width);
            for line in text.lines() {
                assert!(line.chars().count() <= width, "{width}: {line:?}");
            }
            assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text}");
            assert!(text.contains("99 bpm") && text.contains("60 bpm"), "{text}");
            assert_eq!(text.matches('^').count(), 2 + 1, "{text}");
        }
    }

    #[test]
    fn time_ticks_are_round_times_of_the_shown_zone() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().timestamp_millis();
        let ticks = time_ticks(t("2026-11-30T07:20:53Z"), t("2026-12-01T03:16:53Z"), 0, 7);
        let labels: Vec<&str> = ticks.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(
            labels,
            [
                "11-30 09:00",
                "12:00",
                "15:00",
                "18:00",
                "21:00",
                "12-01 00:00",
                "03:00"
            ]
        );
        assert_eq!(ticks[0].0, t("2026-11-30T09:00:00Z"));
        // One hour east of UTC: round in that zone.
        let ticks = time_ticks(
            t("2026-11-30T07:20:53Z"),
            t("2026-11-30T09:00:00Z"),
            3_600_000,
            5,
        );
        assert_eq!(
            ticks[0],
            (t("2026-11-30T07:30:00Z"), "11-30 08:30".to_owned())
        );
        assert_eq!(ticks.len(), 4);
        // Seconds for a short span.
        let ticks = time_ticks(t("2026-11-30T07:20:00Z"), t("2026-11-30T07:21:00Z"), 0, 8);
        assert_eq!(ticks[1].1, "07:20:10");
    }

    #[test]
    fn one_value_is_drawn_in_a_widened_range() {
        let c = chart(vec![(0, 2.95)], vec![]);
        let (lo, hi) = c.y_range();
        assert!(lo < 2.95 && hi > 2.95);
        let text = terminal(&c, &TimeArgs { utc: true }, 80);
        assert!(text.contains("n 1  min 2.95 bpm"), "{text}");
    }
}
