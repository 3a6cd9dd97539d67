//! When a sequence ends: a token budget, an end-of-sequence id, and stop strings (which
//! need the tokenizer, handed in as a detokenizing function). The token that ends a
//! sequence is kept: EOS is the last id, and the text ends with the stop string.

use std::sync::Arc;

/// Turns generated ids back into text, to look for stop strings.
pub type Detokenizer = Arc<dyn Fn(&[u32]) -> String + Send + Sync>;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` were generated.
    Length,
    /// The end-of-sequence token was generated.
    Eos,
    /// The text came to contain a stop string.
    Stop,
}

impl FinishReason {
    /// The reason as a short word, for output.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
        }
    }
}

/// The stop conditions of a generation.
#[derive(Clone, Default)]
pub struct StopCriteria {
    /// The most tokens to generate.
    pub max_new_tokens: usize,
    /// The end-of-sequence id, if the model has one.
    pub eos: Option<u32>,
    /// Generation ends once the generated text contains one of these.
    pub stop_strings: Vec<String>,
    /// Needed for `stop_strings`.
    pub detokenize: Option<Detokenizer>,
}

impl std::fmt::Debug for StopCriteria {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopCriteria")
            .field("max_new_tokens", &self.max_new_tokens)
            .field("eos", &self.eos)
            .field("stop_strings", &self.stop_strings)
            .finish()
    }
}

impl StopCriteria {
    /// Stop after `max_new_tokens` only.
    pub fn max_tokens(max_new_tokens: usize) -> Self {
        StopCriteria {
            max_new_tokens,
            ..StopCriteria::default()
        }
    }

    /// Whether the sequence whose generated part is `generated` is finished.
    pub fn check(&self, generated: &[u32]) -> Option<FinishReason> {
        let last = generated.last().copied();
        if last.is_some() && last == self.eos {
            return Some(FinishReason::Eos);
        }
        if let (false, Some(detokenize), Some(_)) =
            (self.stop_strings.is_empty(), &self.detokenize, last)
        {
            let text = detokenize(generated);
            if self.stop_strings.iter().any(|s| !s.is_empty() && text.contains(s.as_str())) {
                return Some(FinishReason::Stop);
            }
        }
        (generated.len() >= self.max_new_tokens).then_some(FinishReason::Length)
    }
}
