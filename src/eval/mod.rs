//! Evaluation of a language model: how well it predicts text (perplexity, bits per
//! byte), how well its confidence matches its accuracy (calibration), and what it costs
//! to run (memory, latency, throughput).
//!
//! This module sees a model only through [`crate::lm::LanguageModel`] and the
//! [`WindowScorer`] interface below, so it never touches tensors: the command glue
//! (`cmd/eval.rs`) supplies a scorer that runs whole windows through the transformer in
//! one forward pass. One file per idea:
//! - [`window`]: the sliding-window plan of the strided perplexity recipe.
//! - [`perplexity`]: log-likelihood, cross-entropy, perplexity and bits per byte.
//! - [`calibration`]: expected and maximum calibration error over equal-width bins.
//! - [`reliability`]: the reliability diagram, laid out as a [`figure::Figure`].
//! - [`figure`]: a figure as shapes, written as SVG or as PNG.
//! - [`raster`]: the pixel canvas, bitmap font and PNG encoding behind a PNG figure.
//! - [`choices`]: answer-level calibration over multiple-choice items (JSONL).
//! - [`efficiency`]: load time, memory, time to first token, latency, throughput.
//! - [`table`]: terminal tables, including the side-by-side comparison of models.

pub mod calibration;
pub mod choices;
pub mod efficiency;
pub mod figure;
pub mod perplexity;
pub mod raster;
pub mod reliability;
pub mod table;
pub mod window;

pub use calibration::{Bin, Calibration};
pub use choices::{AnswerReport, Item, ItemScore};
pub use efficiency::{Efficiency, EfficiencySettings, Stat};
pub use perplexity::Perplexity;
pub use window::{rolling_predictions, windows, Window};

use crate::Result;

/// What a model predicted at one position of a text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// log p(actual token | tokens before it), in nats.
    pub logprob: f32,
    /// log-probability of the model's most likely token there, in nats.
    pub top_logprob: f32,
    /// The model's most likely token there (the lowest id among ties).
    pub top_id: u32,
    /// The actual token.
    pub target: u32,
}

impl Prediction {
    /// Whether the model's top-1 choice was the actual token.
    pub fn correct(&self) -> bool {
        self.top_id == self.target
    }

    /// The top-1 probability, the confidence that calibration measures.
    pub fn confidence(&self) -> f64 {
        f64::from(self.top_logprob).exp()
    }
}

/// A model that scores whole windows of token ids at once.
pub trait WindowScorer {
    /// For each `(ids, from)`: the predictions of positions `from..ids.len()` of `ids`,
    /// each conditioned on the window's tokens before it (`from >= 1`).
    fn score_windows(&self, windows: &[(&[u32], usize)]) -> Result<Vec<Vec<Prediction>>>;
}
