//! Pre-tokenization: cutting text into the pieces that a subword model encodes one by one.
//!
//! - GPT-2 splitting (Radford et al. 2019): the regex
//!   `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//!   written as a hand scanner over UTF-8 (no regex engine), splitting exactly as the regex
//!   does, including `\s+(?!\S)`: a run of spaces before a word leaves its last space to the word.
//!   It works on bytes, so invalid UTF-8 is split too (each invalid byte counts as punctuation).
//! - Hugging Face `Whitespace`: `\w+|[^\w\s]+`, whitespace dropped.
//! - SentencePiece/`Metaspace`: spaces become `▁`, a `▁` is prepended, and the text is cut
//!   before every `▁`.
//!
//! Pre-tokenizers never see added tokens: those are cut out first (see `added.rs`).

use super::unicode::{in_table, LETTER, NUMBER, WORD};

/// When a `Metaspace` pre-tokenizer prepends the replacement character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrependScheme {
    /// Before every segment of text between added tokens.
    Always,
    /// Only before the segment that starts the input.
    First,
    /// Never.
    Never,
}

/// A pre-tokenizer, as named in `tokenizer.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum PreTokenizer {
    /// GPT-2 splitting of raw bytes (the model maps bytes to characters itself).
    ByteLevel { add_prefix_space: bool, use_regex: bool },
    /// Spaces to `replacement`, optional prepended replacement, cut before each replacement.
    Metaspace { replacement: char, prepend_scheme: PrependScheme, split: bool },
    /// `\w+|[^\w\s]+`.
    Whitespace,
    /// The whole segment is one piece.
    None,
}

impl PreTokenizer {
    /// Calls `piece` with each pre-token of `segment`, in order. `at_start` tells whether the
    /// segment begins the input (for `PrependScheme::First`). `scratch` is reused between calls.
    pub(crate) fn split(
        &self,
        segment: &[u8],
        at_start: bool,
        scratch: &mut Vec<u8>,
        piece: &mut impl FnMut(&[u8]),
    ) {
        if segment.is_empty() {
            return;
        }
        match *self {
            PreTokenizer::ByteLevel { add_prefix_space, use_regex } => {
                let text = if add_prefix_space && segment[0] != b' ' {
                    scratch.clear();
                    scratch.push(b' ');
                    scratch.extend_from_slice(segment);
                    &scratch[..]
                } else {
                    segment
                };
                if use_regex {
                    split_gpt2(text, piece);
                } else {
                    piece(text);
                }
            }
            PreTokenizer::Metaspace { replacement, prepend_scheme, split } => {
                let text = String::from_utf8_lossy(segment);
                let prepend = match prepend_scheme {
                    PrependScheme::Always => true,
                    PrependScheme::First => at_start,
                    PrependScheme::Never => false,
                };
                let replaced = metaspace_replace(&text, replacement, prepend);
                if split {
                    split_before(&replaced, replacement, |p| piece(p.as_bytes()));
                } else {
                    piece(replaced.as_bytes());
                }
            }
            PreTokenizer::Whitespace => {
                let text = String::from_utf8_lossy(segment);
                split_whitespace(&text, |p| piece(p.as_bytes()));
            }
            PreTokenizer::None => piece(segment),
        }
    }
}

/// Character classes of the GPT-2 pattern.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

/// Classes of the ASCII characters, so the common case needs no table search.
const ASCII_CLASS: [Class; 128] = {
    let mut table = [Class::Other; 128];
    let mut i = 0;
    while i < 128 {
        let c = i as u8;
        table[i] = if c.is_ascii_alphabetic() {
            Class::Letter
        } else if c.is_ascii_digit() {
            Class::Number
        } else if matches!(c, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r') {
            Class::Space
        } else {
            Class::Other
        };
        i += 1;
    }
    table
};

/// Decodes one UTF-8 character at the start of `bytes`: its class and length in bytes.
/// An invalid or truncated sequence is one byte of class `Other`.
#[inline]
fn unit(bytes: &[u8]) -> (Class, usize) {
    let b0 = bytes[0];
    if b0 < 0x80 {
        return (ASCII_CLASS[b0 as usize], 1);
    }
    let width = match b0 {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return (Class::Other, 1),
    };
    match bytes.get(..width).and_then(|s| std::str::from_utf8(s).ok()) {
        Some(s) => {
            let c = s.chars().next().expect("a valid non-empty sequence");
            (classify(c), width)
        }
        None => (Class::Other, 1),
    }
}

fn classify(c: char) -> Class {
    if c.is_whitespace() {
        Class::Space
    } else if in_table(LETTER, c) {
        Class::Letter
    } else if in_table(NUMBER, c) {
        Class::Number
    } else {
        Class::Other
    }
}

/// Length of a contraction suffix (`s t m d` or `re ve ll`) after an apostrophe.
#[inline]
fn contraction_len(rest: &[u8]) -> Option<usize> {
    match rest {
        [b's' | b't' | b'm' | b'd', ..] => Some(1),
        [b'r', b'e', ..] | [b'v', b'e', ..] | [b'l', b'l', ..] => Some(2),
        _ => None,
    }
}

/// Splits `text` as the GPT-2 regex does, calling `piece` with each match.
pub(crate) fn split_gpt2(text: &[u8], piece: &mut impl FnMut(&[u8])) {
    let n = text.len();
    let mut i = 0;
    while i < n {
        let (class, len) = unit(&text[i..]);
        // 's 't 're 've 'm 'll 'd
        if text[i] == b'\'' {
            if let Some(l) = contraction_len(&text[i + 1..]) {
                piece(&text[i..i + 1 + l]);
                i += 1 + l;
                continue;
            }
        }
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional space, then a run of one class.
        let run = if class != Class::Space {
            Some((i, class))
        } else if text[i] == b' ' && i + 1 < n {
            let (next_class, _) = unit(&text[i + 1..]);
            (next_class != Class::Space).then_some((i + 1, next_class))
        } else {
            None
        };
        if let Some((start, run_class)) = run {
            let mut end = start;
            while end < n {
                let (c, l) = unit(&text[end..]);
                if c != run_class {
                    break;
                }
                end += l;
            }
            piece(&text[i..end]);
            i = end;
            continue;
        }
        // `\s+(?!\S)` then `\s+`: a whitespace run; when a non-space follows it, its last
        // character is left out (the next match takes it as its optional space), unless the
        // run is that one character.
        let mut end = i + len;
        let mut last_start = i;
        while end < n {
            let (c, l) = unit(&text[end..]);
            if c != Class::Space {
                break;
            }
            last_start = end;
            end += l;
        }
        let stop = if end == n || last_start == i { end } else { last_start };
        piece(&text[i..stop]);
        i = stop;
    }
}

/// Whether `c` is a `\w` character (Unicode Perl word class).
#[inline]
fn is_word(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphanumeric() || c == '_'
    } else {
        in_table(WORD, c)
    }
}

/// Splits as `\w+|[^\w\s]+`, dropping whitespace.
pub(crate) fn split_whitespace(text: &str, mut piece: impl FnMut(&str)) {
    let mut start: Option<(usize, bool)> = None; // (start, is_word) of the current run
    for (i, c) in text.char_indices() {
        let kind = if c.is_whitespace() { None } else { Some(is_word(c)) };
        match (start, kind) {
            // Still inside a run of the same kind.
            (Some((_, w)), Some(k)) if w == k => {}
            (Some((s, _)), k) => {
                piece(&text[s..i]);
                start = k.map(|k| (i, k));
            }
            (None, k) => start = k.map(|k| (i, k)),
        }
    }
    if let Some((s, _)) = start {
        piece(&text[s..]);
    }
}

/// Replaces spaces by `replacement` and prepends one when asked and not already there.
pub(crate) fn metaspace_replace(text: &str, replacement: char, prepend: bool) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    if prepend && !text.starts_with(' ') && !text.starts_with(replacement) {
        out.push(replacement);
    }
    for c in text.chars() {
        out.push(if c == ' ' { replacement } else { c });
    }
    out
}

/// Cuts `text` before every `delimiter` (the delimiter starts the next piece).
pub(crate) fn split_before(text: &str, delimiter: char, mut piece: impl FnMut(&str)) {
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c == delimiter && i > start {
            piece(&text[start..i]);
            start = i;
        }
    }
    if start < text.len() {
        piece(&text[start..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        split_gpt2(text.as_bytes(), &mut |p| out.push(String::from_utf8_lossy(p).into_owned()));
        out
    }

    #[test]
    fn gpt2_splits_like_the_regex() {
        assert_eq!(gpt2("Hello world"), ["Hello", " world"]);
        assert_eq!(gpt2("a  b"), ["a", " ", " b"]);
        assert_eq!(gpt2("a \nb"), ["a", " ", "\n", "b"]);
        assert_eq!(gpt2("end  "), ["end", "  "]);
        assert_eq!(gpt2("don't ''s"), ["don", "'t", " ''", "s"]);
        assert_eq!(gpt2("we'll x2 3.5"), ["we", "'ll", " x", "2", " 3", ".", "5"]);
        assert_eq!(gpt2("\n\nFirst"), ["\n", "\n", "First"]);
        assert_eq!(gpt2("  \n"), ["  \n"]);
        assert_eq!(gpt2("Ⅻ éa"), ["Ⅻ", " éa"]);
    }

    #[test]
    fn gpt2_pieces_cover_invalid_utf8() {
        let bytes = b"ab\xff\xfe cd\xe2\x82";
        let mut joined = Vec::new();
        split_gpt2(bytes, &mut |p| joined.extend_from_slice(p));
        assert_eq!(joined, bytes);
    }

    #[test]
    fn whitespace_and_metaspace() {
        let mut out = Vec::new();
        split_whitespace("Hi, you_2 there!!  ok", |p| out.push(p.to_string()));
        assert_eq!(out, ["Hi", ",", "you_2", "there", "!!", "ok"]);
        let replaced = metaspace_replace("Hello  world", '▁', true);
        let mut out = Vec::new();
        split_before(&replaced, '▁', |p| out.push(p.to_string()));
        assert_eq!(out, ["▁Hello", "▁", "▁world"]);
    }
}
