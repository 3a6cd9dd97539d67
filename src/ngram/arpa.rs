//! The ARPA back-off model format: an in-memory [`Arpa`] model, a writer that
//! prints it as lmplz does, and a reader for ARPA files from any tool.
//!
//! Format (Doug Paul's ARPA format as SRILM and KenLM write it): a `\data\`
//! header with `ngram N=count` lines, then one `\N-grams:` section per order whose
//! lines are `log10_prob <tab> w1 .. wN [<tab> log10_backoff]`, then `\end\`.
//! p(w | h) of a listed n-gram is its probability; otherwise p(w | h) =
//! backoff(h) p(w | h') (Katz 1987).
//!
//! The writer prints every order but the highest with a backoff column (0 where
//! the n-gram is no context, as lmplz), values as the shortest decimal that reads
//! back to the same f32, and n-grams in suffix order. The reader accepts plain
//! or gzip files (detected by the gzip magic), blank lines, missing backoffs,
//! space or tab separators and -99 or -inf values; malformed input is an error
//! naming the line.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use super::vocab::{split_words, LineReader};
use super::write_atomically;
use crate::{Error, Result};

/// An n-gram model in ARPA form: a vocabulary and, per order, n-grams with log10
/// probabilities and backoffs.
#[derive(Clone, Debug)]
pub struct Arpa {
    /// Words by id; ids are the order of the 1-grams.
    pub vocab: Vec<String>,
    /// The n-grams of orders 1..=N (index n-1).
    pub orders: Vec<ArpaOrder>,
}

/// The n-grams of one order.
#[derive(Clone, Debug)]
pub struct ArpaOrder {
    /// n, the number of words in each n-gram.
    pub order: usize,
    /// The n-grams as word ids, `order` per n-gram, oldest word first.
    pub words: Vec<u32>,
    /// log10 p(w | h) of each n-gram.
    pub log10_prob: Vec<f32>,
    /// log10 backoff weight of each n-gram as a context (0 where none).
    pub log10_backoff: Vec<f32>,
}

impl ArpaOrder {
    /// Number of n-grams.
    pub fn len(&self) -> usize {
        self.log10_prob.len()
    }

    /// Whether the order holds no n-gram.
    pub fn is_empty(&self) -> bool {
        self.log10_prob.is_empty()
    }

    /// The word ids of the `row`-th n-gram.
    pub fn ngram(&self, row: usize) -> &[u32] {
        &self.words[row * self.order..(row + 1) * self.order]
    }
}

impl Arpa {
    /// The highest order N.
    pub fn order(&self) -> usize {
        self.orders.len()
    }

    /// Number of n-grams per order (index n-1).
    pub fn counts(&self) -> Vec<usize> {
        self.orders.iter().map(ArpaOrder::len).collect()
    }

    /// The words of an n-gram given as ids, joined by spaces.
    pub fn ngram_text(&self, ngram: &[u32]) -> String {
        let words: Vec<&str> = ngram
            .iter()
            .map(|&id| self.vocab[id as usize].as_str())
            .collect();
        words.join(" ")
    }
}

/// Formats an f32 as the shortest decimal that reads back to it, in plain
/// notation, with exponent notation below 1e-6 as lmplz (double-conversion).
pub(crate) fn format_f32(value: f32, out: &mut String) {
    let value = value + 0.0; // -0 prints as 0
    let written = if value != 0.0 && value.abs() < 1e-6 {
        write!(out, "{value:e}")
    } else {
        write!(out, "{value}")
    };
    written.expect("writing to a String cannot fail");
}

/// Writes `model` as an ARPA file at `path`, atomically (a temporary file in the
/// same directory, then a rename; no partial file is left on error).
pub fn write_arpa(model: &Arpa, path: &Path) -> Result<()> {
    write_atomically(path, |out| write_arpa_to(model, out))
}

/// Rows formatted per parallel task when writing ARPA text.
const ROWS_PER_TASK: usize = 1 << 13;

/// Writes `model` in ARPA format to `out`. Lines are formatted in parallel, a
/// window of tasks at a time so that memory stays bounded, and written in order;
/// one window is written while the next is formatted.
pub fn write_arpa_to<W: Write + Send>(model: &Arpa, out: &mut W) -> std::io::Result<()> {
    use rayon::prelude::*;

    let top = model.order();
    let mut text = String::from("\\data\\\n");
    for order in &model.orders {
        let _ = writeln!(text, "ngram {}={}", order.order, order.len());
    }
    out.write_all(text.as_bytes())?;
    let window = rayon::current_num_threads() * 2;
    for order in &model.orders {
        write!(out, "\n\\{}-grams:\n", order.order)?;
        let tasks: Vec<usize> = (0..order.len()).step_by(ROWS_PER_TASK).collect();
        let mut formatted: Vec<String> = Vec::new();
        for starts in tasks.chunks(window) {
            let (written, next) = rayon::join(
                || formatted.iter().try_for_each(|chunk| out.write_all(chunk.as_bytes())),
                || {
                    starts
                        .par_iter()
                        .map(|&start| {
                            let end = (start + ROWS_PER_TASK).min(order.len());
                            format_rows(model, order, start..end, order.order < top)
                        })
                        .collect::<Vec<String>>()
                },
            );
            written?;
            formatted = next;
        }
        for chunk in &formatted {
            out.write_all(chunk.as_bytes())?;
        }
    }
    out.write_all(b"\n\\end\\\n")
}

/// The ARPA lines of some rows of one order.
fn format_rows(model: &Arpa, order: &ArpaOrder, rows: std::ops::Range<usize>, with_backoff: bool) -> String {
    let mut text = String::with_capacity(rows.len() * (12 + 8 * order.order));
    for row in rows {
        format_f32(order.log10_prob[row], &mut text);
        text.push('\t');
        for (i, &id) in order.ngram(row).iter().enumerate() {
            if i > 0 {
                text.push(' ');
            }
            text.push_str(&model.vocab[id as usize]);
        }
        if with_backoff {
            text.push('\t');
            format_f32(order.log10_backoff[row], &mut text);
        }
        text.push('\n');
    }
    text
}

/// Opens a file for reading, decompressing it when it starts with the gzip magic.
pub(crate) fn open_maybe_gzip(path: &Path) -> Result<Box<dyn BufRead>> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut magic = [0_u8; 2];
    let mut filled = 0;
    while filled < 2 {
        let read = file
            .read(&mut magic[filled..])
            .map_err(|e| Error::io(path, e))?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    let head = std::io::Cursor::new(magic[..filled].to_vec());
    let whole = head.chain(file);
    if filled == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(BufReader::with_capacity(
            1 << 16,
            flate2::read::MultiGzDecoder::new(whole),
        )))
    } else {
        Ok(Box::new(BufReader::with_capacity(1 << 16, whole)))
    }
}

/// Reads an ARPA file (plain or gzip).
pub fn read_arpa(path: &Path) -> Result<Arpa> {
    if super::binary::has_magic(path)? {
        return Err(Error::Invalid(format!(
            "{}: this is an nlp binary n-gram model, which stores n-grams by hash and cannot be \
             turned back into ARPA; use the ARPA file it was built from",
            path.display()
        )));
    }
    read_arpa_from(open_maybe_gzip(path)?, path)
}

/// Reads ARPA text from `reader`; `source` names it in errors.
pub fn read_arpa_from<R: BufRead>(reader: R, source: &Path) -> Result<Arpa> {
    let mut lines = LineReader::new(reader, source);
    let error = |line: usize, message: String| Error::Parse {
        path: source.to_path_buf(),
        line,
        message,
    };

    // Header: skip anything before \data\, then read the counts.
    let mut declared: Vec<usize> = Vec::new();
    let mut seen_data = false;
    let mut section: Option<(usize, usize)> = None; // (order, line of its header)
    // Before `\data\` anything goes (comments, or a file that is no ARPA at all).
    while !seen_data {
        match lines.next_bytes()? {
            Some((_, line)) => seen_data = line.trim_ascii() == b"\\data\\",
            None => break,
        }
    }
    while let Some((number, line)) = lines.next_line()? {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("ngram ") {
            let (n, count) = rest
                .split_once('=')
                .and_then(|(n, c)| {
                    Some((
                        n.trim().parse::<usize>().ok()?,
                        c.trim().parse::<usize>().ok()?,
                    ))
                })
                .ok_or_else(|| {
                    error(number, format!("expected `ngram N=COUNT`, found `{line}`"))
                })?;
            if n != declared.len() + 1 {
                return Err(error(
                    number,
                    format!(
                        "expected the count of {}-grams, found `{line}`",
                        declared.len() + 1
                    ),
                ));
            }
            declared.push(count);
            continue;
        }
        section = Some((
            section_order(line).ok_or_else(|| {
                error(
                    number,
                    format!("expected `ngram N=COUNT` or `\\1-grams:`, found `{line}`"),
                )
            })?,
            number,
        ));
        break;
    }
    if !seen_data {
        return Err(Error::Invalid(format!(
            "{}: not an n-gram model: neither an ARPA file (no `\\data\\` line) nor an nlp binary model (magic bytes `{}`)",
            source.display(),
            String::from_utf8_lossy(&super::binary::MAGIC)
        )));
    }
    if declared.is_empty() {
        return Err(error(
            0,
            "the `\\data\\` header declares no n-gram counts".to_string(),
        ));
    }

    let mut vocab: Vec<String> = Vec::new();
    let mut ids: std::collections::HashMap<Vec<u8>, u32, super::hash::FastBuildHasher> =
        Default::default();
    let mut orders: Vec<ArpaOrder> = Vec::new();
    while let Some((order, header_line)) = section.take() {
        if order != orders.len() + 1 || order > declared.len() {
            return Err(error(
                header_line,
                format!("expected the `\\{}-grams:` section", orders.len() + 1),
            ));
        }
        let mut table = ArpaOrder {
            order,
            words: Vec::with_capacity(declared[order - 1] * order),
            log10_prob: Vec::with_capacity(declared[order - 1]),
            log10_backoff: Vec::with_capacity(declared[order - 1]),
        };
        let mut end_line = header_line;
        while let Some((number, line)) = lines.next_bytes()? {
            end_line = number;
            let trimmed = line.trim_ascii();
            if trimmed.is_empty() {
                continue;
            }
            if trimmed.starts_with(b"\\") {
                let trimmed = String::from_utf8_lossy(trimmed);
                // `\end\` stops the reading; a file that lacks it after its
                // last section is accepted.
                if trimmed != "\\end\\" {
                    let next = section_order(&trimmed).ok_or_else(|| {
                        error(
                            number,
                            format!(
                                "expected an n-gram line or a section header, found `{trimmed}`"
                            ),
                        )
                    })?;
                    section = Some((next, number));
                }
                break;
            }
            let fields: Vec<&[u8]> = split_words(line).collect();
            if fields.len() != order + 1 && fields.len() != order + 2 {
                return Err(error(
                    number,
                    format!(
                        "expected {} or {} fields in a {order}-gram line, found {}",
                        order + 1,
                        order + 2,
                        fields.len()
                    ),
                ));
            }
            let prob = parse_log10(fields[0]).ok_or_else(|| {
                error(
                    number,
                    format!(
                        "expected a log10 probability, found `{}`",
                        String::from_utf8_lossy(fields[0])
                    ),
                )
            })?;
            let backoff = match fields.get(order + 1) {
                Some(text) => parse_log10(text).ok_or_else(|| {
                    error(
                        number,
                        format!(
                            "expected a log10 backoff, found `{}`",
                            String::from_utf8_lossy(text)
                        ),
                    )
                })?,
                None => 0.0,
            };
            for &word in &fields[1..=order] {
                let id = if order == 1 {
                    let text = std::str::from_utf8(word)
                        .map_err(|_| error(number, "expected a UTF-8 word".to_string()))?;
                    if ids.contains_key(word) {
                        return Err(error(
                            number,
                            format!("the 1-gram `{text}` is listed twice"),
                        ));
                    }
                    let id = vocab.len() as u32;
                    vocab.push(text.to_owned());
                    ids.insert(word.to_vec(), id);
                    id
                } else {
                    *ids.get(word).ok_or_else(|| {
                        error(
                            number,
                            format!(
                                "the word `{}` is not among the 1-grams",
                                String::from_utf8_lossy(word)
                            ),
                        )
                    })?
                };
                table.words.push(id);
            }
            table.log10_prob.push(prob);
            table.log10_backoff.push(backoff);
        }
        if table.len() != declared[order - 1] {
            return Err(error(
                end_line,
                format!(
                    "the header declares {} {order}-grams but the section holds {}",
                    declared[order - 1],
                    table.len()
                ),
            ));
        }
        orders.push(table);
    }
    if orders.len() != declared.len() {
        return Err(error(
            0,
            format!(
                "the header declares {} orders but the file holds {} sections (truncated?)",
                declared.len(),
                orders.len()
            ),
        ));
    }
    Ok(Arpa { vocab, orders })
}

/// The N of a `\N-grams:` header.
fn section_order(line: &str) -> Option<usize> {
    line.strip_prefix('\\')?
        .strip_suffix("-grams:")?
        .parse()
        .ok()
}

/// Parses a log10 value; `-inf` and `-Infinity` read as -99.
fn parse_log10(text: &[u8]) -> Option<f32> {
    let text = std::str::from_utf8(text).ok()?;
    let value: f32 = text.parse().ok().or_else(|| {
        text.eq_ignore_ascii_case("-infinity")
            .then_some(f32::NEG_INFINITY)
    })?;
    if value.is_nan() {
        None
    } else if value == f32::NEG_INFINITY {
        Some(-99.0)
    } else {
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = "some preamble\n\\data\\\nngram 1=4\nngram  2 = 2\n\n\\1-grams:\n-1.0\t<unk>\n-99\t<s>\t-0.5\n-0.3 </s>\n-0.6\ta\t-inf\n\n\n\\2-grams:\n-0.2\t<s> a\n-0.1\ta </s>\t0\n\\end\\\n";

    #[test]
    fn reads_blank_lines_missing_backoffs_and_odd_values() {
        let model = read_arpa_from(SMALL.as_bytes(), Path::new("m.arpa")).expect("parses");
        assert_eq!(model.vocab, ["<unk>", "<s>", "</s>", "a"]);
        assert_eq!(model.counts(), [4, 2]);
        assert_eq!(model.orders[0].log10_backoff, [0.0, -0.5, 0.0, -99.0]);
        assert_eq!(model.orders[0].log10_prob[1], -99.0);
        assert_eq!(model.orders[1].ngram(0), [1, 3]);
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let cases = [
            (
                SMALL.replace("-0.2\t<s> a", "-0.2\t<s>"),
                "m.arpa:14: expected 3 or 4 fields in a 2-gram line, found 2",
            ),
            (
                SMALL.replace("-0.2\t<s> a", "-0.2\t<s> b"),
                "m.arpa:14: the word `b` is not among the 1-grams",
            ),
            (
                SMALL.replace("-0.3 </s>", "x </s>"),
                "m.arpa:9: expected a log10 probability, found `x`",
            ),
            (
                SMALL.replace("ngram 1=4", "ngram 1=5"),
                "m.arpa:13: the header declares 5 1-grams but the section holds 4",
            ),
        ];
        for (text, expected) in cases {
            let err = read_arpa_from(text.as_bytes(), Path::new("m.arpa"))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert_eq!(err, expected);
        }
    }

    #[test]
    fn writes_what_it_reads() {
        let model = read_arpa_from(SMALL.as_bytes(), Path::new("m.arpa")).expect("parses");
        let mut out = Vec::new();
        write_arpa_to(&model, &mut out).expect("writes");
        let text = String::from_utf8(out).expect("utf8");
        assert!(
            text.starts_with(
                "\\data\\\nngram 1=4\nngram 2=2\n\n\\1-grams:\n-1\t<unk>\t0\n-99\t<s>\t-0.5\n"
            ),
            "{text}"
        );
        assert!(
            text.ends_with("\\2-grams:\n-0.2\t<s> a\n-0.1\ta </s>\n\n\\end\\\n"),
            "{text}"
        );
        let again = read_arpa_from(text.as_bytes(), Path::new("again.arpa")).expect("parses");
        assert_eq!(again.orders[1].log10_prob, model.orders[1].log10_prob);
    }

    #[test]
    fn floats_print_shortest_round_trip() {
        let mut s = String::new();
        for v in [-0.04721843_f32, 0.0, -0.0, -99.0, -1.2e-7, -0.6812177] {
            s.clear();
            format_f32(v, &mut s);
            assert_eq!(s.parse::<f32>().ok(), Some(v + 0.0));
        }
        s.clear();
        format_f32(-1.2e-7, &mut s);
        assert_eq!(s, "-1.2e-7");
    }
}
