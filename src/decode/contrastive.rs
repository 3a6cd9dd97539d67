//! Contrastive decoding (Li et al. 2023, "Contrastive Decoding: Open-ended Text
//! Generation as Optimization"): prefer tokens the expert finds much more likely than
//! an amateur does, since both share the failure modes (repetition, blandness) that
//! the amateur has more of.
//!
//! score(v) = log p_exp(v) − log p_ama(v) / τ_ama over the plausible set
//! V_head = {v : p_exp(v) ≥ α · max_w p_exp(w)}, −inf elsewhere (the adaptive
//! plausibility constraint keeps the amateur from promoting nonsense). The processor
//! chain then runs on these scores and the choice rule picks (the paper: argmax).
//! The amateur is any second [`LanguageModel`] over the same token ids: a smaller
//! transformer or an n-gram model.

use crate::rng::SplitMix64;
use super::sample::processed_logprob;
use super::{check_same_vocab, DecodeSettings, Generation};
use crate::lm::LanguageModel;
use crate::{Error, Result};

/// The knobs of contrastive decoding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContrastiveSettings {
    /// Plausibility threshold α in [0, 1]: tokens below α times the expert's best are cut.
    pub alpha: f32,
    /// Temperature of the amateur's log-probabilities (the paper's τ; 1 = none).
    pub amateur_temperature: f32,
}

impl Default for ContrastiveSettings {
    fn default() -> Self {
        ContrastiveSettings {
            alpha: 0.1,
            amateur_temperature: 1.0,
        }
    }
}

/// The contrastive scores of one step.
pub(crate) fn contrastive_scores(expert: &[f32], amateur: &[f32], cs: &ContrastiveSettings) -> Vec<f32> {
    let best = expert.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // p ≥ α·p_max  ⇔  log p ≥ log α + log p_max.
    let threshold = best + cs.alpha.ln();
    expert
        .iter()
        .zip(amateur)
        .map(|(&e, &a)| {
            if e.is_finite() && e >= threshold {
                // An amateur that rules a token out (−inf) would make it +inf: cap its
                // log-probability instead, so the token is merely strongly preferred.
                e - a.max(-1e4) / cs.amateur_temperature
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect()
}

/// Contrastive decoding of `num_samples` continuations (with `Choice::Greedy`, all
/// the same). `Generation::logprobs` are the expert's; `score` sums the chosen
/// tokens' processed log-probabilities.
pub fn contrastive<E: LanguageModel, A: LanguageModel>(
    expert: &E,
    amateur: &A,
    prompt: &[u32],
    cs: &ContrastiveSettings,
    settings: &DecodeSettings,
    num_samples: usize,
) -> Result<Vec<Generation>> {
    check_same_vocab(expert.vocab_size(), amateur.vocab_size(), "amateur model")?;
    if !(0.0..=1.0).contains(&cs.alpha) {
        return Err(Error::Invalid(format!("alpha must be in [0, 1], got {}", cs.alpha)));
    }
    if !(cs.amateur_temperature > 0.0 && cs.amateur_temperature.is_finite()) {
        return Err(Error::Invalid("the amateur temperature must be positive".into()));
    }
    let expert_start = expert.prefill(prompt)?;
    let amateur_start = amateur.prefill(prompt)?;
    let mut out = Vec::with_capacity(num_samples);
    for index in 0..num_samples {
        let mut rng = SplitMix64::for_sample(settings.seed, index as u64);
        let mut e_state = expert_start.clone();
        let mut a_state = amateur_start.clone();
        let mut tokens = prompt.to_vec();
        let mut logprobs = Vec::new();
        let mut score = 0.0;
        let mut finish = (settings.stop.max_new_tokens == 0).then_some(super::FinishReason::Length);
        while finish.is_none() {
            let e_row = first_row(expert.next_logprobs(std::slice::from_ref(&e_state))?)?;
            let a_row = first_row(amateur.next_logprobs(std::slice::from_ref(&a_state))?)?;
            let scores = contrastive_scores(&e_row, &a_row, cs);
            let logits = settings.process(&tokens, prompt.len(), &scores);
            let token = settings.choice.pick(&logits, &mut rng)?;
            score += processed_logprob(&logits, token);
            logprobs.push(e_row[token as usize]);
            tokens.push(token);
            finish = settings.stop.check(&tokens[prompt.len()..]);
            if finish.is_none() {
                expert.advance(&mut e_state, token)?;
                amateur.advance(&mut a_state, token)?;
            }
        }
        out.push(Generation {
            tokens: tokens[prompt.len()..].to_vec(),
            logprobs,
            score,
            finish: finish.expect("the loop ends with a reason"),
        });
    }
    Ok(out)
}

fn first_row(rows: Vec<Vec<f32>>) -> Result<Vec<f32>> {
    rows.into_iter()
        .next()
        .ok_or_else(|| Error::Invalid("the model returned no row".into()))
}
