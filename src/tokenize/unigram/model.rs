//! The Unigram model (Kudo 2018, "Subword Regularization: Improving Neural Network
//! Translation Models with Multiple Subword Candidates"): pieces with log-probabilities;
//! a pre-token is segmented by Viterbi over the lattice of matching pieces, or sampled
//! from it (forward filtering, backward sampling, with scores scaled by `alpha`).
//!
//! Matches `tokenizers`: a character with no single-character piece becomes the unknown
//! piece with score `min_score - 10`, consecutive unknowns are fused into one, and among
//! paths of equal score the first found (earliest start for each end) is kept.

use std::collections::HashMap;

use crate::rng::SplitMix64;

/// Penalty below the lowest score given to an unknown character (as in SentencePiece).
pub(crate) const UNK_PENALTY: f64 = 10.0;

/// A byte trie over the pieces, for common-prefix search.
#[derive(Debug, Clone, Default)]
pub(crate) struct Trie {
    /// Per node: children sorted by byte, and the piece id ending here (or `u32::MAX`).
    children: Vec<Vec<(u8, u32)>>,
    ends: Vec<u32>,
}

impl Trie {
    pub(crate) fn new() -> Self {
        Trie { children: vec![Vec::new()], ends: vec![u32::MAX] }
    }

    pub(crate) fn insert(&mut self, piece: &[u8], id: u32) {
        let mut node = 0usize;
        for &b in piece {
            node = match self.children[node].binary_search_by_key(&b, |&(c, _)| c) {
                Ok(k) => self.children[node][k].1 as usize,
                Err(k) => {
                    let child = self.children.len() as u32;
                    self.children.push(Vec::new());
                    self.ends.push(u32::MAX);
                    self.children[node].insert(k, (b, child));
                    child as usize
                }
            };
        }
        self.ends[node] = id;
    }

    /// Calls `found(length, id)` for every piece that is a prefix of `text`, shortest first.
    #[inline]
    pub(crate) fn prefixes(&self, text: &[u8], mut found: impl FnMut(usize, u32)) {
        let mut node = 0usize;
        for (i, &b) in text.iter().enumerate() {
            let kids = &self.children[node];
            let next = if kids.len() < 8 {
                kids.iter().find(|&&(c, _)| c == b).map(|&(_, n)| n)
            } else {
                kids.binary_search_by_key(&b, |&(c, _)| c).ok().map(|k| kids[k].1)
            };
            let Some(next) = next else { return };
            node = next as usize;
            if self.ends[node] != u32::MAX {
                found(i + 1, self.ends[node]);
            }
        }
    }
}

/// A Unigram vocabulary.
#[derive(Debug, Clone)]
pub struct Unigram {
    /// Piece strings by id.
    pub(crate) pieces: Vec<String>,
    /// Log-probabilities by id.
    pub(crate) scores: Vec<f64>,
    pub(crate) ids: HashMap<String, u32>,
    pub(crate) unk_id: Option<u32>,
    pub(crate) byte_fallback: bool,
    unk_score: f64,
    trie: Trie,
}

impl Unigram {
    /// Builds a model from (piece, score) pairs by id.
    pub fn new(vocab: Vec<(String, f64)>, unk_id: Option<u32>, byte_fallback: bool) -> Self {
        let mut ids = HashMap::with_capacity(vocab.len());
        let mut trie = Trie::new();
        let mut min_score = f64::INFINITY;
        for (id, (piece, score)) in vocab.iter().enumerate() {
            // A repeated piece maps to its last id, as in `tokenizers`.
            ids.insert(piece.clone(), id as u32);
            trie.insert(piece.as_bytes(), id as u32);
            min_score = min_score.min(*score);
        }
        // The trie's id for a piece is the last one inserted; make it the `ids` one.
        let (pieces, scores): (Vec<String>, Vec<f64>) = vocab.into_iter().unzip();
        Unigram {
            pieces,
            scores,
            ids,
            unk_id,
            byte_fallback,
            unk_score: min_score - UNK_PENALTY,
            trie,
        }
    }

    /// Number of pieces.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Best segmentation of one pre-token (valid UTF-8), appending ids to `out`.
    pub(crate) fn encode_piece(&self, text: &str, out: &mut Vec<u32>) {
        let bytes = text.as_bytes();
        let n = bytes.len();
        // best[end] = (score, start, id) of the best path ending at byte `end`.
        let mut best: Vec<(f64, usize, u32)> = vec![(0.0, usize::MAX, u32::MAX); n + 1];
        let mut start = 0;
        while start < n {
            let base = best[start].0;
            let char_len = utf8_len(bytes[start]);
            let mut has_single = false;
            self.trie.prefixes(&bytes[start..], |len, id| {
                let candidate = self.scores[id as usize] + base;
                let node = &mut best[start + len];
                if node.1 == usize::MAX || candidate > node.0 {
                    *node = (candidate, start, id);
                }
                has_single |= len == char_len;
            });
            if !has_single {
                let candidate = self.unk_score + base;
                let node = &mut best[start + char_len];
                if node.1 == usize::MAX || candidate > node.0 {
                    *node = (candidate, start, self.unk_id.unwrap_or(u32::MAX));
                }
            }
            start += char_len;
        }
        self.backtrack(text, |end| (best[end].1, best[end].2), out);
    }

    /// Walks a path back from the end, fusing consecutive unknowns, and emits ids in order.
    fn backtrack(&self, text: &str, step: impl Fn(usize) -> (usize, u32), out: &mut Vec<u32>) {
        let mut end = text.len();
        let first = out.len();
        let mut in_unk = false;
        while end > 0 {
            let (start, id) = step(end);
            let is_unk = id == u32::MAX || Some(id) == self.unk_id;
            if is_unk {
                if !in_unk {
                    if let Some(unk) = self.unk_id {
                        out.push(unk);
                    }
                }
                in_unk = true;
            } else {
                // `tokenizers` maps the matched string back through its piece map.
                out.push(self.ids.get(&text[start..end]).copied().unwrap_or(id));
                in_unk = false;
            }
            end = start;
        }
        out[first..].reverse();
    }

    /// The segmentation lattice of one pre-token: for each byte position, the edges
    /// (start, id, score) of the pieces ending there; an unknown character is one edge.
    fn lattice(&self, bytes: &[u8]) -> Vec<Vec<(usize, u32, f64)>> {
        let n = bytes.len();
        let mut ending: Vec<Vec<(usize, u32, f64)>> = vec![Vec::new(); n + 1];
        let mut start = 0;
        while start < n {
            let char_len = utf8_len(bytes[start]);
            let mut has_single = false;
            self.trie.prefixes(&bytes[start..], |len, id| {
                ending[start + len].push((start, id, self.scores[id as usize]));
                has_single |= len == char_len;
            });
            if !has_single {
                ending[start + char_len].push((start, self.unk_id.unwrap_or(u32::MAX), self.unk_score));
            }
            start += char_len;
        }
        ending
    }

    /// Samples a segmentation from p(x) ∝ exp(alpha * score(x)) over the full lattice
    /// (forward filtering, backward sampling), appending ids to `out`.
    pub(crate) fn sample_piece(&self, text: &str, alpha: f64, rng: &mut SplitMix64, out: &mut Vec<u32>) {
        let n = text.len();
        let ending = self.lattice(text.as_bytes());
        // alpha_f[pos] = log sum over paths from 0 to pos of exp(alpha * score).
        let mut forward = vec![f64::NEG_INFINITY; n + 1];
        forward[0] = 0.0;
        for end in 1..=n {
            let mut acc = f64::NEG_INFINITY;
            for &(s, _, score) in &ending[end] {
                acc = log_add(acc, forward[s] + alpha * score);
            }
            forward[end] = acc;
        }
        let mut chosen: Vec<(usize, u32)> = vec![(0, 0); n + 1];
        let mut end = n;
        while end > 0 {
            let weights: Vec<f64> = ending[end]
                .iter()
                .map(|&(s, _, score)| (forward[s] + alpha * score - forward[end]).exp())
                .collect();
            let total: f64 = weights.iter().sum();
            let mut r = rng.next_f64() * total;
            let mut pick = ending[end].len() - 1;
            for (k, w) in weights.iter().enumerate() {
                if r < *w {
                    pick = k;
                    break;
                }
                r -= w;
            }
            let (s, id, _) = ending[end][pick];
            chosen[end] = (s, id);
            end = s;
        }
        self.backtrack(text, |e| chosen[e], out);
    }

    /// Samples one of the `nbest` best segmentations, each with probability
    /// proportional to exp(alpha * score), as SentencePiece's n-best sampling does
    /// (Kudo 2018, section 2.2), appending ids to `out`. `nbest` 1 is Viterbi.
    pub(crate) fn sample_nbest_piece(
        &self,
        text: &str,
        nbest: usize,
        alpha: f64,
        rng: &mut SplitMix64,
        out: &mut Vec<u32>,
    ) {
        let n = text.len();
        let ending = self.lattice(text.as_bytes());
        // best[pos]: up to `nbest` partial paths ending at pos, best first, as
        // (score, start, id, rank of the path it extends at `start`).
        let mut best: Vec<Vec<(f64, usize, u32, usize)>> = vec![Vec::new(); n + 1];
        best[0].push((0.0, 0, u32::MAX, 0));
        for end in 1..=n {
            let mut candidates: Vec<(f64, usize, u32, usize)> = ending[end]
                .iter()
                .flat_map(|&(start, id, score)| {
                    best[start]
                        .iter()
                        .enumerate()
                        .map(move |(rank, path)| (path.0 + score, start, id, rank))
                })
                .collect();
            // Ties keep lattice order, so the result does not depend on the sort.
            candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
            candidates.truncate(nbest.max(1));
            best[end] = candidates;
        }
        let finals = &best[n];
        let top = finals.first().map_or(0.0, |path| path.0);
        let weights: Vec<f64> = finals.iter().map(|path| (alpha * (path.0 - top)).exp()).collect();
        let mut r = rng.next_f64() * weights.iter().sum::<f64>();
        let mut rank = weights.len().saturating_sub(1);
        for (k, w) in weights.iter().enumerate() {
            if r < *w {
                rank = k;
                break;
            }
            r -= w;
        }
        let mut chosen: Vec<(usize, u32)> = vec![(0, 0); n + 1];
        let mut end = n;
        while end > 0 {
            let (_, start, id, previous) = best[end][rank];
            chosen[end] = (start, id);
            rank = previous;
            end = start;
        }
        self.backtrack(text, |e| chosen[e], out);
    }

}

/// log(exp(a) + exp(b)) without overflow.
#[inline]
pub(crate) fn log_add(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (lo - hi).exp().ln_1p()
}

/// Length of the UTF-8 sequence that starts with byte `b`.
#[inline]
pub(crate) fn utf8_len(b: u8) -> usize {
    match b {
        0x00..=0x7F => 1,
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Unigram {
        let vocab = [("<unk>", 0.0), ("a", -2.0), ("b", -2.0), ("ab", -3.0), ("abc", -10.0), ("c", -3.0)];
        Unigram::new(vocab.iter().map(|&(p, s)| (p.to_string(), s)).collect(), Some(0), false)
    }

    #[test]
    fn viterbi_picks_the_best_path_and_fuses_unknowns() {
        let model = toy();
        let mut out = Vec::new();
        model.encode_piece("abcxyab", &mut out);
        // ab (-3) + c (-3) = -6 beats abc (-10) and a + b + c (-7); xy is one fused unknown.
        assert_eq!(out, [3, 5, 0, 3]);
    }

    #[test]
    fn nbest_sampling_draws_the_best_segmentations_by_their_scores() {
        let model = toy();
        let segment = |rng: &mut SplitMix64, nbest: usize| {
            let mut out = Vec::new();
            model.sample_nbest_piece("abc", nbest, 0.5, rng, &mut out);
            out
        };
        let mut rng = SplitMix64::new(3);
        let mut viterbi = Vec::new();
        model.encode_piece("abc", &mut viterbi);
        assert_eq!(segment(&mut rng, 1), viterbi);
        // The two best: ab + c (-6) and a + b + c (-7); abc (-10) is third.
        // p(ab c) = 1 / (1 + e^(0.5 * (-7 + 6))) = 0.6225.
        let draws = 20_000;
        let mut first = 0;
        for _ in 0..draws {
            match segment(&mut rng, 2).as_slice() {
                [3, 5] => first += 1,
                [1, 2, 5] => {}
                other => panic!("not one of the two best: {other:?}"),
            }
        }
        let expected = 1.0 / (1.0 + (-0.5_f64).exp());
        let share = first as f64 / draws as f64;
        // Five standard deviations of a binomial share.
        let sd = (expected * (1.0 - expected) / draws as f64).sqrt();
        assert!((share - expected).abs() < 5.0 * sd, "{share} vs {expected}");
    }

    #[test]
    fn sampling_covers_the_text() {
        let model = toy();
        let mut rng = SplitMix64::new(7);
        for _ in 0..20 {
            let mut out = Vec::new();
            model.sample_piece("abcab", 0.5, &mut rng, &mut out);
            let text: String = out.iter().map(|&id| model.pieces[id as usize].as_str()).collect();
            assert_eq!(text, "abcab");
        }
    }
}
