//! A small RGB raster: a pixel buffer with filled rectangles (optionally translucent),
//! thick dashed lines, text in a built-in 5x7 bitmap font, and PNG encoding (the `png`
//! crate). Enough to draw a chart without a graphics library; not a general renderer
//! (no anti-aliasing, no curves).
//!
//! Coordinates are pixels, `x` to the right and `y` down; pixel `(x, y)` covers the
//! square `[x, x + 1) x [y, y + 1)`. Everything drawn outside the canvas is clipped.

use crate::{Error, Result};

/// A colour, 8 bits per channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rgb(pub u8, pub u8, pub u8);

impl Rgb {
    /// `self` painted over `under` with the given opacity (0 transparent, 1 opaque),
    /// rounded to the nearest level.
    pub fn over(self, under: Rgb, opacity: f64) -> Rgb {
        let mix = |top: u8, bottom: u8| {
            (opacity * f64::from(top) + (1.0 - opacity) * f64::from(bottom)).round() as u8
        };
        Rgb(
            mix(self.0, under.0),
            mix(self.1, under.1),
            mix(self.2, under.2),
        )
    }

    /// The colour as SVG writes it, `#rrggbb`.
    pub fn hex(self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }
}

/// Which way text runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Left to right, glyph tops up.
    Right,
    /// Bottom to top, glyph tops to the left (text turned a quarter anticlockwise).
    Up,
}

/// Columns of a glyph.
pub const GLYPH_WIDTH: i64 = 5;
/// Rows of a glyph, from the top of a capital to the baseline.
pub const GLYPH_HEIGHT: i64 = 7;
/// Rows that descenders reach below the baseline.
pub const DESCENT: i64 = 2;
/// Columns from one glyph's start to the next (one column of space between).
const ADVANCE: i64 = GLYPH_WIDTH + 1;

/// An RGB image being drawn.
#[derive(Debug, Clone)]
pub struct Canvas {
    width: u32,
    height: u32,
    /// Row-major, 3 bytes per pixel.
    pixels: Vec<u8>,
}

impl Canvas {
    /// A `width` x `height` canvas filled with `background`.
    pub fn new(width: u32, height: u32, background: Rgb) -> Self {
        let pixels =
            [background.0, background.1, background.2].repeat(width as usize * height as usize);
        Canvas {
            width,
            height,
            pixels,
        }
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The colour of pixel `(x, y)`; `None` outside the canvas.
    pub fn pixel(&self, x: i64, y: i64) -> Option<Rgb> {
        let at = self.offset(x, y)?;
        Some(Rgb(
            self.pixels[at],
            self.pixels[at + 1],
            self.pixels[at + 2],
        ))
    }

    /// The byte offset of pixel `(x, y)`, if it is on the canvas.
    fn offset(&self, x: i64, y: i64) -> Option<usize> {
        let inside =
            (0..i64::from(self.width)).contains(&x) && (0..i64::from(self.height)).contains(&y);
        inside.then(|| (y as usize * self.width as usize + x as usize) * 3)
    }

    /// Paints the pixels `x0..x1` x `y0..y1` with `colour` at `opacity` (1 is opaque).
    pub fn fill(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), colour: Rgb, opacity: f64) {
        let clamp_x = |x: i64| x.clamp(0, i64::from(self.width));
        let clamp_y = |y: i64| y.clamp(0, i64::from(self.height));
        for y in clamp_y(y0)..clamp_y(y1) {
            for x in clamp_x(x0)..clamp_x(x1) {
                let at = self.offset(x, y).expect("clamped to the canvas");
                let under = Rgb(self.pixels[at], self.pixels[at + 1], self.pixels[at + 2]);
                let Rgb(r, g, b) = colour.over(under, opacity);
                self.pixels[at..at + 3].copy_from_slice(&[r, g, b]);
            }
        }
    }

    /// A straight line `width` pixels thick between two points (pixel corners, so
    /// `(0.0, 0.0)` is the canvas's top-left corner). With `dash = Some((on, off))` it
    /// is drawn in dashes of `on` pixels with gaps of `off`, counted from the nearer
    /// end, so that both ends carry a dash.
    pub fn line(
        &mut self,
        from: (f64, f64),
        to: (f64, f64),
        width: f64,
        colour: Rgb,
        dash: Option<(f64, f64)>,
    ) {
        let (dx, dy) = (to.0 - from.0, to.1 - from.1);
        let length = dx.hypot(dy);
        let steps = dx.abs().max(dy.abs()).ceil().max(1.0) as usize;
        let side = width.round().max(1.0) as i64;
        for step in 0..=steps {
            let t = step as f64 / steps as f64;
            if let Some((on, off)) = dash {
                let from_nearer_end = step.min(steps - step) as f64 * length / steps as f64;
                if from_nearer_end % (on + off) >= on {
                    continue;
                }
            }
            // The pen is a `side`-pixel square centred on the point.
            let left = (from.0 + t * dx - width / 2.0 + 0.5).floor() as i64;
            let top = (from.1 + t * dy - width / 2.0 + 0.5).floor() as i64;
            self.fill((left, top), (left + side, top + side), colour, 1.0);
        }
    }

    /// Pixels that `text` spans along its direction at `scale` (pixels per font dot).
    pub fn text_length(text: &str, scale: i64) -> i64 {
        let glyphs = text.chars().count() as i64;
        (glyphs * ADVANCE - 1).max(0) * scale
    }

    /// Draws `text` at `scale` pixels per font dot. `origin` is where the text's
    /// top-left corner (as if it ran right) lands: the top-left pixel for
    /// [`Direction::Right`], the bottom-left for [`Direction::Up`].
    pub fn text(
        &mut self,
        origin: (i64, i64),
        text: &str,
        scale: i64,
        colour: Rgb,
        direction: Direction,
    ) {
        for (index, c) in text.chars().enumerate() {
            let rows = glyph(c);
            for (row, bits) in (0..).zip(rows) {
                for column in 0..GLYPH_WIDTH {
                    if bits & (1 << (GLYPH_WIDTH - 1 - column)) == 0 {
                        continue;
                    }
                    // (along, across): the dot's place in the text as if it ran right.
                    let along = (index as i64 * ADVANCE + column) * scale;
                    let across = (row + drop(c)) * scale;
                    let (x, y) = match direction {
                        Direction::Right => (origin.0 + along, origin.1 + across),
                        Direction::Up => (origin.0 + across, origin.1 - along - scale),
                    };
                    self.fill((x, y), (x + scale, y + scale), colour, 1.0);
                }
            }
        }
    }

    /// The canvas as a PNG file (8-bit RGB, no interlacing).
    pub fn png(&self) -> Result<Vec<u8>> {
        let failed = |e: png::EncodingError| Error::Invalid(format!("encoding the PNG image: {e}"));
        let mut bytes = Vec::new();
        let mut encoder = png::Encoder::new(&mut bytes, self.width, self.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(failed)?;
        writer.write_image_data(&self.pixels).map_err(failed)?;
        writer.finish().map_err(failed)?;
        Ok(bytes)
    }
}

/// Rows that `c`'s bitmap is drawn below the top of a capital: letters with a
/// descender (and the comma) hang [`DESCENT`] rows below the baseline.
fn drop(c: char) -> i64 {
    match c {
        'g' | 'p' | 'q' | 'y' | ',' => DESCENT,
        _ => 0,
    }
}

/// The 5x7 bitmap of `c`, one row per byte from the top, the leftmost column in bit 4;
/// a character without a bitmap is drawn as a box. The bitmaps of letters with a
/// descender start at the x-height and are lowered by [`drop`].
#[rustfmt::skip]
fn glyph(c: char) -> [u8; GLYPH_HEIGHT as usize] {
    match c {
        ' ' => [0, 0, 0, 0, 0, 0, 0],
        '0' => [0b01110, 0b10001, 0b10011, 0b10101, 0b11001, 0b10001, 0b01110],
        '1' => [0b00100, 0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
        '2' => [0b01110, 0b10001, 0b00001, 0b00010, 0b00100, 0b01000, 0b11111],
        '3' => [0b11111, 0b00010, 0b00100, 0b00010, 0b00001, 0b10001, 0b01110],
        '4' => [0b00010, 0b00110, 0b01010, 0b10010, 0b11111, 0b00010, 0b00010],
        '5' => [0b11111, 0b10000, 0b11110, 0b00001, 0b00001, 0b10001, 0b01110],
        '6' => [0b00110, 0b01000, 0b10000, 0b11110, 0b10001, 0b10001, 0b01110],
        '7' => [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b01000, 0b01000],
        '8' => [0b01110, 0b10001, 0b10001, 0b01110, 0b10001, 0b10001, 0b01110],
        '9' => [0b01110, 0b10001, 0b10001, 0b01111, 0b00001, 0b00010, 0b01100],
        'A' => [0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001],
        'B' => [0b11110, 0b10001, 0b10001, 0b11110, 0b10001, 0b10001, 0b11110],
        'C' => [0b01110, 0b10001, 0b10000, 0b10000, 0b10000, 0b10001, 0b01110],
        'D' => [0b11110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b11110],
        'E' => [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b11111],
        'F' => [0b11111, 0b10000, 0b10000, 0b11110, 0b10000, 0b10000, 0b10000],
        'G' => [0b01110, 0b10001, 0b10000, 0b10111, 0b10001, 0b10001, 0b01111],
        'H' => [0b10001, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001],
        'I' => [0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
        'J' => [0b00111, 0b00010, 0b00010, 0b00010, 0b00010, 0b10010, 0b01100],
        'K' => [0b10001, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010, 0b10001],
        'L' => [0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111],
        'M' => [0b10001, 0b11011, 0b10101, 0b10101, 0b10001, 0b10001, 0b10001],
        'N' => [0b10001, 0b10001, 0b11001, 0b10101, 0b10011, 0b10001, 0b10001],
        'O' => [0b01110, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110],
        'P' => [0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000],
        'Q' => [0b01110, 0b10001, 0b10001, 0b10001, 0b10101, 0b10010, 0b01101],
        'R' => [0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001],
        'S' => [0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110],
        'T' => [0b11111, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100],
        'U' => [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01110],
        'V' => [0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100],
        'W' => [0b10001, 0b10001, 0b10001, 0b10101, 0b10101, 0b10101, 0b01010],
        'X' => [0b10001, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001, 0b10001],
        'Y' => [0b10001, 0b10001, 0b01010, 0b00100, 0b00100, 0b00100, 0b00100],
        'Z' => [0b11111, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b11111],
        'a' => [0b00000, 0b00000, 0b01110, 0b00001, 0b01111, 0b10001, 0b01111],
        'b' => [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b11110],
        'c' => [0b00000, 0b00000, 0b01110, 0b10000, 0b10000, 0b10001, 0b01110],
        'd' => [0b00001, 0b00001, 0b01101, 0b10011, 0b10001, 0b10001, 0b01111],
        'e' => [0b00000, 0b00000, 0b01110, 0b10001, 0b11111, 0b10000, 0b01110],
        'f' => [0b00110, 0b01001, 0b01000, 0b11100, 0b01000, 0b01000, 0b01000],
        'g' => [0b01111, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110],
        'h' => [0b10000, 0b10000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001],
        'i' => [0b00100, 0b00000, 0b01100, 0b00100, 0b00100, 0b00100, 0b01110],
        'j' => [0b00010, 0b00000, 0b00110, 0b00010, 0b00010, 0b10010, 0b01100],
        'k' => [0b10000, 0b10000, 0b10010, 0b10100, 0b11000, 0b10100, 0b10010],
        'l' => [0b01100, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110],
        'm' => [0b00000, 0b00000, 0b11010, 0b10101, 0b10101, 0b10001, 0b10001],
        'n' => [0b00000, 0b00000, 0b10110, 0b11001, 0b10001, 0b10001, 0b10001],
        'o' => [0b00000, 0b00000, 0b01110, 0b10001, 0b10001, 0b10001, 0b01110],
        'p' => [0b11110, 0b10001, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000],
        'q' => [0b01111, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b00001],
        'r' => [0b00000, 0b00000, 0b10110, 0b11001, 0b10000, 0b10000, 0b10000],
        's' => [0b00000, 0b00000, 0b01110, 0b10000, 0b01110, 0b00001, 0b11110],
        't' => [0b01000, 0b01000, 0b11100, 0b01000, 0b01000, 0b01001, 0b00110],
        'u' => [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b10011, 0b01101],
        'v' => [0b00000, 0b00000, 0b10001, 0b10001, 0b10001, 0b01010, 0b00100],
        'w' => [0b00000, 0b00000, 0b10001, 0b10001, 0b10101, 0b10101, 0b01010],
        'x' => [0b00000, 0b00000, 0b10001, 0b01010, 0b00100, 0b01010, 0b10001],
        'y' => [0b10001, 0b10001, 0b10001, 0b10001, 0b01111, 0b00001, 0b01110],
        'z' => [0b00000, 0b00000, 0b11111, 0b00010, 0b00100, 0b01000, 0b11111],
        '.' => [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b01100, 0b01100],
        ',' => [0b00000, 0b00000, 0b00000, 0b01100, 0b01100, 0b00100, 0b01000],
        ':' => [0b00000, 0b01100, 0b01100, 0b00000, 0b01100, 0b01100, 0b00000],
        '%' => [0b11000, 0b11001, 0b00010, 0b00100, 0b01000, 0b10011, 0b00011],
        '=' => [0b00000, 0b00000, 0b11111, 0b00000, 0b11111, 0b00000, 0b00000],
        '-' => [0b00000, 0b00000, 0b00000, 0b11111, 0b00000, 0b00000, 0b00000],
        '_' => [0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b00000, 0b11111],
        '(' => [0b00010, 0b00100, 0b01000, 0b01000, 0b01000, 0b00100, 0b00010],
        ')' => [0b01000, 0b00100, 0b00010, 0b00010, 0b00010, 0b00100, 0b01000],
        '<' => [0b00010, 0b00100, 0b01000, 0b10000, 0b01000, 0b00100, 0b00010],
        '>' => [0b01000, 0b00100, 0b00010, 0b00001, 0b00010, 0b00100, 0b01000],
        '/' => [0b00000, 0b00001, 0b00010, 0b00100, 0b01000, 0b10000, 0b00000],
        _ => [0b11111, 0b10001, 0b10001, 0b10001, 0b10001, 0b10001, 0b11111],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WHITE: Rgb = Rgb(255, 255, 255);
    const BLACK: Rgb = Rgb(0, 0, 0);

    /// The canvas as rows of `#` (black) and `.` (anything else).
    fn picture(canvas: &Canvas) -> Vec<String> {
        (0..i64::from(canvas.height()))
            .map(|y| {
                (0..i64::from(canvas.width()))
                    .map(|x| match canvas.pixel(x, y) == Some(BLACK) {
                        true => '#',
                        false => '.',
                    })
                    .collect()
            })
            .collect()
    }

    /// The picture of `text` drawn in black on a white `size` canvas.
    fn drawn(
        size: (u32, u32),
        origin: (i64, i64),
        text: &str,
        scale: i64,
        direction: Direction,
    ) -> Vec<String> {
        let mut canvas = Canvas::new(size.0, size.1, WHITE);
        canvas.text(origin, text, scale, BLACK, direction);
        picture(&canvas)
    }

    #[test]
    fn translucent_fill_mixes_with_what_is_under_it() {
        let mut canvas = Canvas::new(4, 3, WHITE);
        canvas.fill((1, 1), (3, 9), Rgb(0, 100, 200), 0.25);
        // 0.25 * (0, 100, 200) + 0.75 * 255 = (191.25, 216.25, 241.25), rounded.
        assert_eq!(canvas.pixel(1, 1), Some(Rgb(191, 216, 241)));
        assert_eq!(canvas.pixel(2, 2), Some(Rgb(191, 216, 241)));
        assert_eq!(canvas.pixel(0, 1), Some(WHITE));
        assert_eq!(canvas.pixel(1, 0), Some(WHITE));
        assert_eq!(canvas.pixel(4, 0), None);
    }

    #[test]
    fn text_is_drawn_glyph_by_glyph_one_column_apart() {
        let picture = drawn((13, 9), (1, 1), "1=", 1, Direction::Right);
        let expected = [
            ".............",
            "...#.........",
            "..##.........",
            "...#...#####.",
            "...#.........",
            "...#...#####.",
            "...#.........",
            "..###........",
            ".............",
        ];
        assert_eq!(picture, expected);
        assert_eq!(Canvas::text_length("1=", 1), 11);
        assert_eq!(Canvas::text_length("1=", 3), 33);
    }

    #[test]
    fn descenders_hang_below_the_baseline() {
        // "h" spans a capital's height, rows 1..=7 when drawn from row 1; "y" starts at
        // the x-height (2 rows lower) and its tail hangs 2 rows below the baseline.
        let picture = drawn((13, 11), (1, 1), "hy", 1, Direction::Right);
        let inked_rows = |columns: std::ops::Range<usize>| -> Vec<usize> {
            (0..picture.len())
                .filter(|&row| picture[row][columns.clone()].contains('#'))
                .collect()
        };
        assert_eq!(inked_rows(1..6), (1..=7).collect::<Vec<_>>());
        assert_eq!(inked_rows(7..12), (3..=9).collect::<Vec<_>>());
    }

    #[test]
    fn upward_text_turns_a_quarter_anticlockwise() {
        // "L" read upwards: its stem lies along the bottom row of the glyph's box, its
        // foot rises on the right.
        let picture = drawn((9, 7), (1, 6), "L", 1, Direction::Up);
        assert_eq!(picture[5], ".#######.");
        assert!(
            picture[1..=4].iter().all(|row| row == ".......#."),
            "{picture:?}"
        );
        assert_eq!(picture.concat().matches('#').count(), 11);
    }

    #[test]
    fn a_character_without_a_glyph_is_a_box_and_scale_enlarges_dots() {
        let picture = drawn((12, 16), (1, 1), "€", 2, Direction::Right);
        assert_eq!(picture[1], ".##########.");
        assert_eq!(picture[2], ".##########.");
        assert_eq!(picture[7], ".##......##.");
        assert_eq!(picture[14], ".##########.");
        assert_eq!(picture[15], "............");
    }

    #[test]
    fn dashes_start_at_both_ends_of_a_line() {
        let mut canvas = Canvas::new(21, 3, WHITE);
        canvas.line((0.0, 1.5), (20.0, 1.5), 1.0, BLACK, Some((3.0, 2.0)));
        // Distance to the nearer end, modulo 5, below 3: on.
        assert_eq!(picture(&canvas)[1], "###..###..#..###..###");
        assert_eq!(picture(&canvas)[0], ".....................");
    }

    #[test]
    fn png_decodes_to_the_same_pixels() {
        let mut canvas = Canvas::new(3, 2, WHITE);
        canvas.fill((1, 0), (2, 2), Rgb(10, 20, 30), 1.0);
        let bytes = canvas.png().unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), (3, 2));
        assert_eq!(pixels, canvas.pixels);
    }
}
