//! Unigram training (Kudo 2018, "Subword Regularization", section 3.2), in plain EM:
//!
//! 1. Seed: every character, plus the most frequent substrings of the pre-tokenized words
//!    (Metaspace words such as `▁the`), found level by level (Apriori style: a substring of
//!    length k is counted only if both its (k-1)-substrings were frequent), so memory stays
//!    near the number of frequent substrings rather than all substrings. Seeds are ranked
//!    by frequency × length, as SentencePiece ranks its suffix-array seeds.
//! 2. EM: the E-step runs forward-backward over each word's lattice (log space) to get
//!    expected piece counts; the M-step sets log p(piece) = log(count / total) and drops
//!    pieces expected less than half a time.
//! 3. Prune: for each piece, the likelihood lost if its occurrences (in Viterbi
//!    segmentations) were re-segmented by the best path without it; keep the 75% that lose
//!    most, never dropping a single character; repeat 2-3 until 110% of the target, then
//!    keep the best-scored pieces.
//!
//! Ties are broken by piece string, so results do not depend on hash order.

use std::collections::HashMap;

use rayon::prelude::*;

use super::model::{log_add, utf8_len, Trie, Unigram, UNK_PENALTY};
use crate::tokenize::hash::FastMap;
use crate::tokenize::pretokenize::{PreTokenizer, PrependScheme};
use crate::tokenize::{AddedToken, AnyTokenizer, Decoder, Model, ModelKind, Progress, TrainOptions};
use crate::{Error, Result};

/// The pre-tokenizer Unigram models are trained and used with.
pub(crate) fn pre_tokenizer() -> PreTokenizer {
    PreTokenizer::Metaspace { replacement: '▁', prepend_scheme: PrependScheme::Always, split: true }
}

/// Longest seed piece in characters when `max_token_length` is not given.
const DEFAULT_MAX_PIECE_CHARS: usize = 16;
/// Fraction of pieces kept by each pruning round.
const SHRINK: f64 = 0.75;
/// EM iterations per pruning round.
const EM_PER_ROUND: usize = 2;
/// Pieces expected fewer times than this are dropped in the M-step.
const MIN_EXPECTED: f64 = 0.5;

/// Training settings besides the word counts.
#[derive(Debug, Clone)]
pub(crate) struct UnigramConfig {
    /// Pieces of the model, special tokens excluded.
    pub(crate) pieces: usize,
    pub(crate) max_piece_chars: usize,
    /// How many seed substrings to start EM from.
    pub(crate) seed_size: usize,
}

/// Pieces with log-probabilities during training.
struct Current {
    pieces: Vec<String>,
    scores: Vec<f64>,
    is_char: Vec<bool>,
    trie: Trie,
    unk_score: f64,
}

impl Current {
    fn new(pieces: Vec<String>, scores: Vec<f64>) -> Self {
        let mut trie = Trie::new();
        for (id, piece) in pieces.iter().enumerate() {
            trie.insert(piece.as_bytes(), id as u32);
        }
        let is_char = pieces.iter().map(|p| p.chars().count() == 1).collect();
        let min = scores.iter().copied().fold(f64::INFINITY, f64::min);
        Current { pieces, scores, is_char, trie, unk_score: min - UNK_PENALTY }
    }

    /// The lattice edges of `word`: (start, end, id or u32::MAX for unknown, score).
    fn edges(&self, word: &str, skip: u32, edges: &mut Vec<(usize, usize, u32, f64)>) {
        edges.clear();
        let bytes = word.as_bytes();
        let mut start = 0;
        while start < bytes.len() {
            let char_len = utf8_len(bytes[start]);
            let mut has_single = false;
            self.trie.prefixes(&bytes[start..], |len, id| {
                if id != skip {
                    edges.push((start, start + len, id, self.scores[id as usize]));
                    has_single |= len == char_len;
                }
            });
            if !has_single {
                edges.push((start, start + char_len, u32::MAX, self.unk_score));
            }
            start += char_len;
        }
    }

    /// Expected piece counts over all words (weighted by count), and the log-likelihood.
    fn expected_counts(&self, words: &[(String, u64)]) -> (Vec<f64>, f64) {
        words
            .par_chunks(512)
            .map(|chunk| {
                let mut expected = vec![0.0; self.pieces.len()];
                let mut loglik = 0.0;
                let mut edges = Vec::new();
                for (word, count) in chunk {
                    let n = word.len();
                    self.edges(word, u32::MAX, &mut edges);
                    // Edges are sorted by start: every edge into `s` starts before `s`, so
                    // forward[s] is final when read; backward works in reverse likewise.
                    let mut forward = vec![f64::NEG_INFINITY; n + 1];
                    forward[0] = 0.0;
                    for &(s, e, _, score) in &edges {
                        forward[e] = log_add(forward[e], forward[s] + score);
                    }
                    let mut backward = vec![f64::NEG_INFINITY; n + 1];
                    backward[n] = 0.0;
                    for &(s, e, _, score) in edges.iter().rev() {
                        backward[s] = log_add(backward[s], backward[e] + score);
                    }
                    let z = forward[n];
                    let c = *count as f64;
                    for &(s, e, id, score) in &edges {
                        if id != u32::MAX {
                            expected[id as usize] += c * (forward[s] + score + backward[e] - z).exp();
                        }
                    }
                    loglik += c * z;
                }
                (expected, loglik)
            })
            .reduce(
                || (vec![0.0; self.pieces.len()], 0.0),
                |(mut a, la), (b, lb)| {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                    (a, la + lb)
                },
            )
    }

    /// The best path of `word` without piece `skip`: ids (u32::MAX for unknown).
    fn viterbi(&self, word: &str, skip: u32, edges: &mut Vec<(usize, usize, u32, f64)>) -> Vec<u32> {
        self.edges(word, skip, edges);
        let n = word.len();
        let mut best: Vec<(f64, usize, u32)> = vec![(f64::NEG_INFINITY, 0, u32::MAX); n + 1];
        best[0].0 = 0.0;
        // Edges are grouped by start in increasing order; every start is final when reached.
        for &(s, e, id, score) in edges.iter() {
            let candidate = best[s].0 + score;
            if candidate > best[e].0 {
                best[e] = (candidate, s, id);
            }
        }
        let mut path = Vec::new();
        let mut end = n;
        while end > 0 {
            path.push(best[end].2);
            end = best[end].1;
        }
        path.reverse();
        path
    }
}

/// Frequent substrings of the words up to `max_chars` characters (length ≥ 2), with counts.
/// `▁` may only start a piece. Level k keeps substrings seen at least `min_count` times.
fn frequent_substrings(words: &[(String, u64)], max_chars: usize, min_count: u64) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    // Char-boundary offsets of each word, computed once.
    let bounds: Vec<Vec<usize>> = words
        .iter()
        .map(|(w, _)| w.char_indices().map(|(i, _)| i).chain(std::iter::once(w.len())).collect())
        .collect();
    let mut previous: FastMap<&str, u64> = FastMap::default();
    for k in 2..=max_chars {
        let level: FastMap<&str, u64> = words
            .par_iter()
            .zip(bounds.par_iter())
            .fold(FastMap::default, |mut map: FastMap<&str, u64>, ((word, count), b)| {
                let chars = b.len() - 1;
                for start in 0..chars.saturating_sub(k - 1) {
                    let piece = &word[b[start]..b[start + k]];
                    if piece.char_indices().skip(1).any(|(_, c)| c == '▁') {
                        continue;
                    }
                    if k > 2 {
                        let left = &word[b[start]..b[start + k - 1]];
                        let right = &word[b[start + 1]..b[start + k]];
                        if !previous.contains_key(left) || !previous.contains_key(right) {
                            continue;
                        }
                    }
                    *map.entry(piece).or_insert(0) += count;
                }
                map
            })
            .reduce(FastMap::default, |mut a, b| {
                if a.len() < b.len() {
                    return merge_counts(b, a);
                }
                for (k, v) in b {
                    *a.entry(k).or_insert(0) += v;
                }
                a
            });
        let kept: FastMap<&str, u64> = level.into_iter().filter(|&(_, c)| c >= min_count).collect();
        if kept.is_empty() {
            break;
        }
        out.extend(kept.iter().map(|(p, &c)| (p.to_string(), c)));
        previous = kept;
    }
    out
}

fn merge_counts<'a>(mut a: FastMap<&'a str, u64>, b: FastMap<&'a str, u64>) -> FastMap<&'a str, u64> {
    for (k, v) in b {
        *a.entry(k).or_insert(0) += v;
    }
    a
}

/// Learns pieces and log-probabilities from word counts (Metaspace words). A pure
/// function of its inputs; returns (piece, score) sorted by score, best first.
pub(crate) fn learn_pieces(
    words: &[(String, u64)],
    config: &UnigramConfig,
    progress: &dyn Fn(Progress),
) -> Result<Vec<(String, f64)>> {
    let mut char_counts: HashMap<char, u64> = HashMap::new();
    for (word, count) in words {
        for c in word.chars() {
            *char_counts.entry(c).or_insert(0) += count;
        }
    }
    let mut chars: Vec<(String, u64)> = char_counts.into_iter().map(|(c, n)| (c.to_string(), n)).collect();
    chars.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    if chars.len() > config.pieces {
        return Err(Error::Invalid(format!(
            "the corpus has {} distinct characters but the vocabulary allows {} pieces; raise vocab_size",
            chars.len(),
            config.pieces
        )));
    }
    let mut seeds = frequent_substrings(words, config.max_piece_chars, 2);
    // Most frequency × length first; ties by string.
    seeds.sort_unstable_by(|a, b| {
        let score = |s: &(String, u64)| s.1 as u128 * s.0.chars().count() as u128;
        score(b).cmp(&score(a)).then_with(|| a.0.cmp(&b.0))
    });
    seeds.truncate(config.seed_size.saturating_sub(chars.len()));
    let mut pieces: Vec<(String, u64)> = chars;
    pieces.extend(seeds);
    let total: f64 = pieces.iter().map(|p| p.1 as f64).sum();
    let mut current = Current::new(
        pieces.iter().map(|p| p.0.clone()).collect(),
        pieces.iter().map(|p| (p.1 as f64).ln() - total.ln()).collect(),
    );
    let target = config.pieces;
    let mut edges = Vec::new();
    loop {
        for _ in 0..EM_PER_ROUND {
            current = em_step(&current, words);
        }
        progress(Progress::Pruning { vocab: current.pieces.len(), target });
        if current.pieces.len() <= target + target / 10 {
            break;
        }
        let keep = ((current.pieces.len() as f64 * SHRINK) as usize).max(target + target / 10);
        current = prune(&current, words, keep, &mut edges);
    }
    current = em_step(&current, words);
    let mut scored: Vec<(String, f64, bool)> = current
        .pieces
        .into_iter()
        .zip(current.scores)
        .zip(current.is_char)
        .map(|((p, s), c)| (p, s, c))
        .collect();
    // Characters first (always kept), then the best scores; ties by string.
    scored.sort_by(|a, b| b.2.cmp(&a.2).then(b.1.total_cmp(&a.1)).then_with(|| a.0.cmp(&b.0)));
    scored.truncate(target);
    let mut out: Vec<(String, f64)> = scored.into_iter().map(|(p, s, _)| (p, s)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(out)
}

/// One EM iteration: expected counts, then re-normalised log-probabilities; pieces
/// (not characters) expected less than `MIN_EXPECTED` times are dropped.
fn em_step(current: &Current, words: &[(String, u64)]) -> Current {
    let (expected, _loglik) = current.expected_counts(words);
    let kept: Vec<usize> = (0..current.pieces.len())
        .filter(|&i| current.is_char[i] || expected[i] >= MIN_EXPECTED)
        .collect();
    let total: f64 = kept.iter().map(|&i| expected[i]).sum();
    let pieces = kept.iter().map(|&i| current.pieces[i].clone()).collect();
    // A character never seen in a best path still needs a finite score.
    let scores = kept.iter().map(|&i| (expected[i].max(1e-3)).ln() - total.ln()).collect();
    Current::new(pieces, scores)
}

/// Keeps the `keep` pieces whose removal would lose most likelihood (characters always).
fn prune(current: &Current, words: &[(String, u64)], keep: usize, edges: &mut Vec<(usize, usize, u32, f64)>) -> Current {
    let n = current.pieces.len();
    // Piece frequencies in Viterbi segmentations.
    let freq: Vec<f64> = words
        .par_chunks(512)
        .map(|chunk| {
            let mut freq = vec![0.0; n];
            let mut edges = Vec::new();
            for (word, count) in chunk {
                for id in current.viterbi(word, u32::MAX, &mut edges) {
                    if id != u32::MAX {
                        freq[id as usize] += *count as f64;
                    }
                }
            }
            freq
        })
        .reduce(|| vec![0.0; n], |mut a, b| {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            a
        });
    let sum: f64 = freq.iter().sum();
    let log_sum = sum.ln();
    // Loss of removing piece i: its occurrences are re-segmented by the best path without
    // it (alternatives), whose frequencies grow by freq[i] (SentencePiece's estimate).
    let mut losses: Vec<(f64, usize)> = Vec::with_capacity(n);
    for i in 0..n {
        if current.is_char[i] {
            continue;
        }
        if freq[i] == 0.0 {
            losses.push((0.0, i));
            continue;
        }
        let alternatives = current.viterbi(&current.pieces[i], i as u32, edges);
        let new_sum = sum + freq[i] * (alternatives.len() as f64 - 1.0);
        let logprob_piece = freq[i].ln() - log_sum;
        let logprob_alt: f64 = alternatives
            .iter()
            .map(|&j| {
                let f = if j == u32::MAX { 0.0 } else { freq[j as usize] };
                (f + freq[i]).ln() - new_sum.ln()
            })
            .sum();
        losses.push((freq[i] * (logprob_piece - logprob_alt), i));
    }
    let chars = current.is_char.iter().filter(|&&c| c).count();
    // Largest loss first; ties by piece string.
    losses.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| current.pieces[a.1].cmp(&current.pieces[b.1])));
    let mut kept: Vec<usize> = (0..n).filter(|&i| current.is_char[i]).collect();
    kept.extend(losses.iter().take(keep.saturating_sub(chars)).map(|&(_, i)| i));
    kept.sort_unstable();
    Current::new(
        kept.iter().map(|&i| current.pieces[i].clone()).collect(),
        kept.iter().map(|&i| current.scores[i]).collect(),
    )
}

/// Trains a Unigram tokenizer (Metaspace pre-tokenization) from pre-token counts.
/// `<unk>` is the unknown piece: its position among the special tokens, or id 0 if absent.
pub(crate) fn train_unigram(
    counts: &FastMap<Box<[u8]>, u64>,
    opts: &TrainOptions,
    progress: &dyn Fn(Progress),
    warnings: &mut Vec<String>,
) -> Result<AnyTokenizer> {
    let mut specials: Vec<String> = Vec::new();
    if !opts.special_tokens.iter().any(|s| s == "<unk>") {
        specials.push("<unk>".into());
    }
    for s in &opts.special_tokens {
        if !specials.contains(s) {
            specials.push(s.clone());
        }
    }
    let unk_id = specials.iter().position(|s| s == "<unk>").expect("<unk> was added") as u32;
    if opts.vocab_size <= specials.len() {
        return Err(Error::Invalid(format!(
            "vocab_size {} leaves no room beside {} special tokens",
            opts.vocab_size,
            specials.len()
        )));
    }
    let mut words: Vec<(String, u64)> = counts
        .iter()
        .map(|(bytes, &count)| (String::from_utf8_lossy(bytes).into_owned(), count))
        .collect();
    words.sort_unstable();
    let config = UnigramConfig {
        pieces: opts.vocab_size - specials.len(),
        max_piece_chars: opts.max_token_length.unwrap_or(DEFAULT_MAX_PIECE_CHARS).max(1),
        seed_size: (opts.vocab_size * 10).clamp(20_000, 1_000_000),
    };
    let learned = learn_pieces(&words, &config, progress)?;
    if learned.len() < config.pieces {
        warnings.push(format!(
            "the vocabulary has {} pieces, fewer than the {} asked: the corpus has no more frequent substrings",
            learned.len() + specials.len(),
            opts.vocab_size
        ));
    }
    let added: Vec<AddedToken> =
        specials.iter().enumerate().map(|(i, s)| AddedToken::special(s, i as u32)).collect();
    let mut vocab: Vec<(String, f64)> = specials.iter().map(|s| (s.clone(), 0.0)).collect();
    vocab.extend(learned.into_iter().filter(|(p, _)| !specials.contains(p)));
    let model = Unigram::new(vocab, Some(unk_id), false);
    let PreTokenizer::Metaspace { replacement, prepend_scheme, .. } = pre_tokenizer() else {
        unreachable!("Unigram uses Metaspace")
    };
    Ok(AnyTokenizer::new(
        Model::Unigram(model),
        added,
        pre_tokenizer(),
        Decoder::Metaspace { replacement, prepend_scheme },
        ModelKind::Unigram,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_frequent_words_as_pieces() {
        let words: Vec<(String, u64)> = [("▁the", 50u64), ("▁then", 10), ("▁cat", 30), ("▁hat", 20), ("▁a", 40)]
            .iter()
            .map(|&(w, c)| (w.to_string(), c))
            .collect();
        let config = UnigramConfig { pieces: 14, max_piece_chars: 8, seed_size: 1000 };
        let pieces = learn_pieces(&words, &config, &|_| {}).expect("trains");
        let names: Vec<&str> = pieces.iter().map(|p| p.0.as_str()).collect();
        assert!(names.contains(&"▁the"), "{names:?}");
        for c in ["▁", "t", "h", "e", "n", "c", "a"] {
            assert!(names.contains(&c), "{c} kept: {names:?}");
        }
        assert!(pieces.windows(2).all(|w| w[0].1 >= w[1].1), "sorted by score");
    }
}
