//! Vocabulary and tokenization, the way lmplz reads training text.
//!
//! Each line is one sentence `<s> w1 .. wk </s>`; words are separated by runs of
//! space, tab, carriage return and NUL (lmplz's delimiters: other Unicode
//! whitespace belongs to the word). Ids are `<unk>` = 0, `<s>` = 1, `</s>` = 2,
//! then the other words in order of first occurrence.

use std::hash::Hasher;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use super::hash::FastHasher;
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

/// The words by id and the map back to their ids: an open-addressing table over
/// one byte buffer, so a lookup touches one slot and, on a tag match, the word's
/// bytes (a `HashMap<String, u32>` dereferences each key it compares).
pub(crate) struct Vocabulary {
    /// Every word's bytes, one after another: word `i` is `text[starts[i]..starts[i + 1]]`.
    text: Vec<u8>,
    starts: Vec<usize>,
    /// Per slot, the high 32 bits of the word's hash and its id + 1 (0: empty).
    slots: Vec<(u32, u32)>,
    /// The words' hashes, to rebuild the table when it grows.
    hashes: Vec<u64>,
}

impl Vocabulary {
    /// A vocabulary holding only `<unk>`, `<s>` and `</s>`.
    pub(crate) fn with_specials() -> Self {
        let mut vocab = Vocabulary {
            text: Vec::new(),
            starts: vec![0],
            slots: vec![(0, 0); 1 << 10],
            hashes: Vec::new(),
        };
        for word in [UNK_WORD, BOS_WORD, EOS_WORD] {
            vocab.insert(word.as_bytes(), word_hash(word.as_bytes()));
        }
        vocab
    }

    /// The id of `word`, if known.
    #[inline]
    pub(crate) fn id(&self, word: &[u8]) -> Option<u32> {
        self.find(word, word_hash(word))
    }

    /// The id of `word`, adding it if new. A new word must be UTF-8: the error
    /// gives the offset of its first invalid byte.
    pub(crate) fn id_or_insert(&mut self, word: &[u8]) -> std::result::Result<u32, usize> {
        let hash = word_hash(word);
        if let Some(id) = self.find(word, hash) {
            return Ok(id);
        }
        std::str::from_utf8(word).map_err(|e| e.valid_up_to())?;
        Ok(self.insert(word, hash))
    }

    /// The id of `word`, whose hash is `hash`, if present.
    #[inline]
    fn find(&self, word: &[u8], hash: u64) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let tag = (hash >> 32) as u32;
        let mut slot = hash as usize & mask;
        loop {
            match self.slots[slot] {
                (_, 0) => return None,
                (slot_tag, id_plus_one) if slot_tag == tag => {
                    let id = (id_plus_one - 1) as usize;
                    if &self.text[self.starts[id]..self.starts[id + 1]] == word {
                        return Some(id_plus_one - 1);
                    }
                }
                _ => {}
            }
            slot = (slot + 1) & mask;
        }
    }

    /// Adds a word known to be absent and returns its id.
    fn insert(&mut self, word: &[u8], hash: u64) -> u32 {
        let id = u32::try_from(self.len())
            .ok()
            .filter(|&id| id < u32::MAX)
            .expect("fewer than 2^32 - 1 distinct words");
        self.text.extend_from_slice(word);
        self.starts.push(self.text.len());
        self.hashes.push(hash);
        // Keep the table at most half full.
        if 2 * self.hashes.len() > self.slots.len() {
            self.slots = vec![(0, 0); 2 * self.slots.len()];
            for (other, &hash) in self.hashes.iter().enumerate() {
                place(&mut self.slots, other as u32, hash);
            }
        } else {
            place(&mut self.slots, id, hash);
        }
        id
    }

    /// Number of words, specials included.
    pub(crate) fn len(&self) -> usize {
        self.starts.len() - 1
    }

    /// The words by id.
    pub(crate) fn into_words(self) -> Vec<String> {
        self.starts
            .windows(2)
            .map(|span| {
                String::from_utf8(self.text[span[0]..span[1]].to_vec())
                    .expect("words are checked for UTF-8 when added")
            })
            .collect()
    }
}

/// Puts word `id` with `hash` into the first empty slot of its probe sequence.
fn place(slots: &mut [(u32, u32)], id: u32, hash: u64) {
    let mask = slots.len() - 1;
    let mut slot = hash as usize & mask;
    while slots[slot].1 != 0 {
        slot = (slot + 1) & mask;
    }
    slots[slot] = ((hash >> 32) as u32, id + 1);
}

/// The hash of a word's bytes for the vocabulary table.
#[inline]
fn word_hash(word: &[u8]) -> u64 {
    let mut hasher = FastHasher::default();
    hasher.write(word);
    hasher.finish()
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
        assert_eq!(vocab.id_or_insert(b"the"), Ok(3));
        assert_eq!(vocab.id_or_insert(b"cat"), Ok(4));
        assert_eq!(vocab.id_or_insert(b"the"), Ok(3));
        assert_eq!(vocab.id(b"<s>"), Some(BOS));
        assert_eq!(vocab.id(b"dog"), None);
        assert_eq!(vocab.id_or_insert(b"d\xc3g"), Err(1));
        assert_eq!(vocab.into_words(), ["<unk>", "<s>", "</s>", "the", "cat"]);
    }

    #[test]
    fn every_word_keeps_its_id_as_the_table_grows() {
        let mut vocab = Vocabulary::with_specials();
        let words: Vec<String> = (0..5000).map(|i| format!("w{i}")).collect();
        for (i, word) in words.iter().enumerate() {
            assert_eq!(vocab.id_or_insert(word.as_bytes()), Ok(i as u32 + 3));
        }
        for (i, word) in words.iter().enumerate() {
            assert_eq!(vocab.id(word.as_bytes()), Some(i as u32 + 3));
        }
        assert_eq!(vocab.id(b"w5000"), None);
        assert_eq!(vocab.len(), 5003);
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
