//! Jelinek-Mercer smoothing: linear interpolation of maximum-likelihood
//! estimates with one weight per order, tuned on held-out text by EM
//! (Jelinek and Mercer 1980; Chen and Goodman 1998, eq. 11 and sec. 2.2).
//!
//! p_n(w | h) = lambda_n c(h w) / c(h) + (1 - lambda_n) p_{n-1}(w | h') for a seen
//! context h, p_n(w | h) = p_{n-1}(w | h') otherwise, and p_0 = 1/V. So
//! alpha(h w) = lambda_n c(h w) / c(h) and gamma(h) = 1 - lambda_n.
//!
//! EM treats each held-out token as drawn from one level of the recursion: the
//! posterior of level n is its share of p(w | h), and lambda_n becomes the
//! expected number of tokens that stopped at level n over those that reached it.
//! Held-out tokens outside the vocabulary are skipped and reset the context, as
//! in `query`.

use std::io::BufRead;
use std::path::Path;

use super::adjust::OrderCounts;
use super::hash::NgramIndex;
use super::interpolate::{estimate_from_raw, OrderEstimate};
use super::vocab::{words, LineReader, Vocabulary, BOS, EOS};
use crate::Result;

/// lambda stays inside [MIN_LAMBDA, 1 - MIN_LAMBDA] so every order keeps some
/// weight on the one below (the unigram level must leave mass for `<unk>`).
const MIN_LAMBDA: f64 = 1e-3;
const MAX_ITERATIONS: usize = 200;

/// Jelinek-Mercer estimates for every order with weights `lambdas` (index n-1).
pub(crate) fn estimate(
    orders: &[OrderCounts],
    contexts: &[Vec<u32>],
    keep: &[Vec<bool>],
    interpolate_unigrams: bool,
    lambdas: &[f64],
) -> Vec<OrderEstimate> {
    (1..=orders.len())
        .map(|n| {
            let lambda = lambdas[n - 1];
            estimate_from_raw(
                orders,
                contexts,
                n,
                &keep[n - 1],
                interpolate_unigrams,
                |count, h| lambda * count as f64 / h.count as f64,
                |_| 1.0 - lambda,
            )
        })
        .collect()
}

/// The outcome of tuning: weights per order and the held-out data they fit.
pub(crate) struct Tuned {
    pub lambdas: Vec<f64>,
    pub tokens: usize,
}

/// Tunes lambda per order by EM on `heldout` (named `source` in errors), given
/// the count tables and vocabulary of the training text.
pub(crate) fn tune<R: BufRead>(
    orders: &[OrderCounts],
    contexts: &[Vec<u32>],
    vocab: &Vocabulary,
    heldout: R,
    source: &Path,
) -> Result<Tuned> {
    let top = orders.len();
    let vocab_size = vocab.len() - 1; // every word but <s>
    let indexes: Vec<NgramIndex> = orders
        .iter()
        .map(|t| NgramIndex::new(&t.words, t.order))
        .collect();
    // c(h) = sum of raw counts of h's extensions, per context row, per order.
    let totals: Vec<Vec<u64>> = (1..=top)
        .map(|n| {
            let size = if n == 1 { 1 } else { orders[n - 2].len() };
            let mut sums = vec![0_u64; size];
            for (row, &c) in contexts[n - 1].iter().enumerate() {
                sums[c as usize] += orders[n - 1].raw[row];
            }
            sums
        })
        .collect();

    // Per held-out token, the ML estimate a_n of each active level n >= 1
    // (levels stop at the first unseen context); level 0 is uniform.
    let mut levels: Vec<Vec<f64>> = Vec::new();
    let mut lines = LineReader::new(heldout, source);
    let mut history: Vec<u32> = Vec::new();
    let mut ngram: Vec<u32> = Vec::with_capacity(top);
    while let Some((_, line)) = lines.next_line()? {
        history.clear();
        history.push(BOS);
        let ids = words(line)
            .map(|w| vocab.id(w.as_bytes()).filter(|&id| id > EOS))
            .chain(std::iter::once(Some(EOS)));
        for id in ids {
            let Some(word) = id else {
                history.clear();
                continue;
            };
            let mut estimates = Vec::with_capacity(top);
            for n in 1..=top.min(history.len() + 1) {
                let context = &history[history.len() + 1 - n..];
                let context_row = if n == 1 {
                    Some(0)
                } else {
                    indexes[n - 2].find(&orders[n - 2].words, context)
                };
                let Some(context_row) = context_row else {
                    break;
                };
                let total = totals[n - 1][context_row];
                if total == 0 {
                    break;
                }
                ngram.clear();
                ngram.extend_from_slice(context);
                ngram.push(word);
                let count = indexes[n - 1]
                    .find(&orders[n - 1].words, &ngram)
                    .map_or(0, |row| orders[n - 1].raw[row]);
                estimates.push(count as f64 / total as f64);
            }
            levels.push(estimates);
            history.push(word);
            if history.len() > top.saturating_sub(1) {
                history.remove(0);
            }
        }
    }

    let uniform = 1.0 / vocab_size as f64;
    let mut lambdas = vec![0.5; top];
    for _ in 0..MAX_ITERATIONS {
        let mut stopped = vec![0.0; top];
        let mut reached = vec![0.0; top];
        let mut weights = vec![0.0; top + 1];
        for estimates in &levels {
            // weights[n]: prior probability of stopping at level n (0 = uniform).
            let mut rest = 1.0;
            for n in (1..=estimates.len()).rev() {
                weights[n] = rest * lambdas[n - 1];
                rest *= 1.0 - lambdas[n - 1];
            }
            weights[0] = rest;
            let p: f64 = weights[0] * uniform
                + (1..=estimates.len())
                    .map(|n| weights[n] * estimates[n - 1])
                    .sum::<f64>();
            let mut below = weights[0] * uniform / p;
            for n in 1..=estimates.len() {
                let posterior = weights[n] * estimates[n - 1] / p;
                below += posterior;
                stopped[n - 1] += posterior;
                reached[n - 1] += below;
            }
        }
        let mut change: f64 = 0.0;
        for n in 0..top {
            if reached[n] > 0.0 {
                let next = (stopped[n] / reached[n]).clamp(MIN_LAMBDA, 1.0 - MIN_LAMBDA);
                change = change.max((next - lambdas[n]).abs());
                lambdas[n] = next;
            }
        }
        if change < 1e-7 {
            break;
        }
    }
    Ok(Tuned {
        lambdas,
        tokens: levels.len(),
    })
}
