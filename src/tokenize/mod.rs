//! Subword tokenizers: byte-level BPE (Sennrich et al. 2016; GPT-2 bytes, Radford et al.
//! 2019), Unigram (Kudo 2018) and a character tokenizer with byte fallback; their
//! trainers; subword regularization (BPE-dropout, Provilkov et al. 2020; Unigram sampling);
//! and Hugging Face `tokenizer.json` reading and writing, so that the `tokenizers` crate
//! encodes a saved tokenizer exactly as we do.
//!
//! Encoding is a pipeline: added tokens are cut out of the raw text (`added.rs`), the text
//! between them is pre-tokenized (`pretokenize.rs`), and each pre-token is encoded by the
//! model (`bpe/`, `unigram/`). Decoding maps ids back to pieces and through a decoder.
//! Normalizers are not supported (none of our tokenizers use one).

mod added;
pub(crate) mod bpe;
mod bytes;
mod count;
mod hash;
pub(crate) mod hf_json;
mod id_lines;
pub(crate) mod pretokenize;
mod stats;
mod unicode;
pub(crate) mod unigram;

use std::path::PathBuf;

use rayon::prelude::*;

pub use added::AddedToken;
pub use bpe::Bpe;
pub use count::estimate;
pub use hf_json::{load_json, save_json, save_tiktoken};
pub use id_lines::IdLines;
pub use pretokenize::{PreTokenizer, PrependScheme};
pub use stats::{stats, Stats};
pub use unigram::Unigram;

use added::{AddedVocab, Segment};
use hash::FastMap;
use crate::rng::SplitMix64;

use crate::{Error, Result};

/// What every tokenizer offers: text to ids and back.
pub trait Tokenizer {
    /// Encodes text to ids (added tokens recognised, no post-processing).
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Decodes ids to text; an id outside the vocabulary is an error.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// One past the largest id.
    fn vocab_size(&self) -> usize;
    /// The special tokens with their ids.
    fn special_tokens(&self) -> Vec<(String, u32)>;
    /// The piece string of an id (as stored in `tokenizer.json`).
    fn id_to_piece(&self, id: u32) -> Option<&str>;
    /// The id of a piece string.
    fn piece_to_id(&self, piece: &str) -> Option<u32>;
}

/// Which model a tokenizer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Byte-level BPE.
    Bpe,
    /// Unigram language model with Metaspace pre-tokenization.
    Unigram,
    /// One token per character seen, with byte fallback for the rest.
    Char,
}

/// Options for [`train`].
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Which model to train.
    pub model: ModelKind,
    /// Target vocabulary size, special tokens included.
    pub vocab_size: usize,
    /// BPE: pairs seen fewer times are not merged.
    pub min_frequency: u64,
    /// Special tokens, given ids 0..k in this order.
    pub special_tokens: Vec<String>,
    /// Longest token in characters. BPE follows `tokenizers`: a merge is only counted when
    /// the merged token would be shorter than this.
    pub max_token_length: Option<usize>,
    /// Bytes allowed for the word-count map; past it the rarest words are dropped.
    pub max_memory: Option<u64>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            model: ModelKind::Bpe,
            vocab_size: 32_000,
            min_frequency: 0,
            special_tokens: Vec::new(),
            max_token_length: None,
            max_memory: None,
        }
    }
}

/// Progress reports from training, for progress bars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Progress {
    /// Counting words: bytes read of the total.
    Counting { bytes_read: u64, total_bytes: u64 },
    /// BPE merges done of the most possible.
    Merging { done: usize, total: usize },
    /// Unigram EM: current vocabulary size and the target.
    Pruning { vocab: usize, target: usize },
}

/// A trained tokenizer and what the caller should be told about the run.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The tokenizer.
    pub tokenizer: AnyTokenizer,
    /// Warnings (words dropped by the memory bound, vocabulary smaller than asked...).
    pub warnings: Vec<String>,
}

/// Options for sampled (regularized) encoding.
#[derive(Debug, Clone, Default)]
pub struct EncodeOptions {
    /// BPE-dropout probability.
    pub dropout: Option<f32>,
    /// Unigram sampling smoothing (scores are multiplied by it; small is more uniform).
    pub alpha: Option<f32>,
    /// Unigram n-best size: sample among the N best segmentations (None or 0: the
    /// whole lattice).
    pub nbest: Option<usize>,
    /// Seed of the sampler.
    pub seed: u64,
}

/// The model inside a tokenizer.
#[derive(Debug, Clone)]
pub enum Model {
    /// BPE (byte-level or character-level).
    Bpe(Bpe),
    /// Unigram.
    Unigram(Unigram),
}

/// How ids become text again.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoder {
    /// GPT-2 characters back to bytes.
    ByteLevel,
    /// `▁` back to spaces; the first token loses its `▁` unless the scheme is `Never`.
    Metaspace { replacement: char, prepend_scheme: PrependScheme },
    /// `<0xNN>` tokens back to bytes, others verbatim.
    ByteFallback,
    /// No decoder: pieces joined with spaces (as `tokenizers` does).
    None,
}

/// A trained or loaded tokenizer of any model kind.
#[derive(Debug, Clone)]
pub struct AnyTokenizer {
    pub(crate) model: Model,
    pub(crate) added: AddedVocab,
    pub(crate) pre: PreTokenizer,
    pub(crate) decoder: Decoder,
    /// The `post_processor` of a loaded file, written back as it was (not applied).
    pub(crate) post_processor: Option<serde_json::Value>,
    pub(crate) kind: ModelKind,
}

/// Pre-tokens longer than this are not cached.
const CACHE_MAX_PIECE: usize = 64;
/// The cache is emptied when it holds this many pre-tokens.
const CACHE_MAX_ENTRIES: usize = 1 << 18;

/// Reusable buffers for encoding: a pre-token cache and scratch space.
#[derive(Default)]
struct EncodeState {
    cache: FastMap<Box<[u8]>, Box<[u32]>>,
    symbols: Vec<u32>,
    scratch: Vec<u8>,
}

impl AnyTokenizer {
    /// Assembles a tokenizer from its parts.
    pub fn new(
        model: Model,
        added_tokens: Vec<AddedToken>,
        pre: PreTokenizer,
        decoder: Decoder,
        kind: ModelKind,
    ) -> Self {
        AnyTokenizer {
            model,
            added: AddedVocab::new(added_tokens),
            pre,
            decoder,
            post_processor: None,
            kind,
        }
    }

    /// Which model this is.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The pre-tokenizer.
    pub fn pre_tokenizer(&self) -> &PreTokenizer {
        &self.pre
    }

    /// The added tokens (special or not).
    pub fn added_tokens(&self) -> &[AddedToken] {
        &self.added.tokens
    }

    /// Encodes raw bytes (any bytes, valid UTF-8 or not; byte-level BPE never needs an unknown token).
    pub fn encode_bytes(&self, bytes: &[u8]) -> Vec<u32> {
        let mut state = EncodeState::default();
        let mut out = Vec::with_capacity(bytes.len() / 3 + 1);
        self.encode_into(bytes, &mut state, &mut out);
        out
    }

    /// Encodes many texts (UTF-8 or raw bytes) in parallel; each worker keeps its own
    /// pre-token cache.
    pub fn encode_batch<T: AsRef<[u8]> + Sync>(&self, texts: &[T]) -> Vec<Vec<u32>> {
        // Chunks of texts share one cache: a fresh cache per text would rarely hit.
        let chunk = (texts.len() / (rayon::current_num_threads() * 8)).clamp(1, 4096);
        texts
            .par_chunks(chunk)
            .flat_map_iter(|chunk| self.encode_each(chunk.iter().map(AsRef::as_ref)))
            .collect()
    }

    /// Encodes texts one after another on this thread, sharing one pre-token cache:
    /// what a worker that has its own share of the input runs.
    pub fn encode_each<'a>(&self, texts: impl Iterator<Item = &'a [u8]>) -> Vec<Vec<u32>> {
        let mut state = EncodeState::default();
        texts
            .map(|text| {
                let mut out = Vec::with_capacity(text.len() / 3 + 1);
                self.encode_into(text, &mut state, &mut out);
                out
            })
            .collect()
    }

    /// Encodes with subword regularization: BPE-dropout for BPE, sampling for Unigram.
    /// With no dropout or alpha set it is plain `encode`.
    pub fn encode_with(&self, text: &str, opts: &EncodeOptions) -> Vec<u32> {
        let mut rng = SplitMix64::new(opts.seed);
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        match &self.model {
            Model::Bpe(bpe) => {
                let Some(p) = opts.dropout.filter(|&p| p > 0.0) else {
                    return self.encode_bytes(text.as_bytes());
                };
                self.added.split(text.as_bytes(), |segment| match segment {
                    Segment::Token(id) => out.push(id),
                    Segment::Text(part, at_start) => self.pre.split(part, at_start, &mut scratch, &mut |piece| {
                        bpe.encode_piece_dropout(piece, p, &mut rng, &mut out)
                    }),
                });
            }
            Model::Unigram(unigram) => {
                let Some(alpha) = opts.alpha else {
                    return self.encode_bytes(text.as_bytes());
                };
                self.added.split(text.as_bytes(), |segment| match segment {
                    Segment::Token(id) => out.push(id),
                    Segment::Text(part, at_start) => self.pre.split(part, at_start, &mut scratch, &mut |piece| {
                        let piece = String::from_utf8_lossy(piece);
                        match opts.nbest.filter(|&n| n > 0) {
                            Some(n) => unigram.sample_nbest_piece(&piece, n, alpha as f64, &mut rng, &mut out),
                            None => unigram.sample_piece(&piece, alpha as f64, &mut rng, &mut out),
                        }
                    }),
                });
            }
        }
        out
    }

    fn encode_into(&self, bytes: &[u8], state: &mut EncodeState, out: &mut Vec<u32>) {
        let EncodeState { cache, symbols, scratch } = state;
        self.added.split(bytes, |segment| match segment {
            Segment::Token(id) => out.push(id),
            Segment::Text(part, at_start) => self.pre.split(part, at_start, scratch, &mut |piece| {
                if piece.len() > CACHE_MAX_PIECE {
                    self.encode_piece(piece, symbols, out);
                    return;
                }
                if let Some(ids) = cache.get(piece) {
                    out.extend_from_slice(ids);
                    return;
                }
                let first = out.len();
                self.encode_piece(piece, symbols, out);
                if cache.len() >= CACHE_MAX_ENTRIES {
                    cache.clear();
                }
                cache.insert(piece.into(), out[first..].into());
            }),
        });
    }

    #[inline]
    fn encode_piece(&self, piece: &[u8], symbols: &mut Vec<u32>, out: &mut Vec<u32>) {
        match &self.model {
            Model::Bpe(bpe) => bpe.encode_piece(piece, symbols, out),
            Model::Unigram(unigram) => match std::str::from_utf8(piece) {
                Ok(text) => unigram.encode_piece(text, out),
                Err(_) => unigram.encode_piece(&String::from_utf8_lossy(piece), out),
            },
        }
    }

    /// The piece string of an id, added tokens included.
    fn piece(&self, id: u32) -> Option<&str> {
        let model_piece = match &self.model {
            Model::Bpe(bpe) => bpe.vocab.get(id as usize),
            Model::Unigram(unigram) => unigram.pieces.get(id as usize),
        };
        model_piece
            .map(String::as_str)
            .or_else(|| self.added.by_id(id).map(|t| t.content.as_str()))
    }

    /// Decodes ids to raw bytes (exact even when the text was not valid UTF-8).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let piece = self.piece(id).ok_or_else(|| {
                Error::Invalid(format!(
                    "token id {id} is outside the vocabulary (size {}); was it made by another tokenizer?",
                    self.vocab_size()
                ))
            })?;
            match &self.decoder {
                Decoder::ByteLevel => match &self.model {
                    Model::Bpe(bpe) if (id as usize) < bpe.token_bytes.len() && bpe.byte_level => {
                        out.extend_from_slice(&bpe.token_bytes[id as usize])
                    }
                    _ => match bytes::unmap(piece) {
                        Some(raw) => out.extend_from_slice(&raw),
                        None => out.extend_from_slice(piece.as_bytes()),
                    },
                },
                Decoder::Metaspace { replacement, prepend_scheme } => {
                    for c in piece.chars() {
                        if c == *replacement {
                            if i == 0 && *prepend_scheme != PrependScheme::Never {
                                continue;
                            }
                            out.push(b' ');
                        } else {
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                    }
                }
                Decoder::ByteFallback => match bpe::model::parse_byte_token(piece) {
                    Some(b) => out.push(b),
                    None => out.extend_from_slice(piece.as_bytes()),
                },
                Decoder::None => {
                    if i > 0 {
                        out.push(b' ');
                    }
                    out.extend_from_slice(piece.as_bytes());
                }
            }
        }
        Ok(out)
    }
}

impl Tokenizer for AnyTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_bytes(text.as_bytes())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        let bytes = self.decode_bytes(ids)?;
        Ok(match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    fn vocab_size(&self) -> usize {
        let model_len = match &self.model {
            Model::Bpe(bpe) => bpe.len(),
            Model::Unigram(unigram) => unigram.len(),
        };
        let added_len = self.added.tokens.iter().map(|t| t.id as usize + 1).max().unwrap_or(0);
        model_len.max(added_len)
    }

    fn special_tokens(&self) -> Vec<(String, u32)> {
        self.added
            .tokens
            .iter()
            .filter(|t| t.special)
            .map(|t| (t.content.clone(), t.id))
            .collect()
    }

    fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.piece(id)
    }

    fn piece_to_id(&self, piece: &str) -> Option<u32> {
        if let Some(token) = self.added.find(piece) {
            return Some(token.id);
        }
        match &self.model {
            Model::Bpe(bpe) => bpe.ids.get(piece).copied(),
            Model::Unigram(unigram) => unigram.ids.get(piece).copied(),
        }
    }
}

/// Trains a tokenizer on text files: a streaming, parallel counting pass over the files
/// (line by line, so no pre-token crosses a newline), then the model's trainer on the counts.
pub fn train(files: &[PathBuf], opts: &TrainOptions, progress: &dyn Fn(Progress)) -> Result<Trained> {
    if files.is_empty() {
        return Err(Error::Invalid("no training files given".into()));
    }
    let pre = match opts.model {
        ModelKind::Bpe | ModelKind::Char => PreTokenizer::ByteLevel { add_prefix_space: false, use_regex: true },
        ModelKind::Unigram => unigram::train::pre_tokenizer(),
    };
    let specials = AddedVocab::new(
        opts.special_tokens
            .iter()
            .enumerate()
            .map(|(i, s)| AddedToken::special(s, i as u32))
            .collect(),
    );
    let counted = count::count_words(files, &pre, &specials, opts.max_memory, progress)?;
    let mut warnings = Vec::new();
    if counted.dropped_words > 0 {
        warnings.push(format!(
            "the word counts outgrew --max-memory: dropped {} distinct words ({} occurrences) seen at most {} times",
            counted.dropped_words, counted.dropped_occurrences, counted.prune_threshold
        ));
    }
    if counted.counts.is_empty() {
        return Err(Error::Invalid(format!(
            "the training corpus is empty ({}); give files with some text",
            files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
        )));
    }
    let tokenizer = match opts.model {
        ModelKind::Bpe => bpe::train::train_byte_level(&counted.counts, opts, progress, &mut warnings)?,
        ModelKind::Char => bpe::train::train_char(&counted.counts, opts, &mut warnings)?,
        ModelKind::Unigram => unigram::train::train_unigram(&counted.counts, opts, progress, &mut warnings)?,
    };
    Ok(Trained { tokenizer, warnings })
}

#[cfg(test)]
mod oracle_tests;
