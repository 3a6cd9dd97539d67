//! Constrained decoding at the token level, as processors any strategy can run.
//!
//! - [`BannedTokens`] and [`AllowedTokens`]: a fixed set of ids removed, or the only ids
//!   kept (a one-state automaton).
//! - [`BannedPhrases`]: `transformers`' `NoBadWordsLogitsProcessor`: when the sequence
//!   ends with all but the last token of a banned phrase, that last token is removed, so
//!   the phrase can never be completed (a phrase of one token is simply banned).
//! - [`NoRepeatNgram`]: no n-gram occurs twice (Paulus et al. 2018).
//! - [`ForcedPhrases`]: every phrase must appear in the generated tokens. The processor
//!   tracks, per phrase, the longest suffix of the output that is a prefix of the phrase
//!   (a Knuth-Morris-Pratt style automaton recomputed from the output). Once the model
//!   starts a phrase of its own accord the phrase is completed; when the tokens still
//!   needed reach the remaining budget, the next needed token is forced; until every
//!   phrase is in, the end-of-sequence token is banned. So every phrase appears
//!   whenever the phrases fit in `max_new_tokens` together.
//!
//! Put bans before the sampling filters (as `transformers` does) and forced phrases
//! last, so that no filter removes a forced token.
//!
//! Bans and forces act on token ids: with a subword tokenizer a word can have several
//! spellings in ids (with or without a leading space); the caller lists each.

use std::collections::HashSet;

use super::processors::{LogitsProcessor, StepContext};

/// Removes a fixed set of tokens.
#[derive(Debug, Clone, Default)]
pub struct BannedTokens(pub Vec<u32>);

impl LogitsProcessor for BannedTokens {
    fn process(&self, _: &StepContext, logits: &mut [f32]) {
        for &token in &self.0 {
            if let Some(l) = logits.get_mut(token as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Keeps only a fixed set of tokens.
#[derive(Debug, Clone, Default)]
pub struct AllowedTokens(pub Vec<u32>);

impl LogitsProcessor for AllowedTokens {
    fn process(&self, _: &StepContext, logits: &mut [f32]) {
        let allowed: HashSet<u32> = self.0.iter().copied().collect();
        for (id, l) in logits.iter_mut().enumerate() {
            if !allowed.contains(&(id as u32)) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Phrases (token sequences) that must never be completed.
#[derive(Debug, Clone, Default)]
pub struct BannedPhrases(pub Vec<Vec<u32>>);

impl LogitsProcessor for BannedPhrases {
    fn process(&self, ctx: &StepContext, logits: &mut [f32]) {
        for phrase in &self.0 {
            let Some((&last, head)) = phrase.split_last() else {
                continue;
            };
            if ctx.tokens.ends_with(head) {
                if let Some(l) = logits.get_mut(last as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// Forbids any n-gram (of `self.0` tokens) from occurring twice.
#[derive(Debug, Clone, Copy)]
pub struct NoRepeatNgram(pub usize);

impl LogitsProcessor for NoRepeatNgram {
    fn process(&self, ctx: &StepContext, logits: &mut [f32]) {
        let n = self.0;
        let tokens = ctx.tokens;
        if n == 0 || tokens.len() + 1 < n {
            return;
        }
        let head = &tokens[tokens.len() + 1 - n..];
        for window in tokens.windows(n) {
            if &window[..n - 1] == head {
                if let Some(l) = logits.get_mut(window[n - 1] as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// Phrases that must each appear in the generated tokens.
#[derive(Debug, Clone, Default)]
pub struct ForcedPhrases {
    /// The phrases, as token ids.
    pub phrases: Vec<Vec<u32>>,
    /// The end-of-sequence id, banned until every phrase is in.
    pub eos: Option<u32>,
}

impl ForcedPhrases {
    /// Whether every phrase occurs in `generated`.
    pub fn satisfied(&self, generated: &[u32]) -> bool {
        self.phrases.iter().all(|p| contains(generated, p))
    }

    /// The token that must come next after `generated` with `remaining` tokens left,
    /// if any must.
    fn forced_token(&self, generated: &[u32], remaining: usize) -> Option<u32> {
        let open: Vec<(&Vec<u32>, usize)> = self
            .phrases
            .iter()
            .filter(|p| !p.is_empty() && !contains(generated, p))
            .map(|p| (p, progress(generated, p)))
            .collect();
        // A phrase under way is finished first (the one furthest along; ties: listed first).
        let mut best: Option<(&Vec<u32>, usize)> = None;
        for &(phrase, done) in &open {
            if done > 0 && best.is_none_or(|(_, b)| done > b) {
                best = Some((phrase, done));
            }
        }
        if let Some((phrase, done)) = best {
            return Some(phrase[done]);
        }
        let needed: usize = open.iter().map(|(p, done)| p.len() - done).sum();
        if needed >= remaining {
            return open.first().map(|(p, done)| p[*done]);
        }
        None
    }
}

impl LogitsProcessor for ForcedPhrases {
    fn process(&self, ctx: &StepContext, logits: &mut [f32]) {
        let generated = ctx.generated();
        if let Some(token) = self.forced_token(generated, ctx.remaining()) {
            let Some(&kept) = logits.get(token as usize) else {
                return;
            };
            logits.fill(f32::NEG_INFINITY);
            // Keep the token's own score (beam scores stay log-probabilities) unless an
            // earlier processor removed it.
            logits[token as usize] = if kept.is_finite() { kept } else { 0.0 };
            return;
        }
        if let Some(eos) = self.eos {
            if !self.satisfied(generated) {
                if let Some(l) = logits.get_mut(eos as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// Whether `phrase` occurs contiguously in `tokens`.
pub(crate) fn contains(tokens: &[u32], phrase: &[u32]) -> bool {
    phrase.is_empty() || tokens.windows(phrase.len()).any(|w| w == phrase)
}

/// The longest proper prefix of `phrase` that `tokens` ends with.
fn progress(tokens: &[u32], phrase: &[u32]) -> usize {
    (1..phrase.len())
        .rev()
        .find(|&n| tokens.ends_with(&phrase[..n]))
        .unwrap_or(0)
}
