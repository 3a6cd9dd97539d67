//! Log-likelihood and the figures derived from it (course lecture 3): per-token
//! cross-entropy, token- and word-level perplexity, and bits per byte, the link between
//! a language model and a compressor (Shannon 1948: an ideal code spends -log2 p bits).

use crate::{Error, Result};

/// How well a model predicted a text.
#[derive(Debug, Clone, PartialEq)]
pub struct Perplexity {
    /// Tokens scored.
    pub tokens: usize,
    /// Total negative log-likelihood, nats.
    pub total_nll: f64,
    /// Cross-entropy per token, nats: `total_nll / tokens`.
    pub mean_nll: f64,
    /// exp(mean_nll).
    pub perplexity: f64,
    /// Whitespace-separated words of the text (lm-eval's word count).
    pub words: usize,
    /// exp(total_nll / words): comparable across tokenizers.
    pub word_perplexity: f64,
    /// UTF-8 bytes of the text.
    pub bytes: usize,
    /// total_nll / ln 2 / bytes: comparable across tokenizers.
    pub bits_per_byte: f64,
}

impl Perplexity {
    /// The figures for `tokens` predictions whose negative log-likelihoods add up to
    /// `total_nll` (nats), over a text of `words` words and `bytes` bytes.
    pub fn new(tokens: usize, total_nll: f64, words: usize, bytes: usize) -> Result<Self> {
        if tokens == 0 {
            return Err(Error::Invalid(
                "no token was scored: the text must be at least one token longer than its \
                 first token (a model without a beginning-of-sequence token cannot score the first)"
                    .into(),
            ));
        }
        let mean_nll = total_nll / tokens as f64;
        Ok(Perplexity {
            tokens,
            total_nll,
            mean_nll,
            perplexity: mean_nll.exp(),
            words,
            word_perplexity: ratio(total_nll, words).exp(),
            bytes,
            bits_per_byte: ratio(total_nll / std::f64::consts::LN_2, bytes),
        })
    }

    /// The figures for per-token log-probabilities (nats), summed in f64.
    pub fn from_logprobs(logprobs: &[f32], words: usize, bytes: usize) -> Result<Self> {
        let total_nll = -logprobs.iter().map(|&lp| f64::from(lp)).sum::<f64>();
        Perplexity::new(logprobs.len(), total_nll, words, bytes)
    }

    /// Adds the figures of another text scored by the same model.
    pub fn merge(&self, other: &Perplexity) -> Result<Self> {
        Perplexity::new(
            self.tokens + other.tokens,
            self.total_nll + other.total_nll,
            self.words + other.words,
            self.bytes + other.bytes,
        )
    }
}

/// `a / b`, or NaN when there is nothing to divide by (no words, no bytes).
fn ratio(a: f64, b: usize) -> f64 {
    match b {
        0 => f64::NAN,
        b => a / b as f64,
    }
}

/// The number of whitespace-separated words of `text`.
pub fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_predictions_give_the_vocabulary_size() {
        // Every token at probability 1/8: perplexity 8, 3 bits per token.
        let logprobs = vec![-(8f32).ln(); 6];
        let ppl = Perplexity::from_logprobs(&logprobs, 3, 6).unwrap();
        assert!((ppl.perplexity - 8.0).abs() < 1e-5);
        assert!((ppl.bits_per_byte - 3.0).abs() < 1e-5); // one byte per token
        assert!((ppl.word_perplexity - 64.0).abs() < 1e-3); // two tokens per word
    }

    #[test]
    fn nothing_scored_is_an_error() {
        assert!(Perplexity::from_logprobs(&[], 0, 0).is_err());
    }

    #[test]
    fn merging_is_scoring_the_concatenation() {
        let a = Perplexity::from_logprobs(&[-1.0, -2.0], 1, 4).unwrap();
        let b = Perplexity::from_logprobs(&[-3.0], 2, 5).unwrap();
        let both = Perplexity::from_logprobs(&[-1.0, -2.0, -3.0], 3, 9).unwrap();
        assert_eq!(a.merge(&b).unwrap(), both);
    }
}
