//! The transformer as a [`LanguageModel`]: a state is the token history plus its KV
//! cache and the next-token log-probabilities that history leads to.
//!
//! `advance` runs the model on the new token at once (one cached forward step) and keeps
//! the resulting row, so `next_logprobs` only copies rows out; the trait's states are
//! immutable there, so that is where the cache has to grow. The empty prefix of a model
//! without a beginning-of-sequence token has no context to condition on: it gets the
//! uniform distribution, `-ln(vocab_size)` for every token.
//!
//! A model with learned or rotary positions knows `max_position_embeddings` of them
//! (the context it was trained on). A state that would outgrow them slides: the cache
//! is rebuilt from the last three quarters of the context, so the model keeps seeing
//! windows like those it was trained on (nanoGPT crops its input the same way, one
//! token at a time; sliding by a quarter re-reads the window four times less often).

use std::sync::Arc;

use candle_core::Tensor;

use super::attention::KvCache;
use super::config::PositionKind;
use super::fused::log_softmax_rows;
use super::transformer::Transformer;
use crate::lm::LanguageModel;
use crate::{Error, Result};

/// A transformer's memory of a prefix.
#[derive(Debug, Clone)]
pub struct TransformerState {
    /// The tokens fed so far (without the beginning-of-sequence token).
    tokens: Vec<u32>,
    /// Where in `tokens` the cached window starts (0 until the state first slides).
    window_start: usize,
    /// Keys and values of `tokens[window_start..]` (after the beginning-of-sequence
    /// token).
    kv_cache: KvCache,
    /// log p(next | tokens) in nats; `None` before the first token.
    next_logprobs: Option<Arc<[f32]>>,
}

impl TransformerState {
    /// The tokens fed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The cached keys and values.
    pub fn kv_cache(&self) -> &KvCache {
        &self.kv_cache
    }
}

impl Transformer {
    /// The state after `prompt`, computed in one forward pass.
    pub fn prefill(&self, prompt: &[u32]) -> Result<TransformerState> {
        let mut state = self.initial_state();
        if !prompt.is_empty() {
            self.feed(&mut state, prompt)?;
        }
        Ok(state)
    }

    /// Advances each state by its token. States with equally long non-empty caches
    /// (a beam) run as one batched forward step; otherwise one step per state.
    pub fn advance_batch(&self, states: &mut [TransformerState], tokens: &[u32]) -> Result<()> {
        if states.len() != tokens.len() {
            return Err(Error::Invalid(format!(
                "advance_batch got {} states but {} tokens",
                states.len(),
                tokens.len()
            )));
        }
        let Some(first) = states.first() else {
            return Ok(());
        };
        let len = first.kv_cache.len();
        let batchable = len > 0
            && len < self.position_limit()
            && states.iter().all(|s| s.kv_cache.len() == len);
        if !batchable || states.len() == 1 {
            for (state, &token) in states.iter_mut().zip(tokens) {
                self.feed(state, &[token])?;
            }
            return Ok(());
        }
        for &token in tokens {
            self.check_token(token)?;
        }
        let caches: Vec<&KvCache> = states.iter().map(|s| &s.kv_cache).collect();
        let mut batch_cache = KvCache::stack(&caches)?;
        let n = states.len();
        let ids = Tensor::from_slice(tokens, (n, 1), self.device())?; // (n, 1)
        let logits = self.forward_step(&ids, &mut batch_cache)?; // (n, 1, vocab)
        let rows = log_softmax_rows(&logits.squeeze(1)?)?; // n rows of vocab
        let caches = batch_cache.unstack(n)?;
        for ((state, cache), (row, &token)) in states
            .iter_mut()
            .zip(caches)
            .zip(rows.into_iter().zip(tokens))
        {
            state.kv_cache = cache;
            state.tokens.push(token);
            state.next_logprobs = Some(row.into());
        }
        Ok(())
    }

    /// Runs `tokens` through the model after `state` in one forward pass and returns
    /// the next-token log-probabilities after each of them.
    fn feed_scored(&self, state: &mut TransformerState, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let logits = self.feed_tail(state, tokens, tokens.len())?; // (t, vocab)
        let rows = log_softmax_rows(&logits)?;
        state.next_logprobs = rows.last().map(|row| row.as_slice().into());
        Ok(rows)
    }

    /// Runs `tokens` through the model after `state`, keeping the last row.
    fn feed(&self, state: &mut TransformerState, tokens: &[u32]) -> Result<()> {
        let last = self.feed_tail(state, tokens, 1)?; // (1, vocab)
        let row = log_softmax_rows(&last)?
            .pop()
            .expect("one row per batch entry");
        state.next_logprobs = Some(row.into());
        Ok(())
    }

    /// Runs `tokens` (not empty) through the model after `state`, with a BOS first on an
    /// empty cache, and returns the logits (keep, vocab) after each of the last `keep`
    /// tokens; the output projection runs on those rows only.
    fn feed_tail(&self, state: &mut TransformerState, tokens: &[u32], keep: usize) -> Result<Tensor> {
        for &token in tokens {
            self.check_token(token)?;
        }
        let bos = self.config().bos_token_id;
        let limit = self.position_limit();
        let fresh = usize::from(bos.is_some()) + tokens.len();
        if fresh > limit {
            return Err(Error::Invalid(format!(
                "{} tokens do not fit the model's context of {limit} positions \
                 (max_position_embeddings in config.json)",
                tokens.len()
            )));
        }
        if !state.kv_cache.is_empty() && state.kv_cache.len() + tokens.len() > limit {
            // Slide: restart the cache from the most recent tokens that leave room.
            let room = slid_window(limit).max(fresh) - fresh;
            state.window_start = state.tokens.len() - room.min(state.tokens.len());
            state.kv_cache = KvCache::new();
        }
        let mut input = Vec::with_capacity(tokens.len() + 1);
        if state.kv_cache.is_empty() {
            input.extend(bos);
            input.extend_from_slice(&state.tokens[state.window_start..]);
        }
        input.extend_from_slice(tokens);
        let n = input.len();
        let ids = Tensor::from_vec(input, (1, n), self.device())?; // (1, n)
        let logits = self.forward_step_tail(&ids, &mut state.kv_cache, keep)?; // (1, keep, vocab)
        state.tokens.extend_from_slice(tokens);
        Ok(logits.squeeze(0)?)
    }

    /// Positions the cache can hold: `max_position_embeddings`, or no limit for a model
    /// without position information.
    fn position_limit(&self) -> usize {
        match self.config().position {
            PositionKind::None => usize::MAX,
            _ => self.config().max_position_embeddings,
        }
    }

    /// The distribution of the first token: after BOS, or uniform without one.
    fn first_logprobs(&self) -> Result<Vec<f32>> {
        match self.config().bos_token_id {
            Some(bos) => {
                let ids = Tensor::from_vec(vec![bos], (1, 1), self.device())?;
                let logits = self.forward(&ids)?; // (1, 1, vocab)
                Ok(log_softmax_rows(&logits.squeeze(1)?)?
                    .pop()
                    .expect("one row"))
            }
            None => {
                let vocab = self.config().vocab_size;
                Ok(vec![-(vocab as f32).ln(); vocab])
            }
        }
    }

    fn check_token(&self, token: u32) -> Result<()> {
        let vocab = self.config().vocab_size;
        if token as usize >= vocab {
            return Err(Error::Invalid(format!(
                "token id {token} is outside the model's vocabulary of {vocab}; \
                 was the text encoded with this model's tokenizer?"
            )));
        }
        Ok(())
    }
}

/// Positions a window keeps when it slides over a context of `context` positions: the
/// most recent three quarters.
pub fn slid_window(context: usize) -> usize {
    context - context / 4
}

impl LanguageModel for Transformer {
    type State = TransformerState;

    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }

    fn initial_state(&self) -> TransformerState {
        TransformerState {
            tokens: Vec::new(),
            window_start: 0,
            kv_cache: KvCache::new(),
            next_logprobs: None,
        }
    }

    fn advance(&self, state: &mut TransformerState, token: u32) -> Result<()> {
        self.feed(state, &[token])
    }

    /// The whole prompt in one forward pass.
    fn prefill(&self, tokens: &[u32]) -> Result<TransformerState> {
        Transformer::prefill(self, tokens)
    }

    /// Beams with equally long caches step as one batched forward pass.
    fn advance_batch(&self, states: &mut [TransformerState], tokens: &[u32]) -> Result<()> {
        Transformer::advance_batch(self, states, tokens)
    }

    /// All of `tokens` in one forward pass, every row kept.
    fn advance_scored(
        &self,
        state: &mut TransformerState,
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>> {
        self.feed_scored(state, tokens)
    }

    /// Drops the last `drop` cached positions (a view, no copy), as long as they are
    /// all in the current window.
    fn rewind(&self, state: &mut TransformerState, drop: usize, row: &[f32]) -> Result<bool> {
        let fed = state.tokens.len() - state.window_start;
        if drop == 0 || drop >= fed || row.len() != self.config().vocab_size {
            return Ok(drop == 0);
        }
        state.kv_cache.truncate(state.kv_cache.len() - drop)?;
        state.tokens.truncate(state.tokens.len() - drop);
        state.next_logprobs = Some(row.into());
        Ok(true)
    }

    fn next_logprobs(&self, states: &[TransformerState]) -> Result<Vec<Vec<f32>>> {
        // Rows were computed by `advance` (batched by `advance_batch`); this only copies.
        let mut first = None;
        states
            .iter()
            .map(|state| match &state.next_logprobs {
                Some(row) => Ok(row.to_vec()),
                None => {
                    if first.is_none() {
                        first = Some(self.first_logprobs()?);
                    }
                    Ok(first.clone().expect("computed just above"))
                }
            })
            .collect()
    }

    /// One forward pass over the whole sequence instead of one step per token.
    fn score(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        for &token in tokens {
            self.check_token(token)?;
        }
        let bos = self.config().bos_token_id;
        let mut input: Vec<u32> = bos.into_iter().collect();
        input.extend_from_slice(tokens);
        let mut logprobs = match bos {
            Some(_) => Vec::with_capacity(tokens.len()),
            None => vec![self.first_logprobs()?[tokens[0] as usize]],
        };
        if input.len() >= 2 {
            let n = input.len();
            let ids = Tensor::from_vec(input, (1, n), self.device())?; // (1, n)
            let rest = self.next_token_logprobs(&ids)?.squeeze(0)?; // (n - 1)
            logprobs.extend(rest.to_vec1::<f32>()?);
        }
        Ok(logprobs)
    }
}
