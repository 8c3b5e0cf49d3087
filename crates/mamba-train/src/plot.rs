//! A loss-curve plot as a self-contained SVG (no plotting dependency: a few polylines and
//! labels are all a loss curve needs).

use std::fmt::Write;

/// One named series of (x, y) points.
pub struct Series<'a> {
    /// Legend label.
    pub name: &'a str,
    /// CSS colour.
    pub color: &'a str,
    /// Points, in increasing x.
    pub points: &'a [(f64, f64)],
}

/// Renders `series` into an SVG document with axes, ticks, a title and a legend.
pub fn svg(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h, ml, mr, mt, mb) = (720.0, 440.0, 70.0, 20.0, 40.0, 50.0);
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    (y0, y1) = (y0 - pad, y1 + pad);
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * (w - ml - mr);
    let sy = |y: f64| mt + (1.0 - (y - y0) / (y1 - y0)) * (h - mt - mb);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    let (bx, by) = (h - mb, ml);
    let _ = writeln!(s, r#"<line x1="{ml}" y1="{bx}" x2="{}" y2="{bx}" stroke="black"/>"#, w - mr);
    let _ = writeln!(s, r#"<line x1="{by}" y1="{mt}" x2="{by}" y2="{bx}" stroke="black"/>"#);
    for i in 0..=5 {
        let fx = x0 + (x1 - x0) * i as f64 / 5.0;
        let fy = y0 + (y1 - y0) * i as f64 / 5.0;
        let _ = writeln!(s, r##"<line x1="{0}" y1="{mt}" x2="{0}" y2="{bx}" stroke="#eee"/>"##, sx(fx));
        let _ =
            writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, sx(fx), bx + 16.0, tick(fx));
        let _ =
            writeln!(s, r##"<line x1="{ml}" y1="{0}" x2="{1}" y2="{0}" stroke="#eee"/>"##, sy(fy), w - mr);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            ml - 6.0,
            sy(fy) + 4.0,
            tick(fy)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (ml + w - mr) / 2.0,
        h - 12.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{0}" text-anchor="middle" transform="rotate(-90 16 {0})">{1}</text>"#,
        (mt + bx) / 2.0,
        esc(y_label)
    );
    for (i, se) in series.iter().enumerate() {
        let path: Vec<String> = se
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"#,
            se.color,
            path.join(" ")
        );
        let ly = mt + 8.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="3"/>"#,
            w - mr - 150.0,
            w - mr - 130.0,
            se.color
        );
        let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, w - mr - 124.0, ly + 4.0, esc(se.name));
    }
    s.push_str("</svg>\n");
    s
}

fn tick(v: f64) -> String {
    if v.abs() >= 1e4 {
        format!("{:.2e}", v)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_series_with_scaled_points() {
        let a = [(0.0, 4.0), (10.0, 2.0), (20.0, 1.0)];
        let b = [(10.0, 2.5), (20.0, 1.5)];
        let out = svg(
            "loss <run>",
            "tokens",
            "nats",
            &[
                Series { name: "train", color: "blue", points: &a },
                Series { name: "val", color: "red", points: &b },
            ],
        );
        assert!(out.starts_with("<svg") && out.trim_end().ends_with("</svg>"));
        assert_eq!(out.matches("<polyline").count(), 2);
        assert!(out.contains("loss &lt;run&gt;"), "title is escaped");
        // First point at the left axis, last at the right edge.
        assert!(out.contains(r#"points="70.0,"#), "{out}");
        assert!(out.contains("700.0,"), "{out}");
    }
}
