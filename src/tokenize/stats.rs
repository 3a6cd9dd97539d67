//! Summary statistics of a tokenizer on a text: compression (bytes per token, tokens per
//! whitespace word), the longest pieces, and how often it fell back to bytes or unknowns.

use super::{AnyTokenizer, Model, Tokenizer};

/// What [`stats`] measures.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// UTF-8 bytes of text per token.
    pub bytes_per_token: f64,
    /// Tokens per whitespace-separated word.
    pub tokens_per_word: f64,
    /// The ten longest pieces of the vocabulary (in bytes), longest first.
    pub longest_pieces: Vec<String>,
    /// Share of tokens that are the unknown token or single-byte fallback tokens
    /// (for byte-level BPE: byte tokens standing for part of a multi-byte character).
    pub unk_or_byte_fallback_share: f64,
}

/// Measures `tok` on `text`.
pub fn stats(tok: &AnyTokenizer, text: &str) -> Stats {
    let ids = tok.encode(text);
    let words = text.split_whitespace().count();
    let fallback = ids
        .iter()
        .filter(|&&id| match &tok.model {
            Model::Bpe(bpe) => {
                Some(id) == bpe.unk
                    || (bpe.is_byte_token(id)
                        && if bpe.byte_level {
                            bpe.token_bytes[id as usize].first().is_some_and(|&b| b >= 0x80)
                        } else {
                            true
                        })
            }
            Model::Unigram(unigram) => Some(id) == unigram.unk_id,
        })
        .count();
    let mut pieces: Vec<(usize, u32)> = (0..tok.vocab_size() as u32)
        .filter(|&id| tok.added.by_id(id).is_none())
        .filter_map(|id| {
            let bytes = match &tok.model {
                Model::Bpe(bpe) => bpe.token_bytes.get(id as usize)?.len(),
                Model::Unigram(unigram) => unigram.pieces.get(id as usize)?.len(),
            };
            Some((bytes, id))
        })
        .collect();
    // Longest first; equal lengths by id.
    pieces.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let longest_pieces = pieces
        .iter()
        .take(10)
        .map(|&(_, id)| tok.decode(&[id]).unwrap_or_default())
        .collect();
    let n = ids.len().max(1) as f64;
    Stats {
        vocab_size: tok.vocab_size(),
        bytes_per_token: text.len() as f64 / n,
        tokens_per_word: ids.len() as f64 / words.max(1) as f64,
        longest_pieces,
        unk_or_byte_fallback_share: fallback as f64 / n,
    }
}
