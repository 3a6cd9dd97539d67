//! Interpolated Witten-Bell smoothing (Witten and Bell 1991; Chen and Goodman
//! 1998, eq. 16 and sec. 2.3).
//!
//! p(w | h) = (c(h w) + N1+(h .) p(w | h')) / (c(h) + N1+(h .)), on raw counts at
//! every order, so alpha(h w) = c(h w) / (c(h) + N1+(h .)) and
//! gamma(h) = N1+(h .) / (c(h) + N1+(h .)). Unigrams interpolate with uniform.

use super::adjust::OrderCounts;
use super::interpolate::{estimate_from_raw, OrderEstimate};

/// Witten-Bell estimates for every order.
pub(crate) fn estimate(
    orders: &[OrderCounts],
    contexts: &[Vec<u32>],
    keep: &[Vec<bool>],
    interpolate_unigrams: bool,
) -> Vec<OrderEstimate> {
    (1..=orders.len())
        .map(|n| {
            estimate_from_raw(
                orders,
                contexts,
                n,
                &keep[n - 1],
                interpolate_unigrams,
                |count, h| count as f64 / (h.count + h.types) as f64,
                |h| h.types as f64 / (h.count + h.types) as f64,
            )
        })
        .collect()
}
