//! A figure as a short list of shapes (rectangles, lines, text) in SVG user units, and
//! its two ways out: SVG text, or a PNG drawn on a [`Canvas`] at [`PNG_SCALE`] pixels
//! per unit. A chart says once where its shapes go; each format only draws them.

use std::path::Path;

use super::raster::{Canvas, Direction, Rgb, GLYPH_HEIGHT};
use crate::Result;

/// Pixels per SVG user unit in the PNG.
pub const PNG_SCALE: f64 = 2.0;

/// The image formats a figure is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Scalable vector graphics, text.
    Svg,
    /// Portable network graphics, 8-bit RGB.
    Png,
}

impl ImageFormat {
    /// The format a file name's extension asks for (`.svg` or `.png`, any case).
    pub fn from_path(path: &Path) -> Option<ImageFormat> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "svg" => Some(ImageFormat::Svg),
            "png" => Some(ImageFormat::Png),
            _ => None,
        }
    }
}

/// Where a text's anchor point lies along it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// At its start.
    Start,
    /// At its middle.
    Middle,
    /// At its end.
    End,
}

/// A fill colour and its opacity (1 is opaque).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fill {
    /// The colour.
    pub colour: Rgb,
    /// Opacity, 0 to 1.
    pub opacity: f64,
}

/// A rectangle, filled and/or outlined with a stroke one unit wide.
#[derive(Debug, Clone, PartialEq)]
pub struct Rect {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub width: f64,
    /// Height.
    pub height: f64,
    /// The inside, if painted.
    pub fill: Option<Fill>,
    /// The outline's colour, if drawn.
    pub stroke: Option<Rgb>,
    /// What the SVG shows when the pointer rests on it.
    pub tooltip: Option<String>,
}

/// A straight line one unit wide.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// One end.
    pub from: (f64, f64),
    /// The other end.
    pub to: (f64, f64),
    /// Its colour.
    pub colour: Rgb,
    /// Dashes of 4 units with gaps of 3.
    pub dashed: bool,
}

/// A line of black text.
#[derive(Debug, Clone, PartialEq)]
pub struct Text {
    /// The anchor point: where the baseline meets the anchor.
    pub at: (f64, f64),
    /// Where the anchor point lies along the text.
    pub anchor: Anchor,
    /// Font size in units.
    pub size: f64,
    /// Turned a quarter anticlockwise, reading upwards.
    pub upwards: bool,
    /// The text.
    pub text: String,
}

/// One shape, in user units (`y` down).
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A rectangle.
    Rect(Rect),
    /// A straight line.
    Line(Line),
    /// A line of text.
    Text(Text),
}

/// A figure: a white page of `width` x `height` units and the shapes on it, in
/// drawing order.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Page width in units.
    pub width: f64,
    /// Page height in units.
    pub height: f64,
    /// The shapes, each drawn over those before it.
    pub shapes: Vec<Shape>,
}

const BACKGROUND: Rgb = Rgb(255, 255, 255);
const INK: Rgb = Rgb(0, 0, 0);
/// Dash and gap lengths of dashed lines, in units.
const DASH: (f64, f64) = (4.0, 3.0);

impl Figure {
    /// The figure in `format`.
    pub fn encode(&self, format: ImageFormat) -> Result<Vec<u8>> {
        match format {
            ImageFormat::Svg => Ok(self.svg().into_bytes()),
            ImageFormat::Png => self.raster().png(),
        }
    }

    /// The figure as a self-contained SVG document.
    pub fn svg(&self) -> String {
        let (width, height) = (self.width, self.height);
        let mut out = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif">"#
        );
        out.push('\n');
        out.push_str(&format!(
            r#"<rect width="{width}" height="{height}" fill="{}"/>"#,
            BACKGROUND.hex()
        ));
        out.push('\n');
        for shape in &self.shapes {
            let element = match shape {
                Shape::Rect(rect) => rect.svg(),
                Shape::Line(line) => line.svg(),
                Shape::Text(text) => text.svg(),
            };
            out.push_str(&element);
            out.push('\n');
        }
        out.push_str("</svg>\n");
        out
    }

    /// The figure drawn on a canvas of `PNG_SCALE` pixels per unit.
    pub fn raster(&self) -> Canvas {
        let mut canvas = Canvas::new(
            pixel_edge(self.width) as u32,
            pixel_edge(self.height) as u32,
            BACKGROUND,
        );
        for shape in &self.shapes {
            match shape {
                Shape::Rect(rect) => rect.draw(&mut canvas),
                Shape::Line(line) => line.draw(&mut canvas),
                Shape::Text(text) => text.draw(&mut canvas),
            }
        }
        canvas
    }
}

/// The pixel boundary nearest to `v` units.
fn pixel_edge(v: f64) -> i64 {
    (v * PNG_SCALE).round() as i64
}

impl Rect {
    /// The SVG element.
    fn svg(&self) -> String {
        let Rect {
            x,
            y,
            width,
            height,
            ..
        } = self;
        let fill = match self.fill {
            Some(Fill { colour, opacity }) => {
                format!(r#"fill="{}" fill-opacity="{opacity}""#, colour.hex())
            }
            None => r#"fill="none""#.to_string(),
        };
        let stroke = self
            .stroke
            .map_or(String::new(), |s| format!(r#" stroke="{}""#, s.hex()));
        let tooltip = self
            .tooltip
            .as_ref()
            .map_or(String::new(), |t| format!("<title>{}</title>", escape(t)));
        format!(
            r#"<rect x="{x:.2}" y="{y:.2}" width="{width:.2}" height="{height:.2}" {fill}{stroke}>{tooltip}</rect>"#
        )
    }

    /// Paints the inside, then the outline, which straddles the edges as in SVG.
    fn draw(&self, canvas: &mut Canvas) {
        let (left, top) = (pixel_edge(self.x), pixel_edge(self.y));
        let (right, bottom) = (
            pixel_edge(self.x + self.width),
            pixel_edge(self.y + self.height),
        );
        if let Some(Fill { colour, opacity }) = self.fill {
            canvas.fill((left, top), (right, bottom), colour, opacity);
        }
        let Some(colour) = self.stroke else {
            return;
        };
        let half = (PNG_SCALE / 2.0).round() as i64;
        for edge in [top, bottom] {
            canvas.fill(
                (left - half, edge - half),
                (right + half, edge + half),
                colour,
                1.0,
            );
        }
        for edge in [left, right] {
            canvas.fill((edge - half, top), (edge + half, bottom), colour, 1.0);
        }
    }
}

impl Line {
    /// The SVG element.
    fn svg(&self) -> String {
        let dash = match self.dashed {
            true => format!(r#" stroke-dasharray="{} {}""#, DASH.0, DASH.1),
            false => String::new(),
        };
        let ((x1, y1), (x2, y2)) = (self.from, self.to);
        format!(
            r#"<line x1="{x1:.2}" y1="{y1:.2}" x2="{x2:.2}" y2="{y2:.2}" stroke="{}"{dash}/>"#,
            self.colour.hex()
        )
    }

    /// Draws the line one unit thick.
    fn draw(&self, canvas: &mut Canvas) {
        let px = |(x, y): (f64, f64)| (x * PNG_SCALE, y * PNG_SCALE);
        let dash = self
            .dashed
            .then_some((DASH.0 * PNG_SCALE, DASH.1 * PNG_SCALE));
        canvas.line(px(self.from), px(self.to), PNG_SCALE, self.colour, dash);
    }
}

impl Text {
    /// The SVG element.
    fn svg(&self) -> String {
        let (x, y) = self.at;
        let anchor = match self.anchor {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        };
        let turn = match self.upwards {
            true => format!(r#" transform="rotate(-90 {x:.2} {y:.2})""#),
            false => String::new(),
        };
        format!(
            r#"<text x="{x:.2}" y="{y:.2}" text-anchor="{anchor}" font-size="{}"{turn}>{}</text>"#,
            self.size,
            escape(&self.text)
        )
    }

    /// Draws the text in the bitmap font, at the scale nearest the SVG font's size.
    fn draw(&self, canvas: &mut Canvas) {
        let room = match self.upwards {
            false => canvas.width(),
            true => canvas.height(),
        };
        let scale = glyph_scale(self.size, &self.text, room);
        let length = Canvas::text_length(&self.text, scale);
        let before = match self.anchor {
            Anchor::Start => 0,
            Anchor::Middle => length / 2,
            Anchor::End => length,
        };
        let (x, y) = (pixel_edge(self.at.0), pixel_edge(self.at.1));
        let rise = GLYPH_HEIGHT * scale;
        let (origin, direction) = match self.upwards {
            false => ((x - before, y - rise), Direction::Right),
            true => ((x - rise, y + before), Direction::Up),
        };
        canvas.text(origin, &self.text, scale, INK, direction);
    }
}

/// Pixels per font dot for text of `size` units: a capital about as tall as the SVG
/// font's (0.72 of the size), made smaller if the text would not fit in `room` pixels.
fn glyph_scale(size: f64, text: &str, room: u32) -> i64 {
    let capital = 0.72 * size * PNG_SCALE;
    let mut scale = (capital / GLYPH_HEIGHT as f64).round().max(1.0) as i64;
    while scale > 1 && Canvas::text_length(text, scale) > i64::from(room) {
        scale -= 1;
    }
    scale
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
    fn the_extension_names_the_format_in_any_case() {
        let format = |name: &str| ImageFormat::from_path(Path::new(name));
        assert_eq!(format("out/r.png"), Some(ImageFormat::Png));
        assert_eq!(format("r.PNG"), Some(ImageFormat::Png));
        assert_eq!(format("r.svg"), Some(ImageFormat::Svg));
        assert_eq!(format("r.jpg"), None);
        assert_eq!(format("png"), None);
    }

    #[test]
    fn the_page_is_png_scale_pixels_per_unit() {
        let figure = Figure {
            width: 30.0,
            height: 20.5,
            shapes: Vec::new(),
        };
        let canvas = figure.raster();
        assert_eq!((canvas.width(), canvas.height()), (60, 41));
        assert_eq!(canvas.pixel(59, 40), Some(BACKGROUND));
    }
}
