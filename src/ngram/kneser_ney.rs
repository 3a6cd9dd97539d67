//! Interpolated (modified) Kneser-Ney estimates, as lmplz computes them.
//!
//! Input: adjusted counts a(h w) per order, each n-gram's context row, one
//! [`Discount`] per order, and which n-grams survive pruning. Output: the
//! [`OrderEstimate`]s of Chen and Goodman (1998), eqs. 17 and 26-28:
//! alpha(h w) = (a(h w) - D(a(h w))) / S(h), with S(h) = sum_w a(h w), and
//! gamma(h) = (D1 N1(h .) + D2 N2(h .) + D3+ N3+(h .)) / S(h).
//! Plain Kneser-Ney is the same with D1 = D2 = D3+.
//!
//! Pruning as lmplz: S(h) still sums every extension of h, N_k(h .) counts only
//! the surviving ones, and the whole adjusted count of each pruned extension is
//! added to gamma's numerator, so the context still sums to one. All arithmetic
//! is f32 in lmplz's order.

use super::adjust::OrderCounts;
use super::discount::Discount;
use super::interpolate::{unigram_conventions, OrderEstimate};

/// Kneser-Ney estimates for every order.
pub(crate) fn estimate(
    orders: &[OrderCounts],
    contexts: &[Vec<u32>],
    discounts: &[Discount],
    keep: &[Vec<bool>],
    interpolate_unigrams: bool,
) -> Vec<OrderEstimate> {
    let mut estimates = Vec::with_capacity(orders.len());
    for n in 1..=orders.len() {
        let table = &orders[n - 1];
        let context_of = &contexts[n - 1];
        let discount = &discounts[n - 1];
        let kept = |row: usize| keep.get(n - 1).is_none_or(|k| k.is_empty() || k[row]);
        let context_count = if n == 1 { 1 } else { orders[n - 2].len() };

        let mut denominator = vec![0_u64; context_count];
        let mut pruned_mass = vec![0_u64; context_count];
        // N1, N2, N3+ of surviving extensions per context.
        let mut extensions = vec![[0_u64; 3]; context_count];
        for (row, (&count, &context)) in table.adjusted.iter().zip(context_of).enumerate() {
            let context = context as usize;
            denominator[context] += count;
            if !kept(row) {
                pruned_mass[context] += count;
            } else if count > 0 {
                extensions[context][count.min(3) as usize - 1] += 1;
            }
        }
        let context_gamma: Vec<f32> = (0..context_count)
            .map(|context| {
                if denominator[context] == 0 {
                    return 1.0;
                }
                let [n1, n2, n3] = extensions[context];
                let mut gamma = 0.0_f32;
                gamma += discount.d1 * n1 as f32;
                gamma += discount.d2 * n2 as f32;
                gamma += discount.d3_plus * n3 as f32;
                gamma += pruned_mass[context] as f32;
                gamma / denominator[context] as f32
            })
            .collect();
        let alpha: Vec<f32> = (0..table.len())
            .map(|row| {
                let context = context_of[row] as usize;
                discount.discounted(table.adjusted[row]) / denominator[context] as f32
            })
            .collect();
        let mut order_estimate = OrderEstimate::new(alpha, context_gamma, context_of);
        if n == 1 {
            unigram_conventions(&mut order_estimate, interpolate_unigrams);
        }
        estimates.push(order_estimate);
    }
    estimates
}
