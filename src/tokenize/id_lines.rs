//! Text read as lines of token ids: how `nlp ngram` counts subword units. Each input
//! line becomes one line of space-separated decimal ids, so a line stays a sentence and
//! the n-gram model's words are the tokenizer's ids.

use std::io::{BufRead, Read};

use super::AnyTokenizer;

/// Lines encoded together, in parallel, per refill of the buffer.
const LINES_PER_BATCH: usize = 8192;

/// A reader that yields `input`'s lines encoded by `tokenizer`, as decimal ids.
pub struct IdLines<'a, R> {
    tokenizer: &'a AnyTokenizer,
    input: R,
    encoded: Vec<u8>,
    position: usize,
    finished: bool,
}

impl<'a, R: BufRead> IdLines<'a, R> {
    /// Wraps `input`; nothing is read until the first read.
    pub fn new(tokenizer: &'a AnyTokenizer, input: R) -> Self {
        IdLines {
            tokenizer,
            input,
            encoded: Vec::new(),
            position: 0,
            finished: false,
        }
    }

    /// Encodes the next batch of lines into the buffer.
    fn refill(&mut self) -> std::io::Result<()> {
        self.encoded.clear();
        self.position = 0;
        let mut lines = Vec::with_capacity(LINES_PER_BATCH);
        while lines.len() < LINES_PER_BATCH {
            let mut line = Vec::new();
            if self.input.read_until(b'\n', &mut line)? == 0 {
                self.finished = true;
                break;
            }
            while matches!(line.last(), Some(b'\n' | b'\r')) {
                line.pop();
            }
            lines.push(line);
        }
        for ids in self.tokenizer.encode_batch(&lines) {
            for (i, id) in ids.iter().enumerate() {
                if i > 0 {
                    self.encoded.push(b' ');
                }
                self.encoded.extend_from_slice(id.to_string().as_bytes());
            }
            self.encoded.push(b'\n');
        }
        Ok(())
    }
}

impl<R: BufRead> Read for IdLines<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for IdLines<'_, R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.position == self.encoded.len() && !self.finished {
            self.refill()?;
        }
        Ok(&self.encoded[self.position..])
    }

    fn consume(&mut self, amount: usize) {
        self.position = (self.position + amount).min(self.encoded.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::{ModelKind, Tokenizer, TrainOptions};

    #[test]
    fn each_line_becomes_the_ids_the_tokenizer_gives_it() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(&corpus, "ab ba\nbab\n").unwrap();
        let opts = TrainOptions { model: ModelKind::Char, vocab_size: 300, ..TrainOptions::default() };
        let tokenizer = crate::tokenize::train(&[corpus], &opts, &|_| {}).unwrap().tokenizer;
        let text = "ab ba\r\n\nbab\n";
        let mut out = String::new();
        IdLines::new(&tokenizer, text.as_bytes())
            .read_to_string(&mut out)
            .unwrap();
        let expected: Vec<String> = ["ab ba", "", "bab"]
            .iter()
            .map(|line| {
                let ids: Vec<String> =
                    tokenizer.encode(line).iter().map(u32::to_string).collect();
                ids.join(" ")
            })
            .collect();
        assert_eq!(out.lines().collect::<Vec<_>>(), expected);
        assert_eq!(out.lines().next().unwrap().split(' ').count(), 5);
    }
}
