//! A small SVG line plot (loss curves), written by hand to keep dependencies down.
use std::fmt::Write;

/// Series of `(x, y)` points with a label and a colour.
pub struct Series<'a> {
    pub label: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// An SVG document plotting `series` with axis ranges fitted to the data.
pub fn svg(title: &str, xlabel: &str, ylabel: &str, series: &[Series]) -> String {
    let (w, h, l, r, t, b) = (720.0, 420.0, 70.0, 20.0, 40.0, 50.0);
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    // pad the range, but keep a non-negative series' axis at or above 0
    let (y0, y1) = (if y0 >= 0.0 { (y0 - pad).max(0.0) } else { y0 - pad }, y1 + pad);
    let sx = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let sy = |y: f64| t + (y1 - y) / (y1 - y0) * (h - t - b);
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        o,
        r#"<rect width="{w}" height="{h}" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{title}</text>"#,
        w / 2.0
    );
    for i in 0..=5 {
        let y = y0 + (y1 - y0) * i as f64 / 5.0;
        let x = x0 + (x1 - x0) * i as f64 / 5.0;
        let _ = write!(
            o,
            r##"<line x1="{l}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{y:.3}</text>"##,
            w - r,
            sy(y),
            sy(y),
            l - 6.0,
            sy(y) + 4.0
        );
        let _ = write!(o, r#"<text x="{:.1}" y="{}" text-anchor="middle">{x:.0}</text>"#, sx(x), h - b + 18.0);
    }
    let _ = write!(
        o,
        r##"<line x1="{l}" x2="{l}" y1="{t}" y2="{}" stroke="#333"/><line x1="{l}" x2="{}" y1="{}" y2="{}" stroke="#333"/>"##,
        h - b,
        w - r,
        h - b,
        h - b
    );
    let _ = write!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">{xlabel}</text><text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{ylabel}</text>"#,
        (l + w - r) / 2.0,
        h - 12.0,
        (t + h - b) / 2.0
    );
    for (k, s) in series.iter().enumerate() {
        let path: Vec<String> =
            s.points.iter().filter(|p| p.1.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ =
            write!(o, r#"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"#, s.color, path.join(" "));
        let ly = t + 16.0 + 16.0 * k as f64;
        let _ = write!(
            o,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            w - r - 150.0,
            w - r - 130.0,
            s.color,
            w - r - 124.0,
            ly + 4.0,
            s.label
        );
    }
    o.push_str("</svg>\n");
    o
}
