//! # tilt-plot: small SVG charts
//!
//! tilt draws the same kind of picture everywhere: a few curves (best-of-n, the tilt, a
//! bound) and measured points (strategies, with error bars) against KL in nats, in one or
//! more panels side by side. This crate wraps `plotters`' SVG backend in that one shape so
//! that each command only says *what* to draw.
//!
//! # What a reader needs, and how it is done here
//! - **Every series stays visible.** Colours come from the Okabe–Ito palette (distinct
//!   under the common colour-vision deficiencies) and each series index also gets its own
//!   marker shape, so two series never look alike even in grey. Points that land on one
//!   another can be drawn hollow ([`Series::hollow`]) and spread sideways by a few pixels
//!   ([`dodge`]); the offset is in pixels, so it never moves a value on the axis.
//! - **Axes fit the data.** A series can be drawn without stretching the axes
//!   ([`Series::clipped`]: a bound far beyond the data is cut at the frame), a horizontal
//!   reference line spans whatever range the data set ([`Series::hline`]), a degenerate
//!   range (every value equal) gets a readable window around it, and tick labels carry as
//!   many decimals as the tick spacing needs (integers on a log axis of whole numbers, such
//!   as sequence lengths).
//! - **Legends never hide data.** Each panel has its legend in a strip below its chart;
//!   when every panel shows the same series, one strip below all of them.
//! - **Paths are checked before any work.** [`check_output`] is what every command that
//!   takes a `--plot` path calls before it computes anything, so that a missing folder or
//!   an unsupported format is reported at once, as bad input ([`PlotError::is_input_error`]).
//!
//! Only SVG is written: a PNG backend needs a font stack (plotters' bitmap backend), which
//! this crate does not take on; convert with `rsvg-convert` or a browser.
#![deny(missing_docs)]

use plotters::coord::Shift;
use plotters::element::{DashedPathElement, Polygon};
use plotters::prelude::*;
use std::path::Path;

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesStyle {
    /// A solid line through the points.
    Line,
    /// A dashed line (bounds, asymptotes, reference lines).
    Dashed,
    /// Markers only (measured points), with error bars if given.
    Points,
}

/// A point marker. Each series index gets its own by default ([`Marker::for_index`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// ●
    Circle,
    /// ■
    Square,
    /// ▲
    TriangleUp,
    /// ◆
    Diamond,
    /// ▼
    TriangleDown,
    /// ✕
    Cross,
    /// ✚
    Plus,
}

impl Marker {
    const ALL: [Marker; 7] = [
        Marker::Circle,
        Marker::Square,
        Marker::TriangleUp,
        Marker::Diamond,
        Marker::TriangleDown,
        Marker::Cross,
        Marker::Plus,
    ];

    /// The default marker of the series at `index` in its panel.
    pub fn for_index(index: usize) -> Marker {
        Marker::ALL[index % Marker::ALL.len()]
    }
}

/// One curve or set of points of a panel.
///
/// Build with [`Series::new`] and the `with_*` methods; the fields are public so that a
/// caller can also set them directly.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (x, y) points; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
    /// Optional error bars: (y_low, y_high) per point.
    pub error_bars: Option<Vec<(f64, f64)>>,
    /// How to draw it.
    pub style: SeriesStyle,
    /// The marker at each point: always drawn for [`SeriesStyle::Points`] (default: the
    /// series index's own, [`Marker::for_index`]); for lines only when set.
    pub marker: Option<Marker>,
    /// Draw markers as outlines, so that points beneath stay visible.
    pub hollow: bool,
    /// A text label per point (e.g. `n = 4`), drawn beside its marker; empty strings and
    /// missing entries draw nothing.
    pub labels: Vec<String>,
    /// A sideways shift of markers and error bars, in pixels (see [`dodge`]).
    pub x_offset_px: i32,
    /// When false, the series does not widen the axes: it is cut at the frame that the
    /// other series set (a bound far beyond the data, say).
    pub sets_range: bool,
    /// A horizontal line at this y across the whole x range (see [`Series::hline`]).
    pub hline: Option<f64>,
    /// Palette slot (default: the series index in its panel).
    pub color: Option<usize>,
}

impl Series {
    /// A series drawn with `style`.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>, style: SeriesStyle) -> Self {
        Self {
            name: name.into(),
            points,
            error_bars: None,
            style,
            marker: None,
            hollow: false,
            labels: Vec::new(),
            x_offset_px: 0,
            sets_range: true,
            hline: None,
            color: None,
        }
    }

    /// A dashed horizontal reference line at `y`, spanning the x range of the panel.
    pub fn hline(name: impl Into<String>, y: f64) -> Self {
        let mut s = Series::new(name, Vec::new(), SeriesStyle::Dashed);
        s.hline = Some(y);
        s
    }

    /// With a marker at each point.
    pub fn with_marker(mut self, marker: Marker) -> Self {
        self.marker = Some(marker);
        self
    }

    /// With hollow (outline) markers.
    pub fn hollow(mut self) -> Self {
        self.hollow = true;
        self
    }

    /// With a label per point.
    pub fn with_labels(mut self, labels: Vec<String>) -> Self {
        self.labels = labels;
        self
    }

    /// With error bars (y_low, y_high) per point.
    pub fn with_error_bars(mut self, bars: Vec<(f64, f64)>) -> Self {
        self.error_bars = Some(bars);
        self
    }

    /// Cut at the frame the other series set, instead of widening the axes.
    pub fn clipped(mut self) -> Self {
        self.sets_range = false;
        self
    }

    /// In palette slot `slot` (to keep one colour for one meaning across panels).
    pub fn with_color(mut self, slot: usize) -> Self {
        self.color = Some(slot);
        self
    }

    fn marker_at(&self, index: usize) -> Option<Marker> {
        match (self.marker, self.style) {
            (Some(m), _) => Some(m),
            (None, SeriesStyle::Points) => Some(Marker::for_index(index)),
            (None, _) => None,
        }
    }
}

/// Spread the [`SeriesStyle::Points`] series of `series` sideways, `step_px` pixels apart
/// and centred on their true x, so that points at (nearly) the same place stay apart; lines
/// are left alone. The values on the axes do not change: only where markers and error bars
/// are drawn.
pub fn dodge(series: &mut [Series], step_px: i32) {
    let count = series
        .iter()
        .filter(|s| s.style == SeriesStyle::Points)
        .count() as i32;
    for (k, s) in series
        .iter_mut()
        .filter(|s| s.style == SeriesStyle::Points)
        .enumerate()
    {
        s.x_offset_px = (2 * k as i32 - (count - 1)) * step_px / 2;
    }
}

/// One chart: a title, labelled axes, and its series.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Title above the chart.
    pub title: String,
    /// Label of the x axis (say the unit, e.g. "KL(π‖p) (nats)").
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// Draw the x axis on a log scale.
    pub log_x: bool,
    /// The series.
    pub series: Vec<Series>,
}

/// What can go wrong while drawing.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Nothing to draw.
    #[error("plot {0}: no finite points to draw")]
    Empty(String),
    /// The output path cannot take the plot (no such directory, a directory, not
    /// writable). Bad input.
    #[error("{path}: {problem}")]
    Path {
        /// The output file.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The output file type is not one this crate writes (only `.svg`). Bad input.
    #[error("{path}: {problem}")]
    Format {
        /// The output file.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The backend failed while writing (the disk filled, the folder went away).
    #[error("plot {path}: {message}")]
    Backend {
        /// The output file.
        path: String,
        /// The backend's message.
        message: String,
    },
}

impl PlotError {
    /// True for the errors that say the caller's output path is wrong ([`PlotError::Path`],
    /// [`PlotError::Format`]): a face reports them as bad input (exit code 2). The others
    /// are failures while running (exit code 1).
    pub fn is_input_error(&self) -> bool {
        matches!(self, PlotError::Path { .. } | PlotError::Format { .. })
    }
}

/// Check, before any work, that `path` can take a plot: it ends in `.svg` (any case), it is
/// not a directory, its directory exists, and a file can be written there. An existing
/// file is opened for appending (not truncated); a new one is created and removed again.
/// Every command with a `--plot` flag calls this first, so all of them check plot paths
/// alike.
///
/// # Errors
/// [`PlotError::Format`] for another extension (`.png` included: only SVG is written);
/// [`PlotError::Path`] for an empty path, a directory, a missing directory, or one that
/// cannot be written.
///
/// ```
/// use tilt_plot::check_output;
/// let dir = std::env::temp_dir();
/// assert!(check_output(&dir.join("tilt-plot-doc.svg")).is_ok());
/// let e = check_output(&dir.join("no-such-folder-tilt").join("a.svg")).unwrap_err();
/// assert!(e.is_input_error() && e.to_string().contains("does not exist"));
/// assert!(check_output(&dir.join("a.png")).unwrap_err().to_string().contains("SVG"));
/// ```
pub fn check_output(path: &Path) -> Result<(), PlotError> {
    if !path.as_os_str().is_empty() && !path.is_dir() {
        check_format(path)?;
    }
    check_writable(path)
}

/// Check, before any work, that a file can be written at `path` (any output file, not only
/// a plot: the CLI checks its manifests and scorer files with it too): not empty, not a
/// directory, in a directory that exists and takes a new file. An existing file is opened
/// for appending (not truncated); a new one is created and removed again.
///
/// # Errors
/// [`PlotError::Path`] saying what is wrong.
pub fn check_writable(path: &Path) -> Result<(), PlotError> {
    let shown = path.display().to_string();
    let bad = |problem: String| PlotError::Path {
        path: shown.clone(),
        problem,
    };
    if path.as_os_str().is_empty() {
        return Err(bad("empty path".into()));
    }
    if path.is_dir() {
        return Err(bad("is a directory; give a file name".into()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(bad(format!(
            "directory {} does not exist (create it first)",
            dir.display()
        )));
    }
    if path.exists() {
        std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| bad(format!("cannot be written: {e}")))?;
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| bad(format!("cannot be created: {e}")))?;
        std::fs::remove_file(path).map_err(|e| bad(format!("cannot be removed again: {e}")))?;
    }
    Ok(())
}

/// The extension check of [`check_output`] alone.
fn check_format(path: &Path) -> Result<(), PlotError> {
    let ext = path.extension().and_then(|e| e.to_str());
    if ext.is_some_and(|e| e.eq_ignore_ascii_case("svg")) {
        return Ok(());
    }
    let what = match ext {
        Some(e) => format!(".{e} is not supported"),
        None => "has no extension".into(),
    };
    Err(PlotError::Format {
        path: path.display().to_string(),
        problem: format!(
            "{what}: plots are written as SVG only; give a path ending in .svg (convert \
             with e.g. rsvg-convert)"
        ),
    })
}

/// The Okabe–Ito palette (Okabe & Ito 2008, "Color Universal Design"), yellow last: eight
/// colours that stay distinct under protanopia, deuteranopia and tritanopia. With more
/// series than colours, the marker shapes (seven) keep them apart.
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),   // blue
    RGBColor(213, 94, 0),    // vermillion
    RGBColor(0, 158, 115),   // bluish green
    RGBColor(204, 121, 167), // reddish purple
    RGBColor(230, 159, 0),   // orange
    RGBColor(86, 180, 233),  // sky blue
    RGBColor(0, 0, 0),       // black
    RGBColor(240, 228, 66),  // yellow
];

fn color_of(series: &Series, index: usize) -> RGBColor {
    PALETTE[series.color.unwrap_or(index) % PALETTE.len()]
}

fn finite(points: &[(f64, f64)], log_x: bool) -> impl Iterator<Item = (usize, (f64, f64))> + '_ {
    points
        .iter()
        .copied()
        .enumerate()
        .filter(move |(_, (x, y))| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0))
}

/// A readable window around `[lo, hi]`: 4% padding, and around a single value (a
/// degenerate range) ±10% of it (±1 at 0), so that ticks stay readable.
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let scale = lo.abs().max(hi.abs());
    if hi - lo <= 1e-9 * scale || hi - lo < f64::MIN_POSITIVE {
        let mid = 0.5 * (lo + hi);
        let half = if mid == 0.0 { 1.0 } else { 0.1 * mid.abs() };
        return (mid - half, mid + half);
    }
    let w = hi - lo;
    (lo - 0.04 * w, hi + 0.04 * w)
}

/// The axis ranges set by the series that set ranges (x of every point, y of every point,
/// error bar and reference line). When those span a single x (every best-of-n at KL 0,
/// say), the clipped series count too, so that the frame shows what they add.
fn range(panel: &Panel) -> Option<((f64, f64), (f64, f64))> {
    let frame = extent(panel, false)?;
    let ((x0, x1), _) = frame;
    if x1 - x0 <= 1e-9 * x0.abs().max(x1.abs()) {
        if let Some(wider) = extent(panel, true) {
            if wider.0 .1 - wider.0 .0 > x1 - x0 {
                return Some(window(panel, wider));
            }
        }
    }
    Some(window(panel, frame))
}

/// The data extent of the series that set ranges (all series with `all`).
#[allow(clippy::type_complexity)]
fn extent(panel: &Panel, all: bool) -> Option<((f64, f64), (f64, f64))> {
    let mut xs = (f64::INFINITY, f64::NEG_INFINITY);
    let mut ys = (f64::INFINITY, f64::NEG_INFINITY);
    for s in panel.series.iter().filter(|s| all || s.sets_range) {
        for (i, (x, y)) in finite(&s.points, panel.log_x) {
            xs = (xs.0.min(x), xs.1.max(x));
            ys = (ys.0.min(y), ys.1.max(y));
            if let Some(&(lo, hi)) = s.error_bars.as_ref().and_then(|eb| eb.get(i)) {
                if lo.is_finite() && hi.is_finite() {
                    ys = (ys.0.min(lo), ys.1.max(hi));
                }
            }
        }
        if let Some(y) = s.hline.filter(|y| y.is_finite()) {
            ys = (ys.0.min(y), ys.1.max(y));
        }
    }
    if !xs.0.is_finite() || !ys.0.is_finite() {
        return None;
    }
    Some((xs, ys))
}

/// The drawn window around a data extent.
fn window(panel: &Panel, (xs, ys): ((f64, f64), (f64, f64))) -> ((f64, f64), (f64, f64)) {
    let x = if panel.log_x {
        let (lo, hi) = (xs.0, xs.1.max(xs.0 * 1.01));
        // A little room in log space, so that end markers are not cut in half.
        let pad = (hi / lo).powf(0.04);
        (lo / pad, hi * pad)
    } else {
        padded(xs.0, xs.1)
    };
    (x, padded(ys.0, ys.1))
}

/// Tick labels with the decimals that ticks about `(hi − lo)/5` apart need; scientific
/// notation for very large or small magnitudes.
fn linear_formatter(lo: f64, hi: f64) -> impl Fn(&f64) -> String {
    let step = (hi - lo).abs() / 5.0;
    let magnitude = lo.abs().max(hi.abs());
    let decimals = if step > 0.0 {
        (-step.log10().floor()).clamp(0.0, 12.0) as usize
    } else {
        2
    };
    let scientific = magnitude >= 1e6 || (magnitude < 1e-3 && magnitude > 0.0) || decimals > 6;
    move |v: &f64| {
        if v.abs() < step * 1e-9 {
            "0".to_string()
        } else if scientific {
            format!("{v:.2e}")
        } else {
            format!("{v:.decimals$}")
        }
    }
}

/// Labels of a log axis: whole numbers when every value on it is one (lengths, counts),
/// else compact numbers.
fn log_formatter(integers: bool) -> impl Fn(&f64) -> String {
    move |v: &f64| {
        if integers && *v >= 1.0 && *v < 1e15 {
            format!("{}", v.round() as u64)
        } else if (1e-3..1e6).contains(&v.abs()) {
            let t = format!("{v:.4}");
            t.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            format!("{v:.0e}")
        }
    }
}

fn backend_err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |message| PlotError::Backend {
        path: path.display().to_string(),
        message,
    }
}

/// Height of one row of a legend strip, in pixels.
const LEGEND_ROW: i32 = 22;
/// Width of one panel, in pixels.
const PANEL_WIDTH: u32 = 640;
/// Height of the chart part of a panel, in pixels.
const CHART_HEIGHT: u32 = 480;

/// One legend entry: how its series looks.
#[derive(Debug, Clone, PartialEq)]
struct LegendEntry {
    name: String,
    color: RGBColor,
    style: SeriesStyle,
    marker: Option<Marker>,
    hollow: bool,
}

fn legend_of(panel: &Panel) -> Vec<LegendEntry> {
    let mut out: Vec<LegendEntry> = Vec::new();
    for (k, s) in panel.series.iter().enumerate() {
        if !out.iter().any(|e| e.name == s.name) {
            out.push(LegendEntry {
                name: s.name.clone(),
                color: color_of(s, k),
                style: s.style,
                marker: s.marker_at(k),
                hollow: s.hollow,
            });
        }
    }
    out
}

/// Approximate width of a point label (12 px sans-serif), in pixels.
fn label_width(text: &str) -> i32 {
    (text.chars().count() as f64 * 6.4).ceil() as i32
}

/// Approximate width of `text` at the legend's 14 px sans-serif, in pixels.
fn text_width(text: &str) -> i32 {
    (text.chars().count() as f64 * 7.4).ceil() as i32
}

/// Lay legend entries out in rows that fit `width`: (x, row) per entry.
fn legend_layout(entries: &[LegendEntry], width: i32) -> (Vec<(i32, i32)>, i32) {
    let mut pos = Vec::with_capacity(entries.len());
    let (mut x, mut row) = (16, 0);
    for e in entries {
        let w = 36 + text_width(&e.name) + 18;
        if x > 16 && x + w > width - 8 {
            x = 16;
            row += 1;
        }
        pos.push((x, row));
        x += w;
    }
    let rows = if entries.is_empty() { 0 } else { row + 1 };
    (pos, rows)
}

fn legend_height(entries: &[LegendEntry], width: i32) -> u32 {
    let (_, rows) = legend_layout(entries, width);
    (rows * LEGEND_ROW + 14) as u32
}

/// Half-size of a marker, pixels.
const MARKER_R: i32 = 5;
/// Least distance between two markers of one line series, pixels.
const MARKER_SPACING: i32 = 14;

/// The outline of a polygonal marker around `(dx, 0)`, in pixels.
fn marker_outline(marker: Marker, dx: i32) -> Vec<(i32, i32)> {
    let r = MARKER_R;
    let v: Vec<(i32, i32)> = match marker {
        Marker::Square => vec![
            (-r + 1, -r + 1),
            (r - 1, -r + 1),
            (r - 1, r - 1),
            (-r + 1, r - 1),
        ],
        Marker::TriangleUp => vec![(0, -r - 1), (r, r - 1), (-r, r - 1)],
        Marker::TriangleDown => vec![(0, r + 1), (r, -r + 1), (-r, -r + 1)],
        Marker::Diamond => vec![(0, -r - 1), (r, 0), (0, r + 1), (-r, 0)],
        Marker::Circle | Marker::Cross | Marker::Plus => Vec::new(),
    };
    v.into_iter().map(|(x, y)| (x + dx, y)).collect()
}

/// Draw `marker` at `at` (a data point, or a pixel of a legend), shifted `dx` pixels
/// sideways: filled, or as a white-filled outline when `hollow`.
fn draw_marker<DB: DrawingBackend, CT: CoordTranslate>(
    area: &DrawingArea<DB, CT>,
    at: CT::From,
    marker: Marker,
    color: RGBColor,
    hollow: bool,
    dx: i32,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    CT::From: Clone,
{
    let r = MARKER_R;
    let stroke = color.stroke_width(2);
    let fill = if hollow {
        WHITE.filled()
    } else {
        color.filled()
    };
    let here = || EmptyElement::<CT::From, DB>::at(at.clone());
    match marker {
        Marker::Circle => {
            area.draw(&(here() + Circle::new((dx, 0), r, fill)))?;
            if hollow {
                area.draw(&(here() + Circle::new((dx, 0), r, stroke)))?;
            }
        }
        Marker::Cross | Marker::Plus => {
            let arms = if marker == Marker::Cross {
                [((-r, -r), (r, r)), ((-r, r), (r, -r))]
            } else {
                [((-r - 1, 0), (r + 1, 0)), ((0, -r - 1), (0, r + 1))]
            };
            let width = if hollow { 2 } else { 3 };
            for (a, b) in arms {
                area.draw(
                    &(here()
                        + PathElement::new(
                            vec![(a.0 + dx, a.1), (b.0 + dx, b.1)],
                            color.stroke_width(width),
                        )),
                )?;
            }
        }
        _ => {
            let pts = marker_outline(marker, dx);
            area.draw(&(here() + Polygon::new(pts.clone(), fill)))?;
            if hollow {
                let mut closed = pts.clone();
                closed.push(pts[0]);
                area.draw(&(here() + PathElement::new(closed, stroke)))?;
            }
        }
    }
    Ok(())
}

fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[LegendEntry],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (w, _) = area.dim_in_pixel();
    let (pos, _) = legend_layout(entries, w as i32);
    for (e, &(x, row)) in entries.iter().zip(&pos) {
        let y = 8 + row * LEGEND_ROW + LEGEND_ROW / 2;
        match e.style {
            SeriesStyle::Points => {}
            SeriesStyle::Line => area.draw(&PathElement::new(
                vec![(x, y), (x + 28, y)],
                e.color.stroke_width(2),
            ))?,
            SeriesStyle::Dashed => {
                for d in [0, 11, 22] {
                    area.draw(&PathElement::new(
                        vec![(x + d, y), (x + d + 6, y)],
                        e.color.stroke_width(2),
                    ))?;
                }
            }
        }
        if let Some(m) = e.marker {
            draw_marker(area, (x + 14, y), m, e.color, e.hollow, 0)?;
        }
        area.draw(&Text::new(
            e.name.clone(),
            (x + 36, y - 8),
            ("sans-serif", 14).into_font().color(&BLACK),
        ))?;
    }
    Ok(())
}

/// `x` on the axis's own scale (log for a log axis), where straight lines are straight.
fn axis_x(x: f64, log_x: bool) -> f64 {
    if log_x {
        x.ln()
    } else {
        x
    }
}

/// Cut the polyline `pts` to the frame `[x0, x1] × [y0, y1]` (Liang–Barsky per segment, on
/// the axis's own scale): the pieces inside, each a polyline.
fn clip_polyline(
    pts: &[(f64, f64)],
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
    log_x: bool,
) -> Vec<Vec<(f64, f64)>> {
    let (ax0, ax1) = (axis_x(x0, log_x), axis_x(x1, log_x));
    let back = |x: f64| if log_x { x.exp() } else { x };
    let mut pieces: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current: Vec<(f64, f64)> = Vec::new();
    for w in pts.windows(2) {
        let (p, q) = (
            (axis_x(w[0].0, log_x), w[0].1),
            (axis_x(w[1].0, log_x), w[1].1),
        );
        let (dx, dy) = (q.0 - p.0, q.1 - p.1);
        let (mut t0, mut t1) = (0.0f64, 1.0f64);
        let mut inside = true;
        for (den, num) in [
            (-dx, p.0 - ax0),
            (dx, ax1 - p.0),
            (-dy, p.1 - y0),
            (dy, y1 - p.1),
        ] {
            if den == 0.0 {
                if num < 0.0 {
                    inside = false;
                }
            } else {
                let t = num / den;
                if den < 0.0 {
                    t0 = t0.max(t);
                } else {
                    t1 = t1.min(t);
                }
            }
        }
        if !inside || t0 > t1 {
            if current.len() > 1 {
                pieces.push(std::mem::take(&mut current));
            }
            current.clear();
            continue;
        }
        let a = (back(p.0 + t0 * dx), p.1 + t0 * dy);
        let b = (back(p.0 + t1 * dx), p.1 + t1 * dy);
        if current.last() != Some(&a) {
            if current.len() > 1 {
                pieces.push(std::mem::take(&mut current));
            }
            current = vec![a];
        }
        current.push(b);
        if t1 < 1.0 {
            pieces.push(std::mem::take(&mut current));
        }
    }
    if current.len() > 1 {
        pieces.push(current);
    }
    pieces
}

/// Drop consecutive points that land on the same pixel (a line of 10⁶ points would
/// otherwise write 10⁶ path vertices for a few hundred visible ones).
fn thin_to_pixels<DB: DrawingBackend, CT: CoordTranslate<From = (f64, f64)>>(
    area: &DrawingArea<DB, CT>,
    pts: Vec<(f64, f64)>,
) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(pts.len().min(4096));
    let mut last_px = None;
    let n = pts.len();
    for (i, p) in pts.into_iter().enumerate() {
        let px = area.map_coordinate(&p);
        if Some(px) != last_px || i + 1 == n {
            out.push(p);
            last_px = Some(px);
        }
    }
    out
}

/// Draw one panel's series on its chart area.
fn draw_series<DB: DrawingBackend, CT: CoordTranslate<From = (f64, f64)>>(
    area: &DrawingArea<DB, CT>,
    panel: &Panel,
    frame: ((f64, f64), (f64, f64)),
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let ((x0, x1), (y0, y1)) = frame;
    // Pixel boxes of the labels drawn so far: a label that would overlap one is left out,
    // so crowded points (best-of-n near saturation) do not pile their labels up.
    let mut label_boxes: Vec<(i32, i32, i32, i32)> = Vec::new();
    for (k, s) in panel.series.iter().enumerate() {
        let color = color_of(s, k);
        let style = color.stroke_width(2);
        let mut pts: Vec<(usize, (f64, f64))> = finite(&s.points, panel.log_x).collect();
        if let Some(y) = s.hline.filter(|y| y.is_finite()) {
            pts = vec![(0, (x0, y)), (1, (x1, y))];
        }
        let in_frame = |&(x, y): &(f64, f64)| x >= x0 && x <= x1 && y >= y0 && y <= y1;
        if s.style != SeriesStyle::Points && pts.len() > 1 {
            let line: Vec<(f64, f64)> = pts.iter().map(|&(_, p)| p).collect();
            let pieces = if s.sets_range {
                vec![line]
            } else {
                clip_polyline(&line, (x0, x1), (y0, y1), panel.log_x)
            };
            for piece in pieces {
                let piece = thin_to_pixels(area, piece);
                if s.style == SeriesStyle::Dashed {
                    area.draw(&DashedPathElement::new(piece, 7, 5, style))?;
                } else {
                    area.draw(&PathElement::new(piece, style))?;
                }
            }
        }
        let dx = s.x_offset_px;
        if let Some(bars) = &s.error_bars {
            for &(i, p) in pts.iter().filter(|(_, p)| s.sets_range || in_frame(p)) {
                let Some(&(lo, hi)) = bars.get(i) else {
                    continue;
                };
                if !(lo.is_finite() && hi.is_finite()) {
                    continue;
                }
                let (_, py) = area.map_coordinate(&p);
                let (_, plo) = area.map_coordinate(&(p.0, lo));
                let (_, phi) = area.map_coordinate(&(p.0, hi));
                let (a, b) = (plo - py, phi - py);
                let bar = EmptyElement::at(p)
                    + PathElement::new(vec![(dx, a), (dx, b)], color.stroke_width(2))
                    + PathElement::new(vec![(dx - 4, a), (dx + 4, a)], color.stroke_width(2))
                    + PathElement::new(vec![(dx - 4, b), (dx + 4, b)], color.stroke_width(2));
                area.draw(&bar)?;
            }
        }
        // Markers of a line mark where it was computed, not data of their own: on a fine
        // grid they are thinned to one per MARKER_SPACING pixels (and labelled points) so
        // that they do not merge into a smear. Points series keep every marker except
        // exact pixel repeats.
        let spacing = if s.style == SeriesStyle::Points {
            1
        } else {
            MARKER_SPACING
        };
        let mut last_px: Option<(i32, i32)> = None;
        for &(i, p) in pts.iter().filter(|(_, p)| s.sets_range || in_frame(p)) {
            let label = s.labels.get(i).filter(|l| !l.is_empty());
            if let Some(m) = s.marker_at(k) {
                let px = area.map_coordinate(&p);
                let far = last_px.is_none_or(|(lx, ly)| {
                    (px.0 - lx).pow(2) + (px.1 - ly).pow(2) >= spacing * spacing
                });
                if far || label.is_some() {
                    draw_marker(area, p, m, color, s.hollow, dx)?;
                    last_px = Some(px);
                }
            }
            if let Some(text) = label {
                // Up and right of the marker, flipped inwards at the frame's right and
                // top edges so that no label is cut.
                let (px, py) = area.map_coordinate(&p);
                let (xr, yr) = area.get_pixel_range();
                let w = label_width(text);
                let bx = if px + dx + 7 + w > xr.end - 2 {
                    px + dx - 7 - w
                } else {
                    px + dx + 7
                };
                let by = if py - 18 < yr.start + 2 {
                    py + 6
                } else {
                    py - 18
                };
                let b = (bx - 3, by - 3, bx + w + 3, by + 15);
                if label_boxes
                    .iter()
                    .any(|o| b.0 < o.2 && o.0 < b.2 && b.1 < o.3 && o.1 < b.3)
                {
                    continue;
                }
                label_boxes.push(b);
                area.draw(
                    &(EmptyElement::at(p)
                        + Text::new(
                            text.clone(),
                            (bx - px, by - py),
                            ("sans-serif", 12).into_font().color(&color),
                        )),
                )?;
            }
        }
    }
    Ok(())
}

/// Draw `panels` side by side into the SVG file `path`, under an overall `title`. Each
/// panel's legend is in a strip below it, or one strip below all when every panel shows
/// the same series.
///
/// # Errors
/// [`PlotError::Format`] unless `path` ends in `.svg`; [`PlotError::Empty`] when a panel
/// has no finite point; [`PlotError::Backend`] when the file cannot be written.
pub fn write_svg(path: &Path, title: &str, panels: &[Panel]) -> Result<(), PlotError> {
    check_format(path)?;
    if panels.is_empty() {
        return Err(PlotError::Empty(path.display().to_string()));
    }
    let frames: Vec<_> = panels
        .iter()
        .map(|p| {
            range(p).ok_or_else(|| PlotError::Empty(format!("{} ({})", path.display(), p.title)))
        })
        .collect::<Result<_, _>>()?;
    let err = backend_err(path);
    let legends: Vec<Vec<LegendEntry>> = panels.iter().map(legend_of).collect();
    let shared = legends.windows(2).all(|w| w[0] == w[1]);
    let width = PANEL_WIDTH * panels.len() as u32;
    let strip = if shared {
        legend_height(&legends[0], width as i32)
    } else {
        legends
            .iter()
            .map(|l| legend_height(l, PANEL_WIDTH as i32))
            .max()
            .unwrap_or(0)
    };
    let title_height = 40;
    let root =
        SVGBackend::new(path, (width, title_height + CHART_HEIGHT + strip)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (title_area, body) = root.split_vertically(title_height);
    title_area
        .draw(&Text::new(
            title.to_string(),
            (width as i32 / 2, 12),
            ("sans-serif", 20).into_font().color(&BLACK).pos(
                plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Top,
                ),
            ),
        ))
        .map_err(|e| err(e.to_string()))?;
    let (charts, legend_strip) = body.split_vertically(CHART_HEIGHT);
    if shared {
        draw_legend(&legend_strip, &legends[0]).map_err(|e| err(e.to_string()))?;
    } else {
        for (area, entries) in legend_strip
            .split_evenly((1, panels.len()))
            .iter()
            .zip(&legends)
        {
            draw_legend(area, entries).map_err(|e| err(e.to_string()))?;
        }
    }
    let areas = charts.split_evenly((1, panels.len()));
    for ((panel, area), &frame) in panels.iter().zip(areas.iter()).zip(&frames) {
        let ((x0, x1), (y0, y1)) = frame;
        let fy = linear_formatter(y0, y1);
        let y_label_width = [y0, 0.5 * (y0 + y1), y1]
            .iter()
            .map(|v| text_width(&fy(v)))
            .max()
            .unwrap_or(40);
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(&panel.title, ("sans-serif", 17))
            .margin(14)
            .margin_right(24)
            .x_label_area_size(48)
            .y_label_area_size((y_label_width + 40) as u32);
        let whole_x = panel
            .series
            .iter()
            .flat_map(|s| finite(&s.points, panel.log_x))
            .all(|(_, (x, _))| x.fract() == 0.0);
        macro_rules! draw {
            ($chart:expr, $fx:expr) => {{
                let mut chart = $chart;
                let fx = $fx;
                chart
                    .configure_mesh()
                    .x_desc(panel.x_label.as_str())
                    .y_desc(panel.y_label.as_str())
                    .x_labels(7)
                    .y_labels(7)
                    .x_label_formatter(&fx)
                    .y_label_formatter(&fy)
                    .label_style(("sans-serif", 13))
                    .axis_desc_style(("sans-serif", 14))
                    .light_line_style(RGBColor(235, 235, 235))
                    .bold_line_style(RGBColor(210, 210, 210))
                    .draw()
                    .map_err(|e| err(e.to_string()))?;
                draw_series(chart.plotting_area(), panel, frame).map_err(|e| err(e.to_string()))?;
            }};
        }
        if panel.log_x {
            draw!(
                builder
                    .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
                    .map_err(|e| err(e.to_string()))?,
                log_formatter(whole_x)
            );
        } else {
            draw!(
                builder
                    .build_cartesian_2d(x0..x1, y0..y1)
                    .map_err(|e| err(e.to_string()))?,
                linear_formatter(x0, x1)
            );
        }
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tilt-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn panel(series: Vec<Series>) -> Panel {
        Panel {
            title: "reward vs KL".into(),
            x_label: "KL (nats)".into(),
            y_label: "expected reward".into(),
            log_x: false,
            series,
        }
    }

    #[test]
    fn writes_an_svg_with_labels_and_legend() {
        let path = tmp("t.svg");
        let p = panel(vec![
            Series::new("best-of-n", vec![(0.0, 0.0), (1.0, 1.0)], SeriesStyle::Line),
            Series::new("bound", vec![(0.0, 0.0), (1.0, 1.5)], SeriesStyle::Dashed),
        ]);
        write_svg(&path, "frontier", &[p.clone(), p]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg"));
        assert!(svg.contains("KL (nats)"));
        assert_eq!(svg.matches("\nbest-of-n\n").count(), 1, "one shared legend");
        assert!(svg.contains("frontier"));
    }

    #[test]
    fn panels_with_different_series_get_one_legend_each() {
        let path = tmp("two.svg");
        let a = panel(vec![Series::new(
            "alpha",
            vec![(0.0, 1.0), (1.0, 2.0)],
            SeriesStyle::Line,
        )]);
        let b = panel(vec![Series::new(
            "beta",
            vec![(0.0, 1.0), (1.0, 2.0)],
            SeriesStyle::Line,
        )]);
        write_svg(&path, "t", &[a, b]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_eq!(svg.matches("\nalpha\n").count(), 1);
        assert_eq!(svg.matches("\nbeta\n").count(), 1);
    }

    #[test]
    fn empty_panel_is_an_error_not_a_panic() {
        let path = tmp("empty.svg");
        let p = panel(vec![Series::new(
            "nan",
            vec![(f64::NAN, 1.0)],
            SeriesStyle::Line,
        )]);
        let e = write_svg(&path, "t", &[p]).unwrap_err();
        assert!(matches!(e, PlotError::Empty(_)));
        assert!(!e.is_input_error());
    }

    #[test]
    fn output_paths_are_checked_as_input() {
        let ok = tmp("ok.SVG");
        check_output(&ok).unwrap();
        assert!(!ok.exists(), "the probe file is removed");
        std::fs::write(&ok, "keep").unwrap();
        check_output(&ok).unwrap();
        assert_eq!(
            std::fs::read_to_string(&ok).unwrap(),
            "keep",
            "not truncated"
        );
        let dir = ok.parent().unwrap().to_path_buf();
        for (path, needle) in [
            (dir.join("missing").join("a.svg"), "does not exist"),
            (dir.clone(), "directory"),
            (dir.join("a.png"), ".png is not supported"),
            (dir.join("a"), "no extension"),
            (std::path::PathBuf::new(), "empty path"),
        ] {
            let e = check_output(&path).unwrap_err();
            assert!(e.is_input_error(), "{e}");
            assert!(e.to_string().contains(needle), "{path:?}: {e}");
        }
        // write_svg itself refuses another format before drawing anything.
        let p = panel(vec![Series::new(
            "a",
            vec![(0.0, 1.0)],
            SeriesStyle::Points,
        )]);
        let png = dir.join("b.png");
        assert!(write_svg(&png, "t", &[p]).unwrap_err().is_input_error());
        assert!(!png.exists());
    }

    #[test]
    fn degenerate_ranges_get_a_readable_window() {
        assert_eq!(padded(0.0, 0.0), (-1.0, 1.0));
        let (lo, hi) = padded(0.5, 0.5);
        assert!((lo - 0.45).abs() < 1e-15 && (hi - 0.55).abs() < 1e-15);
        let f = linear_formatter(lo, hi);
        assert_eq!(f(&0.5), "0.50");
        let f = linear_formatter(-0.04, 1.04);
        assert_eq!(f(&0.2), "0.2");
        assert_eq!(f(&1e-17), "0", "no -0.0 or 1e-17 at the origin");
        assert_eq!(log_formatter(true)(&1000.0), "1000");
    }

    #[test]
    fn clipped_series_do_not_widen_the_axes_and_are_cut_at_the_frame() {
        let p = panel(vec![
            Series::new("data", vec![(0.0, 0.0), (1.0, 1.0)], SeriesStyle::Line),
            Series::new("bound", vec![(0.0, 0.0), (4.0, 1.0)], SeriesStyle::Dashed).clipped(),
        ]);
        let ((x0, x1), _) = range(&p).unwrap();
        assert!(x0 < 0.0 && x1 < 1.1, "{x0} {x1}");
        // When the others span a single x, the clipped series sets the frame after all.
        let flat = panel(vec![
            Series::new("data", vec![(0.0, 1.0), (0.0, 1.0)], SeriesStyle::Line),
            Series::new("bound", vec![(0.0, 1.0), (0.9, 1.0)], SeriesStyle::Dashed).clipped(),
        ]);
        let ((x0, x1), _) = range(&flat).unwrap();
        assert!(x0 < 0.0 && x0 > -0.1 && x1 > 0.9 && x1 < 1.0, "{x0} {x1}");
        let pieces = clip_polyline(&[(0.0, 0.0), (4.0, 1.0)], (0.0, 2.0), (0.0, 1.0), false);
        assert_eq!(pieces, vec![vec![(0.0, 0.0), (2.0, 0.5)]]);
        let logp = clip_polyline(&[(1.0, 0.0), (100.0, 1.0)], (1.0, 10.0), (-1.0, 2.0), true);
        assert!((logp[0][1].0 - 10.0).abs() < 1e-12 && (logp[0][1].1 - 0.5).abs() < 1e-12);
    }

    #[test]
    fn dodge_spreads_points_series_symmetrically_and_markers_differ() {
        let mut s = vec![
            Series::new("line", vec![], SeriesStyle::Line),
            Series::new("a", vec![], SeriesStyle::Points),
            Series::new("b", vec![], SeriesStyle::Points),
            Series::new("c", vec![], SeriesStyle::Points),
        ];
        dodge(&mut s, 8);
        let offs: Vec<i32> = s.iter().map(|s| s.x_offset_px).collect();
        assert_eq!(offs, vec![0, -8, 0, 8]);
        let markers: Vec<Marker> = (0..7).map(Marker::for_index).collect();
        for (i, a) in markers.iter().enumerate() {
            assert!(!markers[i + 1..].contains(a));
        }
        assert!(PALETTE.windows(2).all(|w| w[0] != w[1]));
    }

    #[test]
    fn points_with_error_bars_labels_and_hollow_markers_draw() {
        let path = tmp("points.svg");
        let mut series = vec![
            Series::new("a", vec![(0.1, 0.5)], SeriesStyle::Points)
                .with_error_bars(vec![(0.4, 0.6)])
                .with_labels(vec!["n = 1".into()]),
            Series::new("b", vec![(0.1, 0.5)], SeriesStyle::Points)
                .hollow()
                .with_error_bars(vec![(0.45, 0.55)]),
            Series::hline("reference", 0.5),
        ];
        dodge(&mut series, 10);
        write_svg(&path, "points", &[panel(series)]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("n = 1") && svg.contains("reference"));
        assert!(
            svg.contains("<polygon") || svg.contains("<polyline"),
            "square marker"
        );
    }
}
