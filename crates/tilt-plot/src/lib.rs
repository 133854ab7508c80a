//! # tilt-plot: small SVG line charts
//!
//! tilt draws the same kind of picture everywhere: a few curves (best-of-n, the tilt, a
//! bound, measured points) against KL in nats, in one or more panels side by side. This
//! crate wraps `plotters`' SVG backend in that one shape so that each command only says
//! *what* to draw.
#![deny(missing_docs)]

use plotters::prelude::*;
use std::path::Path;

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeriesStyle {
    /// A solid line through the points.
    Line,
    /// A dashed line (bounds, asymptotes).
    Dashed,
    /// Markers only (measured points), with error bars if given.
    Points,
}

/// One curve of a panel.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (x, y) points; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
    /// Optional symmetric or asymmetric error bars: (y_low, y_high) per point.
    pub error_bars: Option<Vec<(f64, f64)>>,
    /// How to draw it.
    pub style: SeriesStyle,
}

impl Series {
    /// A series drawn with `style`.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>, style: SeriesStyle) -> Self {
        Self {
            name: name.into(),
            points,
            error_bars: None,
            style,
        }
    }
}

/// One chart: a title, labelled axes, and its curves.
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
    /// The curves.
    pub series: Vec<Series>,
}

/// What can go wrong while drawing.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Nothing to draw.
    #[error("plot {0}: no finite points to draw")]
    Empty(String),
    /// The backend failed (usually the output file cannot be written).
    #[error("plot {path}: {message}")]
    Backend {
        /// The output file.
        path: String,
        /// The backend's message.
        message: String,
    },
}

/// Matplotlib's "tab10": ten colours that stay apart, so that eval plots with many
/// strategies do not repeat a colour.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn finite(points: &[(f64, f64)], log_x: bool) -> impl Iterator<Item = (f64, f64)> + '_ {
    points
        .iter()
        .copied()
        .filter(move |(x, y)| x.is_finite() && y.is_finite() && (!log_x || *x > 0.0))
}

fn range(panel: &Panel) -> Option<((f64, f64), (f64, f64))> {
    let mut xs = (f64::INFINITY, f64::NEG_INFINITY);
    let mut ys = (f64::INFINITY, f64::NEG_INFINITY);
    for s in &panel.series {
        for (i, (x, y)) in finite(&s.points, panel.log_x).enumerate() {
            xs = (xs.0.min(x), xs.1.max(x));
            ys = (ys.0.min(y), ys.1.max(y));
            if let Some(eb) = &s.error_bars {
                if let Some((lo, hi)) = eb.get(i) {
                    if lo.is_finite() && hi.is_finite() {
                        ys = (ys.0.min(*lo), ys.1.max(*hi));
                    }
                }
            }
        }
    }
    if !xs.0.is_finite() {
        return None;
    }
    let pad = |(lo, hi): (f64, f64)| {
        let w = (hi - lo).abs().max(1e-9);
        (lo - 0.04 * w, hi + 0.04 * w)
    };
    let x = if panel.log_x {
        (xs.0, xs.1.max(xs.0 * 1.01))
    } else {
        pad(xs)
    };
    Some((x, pad(ys)))
}

fn backend_err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |message| PlotError::Backend {
        path: path.display().to_string(),
        message,
    }
}

/// Height of one row of the legend strip, in pixels.
const LEGEND_ROW: u32 = 22;

/// The legend: every series name once, in order of first appearance, with the colour and
/// style it has there (series are coloured by their index in their panel).
fn legend_entries(panels: &[Panel]) -> Vec<(String, RGBColor, SeriesStyle)> {
    let mut out: Vec<(String, RGBColor, SeriesStyle)> = Vec::new();
    for panel in panels {
        for (k, s) in panel.series.iter().enumerate() {
            if !out.iter().any(|(n, _, _)| *n == s.name) {
                out.push((s.name.clone(), PALETTE[k % PALETTE.len()], s.style));
            }
        }
    }
    out
}

fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    entries: &[(String, RGBColor, SeriesStyle)],
    columns: usize,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let (w, _) = area.dim_in_pixel();
    let col_w = (w as i32 - 40) / columns as i32;
    for (i, (name, color, style)) in entries.iter().enumerate() {
        let x = 20 + (i % columns) as i32 * col_w;
        let y = 8 + (i / columns) as i32 * LEGEND_ROW as i32 + LEGEND_ROW as i32 / 2;
        match style {
            SeriesStyle::Points => {
                area.draw(&Circle::new((x + 10, y), 4, color.filled()))?;
            }
            SeriesStyle::Line => {
                area.draw(&PathElement::new(
                    vec![(x, y), (x + 22, y)],
                    color.stroke_width(2),
                ))?;
            }
            SeriesStyle::Dashed => {
                for d in [0, 9, 18] {
                    area.draw(&PathElement::new(
                        vec![(x + d, y), (x + d + 5, y)],
                        color.stroke_width(2),
                    ))?;
                }
            }
        }
        area.draw(&Text::new(
            name.clone(),
            (x + 30, y - 7),
            ("sans-serif", 14).into_font().color(&BLACK),
        ))?;
    }
    Ok(())
}

/// Draw `panels` side by side into the SVG file `path`, under an overall `title`, with
/// one legend for all of them in a strip below.
///
/// # Errors
/// [`PlotError::Empty`] when a panel has no finite point; [`PlotError::Backend`] when the
/// file cannot be written.
pub fn write_svg(path: &Path, title: &str, panels: &[Panel]) -> Result<(), PlotError> {
    if panels.is_empty() {
        return Err(PlotError::Empty(path.display().to_string()));
    }
    let err = backend_err(path);
    let width = 640 * panels.len() as u32;
    let legend = legend_entries(panels);
    let columns = (2 * panels.len()).max(1);
    let legend_height = LEGEND_ROW * legend.len().div_ceil(columns) as u32 + 16;
    let root = SVGBackend::new(path, (width, 520 + legend_height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| err(e.to_string()))?;
    // The legend gets a strip of its own below the charts, so it never hides a point.
    let (charts, legend_area) = root.split_vertically(root.dim_in_pixel().1 - legend_height);
    draw_legend(&legend_area, &legend, columns).map_err(|e| err(e.to_string()))?;
    let areas = charts.split_evenly((1, panels.len()));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let Some(((x0, x1), (y0, y1))) = range(panel) else {
            return Err(PlotError::Empty(format!(
                "{} ({})",
                path.display(),
                panel.title
            )));
        };
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(&panel.title, ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(62);
        macro_rules! draw {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc(panel.x_label.as_str())
                    .y_desc(panel.y_label.as_str())
                    .draw()
                    .map_err(|e| err(e.to_string()))?;
                for (k, s) in panel.series.iter().enumerate() {
                    let color = PALETTE[k % PALETTE.len()];
                    let pts: Vec<(f64, f64)> = finite(&s.points, panel.log_x).collect();
                    match s.style {
                        SeriesStyle::Line => chart
                            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                            .map_err(|e| err(e.to_string()))?,
                        SeriesStyle::Dashed => chart
                            .draw_series(DashedLineSeries::new(
                                pts.clone(),
                                6,
                                4,
                                color.stroke_width(2).into(),
                            ))
                            .map_err(|e| err(e.to_string()))?,
                        SeriesStyle::Points => {
                            if let Some(eb) = &s.error_bars {
                                chart
                                    .draw_series(pts.iter().zip(eb).filter_map(
                                        |(&(x, y), &(lo, hi))| {
                                            (lo.is_finite() && hi.is_finite()).then(|| {
                                                ErrorBar::new_vertical(
                                                    x,
                                                    lo,
                                                    y,
                                                    hi,
                                                    color.filled(),
                                                    6,
                                                )
                                            })
                                        },
                                    ))
                                    .map_err(|e| err(e.to_string()))?;
                            }
                            chart
                                .draw_series(
                                    pts.iter()
                                        .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
                                )
                                .map_err(|e| err(e.to_string()))?
                        }
                    };
                }
            }};
        }
        if panel.log_x {
            draw!(builder
                .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
                .map_err(|e| err(e.to_string()))?);
        } else {
            draw!(builder
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(|e| err(e.to_string()))?);
        }
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_labels_and_legend() {
        let dir = std::env::temp_dir().join(format!("tilt-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        let panel = Panel {
            title: "reward vs KL".into(),
            x_label: "KL (nats)".into(),
            y_label: "expected reward".into(),
            log_x: false,
            series: vec![
                Series::new("best-of-n", vec![(0.0, 0.0), (1.0, 1.0)], SeriesStyle::Line),
                Series::new("bound", vec![(0.0, 0.0), (1.0, 1.5)], SeriesStyle::Dashed),
            ],
        };
        write_svg(&path, "frontier", &[panel.clone(), panel]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg"));
        assert!(svg.contains("KL (nats)"));
        assert!(svg.contains("best-of-n"));
        assert!(svg.contains("frontier"));
    }

    #[test]
    fn empty_panel_is_an_error_not_a_panic() {
        let path = std::env::temp_dir().join("tilt-plot-empty.svg");
        let panel = Panel {
            title: "empty".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            log_x: false,
            series: vec![Series::new("nan", vec![(f64::NAN, 1.0)], SeriesStyle::Line)],
        };
        assert!(matches!(
            write_svg(&path, "t", &[panel]),
            Err(PlotError::Empty(_))
        ));
    }
}
