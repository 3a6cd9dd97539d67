//! Maximum-likelihood estimates, unsmoothed: p(w | h) = c(h w) / c(h).
//!
//! alpha(h w) = c(h w) / c(h) and gamma(h) = 0, so a word never seen after a
//! seen context gets probability 0, written -99 in the ARPA file (the backoff of
//! every context is -99); only a context that was never seen backs off to the
//! lower order. `<unk>` gets -99. Useful as the baseline that shows why smoothing
//! is needed: held-out perplexity is effectively infinite.

use super::adjust::OrderCounts;
use super::interpolate::{estimate_from_raw, OrderEstimate};

/// Maximum-likelihood estimates for every order.
pub(crate) fn estimate(
    orders: &[OrderCounts],
    contexts: &[Vec<u32>],
    keep: &[Vec<bool>],
) -> Vec<OrderEstimate> {
    (1..=orders.len())
        .map(|n| {
            estimate_from_raw(
                orders,
                contexts,
                n,
                &keep[n - 1],
                true,
                |count, h| count as f64 / h.count as f64,
                |_| 0.0,
            )
        })
        .collect()
}
