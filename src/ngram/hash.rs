//! Hash functions and a hash index over flat n-gram tables.
//!
//! The binary model format stores n-grams by a 64-bit hash of their word ids and
//! words by a hash of their bytes, so [`ngram_start`], [`ngram_extend`] and
//! [`bytes_hash`] are part of that file format: changing them needs a new format
//! version. [`FastHasher`] is the deterministic hasher of the in-memory maps.

use std::hash::{BuildHasherDefault, Hasher};

/// splitmix64's finaliser: a bijective mix of 64 bits (Steele, Lea and Flood 2014).
#[inline]
pub(crate) fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hash of the one-word n-gram `w`, where the chain of [`ngram_extend`] starts.
#[inline]
pub(crate) fn ngram_start(word: u32) -> u64 {
    mix64(u64::from(word) ^ 0x6E67_7261_6D00_0001)
}

/// Hash of `v g` from the hash of `g`. N-grams are hashed from their last word
/// leftwards, so a lookup that widens its context one word at a time reuses the
/// previous hash.
#[inline]
pub(crate) fn ngram_extend(hash: u64, word: u32) -> u64 {
    mix64(hash.rotate_left(29) ^ u64::from(word).wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// Hash of a whole n-gram (words oldest first).
pub(crate) fn ngram_hash(ngram: &[u32]) -> u64 {
    let (&last, rest) = ngram.split_last().expect("an n-gram has at least one word");
    rest.iter()
        .rev()
        .fold(ngram_start(last), |hash, &word| ngram_extend(hash, word))
}

/// FNV-1a over bytes, then mixed: the hash of a vocabulary word.
pub(crate) fn bytes_hash(bytes: &[u8]) -> u64 {
    let fnv = bytes.iter().fold(0xCBF2_9CE4_8422_2325_u64, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3)
    });
    mix64(fnv)
}

/// A fast, deterministic hasher for in-memory maps keyed by words.
#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        mix64(self.0)
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let word = u64::from_le_bytes(chunk.try_into().expect("chunks_exact gives 8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517C_C1B7_2722_0A95);
        }
        for &byte in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(byte)).wrapping_mul(0x517C_C1B7_2722_0A95);
        }
    }
}

/// `BuildHasher` for [`FastHasher`].
pub(crate) type FastBuildHasher = BuildHasherDefault<FastHasher>;

/// Open-addressing index from n-gram to its row in a flat table of n-grams
/// (`words.len() == rows * order`). Lookups compare the words, so it is exact.
pub(crate) struct NgramIndex {
    slots: Vec<u32>,
    mask: usize,
}

const EMPTY_SLOT: u32 = u32::MAX;

impl NgramIndex {
    /// Indexes every row of `words`, a table of `order`-grams.
    pub(crate) fn new(words: &[u32], order: usize) -> Self {
        let rows = words.len() / order;
        let capacity = (rows * 2).max(4).next_power_of_two();
        let mask = capacity - 1;
        let mut slots = vec![EMPTY_SLOT; capacity];
        for (row, ngram) in words.chunks_exact(order).enumerate() {
            let mut slot = ngram_hash(ngram) as usize & mask;
            while slots[slot] != EMPTY_SLOT {
                slot = (slot + 1) & mask;
            }
            slots[slot] = u32::try_from(row).expect("fewer than 2^32 n-grams per order");
        }
        NgramIndex { slots, mask }
    }

    /// The row of `ngram` in `words` (the table this index was built over).
    pub(crate) fn find(&self, words: &[u32], ngram: &[u32]) -> Option<usize> {
        let order = ngram.len();
        let mut slot = ngram_hash(ngram) as usize & self.mask;
        loop {
            let row = self.slots[slot];
            if row == EMPTY_SLOT {
                return None;
            }
            let row = row as usize;
            // A loop, not slice equality: n-grams are a few words, too short to
            // pay for a call to memcmp.
            let stored = &words[row * order..(row + 1) * order];
            if stored.iter().zip(ngram).all(|(a, b)| a == b) {
                return Some(row);
            }
            slot = (slot + 1) & self.mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ngram_hash_is_the_extend_chain_from_the_last_word() {
        let direct = ngram_extend(ngram_extend(ngram_start(7), 5), 3);
        assert_eq!(ngram_hash(&[3, 5, 7]), direct);
        assert_ne!(ngram_hash(&[3, 5, 7]), ngram_hash(&[7, 5, 3]));
    }

    #[test]
    fn index_finds_every_row_and_nothing_else() {
        let words = [1, 2, 2, 1, 3, 3, 1, 1];
        let index = NgramIndex::new(&words, 2);
        for row in 0..4 {
            assert_eq!(index.find(&words, &words[row * 2..row * 2 + 2]), Some(row));
        }
        assert_eq!(index.find(&words, &[9, 9]), None);
    }
}
