//! Vocabulary and tokenization, the way lmplz reads training text.
//!
//! Each line is one sentence `<s> w1 .. wk </s>`; words are separated by runs of
//! space, tab, carriage return and NUL (lmplz's delimiters: other Unicode
//! whitespace belongs to the word). Ids are `<unk>` = 0, `<s>` = 1, `</s>` = 2,
//! then the other words in order of first occurrence.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use super::hash::FastBuildHasher;
use crate::{Error, Result};

/// Id of the unknown word `<unk>`.
pub(crate) const UNK: u32 = 0;
/// Id of the sentence-start marker `<s>`.
pub(crate) const BOS: u32 = 1;
/// Id of the sentence-end marker `</s>`.
pub(crate) const EOS: u32 = 2;

pub(crate) const UNK_WORD: &str = "<unk>";
pub(crate) const BOS_WORD: &str = "<s>";
pub(crate) const EOS_WORD: &str = "</s>";

/// Whether `byte` separates words (space, tab, CR, NUL).
#[inline]
pub(crate) fn is_delimiter(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\r' | b'\0')
}

/// The words of one line, as byte slices.
pub(crate) fn split_words(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(|&byte| is_delimiter(byte))
        .filter(|word| !word.is_empty())
}

/// The words of one line.
pub(crate) fn words(line: &str) -> impl Iterator<Item = &str> {
    line.split(|c: char| c.is_ascii() && is_delimiter(c as u8))
        .filter(|word| !word.is_empty())
}

/// Word strings and the map back to their ids.
pub(crate) struct Vocabulary {
    words: Vec<String>,
    ids: HashMap<String, u32, FastBuildHasher>,
}

impl Vocabulary {
    /// A vocabulary holding only `<unk>`, `<s>` and `</s>`.
    pub(crate) fn with_specials() -> Self {
        let mut vocab = Vocabulary {
            words: Vec::new(),
            ids: HashMap::default(),
        };
        for word in [UNK_WORD, BOS_WORD, EOS_WORD] {
            vocab.id_or_insert(word);
        }
        vocab
    }

    /// The id of `word`, if known.
    pub(crate) fn id(&self, word: &str) -> Option<u32> {
        self.ids.get(word).copied()
    }

    /// The id of `word`, adding it if new.
    pub(crate) fn id_or_insert(&mut self, word: &str) -> u32 {
        if let Some(&id) = self.ids.get(word) {
            return id;
        }
        let id = u32::try_from(self.words.len()).expect("fewer than 2^32 distinct words");
        self.words.push(word.to_owned());
        self.ids.insert(word.to_owned(), id);
        id
    }

    /// Number of words, specials included.
    pub(crate) fn len(&self) -> usize {
        self.words.len()
    }

    /// The words by id.
    pub(crate) fn into_words(self) -> Vec<String> {
        self.words
    }
}

/// Reads a text line by line, numbering lines from 1 and naming the file in errors.
pub(crate) struct LineReader<R> {
    reader: R,
    source: PathBuf,
    buf: Vec<u8>,
    line_number: usize,
}

impl<R: BufRead> LineReader<R> {
    /// Wraps `reader`; `source` names it in error messages.
    pub(crate) fn new(reader: R, source: &Path) -> Self {
        LineReader {
            reader,
            source: source.to_path_buf(),
            buf: Vec::new(),
            line_number: 0,
        }
    }

    /// The next line without its `\n`, as bytes, with its 1-based number.
    pub(crate) fn next_bytes(&mut self) -> Result<Option<(usize, &[u8])>> {
        self.buf.clear();
        let read = self
            .reader
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| Error::io(&self.source, e))?;
        if read == 0 {
            return Ok(None);
        }
        self.line_number += 1;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
        }
        Ok(Some((self.line_number, &self.buf)))
    }

    /// The next line as text; invalid UTF-8 is an error naming the line.
    pub(crate) fn next_line(&mut self) -> Result<Option<(usize, &str)>> {
        let source = self.source.clone();
        match self.next_bytes()? {
            None => Ok(None),
            Some((line, bytes)) => match std::str::from_utf8(bytes) {
                Ok(text) => Ok(Some((line, text))),
                Err(e) => Err(Error::Parse {
                    path: source,
                    line,
                    message: format!(
                        "expected UTF-8 text, found an invalid byte at column {}",
                        e.valid_up_to() + 1
                    ),
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_on_runs_of_space_tab_cr_and_nul_only() {
        let line = "  a\tb\r\0c  d\u{a0}e\x0bf ";
        assert_eq!(
            words(line).collect::<Vec<_>>(),
            ["a", "b", "c", "d\u{a0}e\x0bf"]
        );
        let bytes: Vec<&[u8]> = split_words(line.as_bytes()).collect();
        assert_eq!(bytes.len(), 4);
    }

    #[test]
    fn ids_are_specials_then_first_occurrence() {
        let mut vocab = Vocabulary::with_specials();
        assert_eq!(vocab.id_or_insert("the"), 3);
        assert_eq!(vocab.id_or_insert("cat"), 4);
        assert_eq!(vocab.id_or_insert("the"), 3);
        assert_eq!(vocab.id("<s>"), Some(BOS));
        assert_eq!(vocab.into_words(), ["<unk>", "<s>", "</s>", "the", "cat"]);
    }

    #[test]
    fn line_reader_numbers_lines_and_rejects_bad_utf8() {
        let text: &[u8] = b"one\ntwo\n\xff\n";
        let mut lines = LineReader::new(text, Path::new("corpus.txt"));
        assert_eq!(
            lines
                .next_line()
                .ok()
                .flatten()
                .map(|(n, s)| (n, s.to_owned())),
            Some((1, "one".into()))
        );
        assert!(lines.next_line().is_ok());
        let err = lines
            .next_line()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("corpus.txt:3: expected UTF-8"), "{err}");
    }
}
