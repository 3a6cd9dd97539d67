//! Interpolation: from per-order estimates to the probabilities and backoffs of
//! an ARPA model.
//!
//! Every smoothing method here is an interpolated model
//! p(w | h) = alpha(h w) + gamma(h) p(w | h')   (Chen and Goodman 1998, eq. 28 for
//! modified Kneser-Ney), where h' drops the oldest word of h and unigrams
//! interpolate with the uniform distribution 1/V over every word but `<s>`.
//! alpha(h w) is zero when `h w` was not seen, so for such a word
//! p(w | h) = gamma(h) p(w | h'): gamma(h) is exactly the ARPA backoff weight of
//! h, and the ARPA file stores p(w | h) for the seen n-grams and gamma(h) as the
//! backoff of each context. The recursion runs in f32 in lmplz's order of
//! operations, and probabilities are printed as log10 of f32, so the output can
//! match lmplz's to the last digit.
//!
//! Input: the count tables (for the n-grams), their suffix rows, one
//! [`OrderEstimate`] per order, and which n-grams survive pruning. Output: an
//! [`Arpa`] holding the surviving n-grams in suffix order.

use super::adjust::OrderCounts;
use super::arpa::{Arpa, ArpaOrder};
use super::vocab::{BOS, EOS, UNK};

/// One order's terms of the interpolation recursion.
pub(crate) struct OrderEstimate {
    /// alpha(h w) per n-gram: the part of p(w | h) that does not come from the
    /// lower order.
    pub alpha: Vec<f32>,
    /// Per n-gram, the weight of the lower order p(w | h'): gamma(h), except for
    /// the unigram conventions of [`unigram_conventions`].
    pub lower_weight: Vec<f32>,
    /// gamma(h) per context h, indexed by h's row in the order below (one entry,
    /// the empty context, for unigrams); 1 where h has no extension.
    pub context_gamma: Vec<f32>,
}

impl OrderEstimate {
    /// An estimate from alpha per n-gram and gamma per context, with
    /// `lower_weight` set to the gamma of each n-gram's context.
    pub(crate) fn new(alpha: Vec<f32>, context_gamma: Vec<f32>, contexts: &[u32]) -> Self {
        let lower_weight = contexts
            .iter()
            .map(|&c| context_gamma[c as usize])
            .collect();
        OrderEstimate {
            alpha,
            lower_weight,
            context_gamma,
        }
    }
}

/// The unigram conventions shared by every method (as lmplz): `<s>` gets
/// probability 1 (printed as log10 0; it is never predicted, only conditioned
/// on); `<unk>`, never seen in training, is a zeroton that gets gamma / V from the
/// uniform distribution; without unigram interpolation (lmplz
/// `--interpolate_unigrams 0`, SRILM's behaviour) no unigram is interpolated and
/// `<unk>` takes all the left-over mass gamma.
pub(crate) fn unigram_conventions(unigrams: &mut OrderEstimate, interpolate_unigrams: bool) {
    let gamma = unigrams.context_gamma[0];
    let weight = if interpolate_unigrams { gamma } else { 0.0 };
    unigrams.lower_weight.fill(weight);
    unigrams.alpha[UNK as usize] = if interpolate_unigrams { 0.0 } else { gamma };
    unigrams.alpha[BOS as usize] = 1.0;
    unigrams.lower_weight[BOS as usize] = 0.0;
}

/// Moves the alpha of pruned n-grams into their context's gamma, so that each
/// context still sums to one (what lmplz does for Kneser-Ney); `keep[row]` says
/// whether an n-gram survives.
pub(crate) fn move_pruned_mass(estimate: &mut OrderEstimate, contexts: &[u32], keep: &[bool]) {
    for (row, &kept) in keep.iter().enumerate() {
        if !kept {
            estimate.context_gamma[contexts[row] as usize] += estimate.alpha[row];
        }
    }
    for (weight, &context) in estimate.lower_weight.iter_mut().zip(contexts) {
        *weight = estimate.context_gamma[context as usize];
    }
}

/// log10 of a probability or weight in f32, with 0 written as -99 (the ARPA
/// convention for "impossible").
fn log10_or_floor(value: f32) -> f32 {
    let log = value.log10();
    if log.is_finite() {
        log
    } else {
        -99.0
    }
}

/// Runs the recursion over all orders and assembles the ARPA model of the
/// n-grams that `keep` retains (an empty `keep[n]` keeps every n-gram of order
/// n+1). `uniform` is 1/V.
pub(crate) fn interpolate(
    orders: &[OrderCounts],
    suffixes: &[Vec<u32>],
    estimates: &[OrderEstimate],
    keep: &[Vec<bool>],
    uniform: f32,
    vocab: Vec<String>,
) -> Arpa {
    let top = orders.len();
    let mut lower_probs: Vec<f32> = Vec::new();
    let mut arpa_orders = Vec::with_capacity(top);
    for n in 1..=top {
        let table = &orders[n - 1];
        let estimate = &estimates[n - 1];
        let probs: Vec<f32> = (0..table.len())
            .map(|row| {
                let lower = if n == 1 {
                    uniform
                } else {
                    lower_probs[suffixes[n - 1][row] as usize]
                };
                estimate.alpha[row] + estimate.lower_weight[row] * lower
            })
            .collect();

        let mut out = ArpaOrder {
            order: n,
            words: Vec::with_capacity(table.words.len()),
            log10_prob: Vec::with_capacity(table.len()),
            log10_backoff: Vec::with_capacity(table.len()),
        };
        for (row, &prob) in probs.iter().enumerate() {
            if keep.get(n - 1).is_some_and(|k| !k.is_empty() && !k[row]) {
                continue;
            }
            let ngram = table.ngram(row);
            let last = *ngram.last().expect("n >= 1");
            let backoff = if n < top && last != UNK && last != EOS {
                estimates[n].context_gamma[row]
            } else {
                1.0
            };
            out.words.extend_from_slice(ngram);
            out.log10_prob.push(log10_or_floor(prob).min(0.0));
            out.log10_backoff.push(if n < top {
                log10_or_floor(backoff) + 0.0
            } else {
                0.0
            });
        }
        // Pruning keeps fewer rows than reserved.
        out.words.shrink_to_fit();
        out.log10_prob.shrink_to_fit();
        out.log10_backoff.shrink_to_fit();
        arpa_orders.push(out);
        lower_probs = probs;
    }
    Arpa {
        vocab,
        orders: arpa_orders,
    }
}

/// Sums over the extensions of one context: c(h) = sum_w c(h w) of raw counts,
/// and N1+(h .), the number of distinct words seen after h.
#[derive(Clone, Copy, Default)]
pub(crate) struct ContextTotals {
    pub count: u64,
    pub types: u64,
}

/// An order's estimate from raw counts: `alpha(c(h w), totals of h)` per n-gram
/// and `gamma(totals of h)` per context (1 for a row that is no context), in f64
/// rounded to f32. Pruned n-grams (where `keep` is non-empty and false) move
/// their alpha into gamma; unigrams get [`unigram_conventions`].
pub(crate) fn estimate_from_raw(
    orders: &[OrderCounts],
    contexts: &[Vec<u32>],
    n: usize,
    keep: &[bool],
    interpolate_unigrams: bool,
    alpha: impl Fn(u64, ContextTotals) -> f64,
    gamma: impl Fn(ContextTotals) -> f64,
) -> OrderEstimate {
    let table = &orders[n - 1];
    let context_of = &contexts[n - 1];
    let context_count = if n == 1 { 1 } else { orders[n - 2].len() };
    let mut totals = vec![ContextTotals::default(); context_count];
    for (row, &context) in context_of.iter().enumerate() {
        let entry = &mut totals[context as usize];
        entry.count += table.raw[row];
        entry.types += u64::from(table.raw[row] > 0);
    }
    let alphas = (0..table.len())
        .map(|row| alpha(table.raw[row], totals[context_of[row] as usize]) as f32)
        .collect();
    let gammas = totals
        .iter()
        .map(|&t| if t.count == 0 { 1.0 } else { gamma(t) as f32 })
        .collect();
    let mut estimate = OrderEstimate::new(alphas, gammas, context_of);
    if n == 1 {
        unigram_conventions(&mut estimate, interpolate_unigrams);
    } else if !keep.is_empty() {
        move_pruned_mass(&mut estimate, context_of, keep);
    }
    estimate
}
