//! The query model: an n-gram model ready to score text, loaded from an ARPA
//! file, a binary file (memory-mapped) or a freshly trained [`Arpa`].
//!
//! Scoring is standard ARPA back-off (Katz 1987): p(w | h) is the probability of
//! the longest listed n-gram `h_k .. h_1 w`, times the backoff weights of the
//! longer contexts that were not matched. Text is scored as KenLM's `query` does:
//! each line is a sentence scored from `<s>`, one `</s>` token ends it, a word
//! outside the vocabulary (or a literal `<unk>`) scores p(`<unk>` | h) and resets
//! the context. Perplexity is 10^(-total / tokens), with `</s>` among the tokens.
//!
//! One representation serves every source: the binary image of [`super::binary`],
//! owned when built from ARPA, memory-mapped when loaded from a binary file.

use std::fs::File;
use std::io::BufRead;
use std::ops::Deref;
use std::path::Path;

use super::arpa::{read_arpa, Arpa};
use super::binary::{self, read_f32, read_u32, read_u64, slot_key, Layout, NONE};
use super::hash::{bytes_hash, ngram_extend, ngram_start};
use super::vocab::{split_words, LineReader};
use super::write_atomically;
use crate::lm::LanguageModel;
use crate::{Error, Result};

/// The bytes of a binary model, owned or memory-mapped.
enum Storage {
    Owned(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Owned(bytes) => bytes,
            Storage::Mapped(map) => map,
        }
    }
}

/// The context while scoring a sentence: the newest words that can still start a
/// match (oldest first) and the log10 backoff of each suffix (`backoffs[j]`: of
/// the newest j+1 words).
#[derive(Default)]
struct ScoringContext {
    words: Vec<u32>,
    backoffs: Vec<f32>,
    next_backoffs: Vec<f32>,
}

impl ScoringContext {
    fn clear(&mut self) {
        self.words.clear();
        self.backoffs.clear();
    }
}

/// An n-gram model that scores text.
pub struct NgramModel {
    storage: Storage,
    layout: Layout,
}

/// The score of one sentence (one line of text).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SentenceScore {
    /// log10 probability of the sentence's words and `</s>`.
    pub log10_prob: f64,
    /// Words outside the vocabulary.
    pub oov: usize,
    /// Tokens scored: the words plus `</s>`.
    pub tokens: usize,
}

/// Scores of a text, per sentence and in total.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueryReport {
    /// One score per line.
    pub sentences: Vec<SentenceScore>,
    /// Tokens scored, `</s>` included.
    pub tokens: usize,
    /// Out-of-vocabulary words.
    pub oov: usize,
    /// Total log10 probability, OOVs included.
    pub log10_prob: f64,
    /// The part of `log10_prob` that OOV words contributed.
    pub oov_log10_prob: f64,
    /// 10^(-log10_prob / tokens).
    pub perplexity: f64,
    /// Perplexity over the in-vocabulary tokens only.
    pub perplexity_excl_oov: f64,
}

/// Loads a model from a binary file (memory-mapped) or an ARPA file (plain or
/// gzip), telling them apart by their first bytes.
pub fn load(path: &Path) -> Result<NgramModel> {
    if binary::has_magic(path)? {
        NgramModel::from_binary_file(path)
    } else {
        NgramModel::from_arpa(&read_arpa(path)?)
    }
}

impl NgramModel {
    /// Builds the query model of an ARPA model (e.g. one just trained).
    pub fn from_arpa(arpa: &Arpa) -> Result<Self> {
        let bytes = binary::encode(arpa)?;
        let layout = binary::parse_layout(&bytes, "<in-memory model>")?;
        Ok(NgramModel {
            storage: Storage::Owned(bytes),
            layout,
        })
    }

    /// Memory-maps a binary model file.
    pub fn from_binary_file(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only, and every access is bounds-checked against
        // the layout validated below. Like any mapped file it must not be truncated
        // by another process while in use.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let layout = binary::parse_layout(&map, &path.display().to_string())?;
        Ok(NgramModel {
            storage: Storage::Mapped(map),
            layout,
        })
    }

    /// Writes the model in the binary format, atomically.
    pub fn write_binary(&self, path: &Path) -> Result<()> {
        write_atomically(path, |out| std::io::Write::write_all(out, &self.storage))
    }

    /// The highest order N.
    pub fn order(&self) -> usize {
        self.layout.order
    }

    /// Number of n-grams per order (index n-1); 1-grams count the vocabulary.
    pub fn counts(&self) -> Vec<u64> {
        self.layout.counts.clone()
    }

    /// Number of words in the vocabulary.
    pub fn vocab_len(&self) -> usize {
        self.layout.vocab_size
    }

    /// The id of `<unk>`.
    pub fn unk_id(&self) -> u32 {
        self.layout.unk
    }

    /// The id of `<s>`, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        (self.layout.bos != NONE).then_some(self.layout.bos)
    }

    /// The id of `</s>`, if the model has one.
    pub fn eos_id(&self) -> Option<u32> {
        (self.layout.eos != NONE).then_some(self.layout.eos)
    }

    fn word_bytes(&self, id: u32) -> &[u8] {
        let offsets = self.layout.offsets_at + 8 * id as usize;
        let start = read_u64(&self.storage, offsets) as usize;
        let end = read_u64(&self.storage, offsets + 8) as usize;
        &self.storage[self.layout.strings_at + start..self.layout.strings_at + end]
    }

    /// The word with id `id`.
    pub fn word(&self, id: u32) -> Option<&str> {
        ((id as usize) < self.layout.vocab_size).then(|| {
            std::str::from_utf8(self.word_bytes(id))
                .expect("words are checked to be UTF-8 when loading")
        })
    }

    /// The id of a word given as bytes.
    fn id_of_bytes(&self, word: &[u8]) -> Option<u32> {
        let mut slot = bytes_hash(word) as usize & self.layout.vocab_mask;
        loop {
            let id = read_u32(&self.storage, self.layout.vocab_at + 4 * slot);
            if id == NONE {
                return None;
            }
            if self.word_bytes(id) == word {
                return Some(id);
            }
            slot = (slot + 1) & self.layout.vocab_mask;
        }
    }

    /// The id of `word`, if it is in the vocabulary.
    pub fn word_id(&self, word: &str) -> Option<u32> {
        self.id_of_bytes(word.as_bytes())
    }

    /// (log10 prob, log10 backoff) of a unigram; ids outside the vocabulary read
    /// as `<unk>`.
    #[inline]
    fn unigram(&self, id: u32) -> (f32, f32) {
        let id = if (id as usize) < self.layout.vocab_size {
            id
        } else {
            self.layout.unk
        };
        let at = self.layout.unigrams_at + 8 * id as usize;
        (read_f32(&self.storage, at), read_f32(&self.storage, at + 4))
    }

    /// (log10 prob, log10 backoff) of the n-gram of order `n` >= 2 with hash `hash`.
    #[inline]
    fn lookup(&self, n: usize, hash: u64) -> Option<(f32, f32)> {
        let (start, mask) = self.layout.tables[n - 2];
        let key = slot_key(hash);
        let mut slot = key as usize & mask;
        loop {
            let at = start + 16 * slot;
            let found = read_u64(&self.storage, at);
            if found == key {
                return Some((
                    read_f32(&self.storage, at + 8),
                    read_f32(&self.storage, at + 12),
                ));
            }
            if found == 0 {
                return None;
            }
            slot = (slot + 1) & mask;
        }
    }

    /// The longest listed n-gram ending in `word` within `context`: its log10
    /// probability and how many context words it spans.
    #[inline]
    fn longest_match(&self, context: &[u32], word: u32) -> (f32, usize) {
        let (mut log10_prob, _) = self.unigram(word);
        let mut hash = ngram_start(word);
        let mut matched = 0;
        for (j, &previous) in context.iter().rev().enumerate() {
            hash = ngram_extend(hash, previous);
            match self.lookup(j + 2, hash) {
                Some((prob, _)) => {
                    log10_prob = prob;
                    matched = j + 1;
                }
                // Listed n-grams have listed suffixes, so no longer one can match.
                None => break,
            }
        }
        (log10_prob, matched)
    }

    /// log10 backoffs of the contexts `context[len-k..]` for k = 1..=len, stopping
    /// at the first context that is not listed (longer ones are not either).
    fn context_backoffs(&self, context: &[u32]) -> Vec<f32> {
        let mut backoffs = Vec::with_capacity(context.len());
        let Some((&newest, _)) = context.split_last() else {
            return backoffs;
        };
        backoffs.push(self.unigram(newest).1);
        let mut hash = ngram_start(newest);
        for (j, &previous) in context.iter().rev().enumerate().skip(1) {
            hash = ngram_extend(hash, previous);
            match self.lookup(j + 1, hash) {
                Some((_, backoff)) => backoffs.push(backoff),
                None => break,
            }
        }
        backoffs
    }

    /// The part of `context` the model can use: its last N-1 words.
    fn usable<'c>(&self, context: &'c [u32]) -> &'c [u32] {
        &context[context.len().saturating_sub(self.layout.order - 1)..]
    }

    /// log10 p(word | context) by ARPA back-off; `context` lists word ids oldest
    /// first (only the last N-1 matter). Ids outside the vocabulary read as `<unk>`.
    pub fn log10_prob(&self, context: &[u32], word: u32) -> f32 {
        let context = self.usable(context);
        let (mut log10_prob, matched) = self.longest_match(context, word);
        let Some((&newest, _)) = context.split_last() else {
            return log10_prob;
        };
        if matched == context.len() {
            return log10_prob;
        }
        // Backoffs of the contexts longer than the match, one at a time from the
        // shortest, as KenLM adds them (the f32 sums then agree to the bit).
        if matched == 0 {
            log10_prob += self.unigram(newest).1;
        }
        let mut hash = ngram_start(newest);
        for (j, &previous) in context.iter().rev().enumerate().skip(1) {
            hash = ngram_extend(hash, previous);
            if j < matched {
                continue;
            }
            match self.lookup(j + 1, hash) {
                Some((_, backoff)) => log10_prob += backoff,
                // Longer contexts are not listed either.
                None => break,
            }
        }
        log10_prob
    }

    /// Scores text, one sentence per line, as KenLM's `query` does (except that a
    /// last line without a newline is scored in full, `</s>` included).
    pub fn query<R: BufRead>(&self, text: R) -> Result<QueryReport> {
        let mut lines = LineReader::new(text, Path::new("<query text>"));
        let mut report = QueryReport::default();
        let mut context = ScoringContext::default();
        while let Some((_, line)) = lines.next_bytes()? {
            let mut sentence = SentenceScore {
                log10_prob: 0.0,
                oov: 0,
                tokens: 0,
            };
            // Summed in f32 per sentence and f64 over the corpus, as KenLM's query.
            let mut sentence_log10_prob = 0.0_f32;
            self.start_sentence(&mut context);
            for word in split_words(line) {
                let id = self.id_of_bytes(word).filter(|&id| id != self.layout.unk);
                let score = self.step(&mut context, id.unwrap_or(self.layout.unk));
                sentence_log10_prob += score;
                sentence.tokens += 1;
                if id.is_none() {
                    sentence.oov += 1;
                    report.oov_log10_prob += f64::from(score);
                    context.clear();
                }
            }
            let end = self.step(&mut context, self.eos_id().unwrap_or(self.layout.unk));
            sentence.log10_prob = f64::from(sentence_log10_prob + end);
            sentence.tokens += 1;
            report.tokens += sentence.tokens;
            report.oov += sentence.oov;
            report.log10_prob += sentence.log10_prob;
            report.sentences.push(sentence);
        }
        report.perplexity = 10_f64.powf(-report.log10_prob / report.tokens as f64);
        let known = report.tokens - report.oov;
        report.perplexity_excl_oov =
            10_f64.powf(-(report.log10_prob - report.oov_log10_prob) / known as f64);
        Ok(report)
    }

    /// Resets `context` to the start of a sentence, `<s>`.
    fn start_sentence(&self, context: &mut ScoringContext) {
        context.clear();
        if let Some(bos) = self.bos_id().filter(|_| self.layout.order > 1) {
            context.words.push(bos);
            context.backoffs.push(self.unigram(bos).1);
        }
    }

    /// Scores `word` after `context` and moves the context past it. Equal to
    /// [`NgramModel::log10_prob`], but the context keeps the backoffs read with
    /// the previous word's n-grams and only the words that can still match (as
    /// KenLM's state), so no lookup is spent on backoffs.
    #[inline]
    fn step(&self, context: &mut ScoringContext, word: u32) -> f32 {
        let (mut log10_prob, unigram_backoff) = self.unigram(word);
        let found = &mut context.next_backoffs;
        found.clear();
        found.push(unigram_backoff);
        let mut hash = ngram_start(word);
        let mut matched = 0;
        for (j, &previous) in context.words.iter().rev().enumerate() {
            hash = ngram_extend(hash, previous);
            match self.lookup(j + 2, hash) {
                Some((prob, backoff)) => {
                    log10_prob = prob;
                    found.push(backoff);
                    matched = j + 1;
                }
                None => break,
            }
        }
        // One at a time from the shortest unmatched context, as KenLM adds them.
        for backoff in &context.backoffs[matched..] {
            log10_prob += backoff;
        }
        // The next context: the words of the longest match, up to N-1 of them.
        let keep = (matched + 1).min(self.layout.order - 1);
        context.words.push(word);
        let excess = context.words.len() - keep;
        context.words.drain(..excess);
        std::mem::swap(&mut context.backoffs, &mut context.next_backoffs);
        context.backoffs.truncate(keep);
        log10_prob
    }

    /// Next-word log10 probabilities for one context, over the whole vocabulary,
    /// with `<s>` at -inf.
    pub fn log10_distribution(&self, context: &[u32]) -> Vec<f32> {
        let context = self.usable(context);
        let backoffs = self.context_backoffs(context);
        // tail[m]: the backoff paid when the match spans m context words.
        let mut tail = vec![0.0_f32; context.len() + 1];
        for m in (0..context.len()).rev() {
            tail[m] = tail[m + 1] + backoffs.get(m).copied().unwrap_or(0.0);
        }
        (0..self.layout.vocab_size as u32)
            .map(|word| {
                if word == self.layout.bos {
                    return f32::NEG_INFINITY;
                }
                let (log10_prob, matched) = self.longest_match(context, word);
                log10_prob + tail[matched]
            })
            .collect()
    }
}

impl LanguageModel for NgramModel {
    /// The context: up to N-1 word ids, oldest first.
    type State = Vec<u32>;

    fn vocab_size(&self) -> usize {
        self.layout.vocab_size
    }

    fn initial_state(&self) -> Vec<u32> {
        self.bos_id().into_iter().collect()
    }

    fn advance(&self, state: &mut Vec<u32>, token: u32) -> Result<()> {
        if token as usize >= self.layout.vocab_size {
            return Err(Error::Invalid(format!(
                "token id {token} is outside the n-gram model's vocabulary of {}",
                self.layout.vocab_size
            )));
        }
        if token == self.layout.unk {
            // As in `query`: an unknown word resets the context.
            state.clear();
            return Ok(());
        }
        state.push(token);
        let keep = self.layout.order - 1;
        if state.len() > keep {
            state.drain(..state.len() - keep);
        }
        Ok(())
    }

    fn next_logprobs(&self, states: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        Ok(states
            .iter()
            .map(|state| {
                self.log10_distribution(state)
                    .into_iter()
                    .map(|log10_prob| log10_prob * std::f32::consts::LN_10)
                    .collect()
            })
            .collect())
    }
}
