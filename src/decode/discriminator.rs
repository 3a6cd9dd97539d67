//! Control by a discriminator: sample-and-discard, and FUDGE (Yang and Klein 2021,
//! "FUDGE: Controlled Text Generation With Future Discriminators").
//!
//! What a discriminator is here: a language model of text that has the wanted attribute
//! (a transformer fine-tuned on it, or an n-gram model trained on it), with the
//! generator's vocabulary. It becomes a classifier by Bayes' rule against the generator
//! itself, the way class-conditional language models classify (GeDi, Krause et al.
//! 2021): with equal priors, and on per-token (geometric-mean) likelihoods so that the
//! probability does not saturate with length,
//!
//! P(attribute | y) = σ( (1/T) Σₜ [log p_disc(yₜ | y<ₜ) − log p_model(yₜ | y<ₜ)] ),
//!
//! over the T generated tokens (both models condition on the prompt too). So a text the
//! discriminator finds likelier than the generator does scores above 1/2.
//!
//! - [`sample_and_discard`]: draw samples and keep those with P(attribute | y) ≥ a
//!   threshold (rejection sampling: the kept ones follow the generator's distribution
//!   restricted to the accepted set).
//! - [`fudge`]: at every step, over the `top_k` most likely next tokens after the
//!   processor chain, multiply p(token | prefix) by P(attribute | prefix + token) and
//!   renormalise; the other tokens get probability 0. With the Bayes discriminator one
//!   step costs one extra next-token call of the discriminator, not one per candidate,
//!   because P(attribute | prefix + c) needs only both models' log-probabilities of c.

use super::processors::log_softmax_in_place;
use crate::rng::SplitMix64;
use super::sample::{generate_streaming, processed_logprob};
use super::{check_same_vocab, DecodeSettings, Generation};
use crate::lm::LanguageModel;
use crate::{Error, Result};

/// log σ(x), computed without overflow.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// P(attribute | y) from the per-token log-probabilities of y's tokens under the
/// discriminator and the generator (equal priors, geometric-mean likelihoods); 1/2 for
/// an empty y.
pub fn attribute_probability(disc_logprobs: &[f32], model_logprobs: &[f32]) -> f64 {
    let t = disc_logprobs.len().min(model_logprobs.len());
    if t == 0 {
        return 0.5;
    }
    let sum: f64 = disc_logprobs
        .iter()
        .zip(model_logprobs)
        .map(|(&d, &m)| d as f64 - m as f64)
        .sum();
    log_sigmoid(sum / t as f64).exp()
}

/// A kept sample and its attribute probability.
#[derive(Debug, Clone)]
pub struct Judged {
    /// The continuation.
    pub generation: Generation,
    /// P(attribute | continuation).
    pub attribute_probability: f64,
}

/// What sample-and-discard produced.
#[derive(Debug, Clone)]
pub struct DiscardResult {
    /// The kept samples, in sampling order.
    pub kept: Vec<Judged>,
    /// How many samples were drawn in all.
    pub drawn: usize,
}

/// Draws samples in batches of `num_return` until `num_return` of them reach
/// `threshold`, drawing at most `max_samples`.
pub fn sample_and_discard<M: LanguageModel, D: LanguageModel>(
    model: &M,
    disc: &D,
    prompt: &[u32],
    settings: &DecodeSettings,
    num_return: usize,
    threshold: f64,
    max_samples: usize,
) -> Result<DiscardResult> {
    check_same_vocab(model.vocab_size(), disc.vocab_size(), "discriminator")?;
    if num_return == 0 {
        return Err(Error::Invalid("sample-and-discard needs at least one sample to return".into()));
    }
    let mut kept = Vec::new();
    let mut drawn = 0;
    let mut best = 0.0f64;
    while kept.len() < num_return && drawn < max_samples {
        let batch = num_return.min(max_samples - drawn);
        let samples = generate_streaming(model, prompt, settings, drawn..drawn + batch, &mut |_, _| {})?;
        drawn += batch;
        for generation in samples {
            let mut full = prompt.to_vec();
            full.extend_from_slice(&generation.tokens);
            let disc_logprobs = disc.score(&full)?;
            let p = attribute_probability(&disc_logprobs[prompt.len()..], &generation.logprobs);
            best = best.max(p);
            if p >= threshold && kept.len() < num_return {
                kept.push(Judged {
                    generation,
                    attribute_probability: p,
                });
            }
        }
    }
    if kept.len() < num_return {
        return Err(Error::Invalid(format!(
            "only {} of {drawn} samples reached the discriminator threshold {threshold} \
             (the best had {best:.3}); lower the threshold or draw more samples",
            kept.len()
        )));
    }
    Ok(DiscardResult { kept, drawn })
}

/// One FUDGE sequence being generated.
struct Running<S, T> {
    index: usize,
    state: S,
    disc_state: T,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    /// Σ (log p_disc − log p_model) over the generated tokens.
    log_ratio: f64,
    score: f32,
    rng: SplitMix64,
}

/// FUDGE: `num_samples` continuations where each step's distribution (after the
/// processor chain) is reweighted by the discriminator over its `top_k` best tokens.
/// `Generation::score` is the sum of the reweighted log-probabilities.
pub fn fudge<M: LanguageModel, D: LanguageModel>(
    model: &M,
    disc: &D,
    prompt: &[u32],
    settings: &DecodeSettings,
    top_k: usize,
    num_samples: usize,
) -> Result<Vec<Judged>> {
    check_same_vocab(model.vocab_size(), disc.vocab_size(), "discriminator")?;
    if top_k == 0 {
        return Err(Error::Invalid("FUDGE needs at least one candidate token per step".into()));
    }
    let start = model.prefill(prompt)?;
    let disc_start = disc.prefill(prompt)?;
    let mut done: Vec<Option<Judged>> = vec![None; num_samples];
    let mut running: Vec<Running<M::State, D::State>> = (0..num_samples)
        .map(|index| Running {
            index,
            state: start.clone(),
            disc_state: disc_start.clone(),
            tokens: prompt.to_vec(),
            logprobs: Vec::new(),
            log_ratio: 0.0,
            score: 0.0,
            rng: SplitMix64::for_sample(settings.seed, index as u64),
        })
        .collect();
    if settings.stop.max_new_tokens == 0 {
        running.clear();
        for slot in done.iter_mut() {
            *slot = Some(Judged {
                generation: Generation {
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                    score: 0.0,
                    finish: super::FinishReason::Length,
                },
                attribute_probability: 0.5,
            });
        }
    }
    while !running.is_empty() {
        let states: Vec<M::State> = running.iter().map(|r| r.state.clone()).collect();
        let rows = model.next_logprobs(&states)?;
        drop(states);
        let disc_states: Vec<D::State> = running.iter().map(|r| r.disc_state.clone()).collect();
        let disc_rows = disc.next_logprobs(&disc_states)?;
        drop(disc_states);
        let mut next = Vec::with_capacity(running.len());
        let mut next_tokens = Vec::with_capacity(running.len());
        for ((mut seq, row), disc_row) in running.into_iter().zip(rows).zip(disc_rows) {
            let mut logits = settings.process(&seq.tokens, prompt.len(), &row);
            log_softmax_in_place(&mut logits);
            let t = (seq.tokens.len() - prompt.len() + 1) as f64;
            // The top_k candidates by processed score (ties: lower id); the rest drop out.
            let mut order: Vec<usize> = (0..logits.len())
                .filter(|&id| logits[id] > f32::NEG_INFINITY)
                .collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            order.truncate(top_k);
            let mut reweighted = vec![f32::NEG_INFINITY; logits.len()];
            for &id in &order {
                let ratio = seq.log_ratio + disc_row[id] as f64 - row[id] as f64;
                reweighted[id] = (logits[id] as f64 + log_sigmoid(ratio / t)) as f32;
            }
            let token = settings.choice.pick(&reweighted, &mut seq.rng)?;
            seq.score += processed_logprob(&reweighted, token);
            seq.log_ratio += disc_row[token as usize] as f64 - row[token as usize] as f64;
            seq.logprobs.push(row[token as usize]);
            seq.tokens.push(token);
            let generated = &seq.tokens[prompt.len()..];
            match settings.stop.check(generated) {
                Some(finish) => {
                    let attribute_probability =
                        log_sigmoid(seq.log_ratio / generated.len() as f64).exp();
                    done[seq.index] = Some(Judged {
                        generation: Generation {
                            tokens: generated.to_vec(),
                            logprobs: seq.logprobs,
                            score: seq.score,
                            finish,
                        },
                        attribute_probability,
                    });
                }
                None => {
                    next_tokens.push(token);
                    next.push(seq);
                }
            }
        }
        if !next.is_empty() {
            let mut states: Vec<M::State> = next.iter().map(|r| r.state.clone()).collect();
            model.advance_batch(&mut states, &next_tokens)?;
            let mut disc_states: Vec<D::State> = next.iter().map(|r| r.disc_state.clone()).collect();
            disc.advance_batch(&mut disc_states, &next_tokens)?;
            for ((seq, state), disc_state) in next.iter_mut().zip(states).zip(disc_states) {
                seq.state = state;
                seq.disc_state = disc_state;
            }
        }
        running = next;
    }
    Ok(done
        .into_iter()
        .map(|g| g.expect("every sample finishes before the loop ends"))
        .collect())
}
