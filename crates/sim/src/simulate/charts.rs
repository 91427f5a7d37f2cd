//! Charts of the report: a small chart description ([`Chart`]) that experiments fill with
//! data, drawn with plotters twice — into an SVG string (inlined in `report.html` and saved
//! as `.svg`) and into a PNG file (text drawn with the embedded DejaVu Sans).
//!
//! Both axes are plain `f64` ranges with explicit key points: a log axis plots `log10(v)`
//! and labels the ticks with `v`, a "nines" axis plots `-log10(1 - q)` and labels p50, p90,
//! p99, p99.9; bar charts are horizontal, so long plugin names fit on the category axis.

use std::path::Path;
use std::sync::Once;

use anyhow::Context as _;
use std::ops::Range;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use plotters::style::FontStyle;
use plotters::style::text_anchor::{HPos, Pos, VPos};

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 560;
const FONT: &str = "sans-serif";

/// Series colours (Tableau 10, then two more).
const PALETTE: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 128),
    RGBColor(128, 128, 0),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One chart, independent of how it is drawn.
#[derive(Clone, Debug)]
pub struct Chart {
    /// File stem of the `.svg` and `.png` files.
    pub name: String,
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub body: Body,
}

/// What a chart shows.
#[derive(Clone, Debug)]
pub enum Body {
    /// Horizontal grouped bars: one group per category (top to bottom), one bar per series
    /// in each group; values on the x axis.
    Bars {
        categories: Vec<String>,
        /// (series name, one value per category).
        series: Vec<(String, Vec<f64>)>,
        /// Value axis in log scale.
        log: bool,
        /// A labelled reference value drawn as a dashed vertical line (e.g. the ideal share).
        reference: Option<(String, f64)>,
    },
    /// Lines and point clouds over two numeric axes.
    Lines {
        series: Vec<Series>,
        x_axis: Axis,
        y_axis: Axis,
        /// Labelled events drawn as dashed vertical lines (a kill, a restart).
        events: Vec<(String, f64)>,
        /// Where the legend goes: the corner the data leaves empty.
        legend: Corner,
    },
}

/// A corner of the plot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corner {
    UpperLeft,
    UpperRight,
    LowerRight,
}

/// How an axis maps values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    Linear,
    /// Linear with whole-number ticks (a number of servers).
    Count,
    Log,
    /// Percentiles, given as `-log10(1 - q)`.
    Nines,
}

/// One series of a line chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: Style,
}

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Line,
    /// A line with a dot on every point.
    LineDots,
    /// Dots only (one per request).
    Dots,
    /// Red crosses (failed requests).
    Crosses,
}

/// Registers DejaVu Sans as the sans-serif font, once: plotters' text layout (for SVG too)
/// and PNG text rendering need a real font, and the machine may have none.
fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_err()
        {
            tracing::warn!("cannot register the embedded DejaVu Sans font");
        }
    });
}

/// The chart as a standalone SVG document.
pub fn svg(chart: &Chart) -> anyhow::Result<String> {
    register_font();
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, chart).with_context(|| format!("drawing chart {} (svg)", chart.name))?;
    }
    Ok(out)
}

/// Draws the chart into a PNG file.
pub fn png(chart: &Chart, path: &Path) -> anyhow::Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    draw(&root, chart).with_context(|| format!("drawing {}", path.display()))
}

/// A linear `f64` axis whose ticks are given (plotters' float axes choose their own).
#[derive(Clone, Debug)]
struct Ticked {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Ticked {
    fn new((lo, hi, ticks): (f64, f64, Vec<f64>)) -> Self {
        Ticked { lo, hi, ticks }
    }
}

impl Ranged for Ticked {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let span = (self.hi - self.lo).max(f64::MIN_POSITIVE);
        let t = (value - self.lo) / span;
        limit.0 + (t * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        self.ticks.clone()
    }

    fn range(&self) -> Range<f64> {
        self.lo..self.hi
    }
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotters: {e:?}")
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, chart: &Chart) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(err)?;
    match &chart.body {
        Body::Bars {
            categories,
            series,
            log,
            reference,
        } => draw_bars(root, chart, categories, series, *log, reference.as_ref())?,
        Body::Lines {
            series,
            x_axis,
            y_axis,
            events,
            legend,
        } => draw_lines(root, chart, series, (*x_axis, *y_axis), events, *legend)?,
    }
    root.present().map_err(err)
}

/// Where a value sits on an axis.
fn place(axis: Axis, v: f64) -> f64 {
    match axis {
        Axis::Linear | Axis::Count | Axis::Nines => v,
        Axis::Log => v.max(1e-3).log10(),
    }
}

/// Axis range (in placed units) and its ticks, from the data's placed min and max.
fn ticks(axis: Axis, lo: f64, hi: f64) -> (f64, f64, Vec<f64>) {
    match axis {
        Axis::Nines => {
            let hi = hi.max(2.0);
            let ticks = [0.0, 2f64.log10(), 1.0, 2.0, 3.0, 4.0]
                .into_iter()
                .filter(|t| *t <= hi + 1e-9)
                .collect();
            (0.0, hi, ticks)
        }
        Axis::Log => {
            let (lo, hi) = if hi - lo < 0.3 {
                (lo - 0.3, hi + 0.3)
            } else {
                (lo, hi)
            };
            let (lo, hi) = (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo));
            let mut out = Vec::new();
            let mut decade = lo.floor() as i32;
            while f64::from(decade) <= hi {
                for m in [1.0f64, 2.0, 5.0] {
                    let t = f64::from(decade) + m.log10();
                    if t >= lo && t <= hi {
                        out.push(t);
                    }
                }
                decade += 1;
            }
            (lo, hi, out)
        }
        Axis::Linear | Axis::Count => {
            let (lo, hi) = if hi - lo < 1e-9 {
                (lo - 1.0, hi + 1.0)
            } else {
                (lo, hi)
            };
            let raw = (hi - lo) / 8.0;
            let mag = 10f64.powf(raw.log10().floor());
            let step = [1.0, 2.0, 2.5, 5.0, 10.0]
                .into_iter()
                .map(|m| m * mag)
                .find(|s| *s >= raw)
                .unwrap_or(10.0 * mag);
            let step = if axis == Axis::Count {
                step.max(1.0).round()
            } else {
                step
            };
            let start = (lo / step).floor() * step;
            let end = (hi / step).ceil() * step;
            let n = ((end - start) / step).round() as i64;
            let out = (0..=n).map(|i| start + i as f64 * step).collect();
            (start, end, out)
        }
    }
}

/// Tick label of a placed value.
fn label(axis: Axis, placed: f64) -> String {
    match axis {
        Axis::Nines => match (placed * 1000.0).round() as i64 {
            0 => "p0".into(),
            301 => "p50".into(),
            1000 => "p90".into(),
            2000 => "p99".into(),
            3000 => "p99.9".into(),
            4000 => "p99.99".into(),
            _ => String::new(),
        },
        Axis::Log => number(10f64.powf(placed)),
        Axis::Linear | Axis::Count => number(placed),
    }
}

/// A bar's value label: three significant figures or whole numbers.
fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A compact number: 1500 → "1500", 2.5 → "2.5", 0.25 → "0.25".
fn number(v: f64) -> String {
    let r = (v * 1000.0).round() / 1000.0;
    if (r - r.round()).abs() < 1e-9 {
        format!("{}", r.round() as i64)
    } else {
        let s = format!("{r:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn draw_bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &Chart,
    categories: &[String],
    series: &[(String, Vec<f64>)],
    log: bool,
    reference: Option<&(String, f64)>,
) -> anyhow::Result<()> {
    let axis = if log { Axis::Log } else { Axis::Linear };
    let n = categories.len().max(1) as f64;
    let values = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .chain(reference.map(|r| r.1))
        .filter(|v| v.is_finite());
    let (mut vmin, mut vmax) = (f64::MAX, f64::MIN);
    for v in values {
        vmin = vmin.min(place(axis, v));
        vmax = vmax.max(place(axis, v));
    }
    if vmin > vmax {
        (vmin, vmax) = (0.0, 1.0);
    }
    let lo = if log { vmin } else { 0.0 };
    // Room on the right for the value labels and the legend.
    let (x0, x1, xt) = ticks(axis, lo, vmax + 0.45 * (vmax - lo).max(1e-9));
    let centres: Vec<f64> = (0..categories.len()).map(|i| n - i as f64 - 0.5).collect();
    let longest = categories.iter().map(|c| c.len()).max().unwrap_or(4);
    let mut cc = ChartBuilder::on(root)
        .caption(&chart.title, (FONT, 22))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size((longest as u32 * 8 + 24).min(300))
        .build_cartesian_2d(Ticked::new((x0, x1, xt)), Ticked::new((0.0, n, centres)))
        .map_err(err)?;
    let category_of = |y: &f64| -> String {
        let i = (n - y - 0.5).round();
        if i >= 0.0 && (i as usize) < categories.len() {
            categories[i as usize].clone()
        } else {
            String::new()
        }
    };
    cc.configure_mesh()
        .disable_y_mesh()
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .x_label_formatter(&|x| label(axis, *x))
        .y_label_formatter(&category_of)
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .draw()
        .map_err(err)?;
    let ns = series.len().max(1) as f64;
    let h = 0.8 / ns;
    let show_values = categories.len() * series.len() <= 48;
    for (j, (name, vals)) in series.iter().enumerate() {
        let c = color(j);
        let bars = vals.iter().enumerate().map(move |(i, v)| {
            let top = n - i as f64 - 0.1 - j as f64 * h;
            Rectangle::new([(x0, top - h), (place(axis, *v).max(x0), top)], c.filled())
        });
        cc.draw_series(bars)
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
        if show_values {
            let texts = vals.iter().enumerate().map(move |(i, v)| {
                let mid = n - i as f64 - 0.1 - (j as f64 + 0.5) * h;
                Text::new(
                    format!(" {}", short(*v)),
                    (place(axis, *v).max(x0), mid),
                    (FONT, 11)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                )
            });
            cc.draw_series(texts).map_err(err)?;
        }
    }
    if let Some((name, v)) = reference {
        let x = place(axis, *v);
        cc.draw_series(DashedLineSeries::new(
            [(x, 0.0), (x, n)],
            6,
            4,
            BLACK.stroke_width(2),
        ))
        .map_err(err)?
        .label(name.as_str())
        .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK.stroke_width(2)));
    }
    cc.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(err)?;
    Ok(())
}

fn draw_lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    chart: &Chart,
    series: &[Series],
    (x_axis, y_axis): (Axis, Axis),
    events: &[(String, f64)],
    legend: Corner,
) -> anyhow::Result<()> {
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in series.iter().flat_map(|s| s.points.iter()) {
        if x.is_finite() && y.is_finite() {
            xmin = xmin.min(place(x_axis, *x));
            xmax = xmax.max(place(x_axis, *x));
            ymin = ymin.min(place(y_axis, *y));
            ymax = ymax.max(place(y_axis, *y));
        }
    }
    for (_, x) in events {
        xmin = xmin.min(place(x_axis, *x));
        xmax = xmax.max(place(x_axis, *x));
    }
    if xmin > xmax {
        (xmin, xmax) = (0.0, 1.0);
    }
    if ymin > ymax {
        (ymin, ymax) = (0.0, 1.0);
    }
    if matches!(y_axis, Axis::Linear | Axis::Count) {
        ymin = ymin.min(0.0);
        ymax += 0.05 * (ymax - ymin);
    }
    let (x0, x1, xt) = ticks(x_axis, xmin, xmax);
    let (y0, y1, yt) = ticks(y_axis, ymin, ymax);
    let mut cc = ChartBuilder::on(root)
        .caption(&chart.title, (FONT, 22))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(Ticked::new((x0, x1, xt)), Ticked::new((y0, y1, yt)))
        .map_err(err)?;
    cc.configure_mesh()
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .x_label_formatter(&|x| label(x_axis, *x))
        .y_label_formatter(&|y| label(y_axis, *y))
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    let at = |(x, y): &(f64, f64)| (place(x_axis, *x), place(y_axis, *y));
    let mut colour_index = 0;
    for s in series {
        let c = if s.style == Style::Crosses {
            RED
        } else {
            colour_index += 1;
            color(colour_index - 1)
        };
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(at)
            .collect();
        let anno = match s.style {
            Style::Line | Style::LineDots => {
                if s.style == Style::LineDots {
                    cc.draw_series(pts.iter().map(|p| Circle::new(*p, 3, c.filled())))
                        .map_err(err)?;
                }
                cc.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
                    .map_err(err)?
            }
            Style::Dots => cc
                .draw_series(pts.iter().map(|p| Circle::new(*p, 2, c.mix(0.6).filled())))
                .map_err(err)?,
            Style::Crosses => cc
                .draw_series(pts.iter().map(|p| Cross::new(*p, 4, c.stroke_width(2))))
                .map_err(err)?,
        };
        match s.style {
            Style::Line | Style::LineDots => {
                anno.label(s.name.as_str()).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2))
                });
            }
            Style::Dots => {
                anno.label(s.name.as_str())
                    .legend(move |(x, y)| Circle::new((x + 8, y), 3, c.filled()));
            }
            Style::Crosses => {
                anno.label(s.name.as_str())
                    .legend(move |(x, y)| Cross::new((x + 8, y), 4, c.stroke_width(2)));
            }
        }
    }
    for (i, (name, x)) in events.iter().enumerate() {
        let x = place(x_axis, *x);
        let c = if i % 2 == 0 {
            RGBColor(60, 60, 60)
        } else {
            RGBColor(0, 140, 70)
        };
        cc.draw_series(DashedLineSeries::new(
            [(x, y0), (x, y1)],
            6,
            4,
            c.stroke_width(2),
        ))
        .map_err(err)?
        .label(name.as_str())
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2)));
    }
    cc.configure_series_labels()
        .position(match legend {
            Corner::UpperLeft => SeriesLabelPosition::UpperLeft,
            Corner::UpperRight => SeriesLabelPosition::UpperRight,
            Corner::LowerRight => SeriesLabelPosition::LowerRight,
        })
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 13))
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_ticks_cover_the_range() {
        let (lo, hi, t) = ticks(Axis::Linear, 0.0, 3400.0);
        assert!(lo <= 0.0 && hi >= 3400.0);
        assert!(t.len() >= 4 && t.len() <= 12, "{t:?}");
    }

    #[test]
    fn log_ticks_are_round_numbers() {
        let (_, _, t) = ticks(Axis::Log, 0.0, 3.0);
        let labels: Vec<String> = t.iter().map(|v| label(Axis::Log, *v)).collect();
        assert!(labels.contains(&"10".to_string()), "{labels:?}");
        assert!(labels.contains(&"500".to_string()), "{labels:?}");
    }

    #[test]
    fn draws_both_kinds() {
        let bars = Chart {
            name: "b".into(),
            title: "Bars".into(),
            x_label: "requests".into(),
            y_label: "plugin".into(),
            body: Body::Bars {
                categories: vec!["round_robin".into(), "least_connections".into()],
                series: vec![
                    ("s1".into(), vec![10.0, 20.0]),
                    ("s2".into(), vec![5.0, 7.0]),
                ],
                log: false,
                reference: Some(("ideal".into(), 12.0)),
            },
        };
        let lines = Chart {
            name: "l".into(),
            title: "Lines".into(),
            x_label: "percentile".into(),
            y_label: "ms".into(),
            body: Body::Lines {
                series: vec![Series {
                    name: "a".into(),
                    points: vec![(0.0, 1.0), (1.0, 5.0), (2.0, 50.0)],
                    style: Style::LineDots,
                }],
                x_axis: Axis::Nines,
                y_axis: Axis::Log,
                events: vec![("kill".into(), 1.5)],
                legend: Corner::LowerRight,
            },
        };
        for c in [bars, lines] {
            let s = svg(&c).unwrap();
            assert!(s.contains("<svg") && s.contains(&c.title), "{s}");
        }
    }
}
