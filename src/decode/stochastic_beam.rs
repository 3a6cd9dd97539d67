//! Stochastic beam search (Kool, van Hoof and Welling 2019, "Stochastic Beams and Where
//! to Find Them: The Gumbel-Top-k Trick for Sampling Sequences Without Replacement").
//!
//! Every prefix y carries its log-probability φ(y) and a Gumbel key G(y): a
//! Gumbel(φ(y)) draw. Children's keys are drawn top-down, conditioned on their maximum
//! equalling the parent's key (the paper's eq. 10, in its numerically stable form):
//! with G̃ᵢ = φᵢ + Gumbel(0) and Z = maxᵢ G̃ᵢ,
//! Gᵢ = −log(exp(−G_parent) − exp(−Z) + exp(−G̃ᵢ)).
//! Keeping the k children with the largest keys at every step yields k sequences drawn
//! without replacement from the (processed) model distribution, in decreasing key
//! order. A finished sequence keeps its key and competes with the running ones.
//!
//! The draws come from one stream seeded by `settings.seed`.

use super::processors::log_softmax_in_place;
use crate::rng::SplitMix64;
use super::stop::FinishReason;
use super::{DecodeSettings, Generation};
use crate::lm::LanguageModel;
use crate::{Error, Result};

struct Node<S> {
    state: Option<S>,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    /// log-probability of the prefix under the processed distribution.
    phi: f64,
    /// The Gumbel key.
    key: f64,
    finish: Option<FinishReason>,
}

/// A child's key given its unconditioned draw `perturbed`, the parent's key and the
/// largest unconditioned draw among its siblings.
fn conditioned_key(parent: f64, max: f64, perturbed: f64) -> f64 {
    // v = G_parent − G̃ + log(1 − exp(G̃ − Z)); G = G_parent − max(v, 0) − log1p(exp(−|v|)).
    let diff = perturbed - max; // <= 0
    let log1mexp = if diff > -std::f64::consts::LN_2 {
        (-diff.exp_m1()).ln()
    } else {
        (-diff.exp()).ln_1p()
    };
    let v = parent - perturbed + log1mexp;
    parent - v.max(0.0) - (-v.abs()).exp().ln_1p()
}

/// Draws `k` distinct continuations of `prompt` without replacement, highest key first.
/// `Generation::score` is the Gumbel key.
pub fn stochastic_beam_search<M: LanguageModel>(
    model: &M,
    prompt: &[u32],
    k: usize,
    settings: &DecodeSettings,
) -> Result<Vec<Generation>> {
    if k == 0 {
        return Err(Error::Invalid("stochastic beam search needs at least 1 beam".into()));
    }
    let mut rng = SplitMix64::new(settings.seed);
    let mut beams = vec![Node {
        state: Some(model.prefill(prompt)?),
        tokens: prompt.to_vec(),
        logprobs: Vec::new(),
        phi: 0.0,
        key: 0.0,
        finish: (settings.stop.max_new_tokens == 0).then_some(FinishReason::Length),
    }];
    while beams.iter().any(|b| b.finish.is_none()) {
        let running: Vec<usize> = (0..beams.len()).filter(|&i| beams[i].finish.is_none()).collect();
        let states: Vec<M::State> = running
            .iter()
            .map(|&i| beams[i].state.clone().expect("a running beam has a state"))
            .collect();
        let rows = model.next_logprobs(&states)?;
        drop(states);
        // (parent, token, phi, key, raw logprob); finished beams carry over as themselves.
        let mut children: Vec<(usize, Option<u32>, f64, f64, f32)> = Vec::new();
        for (i, b) in beams.iter().enumerate() {
            if b.finish.is_some() {
                children.push((i, None, b.phi, b.key, 0.0));
            }
        }
        for (&i, raw) in running.iter().zip(&rows) {
            let parent = &beams[i];
            let mut logits = settings.process(&parent.tokens, prompt.len(), raw);
            log_softmax_in_place(&mut logits);
            let draws: Vec<(u32, f64, f64)> = logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(token, &l)| {
                    let phi = parent.phi + l as f64;
                    (token as u32, phi, phi + rng.gumbel())
                })
                .collect();
            let max = draws.iter().map(|d| d.2).fold(f64::NEG_INFINITY, f64::max);
            for (token, phi, perturbed) in draws {
                let key = conditioned_key(parent.key, max, perturbed);
                children.push((i, Some(token), phi, key, raw[token as usize]));
            }
        }
        if children.is_empty() {
            return Err(Error::Invalid(
                "stochastic beam search: every token was filtered out".into(),
            ));
        }
        children.sort_by(|a, b| b.3.total_cmp(&a.3));
        children.truncate(k);
        // Advance the kept running children in one batch.
        let mut next: Vec<Node<M::State>> = Vec::with_capacity(children.len());
        let mut to_advance = Vec::new();
        for &(parent, token, phi, key, logprob) in &children {
            let p = &beams[parent];
            match token {
                None => next.push(Node {
                    state: None,
                    tokens: p.tokens.clone(),
                    logprobs: p.logprobs.clone(),
                    phi,
                    key,
                    finish: p.finish,
                }),
                Some(token) => {
                    let mut tokens = p.tokens.clone();
                    tokens.push(token);
                    let mut logprobs = p.logprobs.clone();
                    logprobs.push(logprob);
                    let finish = settings.stop.check(&tokens[prompt.len()..]);
                    if finish.is_none() {
                        to_advance.push((next.len(), parent, token));
                    }
                    next.push(Node {
                        state: None,
                        tokens,
                        logprobs,
                        phi,
                        key,
                        finish,
                    });
                }
            }
        }
        let mut states: Vec<M::State> = to_advance
            .iter()
            .map(|&(_, parent, _)| beams[parent].state.clone().expect("running parent"))
            .collect();
        let tokens: Vec<u32> = to_advance.iter().map(|&(_, _, t)| t).collect();
        model.advance_batch(&mut states, &tokens)?;
        for (&(at, _, _), state) in to_advance.iter().zip(states) {
            next[at].state = Some(state);
        }
        beams = next;
    }
    Ok(beams
        .into_iter()
        .map(|b| Generation {
            tokens: b.tokens[prompt.len()..].to_vec(),
            logprobs: b.logprobs,
            score: b.key as f32,
            finish: b.finish.unwrap_or(FinishReason::Length),
        })
        .collect())
}
