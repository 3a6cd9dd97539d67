//! The reliability diagram (DeGroot and Fienberg 1983; Guo et al. 2017, fig. 1) as a
//! self-contained SVG: one bar per confidence bin whose height is the bin's accuracy,
//! the gap to the bin's mean confidence shaded, the diagonal of perfect calibration,
//! and each bin's count above its bar.

use std::fmt::Write as _;

use super::Calibration;

const WIDTH: f64 = 480.0;
const HEIGHT: f64 = 480.0;
const LEFT: f64 = 60.0;
const TOP: f64 = 50.0;
const PLOT: f64 = 380.0;

/// The diagram of `calibration`, titled `title`, as SVG text.
pub fn svg(calibration: &Calibration, title: &str) -> String {
    let x = |v: f64| LEFT + v * PLOT;
    let y = |v: f64| TOP + (1.0 - v) * PLOT;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="20" text-anchor="middle" font-size="13">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    let _ = writeln!(
        out,
        r#"<text x="{}" y="38" text-anchor="middle">ECE {:.4}   MCE {:.4}   accuracy {:.4}   n = {}</text>"#,
        WIDTH / 2.0,
        calibration.ece,
        calibration.mce,
        calibration.accuracy,
        calibration.samples
    );
    for bin in calibration.bins.iter().filter(|b| b.count > 0) {
        let left = x(bin.lower);
        let width = (x(bin.upper) - left - 1.0).max(0.5);
        let _ = writeln!(
            out,
            r##"<rect x="{left:.2}" y="{:.2}" width="{width:.2}" height="{:.2}" fill="#4878d0" stroke="#2a4d8f"><title>({:.3}, {:.3}]: {} predictions, accuracy {:.4}, confidence {:.4}</title></rect>"##,
            y(bin.accuracy),
            bin.accuracy * PLOT,
            bin.lower,
            bin.upper,
            bin.count,
            bin.accuracy,
            bin.confidence
        );
        // The gap between accuracy and confidence, shaded.
        let (low, high) = match bin.accuracy < bin.confidence {
            true => (bin.accuracy, bin.confidence),
            false => (bin.confidence, bin.accuracy),
        };
        let _ = writeln!(
            out,
            r##"<rect x="{left:.2}" y="{:.2}" width="{width:.2}" height="{:.2}" fill="#d65f5f" fill-opacity="0.35"/>"##,
            y(high),
            (high - low) * PLOT
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.2}" y="{:.2}" text-anchor="middle" font-size="9">{}</text>"#,
            left + width / 2.0,
            y(bin.accuracy.max(bin.confidence)) - 3.0,
            bin.count
        );
    }
    let _ = writeln!(
        out,
        r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#555" stroke-dasharray="4 3"/>"##,
        x(0.0),
        y(0.0),
        x(1.0),
        y(1.0)
    );
    let _ = writeln!(
        out,
        r#"<rect x="{LEFT}" y="{TOP}" width="{PLOT}" height="{PLOT}" fill="none" stroke="black"/>"#
    );
    for tick in 0..=5 {
        let v = f64::from(tick) / 5.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.2}" y="{:.2}" text-anchor="middle">{v:.1}</text><text x="{:.2}" y="{:.2}" text-anchor="end">{v:.1}</text>"#,
            x(v),
            TOP + PLOT + 15.0,
            LEFT - 5.0,
            y(v) + 4.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">confidence (top-1 probability)</text>"#,
        LEFT + PLOT / 2.0,
        TOP + PLOT + 35.0
    );
    let _ = writeln!(
        out,
        r#"<text x="15" y="{}" text-anchor="middle" transform="rotate(-90 15 {})">accuracy</text>"#,
        TOP + PLOT / 2.0,
        TOP + PLOT / 2.0
    );
    out.push_str("</svg>\n");
    out
}

/// Text made safe inside an SVG element.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bar_per_non_empty_bin_with_its_count() {
        let cal = Calibration::new([(0.3, false), (0.9, true), (0.95, true)], 5).unwrap();
        let svg = svg(&cal, "a <model>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("predictions, accuracy").count(), 2);
        assert!(svg.contains("a &lt;model&gt;"));
        assert!(svg.contains(">2</text>"));
    }
}
