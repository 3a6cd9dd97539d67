//! The choice rule at the end of the processor chain: the argmax (greedy, and the
//! verifier of speculative greedy decoding) or a seeded draw from the softmax of the
//! processed scores (ancestral sampling).

use super::processors::softmax;
use crate::rng::SplitMix64;
use crate::{Error, Result};

/// How the next token is picked from processed scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    /// The highest score; ties go to the lowest id (as `torch.argmax`).
    #[default]
    Greedy,
    /// A draw from softmax(scores) with the sample's seeded generator.
    Sample,
}

impl Choice {
    /// Picks a token from `logits` (`rng` is used only when sampling).
    pub fn pick(self, logits: &[f32], rng: &mut SplitMix64) -> Result<u32> {
        match self {
            Choice::Greedy => argmax(logits),
            Choice::Sample => sample(logits, rng),
        }
    }
}

fn nothing_left() -> Error {
    Error::Invalid(
        "every token was filtered out at this step; loosen the constraints \
         (banned tokens, allowed list, top-k/top-p/epsilon/min-p)"
            .into(),
    )
}

/// The id with the highest finite score; ties go to the lowest id.
pub fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (id, &l) in logits.iter().enumerate() {
        if l.is_nan() || l == f32::NEG_INFINITY {
            continue;
        }
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((id, l));
        }
    }
    best.map(|(id, _)| id as u32).ok_or_else(nothing_left)
}

/// A draw from softmax(`logits`) by inverting the cumulative distribution; a token of
/// probability 0 is never drawn.
pub fn sample(logits: &[f32], rng: &mut SplitMix64) -> Result<u32> {
    sample_probs(&softmax(logits), rng)
}

/// A draw from (unnormalised, non-negative) weights.
pub fn sample_probs(weights: &[f64], rng: &mut SplitMix64) -> Result<u32> {
    let total: f64 = weights.iter().filter(|w| w.is_finite()).sum();
    // NaN or zero: nothing can be drawn.
    if total.is_nan() || total <= 0.0 {
        return Err(nothing_left());
    }
    let target = rng.next_f64() * total;
    let mut cumulative = 0.0;
    let mut last_positive = None;
    for (id, &w) in weights.iter().enumerate() {
        if !(w > 0.0 && w.is_finite()) {
            continue;
        }
        cumulative += w;
        last_positive = Some(id);
        if target < cumulative {
            return Ok(id as u32);
        }
    }
    // Rounding left the target just above the sum: the last possible token.
    last_positive.map(|id| id as u32).ok_or_else(nothing_left)
}
