//! Decoding: turning any [`LanguageModel`] into text.
//!
//! Every strategy is a chain of logits processors ([`processors`], [`constrained`])
//! followed by a choice rule ([`sampler::Choice`]: argmax or a seeded draw), or a search
//! procedure built on the same interface:
//!
//! - [`sample`]: greedy decoding and ancestral sampling (with temperature, top-k, top-p,
//!   epsilon, min-p, typical, repetition penalty), several samples as one batch;
//! - [`beam`]: beam search as `transformers` does it (2 × beams candidates per step,
//!   cumulative log-probabilities, length penalty on finished hypotheses);
//! - [`diverse_beam`]: diverse beam search with a Hamming penalty between groups
//!   (Vijayakumar et al. 2016);
//! - [`stochastic_beam`]: sampling sequences without replacement by Gumbel-top-k
//!   (Kool et al. 2019);
//! - [`contrastive`]: expert minus amateur log-probabilities over the expert's plausible
//!   tokens (Li et al. 2023);
//! - [`mbr`]: minimum Bayes risk selection among samples (Eikema and Aziz 2020);
//! - [`speculative`]: a draft model proposes, the target verifies (Leviathan et al. 2023,
//!   Chen et al. 2023), exactly the target's distribution or greedy output;
//! - [`constrained`]: banned tokens and phrases, allowed tokens, forced phrases;
//! - [`discriminator`]: sample-and-discard and FUDGE (Yang and Klein 2021) with a
//!   language model of the wanted attribute as the discriminator;
//! - [`self_consistency`]: majority vote over answers extracted from samples
//!   (Wang et al. 2023).
//!
//! Every random source is a [`crate::rng::SplitMix64`] seeded from the caller's seed; sample `i` has
//! its own stream, so it does not depend on the batch it was drawn in. Decoding sees
//! models only through [`LanguageModel`]: n-gram models and transformers alike, and
//! batched calls (`next_logprobs` of every beam at once, `advance_batch`) let the
//! transformer run a beam as one forward pass.

pub mod beam;
pub mod constrained;
pub mod contrastive;
pub mod discriminator;
pub mod diverse_beam;
pub mod mbr;
pub mod processors;
pub mod sample;
pub mod sampler;
pub mod self_consistency;
pub mod speculative;
pub mod stochastic_beam;
pub mod stop;

#[cfg(test)]
mod tests;

pub use beam::{beam_search, BeamSettings, EarlyStopping};
pub use constrained::{AllowedTokens, BannedPhrases, BannedTokens, ForcedPhrases, NoRepeatNgram};
pub use contrastive::{contrastive, ContrastiveSettings};
pub use diverse_beam::{diverse_beam_search, DiverseBeamSettings};
pub use mbr::{chrf, mbr, ngram_f_score, rouge1, sentence_bleu, MbrResult, Utility};
pub use processors::{LogitBias, LogitsProcessor, ProcessorChain, SamplingParams, Stage, StepContext};
pub use discriminator::{attribute_probability, fudge, sample_and_discard, DiscardResult, Judged};
pub use sample::{generate, generate_streaming};
pub use self_consistency::{extract_answer, majority_vote, Vote};
pub use sampler::Choice;
pub use speculative::{speculative, SpeculativeResult, SpeculativeStats};
pub use stochastic_beam::stochastic_beam_search;
pub use stop::{Detokenizer, FinishReason, StopCriteria};

#[allow(unused_imports)]
use crate::lm::LanguageModel;

/// One generated continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The new tokens (the prompt is not repeated).
    pub tokens: Vec<u32>,
    /// log p(token | prefix) of each new token under the model, before any processor (nats).
    pub logprobs: Vec<f32>,
    /// The strategy's own score: the sum of processed log-probabilities, the
    /// length-normalised beam score, the Gumbel key, the contrastive score or the
    /// expected utility.
    pub score: f32,
    /// Why it ended.
    pub finish: FinishReason,
}

impl Generation {
    /// Total log-probability of the new tokens under the model (nats).
    pub fn logprob(&self) -> f32 {
        self.logprobs.iter().sum()
    }
}

/// What every strategy needs besides the model and the prompt.
#[derive(Debug, Default)]
pub struct DecodeSettings {
    /// Rewrites next-token scores before the choice.
    pub processors: ProcessorChain,
    /// Argmax or a seeded draw (searches that choose by score ignore it).
    pub choice: Choice,
    /// When a sequence ends.
    pub stop: StopCriteria,
    /// The seed of every random draw.
    pub seed: u64,
}

impl DecodeSettings {
    /// Greedy decoding of up to `max_new_tokens` tokens with no processors.
    pub fn greedy(max_new_tokens: usize) -> Self {
        DecodeSettings {
            stop: StopCriteria::max_tokens(max_new_tokens),
            ..DecodeSettings::default()
        }
    }

    /// Plain ancestral sampling of up to `max_new_tokens` tokens with `seed`.
    pub fn sampling(max_new_tokens: usize, seed: u64) -> Self {
        DecodeSettings {
            choice: Choice::Sample,
            stop: StopCriteria::max_tokens(max_new_tokens),
            seed,
            ..DecodeSettings::default()
        }
    }

    /// Processed scores for the next token after `tokens` (prompt + generated).
    pub(crate) fn process(&self, tokens: &[u32], prompt_len: usize, row: &[f32]) -> Vec<f32> {
        let mut logits = row.to_vec();
        if !self.processors.is_empty() {
            let ctx = StepContext {
                tokens,
                prompt_len,
                max_new_tokens: self.stop.max_new_tokens,
            };
            self.processors.apply(&ctx, &mut logits);
        }
        logits
    }
}

/// Checks that two models can be combined token for token.
pub(crate) fn check_same_vocab(a: usize, b: usize, what: &str) -> crate::Result<()> {
    if a != b {
        return Err(crate::Error::Invalid(format!(
            "the {what} has a vocabulary of {b} tokens but the model has {a}; \
             both must share one tokenizer (the same token ids)"
        )));
    }
    Ok(())
}
