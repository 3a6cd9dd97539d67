//! Greedy decoding and ancestral sampling: at each step the processed next-token scores
//! go to the choice rule. Several samples run as one batch (one `next_logprobs` and one
//! `advance_batch` per step, so a transformer steps them in one forward pass); each has
//! its own seeded stream, so sample `i` is the same alone or in a batch.
//!
//! With no processors, sampling draws each token from the model's own distribution:
//! ancestral sampling, whose sequences follow the model's distribution exactly.

use crate::rng::SplitMix64;
use super::{DecodeSettings, Generation};
use crate::lm::LanguageModel;
use crate::Result;

/// One sequence being generated.
struct Running<S> {
    index: usize,
    state: S,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    score: f32,
    rng: SplitMix64,
}

/// Generates `num_samples` continuations of `prompt` (greedy ones are all the same).
pub fn generate<M: LanguageModel>(
    model: &M,
    prompt: &[u32],
    settings: &DecodeSettings,
    num_samples: usize,
) -> Result<Vec<Generation>> {
    generate_streaming(model, prompt, settings, 0..num_samples, &mut |_, _| {})
}

/// Generates the samples numbered `samples` (sample `i` draws from its own stream
/// `SplitMix64::for_sample(seed, i)`, so a later batch continues where an earlier one ended)
/// and calls `on_token(i, generated)` after every token of sample `i`, for printing
/// text as it is produced. Returns the samples in order.
pub fn generate_streaming<M: LanguageModel>(
    model: &M,
    prompt: &[u32],
    settings: &DecodeSettings,
    samples: std::ops::Range<usize>,
    on_token: &mut dyn FnMut(usize, &[u32]),
) -> Result<Vec<Generation>> {
    let first = samples.start;
    let num_samples = samples.len();
    let start = model.prefill(prompt)?;
    let mut done: Vec<Option<Generation>> = vec![None; num_samples];
    let mut running: Vec<Running<M::State>> = (0..num_samples)
        .map(|index| Running {
            index,
            state: start.clone(),
            tokens: prompt.to_vec(),
            logprobs: Vec::new(),
            score: 0.0,
            rng: SplitMix64::for_sample(settings.seed, (first + index) as u64),
        })
        .collect();
    if settings.stop.max_new_tokens == 0 {
        return Ok(running
            .into_iter()
            .map(|_| Generation {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                score: 0.0,
                finish: super::FinishReason::Length,
            })
            .collect());
    }
    while !running.is_empty() {
        let states: Vec<M::State> = running.iter().map(|r| r.state.clone()).collect();
        let rows = model.next_logprobs(&states)?;
        drop(states);
        let mut next = Vec::with_capacity(running.len());
        let mut next_tokens = Vec::with_capacity(running.len());
        for (mut seq, row) in running.into_iter().zip(rows) {
            let logits = settings.process(&seq.tokens, prompt.len(), &row);
            let token = settings.choice.pick(&logits, &mut seq.rng)?;
            seq.score += processed_logprob(&logits, token);
            seq.logprobs.push(row[token as usize]);
            seq.tokens.push(token);
            on_token(first + seq.index, &seq.tokens[prompt.len()..]);
            match settings.stop.check(&seq.tokens[prompt.len()..]) {
                Some(finish) => {
                    done[seq.index] = Some(Generation {
                        tokens: seq.tokens[prompt.len()..].to_vec(),
                        logprobs: seq.logprobs,
                        score: seq.score,
                        finish,
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
            for (seq, state) in next.iter_mut().zip(states) {
                seq.state = state;
            }
        }
        running = next;
    }
    Ok(done
        .into_iter()
        .map(|g| g.expect("every sample finishes before the loop ends"))
        .collect())
}

/// log softmax(logits)[token]: the probability the choice rule gave the token.
pub(crate) fn processed_logprob(logits: &[f32], token: u32) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    (logits[token as usize] as f64 - max as f64 - total.ln()) as f32
}
