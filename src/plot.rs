//! Small SVG plots for artifacts: training curves, heat maps and scatter maps.
//!
//! Drawn with plotters' SVG backend, which writes text as `<text>` elements
//! and needs no font files, so the same data always gives the same bytes.

use std::path::Path;

use plotters::prelude::*;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("drawing `{}`: {message}", path.display())]
pub struct PlotError {
    pub path: std::path::PathBuf,
    pub message: String,
}

fn plot_error(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |message| PlotError { path: path.to_path_buf(), message }
}

/// One named line of `(x, y)` points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// `(x_min, x_max, y_min, y_max)` over the finite points of every series;
/// the unit square when there is none.
fn bounds(series: &[Series<'_>]) -> (f64, f64, f64, f64) {
    let points =
        series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 { (0.0, 1.0, 0.0, 1.0) } else { (x0, x1, y0, y1) }
}

/// A line chart of `series` with a legend, 720 x 400.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
) -> Result<(), PlotError> {
    let err = plot_error(path);
    let (x0, mut x1, y0, y1) = bounds(series);
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    let root = SVGBackend::new(path, (720, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let points = s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite());
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// A heat map of `values[row][column]` (rows drawn top to bottom), white at
/// the minimum and dark red at the maximum; cells in `marked` get a black
/// outline.
pub fn heat_map(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    values: &[Vec<f64>],
    marked: &[Vec<bool>],
) -> Result<(), PlotError> {
    let err = plot_error(path);
    let rows = values.len().max(1);
    let cols = values.first().map_or(1, Vec::len).max(1);
    let (lo, hi) =
        values.iter().flatten().fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    let cell = 28u32;
    let width = (cols as u32 * cell + 120).max(320);
    let height = rows as u32 * cell + 100;
    let root = SVGBackend::new(path, (width, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(32)
        .y_label_area_size(48)
        .build_cartesian_2d(0..cols as i32, (0..rows as i32).into_segmented())
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let cells = values
        .iter()
        .enumerate()
        .flat_map(|(r, row)| row.iter().enumerate().map(move |(c, &v)| (r, c, v)));
    chart
        .draw_series(cells.map(|(r, c, v)| {
            let t = ((v - lo) / span).clamp(0.0, 1.0);
            let color =
                RGBColor(255 - (t * 120.0) as u8, 255 - (t * 245.0) as u8, 255 - (t * 235.0) as u8);
            let y = (rows - 1 - r) as i32;
            Rectangle::new(
                [(c as i32, SegmentValue::Exact(y)), (c as i32 + 1, SegmentValue::Exact(y + 1))],
                color.filled(),
            )
        }))
        .map_err(|e| err(e.to_string()))?;
    let outlined = marked.iter().enumerate().flat_map(|(r, row)| {
        row.iter().enumerate().filter(|(_, on)| **on).map(move |(c, _)| (r, c))
    });
    chart
        .draw_series(outlined.map(|(r, c)| {
            let y = (rows - 1 - r) as i32;
            Rectangle::new(
                [(c as i32, SegmentValue::Exact(y)), (c as i32 + 1, SegmentValue::Exact(y + 1))],
                BLACK.stroke_width(2),
            )
        }))
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// A scatter plot of named point groups with a legend, 520 x 460; axes
/// carry no units (a t-SNE map has none).
pub fn scatter(path: &Path, title: &str, groups: &[Series<'_>]) -> Result<(), PlotError> {
    let err = plot_error(path);
    let (x0, x1, y0, y1) = bounds(groups);
    let (px, py) = (((x1 - x0) * 0.05).max(1e-9), ((y1 - y0) * 0.05).max(1e-9));
    let root = SVGBackend::new(path, (520, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(24)
        .y_label_area_size(40)
        .build_cartesian_2d((x0 - px)..(x1 + px), (y0 - py)..(y1 + py))
        .map_err(|e| err(e.to_string()))?;
    chart.configure_mesh().disable_mesh().draw().map_err(|e| err(e.to_string()))?;
    for (i, group) in groups.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let points = group.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite());
        chart
            .draw_series(points.map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(e.to_string()))?
            .label(group.name)
            .legend(move |(x, y)| Circle::new((x + 8, y), 4, color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}
