//! The reliability diagram (DeGroot and Fienberg 1983; Guo et al. 2017, fig. 1): one
//! bar per confidence bin whose height is the bin's accuracy, the gap to the bin's mean
//! confidence shaded, the diagonal of perfect calibration, and each bin's count above
//! its bar. Laid out once as a [`Figure`], written as SVG or PNG.

use super::figure::{Anchor, Figure, Fill, Line, Rect, Shape, Text};
use super::raster::Rgb;
use super::Calibration;

/// Page width and height, in units.
const WIDTH: f64 = 480.0;
/// Page height, in units.
const HEIGHT: f64 = 480.0;
/// Left edge of the plot area.
const LEFT: f64 = 60.0;
/// Top edge of the plot area.
const TOP: f64 = 50.0;
/// Side of the square plot area.
const PLOT: f64 = 380.0;

/// Fill of the accuracy bars.
const BAR: Rgb = Rgb(0x48, 0x78, 0xd0);
/// Outline of the accuracy bars.
const BAR_EDGE: Rgb = Rgb(0x2a, 0x4d, 0x8f);
/// Colour of the shaded gap between accuracy and confidence.
const GAP: Rgb = Rgb(0xd6, 0x5f, 0x5f);
/// Opacity of the gap's shade.
const GAP_OPACITY: f64 = 0.35;
/// Colour of the diagonal of perfect calibration.
const DIAGONAL: Rgb = Rgb(0x55, 0x55, 0x55);

/// The diagram of `calibration`, titled `title`.
pub fn figure(calibration: &Calibration, title: &str) -> Figure {
    let x = |v: f64| LEFT + v * PLOT;
    let y = |v: f64| TOP + (1.0 - v) * PLOT;
    let text = |at: (f64, f64), anchor: Anchor, size: f64, text: String| {
        Shape::Text(Text {
            at,
            anchor,
            size,
            upwards: false,
            text,
        })
    };
    // A filled rectangle spanning accuracies `low..high` over [left, left + width].
    let band = |left: f64, width: f64, (low, high): (f64, f64), fill: Fill| Rect {
        x: left,
        y: y(high),
        width,
        height: (high - low) * PLOT,
        fill: Some(fill),
        stroke: None,
        tooltip: None,
    };
    let mut shapes = vec![
        text((WIDTH / 2.0, 20.0), Anchor::Middle, 13.0, title.to_string()),
        text(
            (WIDTH / 2.0, 38.0),
            Anchor::Middle,
            11.0,
            format!(
                "ECE {:.4}   MCE {:.4}   accuracy {:.4}   n = {}",
                calibration.ece, calibration.mce, calibration.accuracy, calibration.samples
            ),
        ),
    ];
    for bin in calibration.bins.iter().filter(|b| b.count > 0) {
        let left = x(bin.lower);
        // One unit of white between neighbouring bars.
        let width = (x(bin.upper) - left - 1.0).max(0.5);
        let bar = Fill {
            colour: BAR,
            opacity: 1.0,
        };
        shapes.push(Shape::Rect(Rect {
            stroke: Some(BAR_EDGE),
            tooltip: Some(format!(
                "({:.3}, {:.3}]: {} predictions, accuracy {:.4}, confidence {:.4}",
                bin.lower, bin.upper, bin.count, bin.accuracy, bin.confidence
            )),
            ..band(left, width, (0.0, bin.accuracy), bar)
        }));
        // The gap between accuracy and confidence, shaded over whatever is there.
        let gap = Fill {
            colour: GAP,
            opacity: GAP_OPACITY,
        };
        let (low, high) = (
            bin.accuracy.min(bin.confidence),
            bin.accuracy.max(bin.confidence),
        );
        shapes.push(Shape::Rect(band(left, width, (low, high), gap)));
        shapes.push(text(
            (left + width / 2.0, y(high) - 3.0),
            Anchor::Middle,
            9.0,
            bin.count.to_string(),
        ));
    }
    shapes.push(Shape::Line(Line {
        from: (x(0.0), y(0.0)),
        to: (x(1.0), y(1.0)),
        colour: DIAGONAL,
        dashed: true,
    }));
    shapes.push(Shape::Rect(Rect {
        x: LEFT,
        y: TOP,
        width: PLOT,
        height: PLOT,
        fill: None,
        stroke: Some(Rgb(0, 0, 0)),
        tooltip: None,
    }));
    for tick in 0..=5 {
        let v = f64::from(tick) / 5.0;
        let label = format!("{v:.1}");
        shapes.push(text(
            (x(v), TOP + PLOT + 15.0),
            Anchor::Middle,
            11.0,
            label.clone(),
        ));
        shapes.push(text((LEFT - 5.0, y(v) + 4.0), Anchor::End, 11.0, label));
    }
    shapes.push(text(
        (LEFT + PLOT / 2.0, TOP + PLOT + 35.0),
        Anchor::Middle,
        11.0,
        "confidence (top-1 probability)".to_string(),
    ));
    shapes.push(Shape::Text(Text {
        at: (15.0, TOP + PLOT / 2.0),
        anchor: Anchor::Middle,
        size: 11.0,
        upwards: true,
        text: "accuracy".to_string(),
    }));
    Figure {
        width: WIDTH,
        height: HEIGHT,
        shapes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::figure::ImageFormat;

    /// A decoded 8-bit RGB PNG.
    struct Decoded {
        width: u32,
        height: u32,
        pixels: Vec<u8>,
    }

    impl Decoded {
        fn new(bytes: &[u8]) -> Self {
            let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
                .read_info()
                .unwrap();
            let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
            let info = reader.next_frame(&mut pixels).unwrap();
            assert_eq!(
                (info.color_type, info.bit_depth),
                (png::ColorType::Rgb, png::BitDepth::Eight)
            );
            Decoded {
                width: info.width,
                height: info.height,
                pixels,
            }
        }

        fn at(&self, x: u32, y: u32) -> Rgb {
            let i = ((y * self.width + x) * 3) as usize;
            Rgb(self.pixels[i], self.pixels[i + 1], self.pixels[i + 2])
        }
    }

    const WHITE: Rgb = Rgb(255, 255, 255);

    /// 5 bins of width 0.2, worked by hand:
    /// (0.0, 0.2] and (0.4, 0.6] empty;
    /// (0.2, 0.4]: 0.25 right, 0.3 right, 0.35 wrong -> accuracy 2/3, confidence 0.3;
    /// (0.6, 0.8]: 0.7 right, 0.8 wrong -> accuracy 0.5, confidence 0.75;
    /// (0.8, 1.0]: 0.85, 0.9, 0.95 right, 1.0 wrong -> accuracy 0.75, confidence 0.925.
    fn diagram() -> Decoded {
        let pairs = [
            (0.25, true),
            (0.3, true),
            (0.35, false),
            (0.7, true),
            (0.8, false),
            (0.85, true),
            (0.9, true),
            (0.95, true),
            (1.0, false),
        ];
        let calibration = Calibration::new(pairs, 5).unwrap();
        Decoded::new(
            &figure(&calibration, "hand-worked")
                .encode(ImageFormat::Png)
                .unwrap(),
        )
    }

    // The page is 480 units at 2 pixels per unit. The plot's corners are (60, 50) and
    // (440, 430) units, so in pixels x runs 120..880 and y 100 (accuracy 1) ..860
    // (accuracy 0): accuracy a has its top at row 100 + (1 - a) * 760. Bin i of 5 starts
    // at column 120 + 152 i and is 150 pixels wide (one unit of white between bars), so
    // its middle column is 195 + 152 i.
    fn middle(bin: u32) -> u32 {
        195 + 152 * bin
    }

    #[test]
    fn png_is_a_valid_rgb_file_of_the_page_size() {
        let calibration = Calibration::new([(0.3, false), (0.9, true)], 5).unwrap();
        let bytes = figure(&calibration, "t").encode(ImageFormat::Png).unwrap();
        assert_eq!(
            bytes[..8],
            [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n']
        );
        // The first chunk is IHDR, 13 bytes: width, height (big-endian), bit depth 8,
        // colour type 2 (RGB).
        assert_eq!(bytes[8..16], [0, 0, 0, 13, b'I', b'H', b'D', b'R']);
        assert_eq!(bytes[16..24], [0, 0, 0x03, 0xc0, 0, 0, 0x03, 0xc0]);
        assert_eq!(bytes[24..26], [8, 2]);
        let image = Decoded::new(&bytes);
        assert_eq!((image.width, image.height), (960, 960));
    }

    #[test]
    fn bars_rise_to_the_bins_accuracy() {
        let image = diagram();
        // (0.6, 0.8], accuracy 0.5: top edge at row 480 (its outline covers rows 479
        // and 480), bar colour from row 481 down to the frame (rows 859, 860); above it
        // the gap up to confidence 0.75 (row 290) is shaded over white:
        // 0.35 * (214, 95, 95) + 0.65 * 255, rounded.
        let column = middle(3);
        for row in 481..=858 {
            assert_eq!(image.at(column, row), BAR, "row {row}");
        }
        // Row 479, the outline's upper half, lies under the shaded gap.
        assert_eq!(image.at(column, 480), BAR_EDGE);
        assert_eq!(image.at(column, 476), Rgb(241, 199, 199));
        // (0.8, 1.0], accuracy 0.75: top at row 290.
        assert_eq!(image.at(middle(4), 292), BAR);
        assert_ne!(image.at(middle(4), 286), BAR);
        assert_eq!(image.at(middle(4), 286), Rgb(241, 199, 199));
        // Above the gap, white again until the count label.
        assert_eq!(image.at(middle(4), 155), WHITE);
    }

    #[test]
    fn a_bin_above_its_confidence_is_shaded_over_the_bar() {
        let image = diagram();
        // (0.2, 0.4], accuracy 2/3 (row 353.3), confidence 0.3 (row 632): the shade
        // over the bar is 0.35 * (214, 95, 95) + 0.65 * (72, 120, 208) = (121.7, 111.25,
        // 168.45), rounded. (The diagonal crosses this column at row 633.)
        let column = middle(1);
        for row in 356..=629 {
            assert_eq!(image.at(column, row), Rgb(122, 111, 168), "row {row}");
        }
        for row in 636..=858 {
            assert_eq!(image.at(column, row), BAR, "row {row}");
        }
        assert_ne!(image.at(column, 349), BAR);
    }

    #[test]
    fn a_bin_without_predictions_has_no_bar() {
        let image = diagram();
        for bin in [0, 2] {
            for row in 102..=858 {
                let pixel = image.at(middle(bin), row);
                assert!(
                    pixel == WHITE || pixel == DIAGONAL,
                    "bin {bin} row {row}: {pixel:?}"
                );
            }
        }
    }

    #[test]
    fn the_diagonal_joins_the_plots_corners() {
        let image = diagram();
        // The frame's outline covers rows 859-860 and columns 119-120 at the bottom
        // left, rows 99-100 and columns 879-880 at the top right; the dashes start at
        // both ends.
        assert_eq!(image.at(120, 860), Rgb(0, 0, 0));
        assert_eq!(image.at(880, 100), Rgb(0, 0, 0));
        for k in 2..=5 {
            assert_eq!(image.at(120 + k, 860 - k), DIAGONAL, "bottom left + {k}");
            assert_eq!(image.at(880 - k, 100 + k), DIAGONAL, "top right - {k}");
        }
    }

    #[test]
    fn each_bar_carries_its_count_above_the_gap() {
        let image = diagram();
        // (0.8, 1.0]: the count "4" has its baseline 3 units above confidence 0.925
        // (row 157), so at row 151, and is 7 dots of 2 pixels tall: rows 137..151.
        let ink_rows: Vec<u32> = (120..=160)
            .filter(|&row| {
                (middle(4) - 20..middle(4) + 20).any(|x| image.at(x, row) == Rgb(0, 0, 0))
            })
            .collect();
        assert_eq!(ink_rows.first(), Some(&137));
        assert_eq!(ink_rows.last(), Some(&150));
    }

    #[test]
    fn svg_has_one_bar_per_non_empty_bin_with_its_count() {
        let cal = Calibration::new([(0.3, false), (0.9, true), (0.95, true)], 5).unwrap();
        let svg = figure(&cal, "a <model>").svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("predictions, accuracy").count(), 2);
        assert!(svg.contains("a &lt;model&gt;"));
        assert!(svg.contains(">2</text>"));
    }
}
