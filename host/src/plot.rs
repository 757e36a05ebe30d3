//! PNG figures: line charts, the kappa histogram and attention maps, drawn with `plotters` into
//! an RGB buffer and encoded with `image`.
//!
//! Text uses the DejaVu Sans Mono font bundled in `host/assets/fonts` (Bitstream Vera licence,
//! `host/assets/fonts/LICENSE`) through plotters' `ab_glyph` backend: no system font lookup, so
//! figures render the same on a bare CI machine.
use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, ensure, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// The font family name figures use.
const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");
static REGISTER: Once = Once::new();

/// Width and height of one chart panel, pixels.
pub const PANEL: (u32, u32) = (560, 400);

fn fonts() {
    REGISTER.call_once(|| {
        // The bundled bytes are a valid TrueType font; a failure here is a build defect, and
        // figures then lose their text rather than the run.
        let _ = register_font(FONT, FontStyle::Normal, FONT_BYTES);
    });
}

/// The line colours, in order.
pub const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One named line.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Draw markers on the points too (sparse series such as periodic evaluations).
    pub markers: bool,
}

fn to_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a figure: {e}")
}

/// Writes an RGB buffer as PNG, atomically (temp file, then rename).
pub fn save_png(path: &Path, buf: Vec<u8>, w: u32, h: u32) -> Result<()> {
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| anyhow!("figure buffer size"))?;
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .context("encoding PNG")?;
    crate::checkpoint::write_atomic(path, &bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Renders `draw` on a white `w x h` canvas and saves it as PNG.
pub fn render(
    path: &Path,
    w: u32,
    h: u32,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>,
) -> Result<()> {
    fonts();
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(to_err)?;
        draw(&root)?;
        root.present().map_err(to_err)?;
    }
    save_png(path, buf, w, h)
}

fn range(vals: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return None;
    }
    if hi - lo < 1e-12 * hi.abs().max(1e-12) {
        let pad = hi.abs().max(1e-3) * 0.05;
        return Some((lo - pad, hi + pad));
    }
    let pad = 0.05 * (hi - lo);
    Some((lo - pad, hi + pad))
}

fn draw_panel(area: &DrawingArea<BitMapBackend<'_>, Shift>, p: &Panel) -> Result<()> {
    let pts = || p.series.iter().flat_map(|s| s.points.iter());
    let (Some(xr), Some(yr)) = (range(pts().map(|q| q.0)), range(pts().map(|q| q.1))) else {
        // Nothing to draw: say so in the panel instead of failing the figure.
        area.draw(&Text::new(
            format!("{}: no data", p.title),
            (20, 20),
            (FONT, 16).into_font(),
        ))
        .map_err(to_err)?;
        return Ok(());
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FONT, 18).into_font())
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(xr.0..xr.1, yr.0..yr.1)
        .map_err(to_err)?;
    chart
        .configure_mesh()
        .x_desc(&p.x_label)
        .y_desc(&p.y_label)
        .label_style((FONT, 12).into_font())
        .axis_desc_style((FONT, 14).into_font())
        .x_labels(6)
        .y_labels(6)
        .draw()
        .map_err(to_err)?;
    for (i, s) in p.series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|q| q.1.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(to_err)?
            .label(&s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        if p.markers {
            chart
                .draw_series(pts.iter().map(|&q| Circle::new(q, 3, c.filled())))
                .map_err(to_err)?;
        }
    }
    if p.series.len() > 1 || p.series.iter().any(|s| !s.name.is_empty()) {
        chart
            .configure_series_labels()
            .label_font((FONT, 12).into_font())
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(to_err)?;
    }
    Ok(())
}

/// Panels side by side in one PNG of `PANEL.0 * panels` by `PANEL.1` pixels.
pub fn line_panels(path: &Path, panels: &[Panel]) -> Result<()> {
    ensure!(!panels.is_empty(), "a figure needs at least one panel");
    let (w, h) = (PANEL.0 * panels.len() as u32, PANEL.1);
    render(path, w, h, |root| {
        let areas = root.split_evenly((1, panels.len()));
        for (a, p) in areas.iter().zip(panels) {
            draw_panel(a, p)?;
        }
        Ok(())
    })
}

/// Histogram counts of `values` over `bins` equal bins spanning [min, max] (a single bin
/// holds everything when all values are equal). Returns (edges[bins + 1], counts[bins]).
pub fn histogram(values: &[f64], bins: usize) -> (Vec<f64>, Vec<u64>) {
    let bins = bins.max(1);
    let Some((lo, hi)) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold(None, |acc: Option<(f64, f64)>, &v| {
            Some(acc.map_or((v, v), |(a, b)| (a.min(v), b.max(v))))
        })
    else {
        return (vec![0.0, 1.0], vec![0]);
    };
    let (lo, hi, bins) = if hi > lo {
        (lo, hi, bins)
    } else {
        (lo - 0.5, lo + 0.5, 1)
    };
    let wdt = (hi - lo) / bins as f64;
    let mut counts = vec![0u64; bins];
    for &v in values.iter().filter(|v| v.is_finite()) {
        let i = (((v - lo) / wdt) as usize).min(bins - 1);
        counts[i] += 1;
    }
    let edges = (0..=bins).map(|i| lo + wdt * i as f64).collect();
    (edges, counts)
}

/// The kappa = |g| / tau histogram as a PNG of one panel.
pub fn kappa_histogram(path: &Path, kappa: &[f64], tau: f64) -> Result<()> {
    ensure!(!kappa.is_empty(), "no kappa values to plot");
    let (edges, counts) = histogram(kappa, 40);
    let ymax = counts.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.08;
    let (x0, x1) = (edges[0], edges[edges.len() - 1]);
    render(path, PANEL.0, PANEL.1, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!("kappa = |g| / tau (tau = {tau}), K = {}", kappa.len()),
                (FONT, 18).into_font(),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, 0.0..ymax)
            .map_err(to_err)?;
        chart
            .configure_mesh()
            .x_desc("kappa")
            .y_desc("prototypes")
            .label_style((FONT, 12).into_font())
            .axis_desc_style((FONT, 14).into_font())
            .draw()
            .map_err(to_err)?;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, &c)| {
                Rectangle::new(
                    [(edges[i], 0.0), (edges[i + 1], c as f64)],
                    COLORS[0].filled(),
                )
            }))
            .map_err(to_err)?;
        Ok(())
    })
}

/// A colour map from [0, 1] to RGB (dark blue -> yellow, viridis-like anchors).
pub fn heat(v: f64) -> RGBColor {
    const A: [(f64, [f64; 3]); 5] = [
        (0.0, [68.0, 1.0, 84.0]),
        (0.25, [59.0, 82.0, 139.0]),
        (0.5, [33.0, 145.0, 140.0]),
        (0.75, [94.0, 201.0, 98.0]),
        (1.0, [253.0, 231.0, 37.0]),
    ];
    let v = if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let i = A
        .iter()
        .rposition(|a| a.0 <= v)
        .unwrap_or(0)
        .min(A.len() - 2);
    let t = (v - A[i].0) / (A[i + 1].0 - A[i].0);
    let c = |j: usize| (A[i].1[j] + t * (A[i + 1].1[j] - A[i].1[j])).round() as u8;
    RGBColor(c(0), c(1), c(2))
}

/// An image `[3, s, s]` in [0, 1] per channel, as RGB bytes of side `s`.
pub struct Rgb {
    pub side: usize,
    pub data: Vec<[f64; 3]>,
}

/// The attention figure: the image, then one panel per head with the head's [CLS] attention
/// over the patch grid (`maps[heads][grid * grid]`, each scaled to its own max) bilinearly
/// upsampled to the image and blended over it. Panels are `cell` pixels square.
pub fn attention_figure(
    path: &Path,
    img: &Rgb,
    maps: &[Vec<f32>],
    grid: usize,
    cell: u32,
) -> Result<()> {
    ensure!(!maps.is_empty(), "no attention heads to draw");
    ensure!(
        maps.iter().all(|m| m.len() == grid * grid),
        "attention maps must hold grid x grid = {} values",
        grid * grid
    );
    let cols = maps.len() + 1;
    let title_h = 28u32;
    let (w, h) = (cell * cols as u32, cell + title_h);
    let s = img.side;
    let pix = |x: u32, y: u32| -> [f64; 3] {
        let ix = ((x as usize * s) / cell as usize).min(s - 1);
        let iy = ((y as usize * s) / cell as usize).min(s - 1);
        img.data[iy * s + ix]
    };
    render(path, w, h, |root| {
        let (top, body) = root.split_vertically(title_h);
        top.draw(&Text::new(
            "image, then the last block's [CLS] attention per head",
            (8, 6),
            (FONT, 16).into_font(),
        ))
        .map_err(to_err)?;
        let panels = body.split_evenly((1, cols));
        for (pi, area) in panels.iter().enumerate() {
            let map = (pi > 0).then(|| &maps[pi - 1]);
            let mx = map.map_or(1.0, |m| m.iter().cloned().fold(0.0f32, f32::max).max(1e-12));
            for y in 0..cell {
                for x in 0..cell {
                    let rgb = pix(x, y);
                    let c = match map {
                        None => RGBColor(
                            (rgb[0] * 255.0) as u8,
                            (rgb[1] * 255.0) as u8,
                            (rgb[2] * 255.0) as u8,
                        ),
                        Some(m) => {
                            let a = bilinear(m, grid, x as f64, y as f64, cell as f64) / mx as f64;
                            let hc = heat(a);
                            // Mostly the map, with the image's luminance underneath.
                            let lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2];
                            let mix = |h: u8| (0.65 * h as f64 + 0.35 * 255.0 * lum) as u8;
                            RGBColor(mix(hc.0), mix(hc.1), mix(hc.2))
                        }
                    };
                    area.draw_pixel((x as i32, y as i32), &c).map_err(to_err)?;
                }
            }
            let label = if pi == 0 {
                "image".to_string()
            } else {
                format!("head {}", pi - 1)
            };
            area.draw(&Text::new(
                label,
                (4, 4),
                (FONT, 14).into_font().color(&WHITE),
            ))
            .map_err(to_err)?;
        }
        Ok(())
    })
}

/// Bilinear sample of a `grid x grid` map at pixel (x, y) of a `cell`-pixel panel (pixel and
/// patch centres aligned).
pub fn bilinear(m: &[f32], grid: usize, x: f64, y: f64, cell: f64) -> f64 {
    let g = grid as f64;
    let fx = ((x + 0.5) * g / cell - 0.5).clamp(0.0, g - 1.0);
    let fy = ((y + 0.5) * g / cell - 0.5).clamp(0.0, g - 1.0);
    let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(grid - 1), (y0 + 1).min(grid - 1));
    let (tx, ty) = (fx - x0 as f64, fy - y0 as f64);
    let at = |xx: usize, yy: usize| m[yy * grid + xx] as f64;
    (1.0 - ty) * ((1.0 - tx) * at(x0, y0) + tx * at(x1, y0))
        + ty * ((1.0 - tx) * at(x0, y1) + tx * at(x1, y1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_every_value_once() {
        let v: Vec<f64> = (0..100).map(|i| i as f64).collect();
        let (e, c) = histogram(&v, 10);
        assert_eq!(c, vec![10; 10]);
        assert_eq!((e[0], e[10]), (0.0, 99.0));
        let (_, c) = histogram(&[3.0; 7], 10);
        assert_eq!(c, vec![7]);
    }

    #[test]
    fn bilinear_hits_patch_centres_and_interpolates() {
        let m = [0.0f32, 1.0, 2.0, 3.0];
        // 2 x 2 grid on a 4-pixel panel: patch centres sit at pixel coordinates 0.5 and 2.5.
        assert_eq!(bilinear(&m, 2, 0.0, 0.0, 4.0), 0.0);
        assert_eq!(bilinear(&m, 2, 3.0, 3.0, 4.0), 3.0);
        let mid = bilinear(&m, 2, 1.5, 1.5, 4.0);
        assert!((mid - 1.5).abs() < 1e-12, "{mid}");
    }

    #[test]
    fn heat_map_ends() {
        assert_eq!(heat(0.0), RGBColor(68, 1, 84));
        assert_eq!(heat(1.0), RGBColor(253, 231, 37));
        assert_eq!(heat(f64::NAN), heat(0.0));
    }
}
