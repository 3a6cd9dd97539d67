//! Additive (add-k) smoothing, interpolated so that an ARPA file holds it exactly.
//!
//! At unigrams this is textbook add-k: p(w) = (c(w) + k) / (N + k V), V counting
//! every word but `<s>` (Chen and Goodman 1998, eq. 8; k = 1 is Laplace).
//! Above unigrams the k V pseudo-counts of a context are spread by the lower
//! order instead of uniformly: p(w | h) = (c(h w) + k V p(w | h')) / (c(h) + k V),
//! i.e. alpha(h w) = c(h w) / (c(h) + k V) and gamma(h) = k V / (c(h) + k V). The
//! uniform spread at every order cannot be written as a back-off model without
//! listing all V^n n-grams; this form can, and it sums to one.

use super::adjust::OrderCounts;
use super::interpolate::{estimate_from_raw, OrderEstimate};

/// Add-k estimates for every order; `vocab_size` counts every word but `<s>`.
pub(crate) fn estimate(
    orders: &[OrderCounts],
    contexts: &[Vec<u32>],
    keep: &[Vec<bool>],
    interpolate_unigrams: bool,
    k: f64,
    vocab_size: usize,
) -> Vec<OrderEstimate> {
    let pseudo = k * vocab_size as f64;
    (1..=orders.len())
        .map(|n| {
            estimate_from_raw(
                orders,
                contexts,
                n,
                &keep[n - 1],
                interpolate_unigrams,
                |count, h| count as f64 / (h.count as f64 + pseudo),
                |h| pseudo / (h.count as f64 + pseudo),
            )
        })
        .collect()
}
