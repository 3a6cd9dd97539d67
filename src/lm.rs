//! `LanguageModel`: the one interface that decoding and evaluation see.
//!
//! The n-gram model and the transformer both implement it, so `generate` and `eval`
//! work on either. Log-probabilities cross this interface on the host, as `f32`
//! natural logarithms (nats), one entry per vocabulary id.

use crate::Result;

/// A left-to-right model of token sequences.
///
/// A `State` is everything the model needs to continue a prefix (an n-gram
/// context, a KV cache). States are cheap to fork by `Clone`, which is what beam
/// search, MBR sampling and speculative drafting rely on.
pub trait LanguageModel {
    /// The model's memory of a prefix.
    type State: Clone;

    /// Number of token ids the model assigns probabilities to.
    fn vocab_size(&self) -> usize;

    /// The state before the first token (after the beginning-of-sequence marker,
    /// for models that have one).
    fn initial_state(&self) -> Self::State;

    /// Consumes one token, moving the state forward.
    fn advance(&self, state: &mut Self::State, token: u32) -> Result<()>;

    /// Next-token log-probabilities (nats) for several states at once: one row of
    /// `vocab_size()` entries per state. Batching lets a model that can run one
    /// forward pass for many prefixes do so.
    fn next_logprobs(&self, states: &[Self::State]) -> Result<Vec<Vec<f32>>>;

    /// The state after `tokens`, starting from [`LanguageModel::initial_state`]. A model
    /// that can read a whole prompt in one pass (the transformer) overrides this.
    fn prefill(&self, tokens: &[u32]) -> Result<Self::State> {
        let mut state = self.initial_state();
        for &token in tokens {
            self.advance(&mut state, token)?;
        }
        Ok(state)
    }

    /// Advances each state by its token (`states[i]` by `tokens[i]`). A model that can
    /// step several prefixes in one forward pass (a batch of beams) overrides this.
    fn advance_batch(&self, states: &mut [Self::State], tokens: &[u32]) -> Result<()> {
        if states.len() != tokens.len() {
            return Err(crate::Error::Invalid(format!(
                "advance_batch got {} states but {} tokens",
                states.len(),
                tokens.len()
            )));
        }
        for (state, &token) in states.iter_mut().zip(tokens) {
            self.advance(state, token)?;
        }
        Ok(())
    }

    /// Feeds `tokens` one after another and returns the next-token log-probabilities
    /// after each of them (row `i` conditions on `tokens[..=i]`). Speculative decoding
    /// verifies a draft with it; the transformer does it in one forward pass.
    fn advance_scored(&self, state: &mut Self::State, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let mut rows = Vec::with_capacity(tokens.len());
        for &token in tokens {
            self.advance(state, token)?;
            let row = self
                .next_logprobs(std::slice::from_ref(state))?
                .pop()
                .ok_or_else(|| crate::Error::Invalid("the model returned no row".into()))?;
            rows.push(row);
        }
        Ok(rows)
    }

    /// Forgets the last `drop` tokens fed to `state`, whose next-token log-probabilities
    /// after the cut are `row` (the caller has them from [`LanguageModel::advance_scored`]).
    /// Returns false, leaving the state as it was, when the model cannot cut back (an
    /// n-gram state keeps only its context); the caller then re-feeds from a saved state.
    /// Speculative decoding cuts its rejected drafts this way.
    fn rewind(&self, state: &mut Self::State, drop: usize, row: &[f32]) -> Result<bool> {
        let _ = (state, drop, row);
        Ok(false)
    }

    /// Log-probability (nats) of each token of `tokens` given the tokens before it,
    /// starting from [`LanguageModel::initial_state`].
    fn score(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut state = self.initial_state();
        let mut logprobs = Vec::with_capacity(tokens.len());
        for &token in tokens {
            let row = self.next_logprobs(std::slice::from_ref(&state))?;
            let logprob = row
                .first()
                .and_then(|r| r.get(token as usize))
                .copied()
                .ok_or_else(|| {
                    crate::Error::Invalid(format!(
                        "token id {token} is outside the model's vocabulary of {}",
                        self.vocab_size()
                    ))
                })?;
            logprobs.push(logprob);
            self.advance(&mut state, token)?;
        }
        Ok(logprobs)
    }
}
