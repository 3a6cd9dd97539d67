//! Minimum Bayes risk decoding (Kumar and Byrne 2004; sampling-based as in Eikema and
//! Aziz 2020, "Is MAP Decoding All You Need?"): draw N samples, use them both as the
//! hypotheses and as pseudo-references, and return the hypothesis with the highest
//! expected utility, (1 / (N − 1)) Σ_{j ≠ i} u(yᵢ, yⱼ).
//!
//! The hypotheses may be a subset of the samples (the K most probable ones) while every
//! sample still serves as a pseudo-reference: more evidence for the expectation without
//! more hypotheses to rank.
//!
//! Utilities: [`ngram_f_score`], an n-gram F-score over any symbols (clipped n-gram
//! matches, precision and recall averaged as F_β over orders 1..=n), on token ids a
//! BLEU/ROUGE-like overlap; [`chrf`] (Popović 2015), the same over characters with
//! n = 6 and β = 2, whitespace removed, as sacreBLEU computes chrF; [`rouge1`] (Lin
//! 2004), the unigram F₁ over whitespace-separated words; and [`sentence_bleu`]
//! (Papineni et al. 2002) on words, with add-one smoothing of the 2- to 4-gram
//! precisions (Lin and Och 2004) so that one missing 4-gram does not zero a sentence.

use std::collections::HashMap;
use std::hash::Hash;

use super::sample::generate;
use super::{DecodeSettings, Generation};
use crate::lm::LanguageModel;
use crate::{Error, Result};

/// The outcome of MBR decoding.
#[derive(Debug, Clone)]
pub struct MbrResult {
    /// Index of the chosen candidate.
    pub best: usize,
    /// Every candidate, in sampling order.
    pub candidates: Vec<Generation>,
    /// Expected utility of each candidate against the others.
    pub expected_utility: Vec<f64>,
    /// Indices of the candidates eligible as the answer, most probable first.
    pub hypotheses: Vec<usize>,
}

impl MbrResult {
    /// The chosen candidate.
    pub fn chosen(&self) -> &Generation {
        &self.candidates[self.best]
    }
}

fn ngram_counts<T: Eq + Hash + Clone>(symbols: &[T], n: usize) -> HashMap<&[T], usize> {
    let mut counts = HashMap::new();
    for window in symbols.windows(n) {
        *counts.entry(window).or_insert(0) += 1;
    }
    counts
}

/// The n-gram F_β score of `hypothesis` against `reference`, averaged over orders
/// 1..=`max_n` that either side has; 1 for two empty sequences.
pub fn ngram_f_score<T: Eq + Hash + Clone>(hypothesis: &[T], reference: &[T], max_n: usize, beta: f64) -> f64 {
    if hypothesis.is_empty() && reference.is_empty() {
        return 1.0;
    }
    let beta2 = beta * beta;
    let mut total = 0.0;
    let mut orders = 0;
    for n in 1..=max_n.max(1) {
        let hyp = ngram_counts(hypothesis, n);
        let refs = ngram_counts(reference, n);
        let hyp_total: usize = hyp.values().sum();
        let ref_total: usize = refs.values().sum();
        if hyp_total == 0 && ref_total == 0 {
            continue;
        }
        orders += 1;
        let matches: usize = hyp
            .iter()
            .map(|(gram, &c)| c.min(refs.get(gram).copied().unwrap_or(0)))
            .sum();
        if matches == 0 {
            continue;
        }
        let precision = matches as f64 / hyp_total as f64;
        let recall = matches as f64 / ref_total as f64;
        total += (1.0 + beta2) * precision * recall / (beta2 * precision + recall);
    }
    if orders == 0 {
        0.0
    } else {
        total / orders as f64
    }
}

/// A text-level utility for MBR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Utility {
    /// Unigram F₁ over words.
    Rouge1,
    /// Smoothed sentence BLEU-4 over words.
    Bleu,
    /// Character 6-gram F₂.
    Chrf,
}

impl Utility {
    /// Parses `rouge1`, `bleu` or `chrf`.
    pub fn parse(name: &str) -> Result<Utility> {
        match name {
            "rouge1" => Ok(Utility::Rouge1),
            "bleu" => Ok(Utility::Bleu),
            "chrf" => Ok(Utility::Chrf),
            other => Err(Error::Invalid(format!(
                "unknown MBR utility `{other}`; use rouge1, bleu or chrf"
            ))),
        }
    }

    /// u(hypothesis, reference), in [0, 1].
    pub fn score(self, hypothesis: &str, reference: &str) -> f64 {
        match self {
            Utility::Rouge1 => rouge1(hypothesis, reference),
            Utility::Bleu => sentence_bleu(hypothesis, reference),
            Utility::Chrf => chrf(hypothesis, reference),
        }
    }
}

/// ROUGE-1 F₁: clipped unigram matches over whitespace-separated words.
pub fn rouge1(hypothesis: &str, reference: &str) -> f64 {
    let hyp: Vec<&str> = hypothesis.split_whitespace().collect();
    let refs: Vec<&str> = reference.split_whitespace().collect();
    ngram_f_score(&hyp, &refs, 1, 1.0)
}

/// Sentence BLEU-4 on words: the geometric mean of clipped 1- to 4-gram precisions,
/// those of order 2 and up add-one smoothed, times the brevity penalty
/// min(1, exp(1 − r / c)). 1 for two empty texts, 0 when either alone is empty.
pub fn sentence_bleu(hypothesis: &str, reference: &str) -> f64 {
    let hyp: Vec<&str> = hypothesis.split_whitespace().collect();
    let refs: Vec<&str> = reference.split_whitespace().collect();
    if hyp.is_empty() || refs.is_empty() {
        return if hyp.is_empty() && refs.is_empty() { 1.0 } else { 0.0 };
    }
    let mut log_sum = 0.0;
    for n in 1..=4 {
        let hyp_counts = ngram_counts(&hyp, n);
        let ref_counts = ngram_counts(&refs, n);
        let total: usize = hyp_counts.values().sum();
        let matches: usize = hyp_counts
            .iter()
            .map(|(gram, &c)| c.min(ref_counts.get(gram).copied().unwrap_or(0)))
            .sum();
        let (matches, total) = if n == 1 {
            (matches as f64, total as f64)
        } else {
            (matches as f64 + 1.0, total as f64 + 1.0)
        };
        if matches == 0.0 {
            return 0.0;
        }
        log_sum += (matches / total).ln() / 4.0;
    }
    let (c, r) = (hyp.len() as f64, refs.len() as f64);
    let brevity = if c >= r { 1.0 } else { (1.0 - r / c).exp() };
    brevity * log_sum.exp()
}

/// chrF (character 6-gram F₂, whitespace removed), in [0, 1].
pub fn chrf(hypothesis: &str, reference: &str) -> f64 {
    let hyp: Vec<char> = hypothesis.chars().filter(|c| !c.is_whitespace()).collect();
    let refs: Vec<char> = reference.chars().filter(|c| !c.is_whitespace()).collect();
    ngram_f_score(&hyp, &refs, 6, 2.0)
}

/// The index with the highest expected utility against the others (ties: the first)
/// and every expected utility.
pub fn mbr_select<T>(items: &[T], utility: &dyn Fn(&T, &T) -> f64) -> (usize, Vec<f64>) {
    let n = items.len();
    let expected: Vec<f64> = (0..n)
        .map(|i| {
            if n < 2 {
                return 0.0;
            }
            let sum: f64 = (0..n).filter(|&j| j != i).map(|j| utility(&items[i], &items[j])).sum();
            sum / (n - 1) as f64
        })
        .collect();
    let mut best = 0;
    for (i, &u) in expected.iter().enumerate() {
        if u > expected[best] {
            best = i;
        }
    }
    (best, expected)
}

/// Samples `num_candidates` continuations with `settings` (as one batch), scores each
/// by its expected `utility` against the other samples, and picks the best among the
/// `num_hypotheses` most probable samples (all of them when `None`). `Generation::score`
/// of the candidates becomes their expected utility.
pub fn mbr<M: LanguageModel>(
    model: &M,
    prompt: &[u32],
    num_candidates: usize,
    num_hypotheses: Option<usize>,
    settings: &DecodeSettings,
    utility: &dyn Fn(&[u32], &[u32]) -> f64,
) -> Result<MbrResult> {
    if num_candidates == 0 {
        return Err(Error::Invalid("MBR needs at least one candidate".into()));
    }
    let num_hypotheses = num_hypotheses.unwrap_or(num_candidates);
    if num_hypotheses == 0 || num_hypotheses > num_candidates {
        return Err(Error::Invalid(format!(
            "MBR needs between 1 and {num_candidates} hypotheses (the samples), got {num_hypotheses}"
        )));
    }
    let mut candidates = generate(model, prompt, settings, num_candidates)?;
    let expected_utility = {
        let ids: Vec<&[u32]> = candidates.iter().map(|g| g.tokens.as_slice()).collect();
        mbr_select(&ids, &|a: &&[u32], b: &&[u32]| utility(a, b)).1
    };
    // The most probable samples under the model; ties by sampling order.
    let mut hypotheses: Vec<usize> = (0..num_candidates).collect();
    hypotheses.sort_by(|&a, &b| {
        candidates[b].logprob().total_cmp(&candidates[a].logprob()).then(a.cmp(&b))
    });
    hypotheses.truncate(num_hypotheses);
    // Highest expected utility; ties go to the earlier sample.
    let best = hypotheses
        .iter()
        .copied()
        .max_by(|&a, &b| expected_utility[a].total_cmp(&expected_utility[b]).then(b.cmp(&a)))
        .expect("at least one hypothesis");
    for (g, &u) in candidates.iter_mut().zip(&expected_utility) {
        g.score = u as f32;
    }
    Ok(MbrResult {
        best,
        candidates,
        expected_utility,
        hypotheses,
    })
}
