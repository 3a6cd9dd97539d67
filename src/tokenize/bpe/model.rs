//! The BPE model (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with
//! Subword Units"): a vocabulary and a ranked list of merges, applied to one pre-token at
//! a time, lowest rank first (leftmost among equal ranks), as `tokenizers` does.
//!
//! In byte-level mode (GPT-2, Radford et al. 2019) a pre-token's bytes start as the 256
//! byte tokens, so any input encodes with no unknown token. Otherwise its characters start
//! as the single-character tokens, with byte fallback (`<0x41>`) or an unknown token for
//! the rest. BPE-dropout (Provilkov et al. 2020) skips each applicable merge with
//! probability p at every step.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::collections::HashMap;

use crate::tokenize::bytes::{BYTE_TO_CHAR, char_to_byte};
use crate::tokenize::hash::{pair_key, FastMap};
use crate::rng::SplitMix64;
use crate::{Error, Result};

const NONE: u32 = u32::MAX;

/// Words longer than this (in symbols) are merged with a heap instead of rescans.
const HEAP_THRESHOLD: usize = 48;

/// A BPE vocabulary with its merges.
#[derive(Debug, Clone)]
pub struct Bpe {
    /// Piece strings by id (byte-level pieces are in GPT-2 mapped characters).
    pub(crate) vocab: Vec<String>,
    pub(crate) ids: HashMap<String, u32>,
    /// Merges by rank: (left id, right id).
    pub(crate) merges: Vec<(u32, u32)>,
    /// (left, right) -> (rank, merged id).
    merge_map: FastMap<u64, (u32, u32)>,
    /// Whether pre-tokens are encoded from their bytes (GPT-2 style).
    pub(crate) byte_level: bool,
    pub(crate) unk: Option<u32>,
    pub(crate) fuse_unk: bool,
    pub(crate) byte_fallback: bool,
    /// Byte-level: the id of each byte's character. Byte fallback: the id of `<0xNN>`.
    byte_ids: Box<[u32; 256]>,
    /// Single-character pieces (non-byte-level input).
    char_ids: FastMap<char, u32>,
    /// Raw bytes of each token, for decoding and for `.tiktoken` export.
    pub(crate) token_bytes: Vec<Vec<u8>>,
}

impl Bpe {
    /// Builds a model from pieces by id and merges as id pairs in rank order.
    pub fn new(
        vocab: Vec<String>,
        merges: Vec<(u32, u32)>,
        byte_level: bool,
        unk: Option<u32>,
        fuse_unk: bool,
        byte_fallback: bool,
    ) -> Result<Self> {
        let mut ids = HashMap::with_capacity(vocab.len());
        for (id, piece) in vocab.iter().enumerate() {
            ids.insert(piece.clone(), id as u32);
        }
        let mut merge_map = FastMap::default();
        merge_map.reserve(merges.len());
        for (rank, &(a, b)) in merges.iter().enumerate() {
            let (Some(left), Some(right)) = (vocab.get(a as usize), vocab.get(b as usize)) else {
                return Err(Error::Invalid(format!("merge {rank} refers to an id outside the vocabulary")));
            };
            let merged = format!("{left}{right}");
            let Some(&new_id) = ids.get(&merged) else {
                return Err(Error::Invalid(format!(
                    "merge {rank} (`{left}` `{right}`) makes `{merged}`, which is not in the vocabulary"
                )));
            };
            // A repeated merge keeps its last rank, as `tokenizers` does.
            merge_map.insert(pair_key(a, b), (rank as u32, new_id));
        }
        let mut byte_ids = Box::new([NONE; 256]);
        let mut char_ids = FastMap::default();
        if byte_level {
            for b in 0..256 {
                byte_ids[b] = *ids.get(BYTE_TO_CHAR[b].to_string().as_str()).ok_or_else(|| {
                    Error::Invalid(format!(
                        "byte-level vocabulary lacks the token `{}` for byte 0x{b:02X}",
                        BYTE_TO_CHAR[b]
                    ))
                })?;
            }
        } else {
            for (id, piece) in vocab.iter().enumerate() {
                let mut chars = piece.chars();
                if let (Some(c), None) = (chars.next(), chars.next()) {
                    char_ids.entry(c).or_insert(id as u32);
                }
            }
            if byte_fallback {
                for (b, slot) in byte_ids.iter_mut().enumerate() {
                    *slot = ids.get(&format!("<0x{b:02X}>")).copied().unwrap_or(NONE);
                }
            }
        }
        let token_bytes = vocab
            .iter()
            .map(|piece| piece_bytes(piece, byte_level, byte_fallback))
            .collect();
        Ok(Bpe {
            vocab,
            ids,
            merges,
            merge_map,
            byte_level,
            unk,
            fuse_unk,
            byte_fallback,
            byte_ids,
            char_ids,
            token_bytes,
        })
    }

    /// Number of pieces.
    pub fn len(&self) -> usize {
        self.vocab.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.vocab.is_empty()
    }

    /// The starting symbols of a pre-token, before any merge.
    fn initial_symbols(&self, piece: &[u8], symbols: &mut Vec<u32>) {
        symbols.clear();
        if self.byte_level {
            symbols.extend(piece.iter().map(|&b| self.byte_ids[b as usize]));
            return;
        }
        let text = String::from_utf8_lossy(piece);
        let mut last_was_unk = false;
        for c in text.chars() {
            if let Some(&id) = self.char_ids.get(&c) {
                symbols.push(id);
                last_was_unk = false;
                continue;
            }
            if self.byte_fallback {
                let mut buf = [0u8; 4];
                let encoded = c.encode_utf8(&mut buf).as_bytes();
                if encoded.iter().all(|&b| self.byte_ids[b as usize] != NONE) {
                    symbols.extend(encoded.iter().map(|&b| self.byte_ids[b as usize]));
                    last_was_unk = false;
                    continue;
                }
            }
            if let Some(unk) = self.unk {
                if !(self.fuse_unk && last_was_unk) {
                    symbols.push(unk);
                }
                last_was_unk = true;
            }
            // No unknown token: the character is dropped (`tokenizers` reports an error).
        }
    }

    #[inline]
    fn lookup(&self, left: u32, right: u32) -> Option<(u32, u32)> {
        self.merge_map.get(&pair_key(left, right)).copied()
    }

    /// Applies the merges to `symbols` in place, lowest rank first, leftmost among equals.
    pub(crate) fn merge(&self, symbols: &mut Vec<u32>) {
        if symbols.len() < 2 {
            return;
        }
        if symbols.len() > HEAP_THRESHOLD {
            self.merge_with_heap(symbols);
            return;
        }
        // ranks[i] is the rank of the pair (symbols[i], symbols[i + 1]).
        let mut ranks: Vec<(u32, u32)> = symbols
            .windows(2)
            .map(|w| self.lookup(w[0], w[1]).unwrap_or((NONE, NONE)))
            .collect();
        loop {
            let mut best = NONE;
            let mut at = 0;
            for (i, &(rank, _)) in ranks.iter().enumerate() {
                if rank < best {
                    best = rank;
                    at = i;
                }
            }
            if best == NONE {
                break;
            }
            self.merge_at(symbols, &mut ranks, at);
        }
    }

    /// Merges symbols `at` and `at + 1`, refreshing the neighbouring pair ranks.
    #[inline]
    fn merge_at(&self, symbols: &mut Vec<u32>, ranks: &mut Vec<(u32, u32)>, at: usize) {
        symbols[at] = ranks[at].1;
        symbols.remove(at + 1);
        ranks.remove(at);
        if at > 0 {
            ranks[at - 1] = self.lookup(symbols[at - 1], symbols[at]).unwrap_or((NONE, NONE));
        }
        if at + 1 < symbols.len() {
            ranks[at] = self.lookup(symbols[at], symbols[at + 1]).unwrap_or((NONE, NONE));
        }
    }

    /// The same merge order for long pre-tokens, with a heap of (rank, position) and a
    /// linked list of symbols, in O(n log n).
    fn merge_with_heap(&self, symbols: &mut Vec<u32>) {
        let n = symbols.len();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        for i in 0..n - 1 {
            if let Some((rank, _)) = self.lookup(symbols[i], symbols[i + 1]) {
                heap.push(Reverse((rank, i)));
            }
        }
        while let Some(Reverse((rank, i))) = heap.pop() {
            if !alive[i] || next[i] >= n {
                continue;
            }
            let j = next[i];
            let Some((current_rank, new_id)) = self.lookup(symbols[i], symbols[j]) else {
                continue;
            };
            if current_rank != rank {
                continue; // stale: a neighbour changed since this entry was pushed
            }
            symbols[i] = new_id;
            alive[j] = false;
            next[i] = next[j];
            if next[i] < n {
                prev[next[i]] = i;
            }
            let p = prev[i];
            if p < n {
                if let Some((r, _)) = self.lookup(symbols[p], symbols[i]) {
                    heap.push(Reverse((r, p)));
                }
            }
            if next[i] < n {
                if let Some((r, _)) = self.lookup(symbols[i], symbols[next[i]]) {
                    heap.push(Reverse((r, i)));
                }
            }
        }
        let mut write = 0;
        for read in 0..n {
            if alive[read] {
                symbols[write] = symbols[read];
                write += 1;
            }
        }
        symbols.truncate(write);
    }

    /// BPE-dropout (Provilkov et al. 2020): at each step every applicable merge is dropped
    /// with probability `p`, and the lowest-ranked survivor is applied; no survivor ends it.
    pub(crate) fn merge_with_dropout(&self, symbols: &mut Vec<u32>, p: f32, rng: &mut SplitMix64) {
        if symbols.len() < 2 {
            return;
        }
        let mut ranks: Vec<(u32, u32)> = symbols
            .windows(2)
            .map(|w| self.lookup(w[0], w[1]).unwrap_or((NONE, NONE)))
            .collect();
        loop {
            let mut best = NONE;
            let mut at = 0;
            for (i, &(rank, _)) in ranks.iter().enumerate() {
                if rank != NONE && rng.next_f64() >= p as f64 && rank < best {
                    best = rank;
                    at = i;
                }
            }
            if best == NONE {
                break;
            }
            self.merge_at(symbols, &mut ranks, at);
        }
    }

    /// Encodes one pre-token, appending its ids to `out`.
    pub(crate) fn encode_piece(&self, piece: &[u8], symbols: &mut Vec<u32>, out: &mut Vec<u32>) {
        self.initial_symbols(piece, symbols);
        self.merge(symbols);
        out.extend_from_slice(symbols);
    }

    /// Encodes one pre-token with BPE-dropout.
    pub(crate) fn encode_piece_dropout(&self, piece: &[u8], p: f32, rng: &mut SplitMix64, out: &mut Vec<u32>) {
        let mut symbols = Vec::new();
        self.initial_symbols(piece, &mut symbols);
        self.merge_with_dropout(&mut symbols, p, rng);
        out.extend_from_slice(&symbols);
    }

    /// Whether `id` is a single byte's token (byte-level) or a `<0xNN>` byte-fallback token.
    pub(crate) fn is_byte_token(&self, id: u32) -> bool {
        self.byte_ids.contains(&id)
    }
}

/// The raw bytes a piece stands for.
fn piece_bytes(piece: &str, byte_level: bool, byte_fallback: bool) -> Vec<u8> {
    if byte_level {
        if let Some(bytes) = piece.chars().map(char_to_byte).collect::<Option<Vec<u8>>>() {
            return bytes;
        }
    } else if byte_fallback {
        if let Some(b) = parse_byte_token(piece) {
            return vec![b];
        }
    }
    piece.as_bytes().to_vec()
}

/// The byte of a `<0xNN>` byte-fallback token.
pub(crate) fn parse_byte_token(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Bpe {
        // a b c, then merges: (a b) -> ab, (ab c) -> abc, (c c) -> cc
        let vocab = ["a", "b", "c", "ab", "abc", "cc"].map(String::from).to_vec();
        Bpe::new(vocab, vec![(0, 1), (3, 2), (2, 2)], false, None, false, false).expect("valid toy")
    }

    #[test]
    fn merges_apply_by_rank_then_leftmost() {
        let bpe = toy();
        let mut out = Vec::new();
        bpe.encode_piece(b"abcccc", &mut Vec::new(), &mut out);
        // ab first (rank 0), then abc (rank 1), then cc cc left to right... c c c -> cc c
        assert_eq!(out, [4, 5, 2]);
        let long: Vec<u8> = b"abc".iter().cycle().take(300).copied().collect();
        let mut heap_out = Vec::new();
        bpe.encode_piece(&long, &mut Vec::new(), &mut heap_out);
        assert_eq!(heap_out, vec![4; 100]);
    }

    #[test]
    fn dropout_extremes() {
        let bpe = toy();
        let mut rng = SplitMix64::new(1);
        let mut out = Vec::new();
        bpe.encode_piece_dropout(b"abcc", 1.0, &mut rng, &mut out);
        assert_eq!(out, [0, 1, 2, 2]);
        out.clear();
        bpe.encode_piece_dropout(b"abcc", 0.0, &mut rng, &mut out);
        assert_eq!(out, [4, 2]);
    }
}
