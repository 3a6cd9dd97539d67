//! Speculative decoding (Leviathan, Kalman and Matias 2023, "Fast Inference from
//! Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large
//! Language Model Decoding with Speculative Sampling").
//!
//! Each round a cheap draft model proposes k tokens d₁..d_k one by one from its
//! (processed) distributions q; the target scores all of them in one call
//! (`advance_scored`, one forward pass for a transformer), giving p at the k + 1
//! positions. Token dⱼ is accepted with probability min(1, p(dⱼ) / q(dⱼ)); at the first
//! rejection a replacement is drawn from norm(max(0, p − q)) and the round ends; if all
//! k are accepted a bonus token is drawn from the last p. Every emitted token then
//! follows the target's processed distribution exactly (Leviathan et al., Theorem 1).
//! With `Choice::Greedy` the rule is: accept dⱼ while it is the target's argmax, and
//! emit the target's argmax at the first mismatch, so the output is exactly the
//! target's greedy output.
//!
//! Each model keeps the state of a verified prefix plus a list of tokens still to feed.
//! A round whose drafts are all accepted costs the target one pass (the bonus token is
//! fed with the next draft); after a rejection the target cuts the rejected drafts off
//! its state (`LanguageModel::rewind`: the transformer drops cache positions), or, for
//! a model that cannot, forks back to the saved state and reads the verified tokens in
//! a second pass; only the replacement token is left to feed with the next draft, so
//! no pass reads more than k + 1 tokens.

use super::processors::softmax;
use crate::rng::SplitMix64;
use super::sampler::{argmax, sample, sample_probs, Choice};
use super::stop::FinishReason;
use super::{check_same_vocab, DecodeSettings, Generation};
use crate::lm::LanguageModel;
use crate::{Error, Result};

/// Counts of one speculative generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpeculativeStats {
    /// Verification rounds (target calls).
    pub rounds: usize,
    /// Tokens the draft proposed.
    pub drafted: usize,
    /// Draft tokens the target accepted.
    pub accepted: usize,
}

impl SpeculativeStats {
    /// Share of drafted tokens accepted.
    pub fn acceptance_rate(&self) -> f64 {
        if self.drafted == 0 {
            0.0
        } else {
            self.accepted as f64 / self.drafted as f64
        }
    }
}

/// A generation and how the drafting went.
#[derive(Debug, Clone)]
pub struct SpeculativeResult {
    /// The continuation; `logprobs` are the target's.
    pub generation: Generation,
    /// Rounds, drafted and accepted tokens.
    pub stats: SpeculativeStats,
}

/// Feeds `pending` (if any) and returns the next-token row after the whole prefix.
fn sync<M: LanguageModel>(model: &M, state: &mut M::State, pending: &mut Vec<u32>) -> Result<Vec<f32>> {
    let row = if pending.is_empty() {
        model.next_logprobs(std::slice::from_ref(state))?.pop()
    } else {
        model.advance_scored(state, pending)?.pop()
    };
    pending.clear();
    row.ok_or_else(|| Error::Invalid("the model returned no row".into()))
}

/// Speculative decoding of `num_samples` continuations of `prompt` with `draft_tokens`
/// tokens drafted per round.
pub fn speculative<T: LanguageModel, D: LanguageModel>(
    target: &T,
    draft: &D,
    prompt: &[u32],
    draft_tokens: usize,
    settings: &DecodeSettings,
    num_samples: usize,
) -> Result<Vec<SpeculativeResult>> {
    check_same_vocab(target.vocab_size(), draft.vocab_size(), "draft model")?;
    if draft_tokens == 0 {
        return Err(Error::Invalid("the draft must propose at least 1 token per round".into()));
    }
    let target_start = target.prefill(prompt)?;
    let draft_start = draft.prefill(prompt)?;
    (0..num_samples)
        .map(|index| {
            let rng = SplitMix64::for_sample(settings.seed, index as u64);
            one(target, draft, target_start.clone(), draft_start.clone(), prompt, draft_tokens, settings, rng)
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn one<T: LanguageModel, D: LanguageModel>(
    target: &T,
    draft: &D,
    mut t_state: T::State,
    mut d_state: D::State,
    prompt: &[u32],
    k: usize,
    settings: &DecodeSettings,
    mut rng: SplitMix64,
) -> Result<SpeculativeResult> {
    let max_new = settings.stop.max_new_tokens;
    let sampling = settings.choice == Choice::Sample;
    let mut t_pending: Vec<u32> = Vec::new();
    let mut d_pending: Vec<u32> = Vec::new();
    let mut tokens = prompt.to_vec();
    let mut logprobs = Vec::new();
    let mut score = 0.0f32;
    let mut stats = SpeculativeStats::default();
    let mut finish = (max_new == 0).then_some(FinishReason::Length);
    while finish.is_none() {
        let kk = k.min(max_new - (tokens.len() - prompt.len())).max(1);
        // Draft kk tokens.
        let mut row = sync(draft, &mut d_state, &mut d_pending)?;
        let d_saved = d_state.clone();
        let mut drafts: Vec<u32> = Vec::with_capacity(kk);
        let mut q_probs: Vec<Vec<f64>> = Vec::with_capacity(kk);
        let mut history = tokens.clone();
        for j in 0..kk {
            let logits = settings.process(&history, prompt.len(), &row);
            let token = if sampling {
                let probs = softmax(&logits);
                let token = sample_probs(&probs, &mut rng)?;
                q_probs.push(probs);
                token
            } else {
                argmax(&logits)?
            };
            drafts.push(token);
            history.push(token);
            if j + 1 < kk {
                row = draft
                    .advance_scored(&mut d_state, &[token])?
                    .pop()
                    .ok_or_else(|| Error::Invalid("the draft model returned no row".into()))?;
            }
        }
        stats.rounds += 1;
        stats.drafted += kk;
        // The target scores the pending tokens and the whole draft in one call.
        let t_saved = t_state.clone();
        let t_pending_saved = t_pending.clone();
        let p_rows: Vec<Vec<f32>> = if t_pending.is_empty() {
            let first = target
                .next_logprobs(std::slice::from_ref(&t_state))?
                .pop()
                .ok_or_else(|| Error::Invalid("the target model returned no row".into()))?;
            let mut rows = vec![first];
            rows.extend(target.advance_scored(&mut t_state, &drafts)?);
            rows
        } else {
            let mut feed = std::mem::take(&mut t_pending);
            feed.extend_from_slice(&drafts);
            let mut rows = target.advance_scored(&mut t_state, &feed)?;
            rows.split_off(rows.len() - (kk + 1))
        };
        // Verify.
        let mut emitted: Vec<(u32, f32, f32)> = Vec::with_capacity(kk + 1); // (token, raw, processed)
        let mut rejected = false;
        history.truncate(tokens.len());
        for j in 0..kk {
            let logits = settings.process(&history, prompt.len(), &p_rows[j]);
            let proposed = drafts[j];
            let (token, accept) = if sampling {
                let p = softmax(&logits);
                let q = &q_probs[j];
                let x = proposed as usize;
                if rng.next_f64() * q[x] < p[x] {
                    (proposed, true)
                } else {
                    let residual: Vec<f64> = p.iter().zip(q).map(|(&p, &q)| (p - q).max(0.0)).collect();
                    let token = if residual.iter().sum::<f64>() > 0.0 {
                        sample_probs(&residual, &mut rng)?
                    } else {
                        sample_probs(&p, &mut rng)?
                    };
                    (token, false)
                }
            } else {
                let best = argmax(&logits)?;
                (best, best == proposed)
            };
            emitted.push((token, p_rows[j][token as usize], super::sample::processed_logprob(&logits, token)));
            history.push(token);
            if !accept {
                rejected = true;
                break;
            }
            stats.accepted += 1;
        }
        if !rejected {
            let logits = settings.process(&history, prompt.len(), &p_rows[kk]);
            let token = if sampling { sample(&logits, &mut rng)? } else { argmax(&logits)? };
            emitted.push((token, p_rows[kk][token as usize], super::sample::processed_logprob(&logits, token)));
        }
        // Both models fork back to a verified prefix plus tokens still to feed.
        let new_tokens: Vec<u32> = emitted.iter().map(|e| e.0).collect();
        if rejected {
            // The target drops the rejected drafts from its state; a model that cannot
            // cut back returns to the state before this round and reads what was
            // verified (the tokens pending before it and the accepted drafts) at once:
            // left pending, a run of rejected rounds would grow the list, and every
            // verification pass with it, to the length of the whole generation.
            let accepted = new_tokens.len() - 1;
            if !target.rewind(&mut t_state, kk - accepted, &p_rows[accepted])? {
                t_state = t_saved;
                let mut verified = t_pending_saved;
                verified.extend_from_slice(&new_tokens[..accepted]);
                if !verified.is_empty() {
                    target.advance_scored(&mut t_state, &verified)?;
                }
            }
            t_pending = vec![*new_tokens.last().expect("a replacement token was emitted")];
            d_state = d_saved;
            d_pending = new_tokens;
        } else {
            t_pending = vec![*new_tokens.last().expect("a bonus token was emitted")];
            // The draft state holds all drafts but the last.
            d_pending = vec![drafts[kk - 1], *new_tokens.last().expect("a bonus token")];
        }
        for (token, raw, processed) in emitted {
            tokens.push(token);
            logprobs.push(raw);
            score += processed;
            finish = settings.stop.check(&tokens[prompt.len()..]);
            if finish.is_some() {
                break;
            }
        }
    }
    Ok(SpeculativeResult {
        generation: Generation {
            tokens: tokens[prompt.len()..].to_vec(),
            logprobs,
            score,
            finish: finish.expect("the loop ends with a reason"),
        },
        stats,
    })
}
