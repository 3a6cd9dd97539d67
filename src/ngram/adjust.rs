//! Adjusted counts: the Kneser-Ney continuation counts of every order.
//!
//! Input: [`PaddedCounts`], the padded N-grams in suffix order. Output: one
//! [`OrderCounts`] table per order 1..=N holding the n-grams that really occur
//! (no `<s>` except in first position), each with its raw count and its adjusted
//! count, in suffix order; plus the counts-of-counts t1..t4 of adjusted counts per
//! order, which the discounts are estimated from (Chen and Goodman 1998, eq. 26).
//!
//! Adjusted counts (Kneser and Ney 1995; Chen and Goodman 1998, sec. 3.5): the
//! highest order keeps raw counts; a lower-order n-gram `g` gets N1+(. g), the
//! number of distinct words seen to its left; n-grams starting with `<s>` have no
//! left context and keep their raw counts. `<unk>` and `<s>` are unigrams with
//! count 0.
//!
//! One quirk of lmplz is reproduced on purpose: the last n-gram of each lower
//! order (in suffix order) enters the counts-of-counts with its raw count rather
//! than its adjusted count, because lmplz flushes that n-gram from a different
//! code path. It moves the discounts by a few parts in a million.

use rayon::prelude::*;

use super::count::PaddedCounts;
use super::hash::NgramIndex;
use super::vocab::BOS;

/// The n-grams of one order with their raw and adjusted counts, in suffix order.
pub(crate) struct OrderCounts {
    /// n, the width of each n-gram.
    pub order: usize,
    /// The n-grams, `order` ids each, oldest word first.
    pub words: Vec<u32>,
    /// How often each n-gram occurs in the padded text.
    pub raw: Vec<u64>,
    /// The count Kneser-Ney smoothing uses (see the module doc).
    pub adjusted: Vec<u64>,
}

impl OrderCounts {
    /// Frees the counts, keeping the n-grams: all that interpolation reads.
    pub(crate) fn drop_counts(&mut self) {
        self.raw = Vec::new();
        self.adjusted = Vec::new();
    }

    /// Number of n-grams.
    pub(crate) fn len(&self) -> usize {
        self.words.len() / self.order
    }

    /// The `row`-th n-gram.
    pub(crate) fn ngram(&self, row: usize) -> &[u32] {
        &self.words[row * self.order..(row + 1) * self.order]
    }
}

/// Counts of counts t_c for c = 0..=4 (index c; t_0 counts `<unk>` and `<s>`).
pub(crate) type CountsOfCounts = [u64; 5];

/// The output of the adjust stage.
pub(crate) struct AdjustedCounts {
    /// Tables for orders 1..=N (index n-1). Unigrams are indexed by word id.
    pub orders: Vec<OrderCounts>,
    /// t_c of adjusted counts per order (index n-1).
    pub counts_of_counts: Vec<CountsOfCounts>,
}

/// Whether a window of a padded n-gram is an n-gram of the text: `<s>` may only
/// come first.
fn occurs(ngram: &[u32]) -> bool {
    !ngram[1..].contains(&BOS)
}

/// Derives every order's n-grams with raw and adjusted counts from the padded
/// N-gram counts, for a vocabulary of `vocab_size` words.
pub(crate) fn adjust_counts(padded: &PaddedCounts, vocab_size: usize) -> AdjustedCounts {
    let top = padded.order;
    let mut orders: Vec<OrderCounts> = (1..=top).map(|n| suffix_table(padded, n)).collect();

    // Unigrams as a dense table by id, so <unk> and <s> (never the last word of an
    // n-gram) are present with count 0. Suffix order of unigrams is id order.
    let unigrams = &orders[0];
    let mut raw = vec![0; vocab_size];
    let mut adjusted = vec![0; vocab_size];
    for row in 0..unigrams.len() {
        let id = unigrams.words[row] as usize;
        raw[id] = unigrams.raw[row];
        adjusted[id] = unigrams.adjusted[row];
    }
    orders[0] = OrderCounts {
        order: 1,
        words: (0..vocab_size as u32).collect(),
        raw,
        adjusted,
    };

    let last_padded = padded.ngram(padded.len() - 1);
    let counts_of_counts = orders
        .iter()
        .map(|table| {
            let mut t = [0_u64; 5];
            for row in 0..table.len() {
                let mut count = table.adjusted[row];
                // lmplz's quirk (module doc): the final lower-order n-grams, the
                // occurring suffixes of the last padded N-gram, count raw.
                let n = table.order;
                if n < top && row + 1 == table.len() && occurs(&last_padded[top - n..]) {
                    count = table.raw[row];
                }
                if count < 5 {
                    t[count as usize] += 1;
                }
            }
            t
        })
        .collect();

    AdjustedCounts {
        orders,
        counts_of_counts,
    }
}

/// The occurring n-grams of order `n` as suffixes of the padded N-grams. Rows
/// sharing a suffix are adjacent in suffix order, and within such a group the
/// word left of the suffix is sorted, so distinct left words are counted by change.
fn suffix_table(padded: &PaddedCounts, n: usize) -> OrderCounts {
    let top = padded.order;
    let skip = top - n;
    let mut table = OrderCounts {
        order: n,
        words: Vec::new(),
        raw: Vec::new(),
        adjusted: Vec::new(),
    };
    let rows = padded.len();
    let mut row = 0;
    while row < rows {
        let suffix = &padded.ngram(row)[skip..];
        let mut raw = 0;
        let mut left_words = 0;
        let mut previous_left = None;
        let mut end = row;
        while end < rows && padded.ngram(end)[skip..] == *suffix {
            raw += padded.counts[end];
            if skip > 0 {
                let left = padded.ngram(end)[skip - 1];
                if previous_left != Some(left) {
                    left_words += 1;
                    previous_left = Some(left);
                }
            }
            end += 1;
        }
        if occurs(suffix) {
            let adjusted = if n == top || suffix[0] == BOS {
                raw
            } else {
                left_words
            };
            table.words.extend_from_slice(suffix);
            table.raw.push(raw);
            table.adjusted.push(adjusted);
        }
        row = end;
    }
    // Give back what doubling over-reserved: these tables live through estimation.
    table.words.shrink_to_fit();
    table.raw.shrink_to_fit();
    table.adjusted.shrink_to_fit();
    table
}

/// For each order n >= 2, the row of each n-gram's context (its first n-1 words)
/// in the table of order n-1; for unigrams, 0 (the one empty context).
pub(crate) fn context_rows(orders: &[OrderCounts]) -> Vec<Vec<u32>> {
    let mut contexts = vec![vec![0; orders[0].len()]];
    for n in 2..=orders.len() {
        let lower = &orders[n - 2];
        let index = NgramIndex::new(&lower.words, n - 1);
        let table = &orders[n - 1];
        let rows = (0..table.len())
            .into_par_iter()
            .map(|row| {
                let ngram = table.ngram(row);
                let context = index
                    .find(&lower.words, &ngram[..n - 1])
                    .expect("the context of an occurring n-gram occurs");
                context as u32
            })
            .collect();
        contexts.push(rows);
    }
    contexts
}

/// For each order n >= 2, the row of each n-gram's suffix (its last n-1 words) in
/// the table of order n-1. Suffix order makes the suffixes non-decreasing, so
/// one forward walk finds them all.
pub(crate) fn suffix_rows(orders: &[OrderCounts]) -> Vec<Vec<u32>> {
    let mut suffixes = vec![Vec::new()];
    for n in 2..=orders.len() {
        let lower = &orders[n - 2];
        let table = &orders[n - 1];
        let mut at = 0;
        let rows = (0..table.len())
            .map(|row| {
                let suffix = &table.ngram(row)[1..];
                while lower.ngram(at) != suffix {
                    at += 1;
                }
                at as u32
            })
            .collect();
        suffixes.push(rows);
    }
    suffixes
}

#[cfg(test)]
mod tests {
    use super::super::count::{count_ngrams, CountOptions};
    use super::super::vocab::Vocabulary;
    use super::*;
    use std::path::Path;

    fn adjusted(text: &str, order: usize) -> (AdjustedCounts, Vec<String>) {
        let mut vocab = Vocabulary::with_specials();
        let opts = CountOptions {
            order,
            skip_symbols: false,
            memory_bytes: None,
        };
        let padded =
            count_ngrams(text.as_bytes(), Path::new("t"), &opts, &mut vocab).expect("counts");
        let result = adjust_counts(&padded, vocab.len());
        (result, vocab.into_words())
    }

    fn rows(table: &OrderCounts, words: &[String]) -> Vec<(String, u64, u64)> {
        (0..table.len())
            .map(|row| {
                let text: Vec<&str> = table
                    .ngram(row)
                    .iter()
                    .map(|&id| words[id as usize].as_str())
                    .collect();
                (text.join(" "), table.raw[row], table.adjusted[row])
            })
            .collect()
    }

    #[test]
    fn continuation_counts_and_bos_raw_counts() {
        // Sentences: <s> a b </s>, <s> c b </s>, <s> a b </s>
        let (result, words) = adjusted("a b\nc b\na b\n", 3);
        let s = |x: &str, raw, adj| (x.to_string(), raw, adj);
        assert_eq!(
            rows(&result.orders[0], &words),
            vec![
                s("<unk>", 0, 0),
                s("<s>", 0, 0),
                s("</s>", 3, 1),
                s("a", 2, 1),
                s("b", 3, 2),
                s("c", 1, 1)
            ]
        );
        // Bigrams in suffix order (last word first): b </s>; <s> a; a b; c b; <s> c.
        assert_eq!(
            rows(&result.orders[1], &words),
            vec![
                s("b </s>", 3, 2),
                s("<s> a", 2, 2),
                s("a b", 2, 1),
                s("c b", 1, 1),
                s("<s> c", 1, 1)
            ]
        );
        assert_eq!(
            rows(&result.orders[2], &words),
            vec![
                s("a b </s>", 2, 2),
                s("c b </s>", 1, 1),
                s("<s> a b", 2, 2),
                s("<s> c b", 1, 1)
            ]
        );
        let contexts = context_rows(&result.orders);
        // "a b </s>" has context "a b", row 2 of the bigrams.
        assert_eq!(contexts[2], vec![2, 3, 1, 4]);
        let suffixes = suffix_rows(&result.orders);
        assert_eq!(suffixes[1], vec![2, 3, 4, 4, 5]);
    }
}
