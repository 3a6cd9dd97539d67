//! Logits processors: each one rewrites a row of next-token scores in place, given the
//! tokens so far; a [`ProcessorChain`] runs them in order and a choice rule
//! ([`super::sampler::Choice`]) then picks the token.
//!
//! Scores are natural-log "logits" (the models hand over log-probabilities, which are
//! logits up to a constant); a removed token gets `-inf`. The filters keep at least one
//! token, so a row always stays a distribution after a softmax.
//!
//! - temperature: divide by T (T < 1 sharpens, T > 1 flattens);
//! - top-k: keep the k largest (ties with the k-th kept, as `transformers` does);
//! - top-p, nucleus sampling (Holtzman et al. 2020, "The Curious Case of Neural Text
//!   Degeneration"): keep the smallest set of most likely tokens whose mass reaches p;
//! - epsilon sampling (Hewitt et al. 2022, "Truncation Sampling as Language Model
//!   Desmoothing"): drop tokens with probability below epsilon;
//! - min-p (Nguyen et al. 2024): drop tokens below `min_p` times the top probability;
//! - locally typical sampling (Meister et al. 2023, "Locally Typical Sampling"): keep the
//!   tokens whose surprisal is closest to the entropy, up to mass p;
//! - repetition penalty (Keskar et al. 2019, CTRL), `transformers`' definition: a token
//!   already in the sequence (prompt included) has a positive score divided by the
//!   penalty and a negative one multiplied by it. Our scores are log-probabilities, so on
//!   a transformer this matches `transformers` exactly where it too penalises
//!   log-probabilities (beam search), not where it penalises raw logits (sampling);
//! - logit bias: add a constant to chosen tokens.
//!
//! Bans, allowed lists and forced phrases live in [`super::constrained`].

use std::collections::HashSet;

use crate::{Error, Result};

/// What a processor may look at besides the scores: the sequence so far.
#[derive(Debug, Clone, Copy)]
pub struct StepContext<'a> {
    /// Prompt followed by the tokens generated so far.
    pub tokens: &'a [u32],
    /// How many of `tokens` are the prompt.
    pub prompt_len: usize,
    /// The generation budget, so constraints can plan.
    pub max_new_tokens: usize,
}

impl<'a> StepContext<'a> {
    /// The tokens generated so far.
    pub fn generated(&self) -> &'a [u32] {
        &self.tokens[self.prompt_len.min(self.tokens.len())..]
    }

    /// Tokens still allowed, this one included.
    pub fn remaining(&self) -> usize {
        self.max_new_tokens.saturating_sub(self.generated().len())
    }
}

/// One step of the chain: rewrites next-token scores in place.
pub trait LogitsProcessor {
    /// Rewrites `logits` (one entry per vocabulary id) for the next token after `ctx`.
    fn process(&self, ctx: &StepContext, logits: &mut [f32]);
}

/// Processors applied in order.
#[derive(Default)]
pub struct ProcessorChain {
    processors: Vec<Box<dyn LogitsProcessor>>,
}

impl std::fmt::Debug for ProcessorChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProcessorChain({} processors)", self.processors.len())
    }
}

impl ProcessorChain {
    /// An empty chain: scores pass unchanged.
    pub fn new() -> Self {
        ProcessorChain::default()
    }

    /// Appends a processor.
    pub fn push(&mut self, processor: impl LogitsProcessor + 'static) -> &mut Self {
        self.processors.push(Box::new(processor));
        self
    }

    /// Appends a boxed processor.
    pub fn push_boxed(&mut self, processor: Box<dyn LogitsProcessor>) -> &mut Self {
        self.processors.push(processor);
        self
    }

    /// Appends a processor (builder style).
    pub fn with(mut self, processor: impl LogitsProcessor + 'static) -> Self {
        self.push(processor);
        self
    }

    /// Number of processors.
    pub fn len(&self) -> usize {
        self.processors.len()
    }

    /// True when no processor is set.
    pub fn is_empty(&self) -> bool {
        self.processors.is_empty()
    }

    /// Runs every processor on `logits`.
    pub fn apply(&self, ctx: &StepContext, logits: &mut [f32]) {
        for processor in &self.processors {
            processor.process(ctx, logits);
        }
    }

    /// The standard sampling chain, in `transformers`' order: repetition penalty, then
    /// temperature, top-k, top-p, min-p, typical, epsilon. Unset knobs add nothing.
    pub fn sampling(params: &SamplingParams) -> Result<Self> {
        let order: Vec<Stage> = Stage::DEFAULT_ORDER.iter().map(|(stage, _)| *stage).collect();
        ProcessorChain::sampling_in_order(params, &order)
    }
}

/// The knobs of ancestral sampling; `None` leaves a knob off.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature, > 0.
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens, k >= 1.
    pub top_k: Option<usize>,
    /// Nucleus mass, in (0, 1].
    pub top_p: Option<f32>,
    /// Epsilon cutoff, in [0, 1).
    pub epsilon: Option<f32>,
    /// Min-p ratio, in [0, 1].
    pub min_p: Option<f32>,
    /// Typical mass, in (0, 1].
    pub typical: Option<f32>,
    /// Repetition penalty, > 0 (1 = none).
    pub repetition_penalty: Option<f32>,
}

impl SamplingParams {
    /// The processor of one sampling stage, if its knob is set to something that
    /// changes the scores (`None` for the stages that are not sampling knobs).
    pub fn processor(&self, stage: Stage) -> Option<Box<dyn LogitsProcessor>> {
        fn boxed(p: impl LogitsProcessor + 'static) -> Box<dyn LogitsProcessor> {
            Box::new(p)
        }
        match stage {
            Stage::RepetitionPenalty => self
                .repetition_penalty
                .filter(|&r| r != 1.0)
                .map(|r| boxed(RepetitionPenalty(r))),
            Stage::Temperature => self.temperature.filter(|&t| t != 1.0).map(|t| boxed(Temperature(t))),
            Stage::TopK => self.top_k.map(|k| boxed(TopK(k))),
            Stage::TopP => self.top_p.filter(|&p| p < 1.0).map(|p| boxed(TopP(p))),
            Stage::MinP => self.min_p.filter(|&m| m > 0.0).map(|m| boxed(MinP(m))),
            Stage::Typical => self.typical.filter(|&p| p < 1.0).map(|p| boxed(Typical(p))),
            Stage::Epsilon => self.epsilon.filter(|&e| e > 0.0).map(|e| boxed(Epsilon(e))),
            Stage::Ban | Stage::LogitBias | Stage::NoRepeatNgram => None,
        }
    }

    /// Checks every knob's range, naming the bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str, value: f32, range: &str| {
            Err(Error::Invalid(format!("{name} must be {range}, got {value}")))
        };
        if let Some(t) = self.temperature {
            if !(t > 0.0 && t.is_finite()) {
                return bad("temperature", t, "a positive number (use greedy decoding for 0)");
            }
        }
        if self.top_k == Some(0) {
            return Err(Error::Invalid("top-k must be at least 1".into()));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad("top-p", p, "in (0, 1]");
            }
        }
        if let Some(e) = self.epsilon {
            if !(0.0..1.0).contains(&e) {
                return bad("epsilon", e, "in [0, 1)");
            }
        }
        if let Some(m) = self.min_p {
            if !(0.0..=1.0).contains(&m) {
                return bad("min-p", m, "in [0, 1]");
            }
        }
        if let Some(p) = self.typical {
            if !(p > 0.0 && p <= 1.0) {
                return bad("typical", p, "in (0, 1]");
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !(r > 0.0 && r.is_finite()) {
                return bad("repetition penalty", r, "a positive number");
            }
        }
        Ok(())
    }
}

/// Probabilities of a row of logits (softmax, accumulated in f64); `-inf` gives 0.
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return vec![0.0; logits.len()];
    }
    let mut probs: Vec<f64> = logits.iter().map(|&l| ((l - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    for p in &mut probs {
        *p /= total;
    }
    probs
}

/// Log-softmax of a row of logits, in place (`-inf` stays `-inf`).
pub fn log_softmax_in_place(logits: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let total: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_z = max as f64 + total.ln();
    for l in logits.iter_mut() {
        *l = (*l as f64 - log_z) as f32;
    }
}

/// Ids ordered by descending score, ties by ascending id.
fn descending(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order
}

/// Divides every score by the temperature.
#[derive(Debug, Clone, Copy)]
pub struct Temperature(pub f32);

impl LogitsProcessor for Temperature {
    fn process(&self, _: &StepContext, logits: &mut [f32]) {
        for l in logits.iter_mut() {
            *l /= self.0;
        }
    }
}

/// Keeps the k highest scores (and any tied with the k-th).
#[derive(Debug, Clone, Copy)]
pub struct TopK(pub usize);

impl LogitsProcessor for TopK {
    fn process(&self, _: &StepContext, logits: &mut [f32]) {
        let k = self.0.max(1);
        if k >= logits.len() {
            return;
        }
        let mut values = logits.to_vec();
        values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let threshold = values[k - 1];
        for l in logits.iter_mut() {
            if *l < threshold {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Nucleus sampling: keeps the most likely tokens until their mass reaches p.
#[derive(Debug, Clone, Copy)]
pub struct TopP(pub f32);

impl LogitsProcessor for TopP {
    fn process(&self, _: &StepContext, logits: &mut [f32]) {
        if self.0 >= 1.0 {
            return;
        }
        let probs = softmax(logits);
        let mut mass = 0.0;
        let mut keep = vec![false; logits.len()];
        for id in descending(&probs) {
            // A token is kept when the mass before it is still short of p, so the token
            // that crosses p is kept and at least one token always is.
            if mass >= self.0 as f64 {
                break;
            }
            keep[id] = true;
            mass += probs[id];
        }
        for (l, keep) in logits.iter_mut().zip(keep) {
            if !keep {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Epsilon sampling: drops tokens with probability below epsilon, keeping the best.
#[derive(Debug, Clone, Copy)]
pub struct Epsilon(pub f32);

impl LogitsProcessor for Epsilon {
    fn process(&self, _: &StepContext, logits: &mut [f32]) {
        let probs = softmax(logits);
        let best = probs.iter().copied().fold(0.0, f64::max);
        for (l, p) in logits.iter_mut().zip(probs) {
            if p < self.0 as f64 && p < best {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Min-p: drops tokens below `min_p` times the most likely token's probability.
#[derive(Debug, Clone, Copy)]
pub struct MinP(pub f32);

impl LogitsProcessor for MinP {
    fn process(&self, _: &StepContext, logits: &mut [f32]) {
        let probs = softmax(logits);
        let best = probs.iter().copied().fold(0.0, f64::max);
        let threshold = self.0 as f64 * best;
        for (l, p) in logits.iter_mut().zip(probs) {
            if p < threshold {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Locally typical sampling: keeps the tokens whose surprisal is nearest the entropy,
/// up to mass p (`transformers`' `TypicalLogitsWarper`).
#[derive(Debug, Clone, Copy)]
pub struct Typical(pub f32);

impl LogitsProcessor for Typical {
    fn process(&self, _: &StepContext, logits: &mut [f32]) {
        if self.0 >= 1.0 {
            return;
        }
        let probs = softmax(logits);
        let entropy: f64 = probs
            .iter()
            .filter(|&&p| p > 0.0)
            .map(|&p| -p * p.ln())
            .sum();
        // Distance of each token's surprisal from the entropy; removed tokens are farthest.
        let distance: Vec<f64> = probs
            .iter()
            .map(|&p| if p > 0.0 { (-p.ln() - entropy).abs() } else { f64::INFINITY })
            .collect();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| distance[a].total_cmp(&distance[b]).then(a.cmp(&b)));
        let mut mass = 0.0;
        let mut last = 0;
        for (rank, &id) in order.iter().enumerate() {
            last = rank;
            mass += probs[id];
            if mass >= self.0 as f64 {
                break;
            }
        }
        let cutoff = distance[order[last]];
        for (l, d) in logits.iter_mut().zip(distance) {
            if d > cutoff {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// Penalises tokens already in the sequence (prompt included): positive scores are
/// divided by the penalty, negative ones multiplied.
#[derive(Debug, Clone, Copy)]
pub struct RepetitionPenalty(pub f32);

impl LogitsProcessor for RepetitionPenalty {
    fn process(&self, ctx: &StepContext, logits: &mut [f32]) {
        let seen: HashSet<u32> = ctx.tokens.iter().copied().collect();
        for token in seen {
            if let Some(l) = logits.get_mut(token as usize) {
                *l = if *l < 0.0 { *l * self.0 } else { *l / self.0 };
            }
        }
    }
}

/// Adds a bias to chosen tokens (`-inf` bans, a large value all but forces).
#[derive(Debug, Clone, Default)]
pub struct LogitBias(pub Vec<(u32, f32)>);

impl LogitsProcessor for LogitBias {
    fn process(&self, _: &StepContext, logits: &mut [f32]) {
        for &(token, bias) in &self.0 {
            if let Some(l) = logits.get_mut(token as usize) {
                *l += bias;
            }
        }
    }
}

/// One named stage of the processor chain, for `--processor-order` (as llama.cpp's
/// `--samplers` names its sampler chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Banned words and phrases.
    Ban,
    /// Constant biases on chosen tokens.
    LogitBias,
    /// No n-gram twice.
    NoRepeatNgram,
    /// The repetition penalty.
    RepetitionPenalty,
    /// Temperature.
    Temperature,
    /// Top-k.
    TopK,
    /// Nucleus (top-p).
    TopP,
    /// Min-p.
    MinP,
    /// Locally typical sampling.
    Typical,
    /// Epsilon sampling.
    Epsilon,
}

impl Stage {
    /// Every stage with its name, in the default order: constraints first (as
    /// `transformers` puts bans before warpers), then the penalties, then temperature
    /// and the truncations in `transformers`' order.
    pub const DEFAULT_ORDER: [(Stage, &'static str); 10] = [
        (Stage::Ban, "ban"),
        (Stage::LogitBias, "logit-bias"),
        (Stage::NoRepeatNgram, "no-repeat-ngram"),
        (Stage::RepetitionPenalty, "repetition-penalty"),
        (Stage::Temperature, "temperature"),
        (Stage::TopK, "top-k"),
        (Stage::TopP, "top-p"),
        (Stage::MinP, "min-p"),
        (Stage::Typical, "typical"),
        (Stage::Epsilon, "epsilon"),
    ];

    /// The stage's name on the command line.
    pub fn name(self) -> &'static str {
        Stage::DEFAULT_ORDER
            .iter()
            .find(|(stage, _)| *stage == self)
            .map(|(_, name)| *name)
            .expect("every stage is in the default order")
    }

    /// Parses a comma-separated order such as `temperature,top-k,top-p`; each stage at
    /// most once.
    pub fn parse_order(text: &str) -> Result<Vec<Stage>> {
        let mut order = Vec::new();
        for name in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let stage = Stage::DEFAULT_ORDER
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(stage, _)| *stage)
                .ok_or_else(|| {
                    let names: Vec<&str> = Stage::DEFAULT_ORDER.iter().map(|(_, n)| *n).collect();
                    Error::Invalid(format!(
                        "unknown processor `{name}` in the order; the processors are {}",
                        names.join(",")
                    ))
                })?;
            if order.contains(&stage) {
                return Err(Error::Invalid(format!("the processor `{name}` appears twice in the order")));
            }
            order.push(stage);
        }
        Ok(order)
    }
}

impl ProcessorChain {
    /// The sampling knobs of `params` in the given order of stages (stages that are not
    /// sampling knobs are skipped: the caller builds those). A set knob whose stage is
    /// missing from `order` is an error, so no flag is silently ignored.
    pub fn sampling_in_order(params: &SamplingParams, order: &[Stage]) -> Result<Self> {
        params.validate()?;
        let set = [
            (Stage::RepetitionPenalty, params.repetition_penalty.is_some()),
            (Stage::Temperature, params.temperature.is_some()),
            (Stage::TopK, params.top_k.is_some()),
            (Stage::TopP, params.top_p.is_some()),
            (Stage::MinP, params.min_p.is_some()),
            (Stage::Typical, params.typical.is_some()),
            (Stage::Epsilon, params.epsilon.is_some()),
        ];
        for (stage, is_set) in set {
            if is_set && !order.contains(&stage) {
                return Err(Error::Invalid(format!(
                    "--{} is set but `{}` is not in the processor order",
                    stage.name(),
                    stage.name()
                )));
            }
        }
        let mut chain = ProcessorChain::new();
        for &stage in order {
            if let Some(processor) = params.processor(stage) {
                chain.processors.push(processor);
            }
        }
        Ok(chain)
    }
}
