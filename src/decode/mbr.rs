//! Minimum Bayes risk decoding (Kumar and Byrne 2004; sampling-based as in Eikema and
//! Aziz 2020, "Is MAP Decoding All You Need?"): draw N samples, use them both as the
//! hypotheses and as pseudo-references, and return the hypothesis with the highest
//! expected utility, (1 / (N − 1)) Σ_{j ≠ i} u(yᵢ, yⱼ).
//!
//! Utilities: [`ngram_f_score`], an n-gram F-score over any symbols (clipped n-gram
//! matches, precision and recall averaged as F_β over orders 1..=n), on token ids a
//! BLEU/ROUGE-like overlap; and [`chrf`] (Popović 2015), the same over characters with
//! n = 6 and β = 2, whitespace removed, as sacreBLEU computes chrF.

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

/// Samples `num_candidates` continuations with `settings` (as one batch) and picks the
/// one of highest expected `utility` (on generated token ids). `Generation::score` of
/// the candidates becomes their expected utility.
pub fn mbr<M: LanguageModel>(
    model: &M,
    prompt: &[u32],
    num_candidates: usize,
    settings: &DecodeSettings,
    utility: &dyn Fn(&[u32], &[u32]) -> f64,
) -> Result<MbrResult> {
    if num_candidates == 0 {
        return Err(Error::Invalid("MBR needs at least one candidate".into()));
    }
    let mut candidates = generate(model, prompt, settings, num_candidates)?;
    let (best, expected_utility) = {
        let ids: Vec<&[u32]> = candidates.iter().map(|g| g.tokens.as_slice()).collect();
        mbr_select(&ids, &|a: &&[u32], b: &&[u32]| utility(a, b))
    };
    for (g, &u) in candidates.iter_mut().zip(&expected_utility) {
        g.score = u as f32;
    }
    Ok(MbrResult {
        best,
        candidates,
        expected_utility,
    })
}
