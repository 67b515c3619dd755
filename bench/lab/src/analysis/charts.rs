//! Charts of the experiments, drawn with plotters into both SVG and PNG.
//!
//! Text is laid out (SVG) and rasterised (PNG) with ab_glyph from a TrueType file found on the
//! machine at run time (`RINGGATE_FONT`, or DejaVu Sans from Debian's `fonts-dejavu-core`, which
//! `make analysis` installs when missing); no system font library is needed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::AnalysisError;

const PNG_SIZE: (u32, u32) = (1000, 560);
const PALETTE: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// Font files tried for PNG text, in order.
const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers a TTF as plotters' `sans-serif` once; `false` when none was found.
pub fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let from_env = std::env::var("RINGGATE_FONT").ok();
        let paths = from_env
            .iter()
            .map(String::as_str)
            .chain(FONT_CANDIDATES.iter().copied());
        for path in paths {
            let Ok(bytes) = std::fs::read(path) else {
                continue;
            };
            // plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        false
    })
}

fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Something that draws itself on any plotters backend.
trait Drawable {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// Charts are committed beside the docs: an SVG larger than this is written as a PNG instead.
pub const SVG_LIMIT: u64 = 256 * 1024;

/// Renders `draw` into `<out>/<stem>.svg`, or `<out>/<stem>.png` when the SVG would be larger
/// than [`SVG_LIMIT`]; the other file of the pair is removed, so the directory holds exactly
/// the charts the report links.
fn render(
    out: &Path,
    stem: &str,
    size: (u32, u32),
    draw: &impl Drawable,
) -> Result<Vec<PathBuf>, AnalysisError> {
    if !font_available() {
        return Err(AnalysisError::Chart(
            "no TrueType font found: install fonts-dejavu-core or set RINGGATE_FONT to a .ttf"
                .to_string(),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| AnalysisError::io("creating the chart dir", e))?;
    let svg = out.join(format!("{stem}.svg"));
    let png = out.join(format!("{stem}.png"));
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw.draw(&root)
            .map_err(|e| AnalysisError::Chart(format!("{}: {e}", svg.display())))?;
        root.present()
            .map_err(|e| AnalysisError::Chart(format!("{}: {e}", svg.display())))?;
    }
    let svg_size = std::fs::metadata(&svg)
        .map_err(|e| AnalysisError::io(svg.display().to_string(), e))?
        .len();
    if svg_size <= SVG_LIMIT {
        let _ = std::fs::remove_file(&png);
        return Ok(vec![svg]);
    }
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw.draw(&root)
            .map_err(|e| AnalysisError::Chart(format!("{}: {e}", png.display())))?;
        root.present()
            .map_err(|e| AnalysisError::Chart(format!("{}: {e}", png.display())))?;
    }
    let _ = std::fs::remove_file(&svg);
    Ok(vec![png])
}

/// One bar chart panel: labelled bars and an optional "ideal" line.
#[derive(Debug, Clone)]
pub struct BarPanel {
    pub title: String,
    pub labels: Vec<String>,
    pub values: Vec<f64>,
    pub ideal: Option<f64>,
}

/// Bar chart panels side by side with a shared y axis.
pub fn bars(
    out: &Path,
    stem: &str,
    title: &str,
    y_desc: &str,
    panels: &[BarPanel],
) -> Result<Vec<PathBuf>, AnalysisError> {
    let width = (420 * panels.len() as u32).max(PNG_SIZE.0);
    let draw = BarsDraw {
        title,
        y_desc,
        panels,
    };
    render(out, stem, (width, PNG_SIZE.1), &draw)
}

struct BarsDraw<'a> {
    title: &'a str,
    y_desc: &'a str,
    panels: &'a [BarPanel],
}

impl Drawable for BarsDraw<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(self.title, ("sans-serif", 24)).map_err(err)?;
        if self.panels.is_empty() {
            return Ok(());
        }
        let ymax = self
            .panels
            .iter()
            .flat_map(|p| p.values.iter().copied().chain(p.ideal))
            .fold(0.0_f64, f64::max)
            * 1.15
            + 1e-9;
        let areas = root.split_evenly((1, self.panels.len()));
        for (area, panel) in areas.iter().zip(self.panels) {
            if panel.values.is_empty() {
                continue;
            }
            let n = panel.values.len() as u32;
            let labels = &panel.labels;
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d((0u32..n - 1).into_segmented(), 0.0..ymax)
                .map_err(err)?;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .y_desc(self.y_desc)
                .y_label_formatter(&|y| format!("{y:.0}"))
                .x_labels(n as usize)
                .x_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                        labels.get(*i as usize).cloned().unwrap_or_default()
                    }
                    SegmentValue::Last => String::new(),
                })
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(err)?;
            chart
                .draw_series(
                    Histogram::vertical(&chart)
                        .margin(12)
                        .style_func(|v, _| {
                            let i = match v {
                                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => *i as usize,
                                SegmentValue::Last => 0,
                            };
                            PALETTE[i % PALETTE.len()].filled()
                        })
                        .data(panel.values.iter().enumerate().map(|(i, v)| (i as u32, *v))),
                )
                .map_err(err)?;
            if let Some(ideal) = panel.ideal {
                chart
                    .draw_series(LineSeries::new(
                        [(SegmentValue::Exact(0), ideal), (SegmentValue::Last, ideal)],
                        BLACK.stroke_width(2),
                    ))
                    .map_err(err)?
                    .label(format!("ideal {ideal:.1}"))
                    .legend(|(x, y)| {
                        PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2))
                    });
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 14))
                    .draw()
                    .map_err(err)?;
            }
        }
        Ok(())
    }
}

/// One line series.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

/// A line panel: several series over a shared x range.
#[derive(Debug, Clone)]
pub struct LinePanel {
    pub title: String,
    pub series: Vec<Series>,
}

/// Line chart panels side by side with shared axes.
pub fn lines(
    out: &Path,
    stem: &str,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    panels: &[LinePanel],
) -> Result<Vec<PathBuf>, AnalysisError> {
    let width = (420 * panels.len() as u32).max(PNG_SIZE.0);
    let draw = LinesDraw {
        title,
        x_desc,
        y_desc,
        panels,
    };
    render(out, stem, (width, PNG_SIZE.1), &draw)
}

struct LinesDraw<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    panels: &'a [LinePanel],
}

impl Drawable for LinesDraw<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(self.title, ("sans-serif", 24)).map_err(err)?;
        let all = || {
            self.panels
                .iter()
                .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().copied()))
        };
        let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0_f64);
        for (x, y) in all() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            return Ok(());
        }
        if x0 == x1 {
            x1 = x0 + 1.0;
        }
        let y1 = y1 * 1.1 + 1e-9;
        let areas = root.split_evenly((1, self.panels.len().max(1)));
        for (area, panel) in areas.iter().zip(self.panels) {
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(x0..x1, 0.0..y1)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc(self.x_desc)
                .y_desc(self.y_desc)
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(err)?;
            for (k, s) in panel.series.iter().enumerate() {
                let color = PALETTE[k % PALETTE.len()];
                let style = color.stroke_width(if s.dashed { 1 } else { 3 });
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), style))
                    .map_err(err)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
                chart
                    .draw_series(s.points.iter().map(|p| Circle::new(*p, 4, color.filled())))
                    .map_err(err)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(err)?;
        }
        Ok(())
    }
}

/// The A-3 timeline: replicas listed by `/rep` over time, and failed requests per bucket.
#[derive(Debug, Clone)]
pub struct Timeline {
    /// `(seconds, servers in the ring)` samples (`up` of `/lb/status`).
    pub replicas: Vec<(f64, f64)>,
    /// `(seconds, desired N)` samples (`desired` of `/lb/status`).
    pub desired: Vec<(f64, f64)>,
    /// `(bucket start seconds, failed, total)` per bucket.
    pub buckets: Vec<(f64, u64, u64)>,
    pub bucket_secs: f64,
    /// When the replica was killed.
    pub kill_at: f64,
}

pub fn timeline(
    out: &Path,
    stem: &str,
    title: &str,
    t: &Timeline,
) -> Result<Vec<PathBuf>, AnalysisError> {
    render(out, stem, (PNG_SIZE.0, 700), &TimelineDraw { title, t })
}

struct TimelineDraw<'a> {
    title: &'a str,
    t: &'a Timeline,
}

impl Drawable for TimelineDraw<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        let (title, t) = (self.title, self.t);
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 24)).map_err(err)?;
        let (upper, lower) = root.split_vertically(300);
        let x1 = t
            .replicas
            .iter()
            .map(|p| p.0)
            .chain(t.buckets.iter().map(|b| b.0 + t.bucket_secs))
            .fold(1.0_f64, f64::max);
        let nmax = t
            .replicas
            .iter()
            .chain(&t.desired)
            .map(|p| p.1)
            .fold(1.0_f64, f64::max)
            + 1.0;

        let mut top = ChartBuilder::on(&upper)
            .caption(
                "replicas: desired and in the ring (/lb/status)",
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x1, 0.0..nmax)
            .map_err(err)?;
        top.configure_mesh()
            .x_desc("seconds")
            .y_desc("N")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        top.draw_series(LineSeries::new(
            steps(&t.desired),
            PALETTE[2].stroke_width(6),
        ))
        .map_err(err)?
        .label("desired")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], PALETTE[2].stroke_width(6)));
        top.draw_series(LineSeries::new(
            steps(&t.replicas),
            PALETTE[0].stroke_width(2),
        ))
        .map_err(err)?
        .label("in the ring")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], PALETTE[0].stroke_width(2)));
        top.draw_series(std::iter::once(PathElement::new(
            [(t.kill_at, 0.0), (t.kill_at, nmax)],
            PALETTE[3].stroke_width(2),
        )))
        .map_err(err)?
        .label("replica killed")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], PALETTE[3].stroke_width(2)));
        top.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;

        let fmax = t.buckets.iter().map(|b| b.2).max().unwrap_or(1).max(1) as f64 * 1.1;
        let mut bottom = ChartBuilder::on(&lower)
            .caption(
                format!(
                    "requests per {:.0} ms: total and failed",
                    t.bucket_secs * 1e3
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x1, 0.0..fmax)
            .map_err(err)?;
        bottom
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("requests")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        let w = t.bucket_secs;
        bottom
            .draw_series(t.buckets.iter().map(|(x, _, total)| {
                Rectangle::new(
                    [(*x, 0.0), (x + w * 0.9, *total as f64)],
                    PALETTE[0].mix(0.35).filled(),
                )
            }))
            .map_err(err)?
            .label("total")
            .legend(|(x, y)| {
                Rectangle::new([(x, y - 5), (x + 15, y + 5)], PALETTE[0].mix(0.35).filled())
            });
        bottom
            .draw_series(t.buckets.iter().filter(|b| b.1 > 0).map(|(x, failed, _)| {
                Rectangle::new(
                    [(*x, 0.0), (x + w * 0.9, *failed as f64)],
                    PALETTE[3].filled(),
                )
            }))
            .map_err(err)?
            .label("failed")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], PALETTE[3].filled()));
        bottom
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        Ok(())
    }
}

/// A step line: each sample held until the next one.
fn steps(samples: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(samples.len() * 2);
    for w in samples.windows(2) {
        out.push(w[0]);
        out.push((w[1].0, w[0].1));
    }
    if let Some(last) = samples.last() {
        out.push(*last);
    }
    out
}
