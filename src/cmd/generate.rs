//! `nlp generate`: text from a transformer directory or an n-gram model, by any
//! decoding strategy of `crate::decode`.
//!
//! Glue only: parse and check the flags, load the model(s) and the tokenizer, build the
//! processor chain and stop conditions, call one strategy, print the continuations
//! (stdout; plain decoding streams them) and the speed (stderr, or in the JSON objects).
//! `--interactive` runs the same strategies in a loop with a person (cmd/interactive.rs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use super::loaded::{Companion, Loaded};
use super::Context;
use crate::decode::{
    self, BannedPhrases, BannedTokens, BeamSettings, Choice, ContrastiveSettings, DecodeSettings,
    DiverseBeamSettings, EarlyStopping, ForcedPhrases, Generation, LogitBias, NoRepeatNgram,
    ProcessorChain, SamplingParams, Stage, StopCriteria, Utility,
};
use crate::lm::LanguageModel;
use crate::ngram::NgramModel;

const AFTER_HELP: &str = "\
Strategies (pick at most one): plain sampling or --greedy (default), --beam N (with
--diverse-groups or --stochastic), --amateur (contrastive), --mbr, --draft (speculative),
--self-consistency, --discriminator with --discard-below, --fudge.

Processor order: the per-step processors run in the order of --processor-order, default
  ban,logit-bias,no-repeat-ngram,repetition-penalty,temperature,top-k,top-p,min-p,typical,epsilon
(as llama.cpp's sampler chain). Every stage whose flag is set must be listed; forced
phrases (--force) always run last so no filter removes a forced token. The choice rule
(argmax with --greedy, else a seeded draw) picks from what the chain leaves.

Second models (--amateur, --draft, --discriminator, --fudge) must share the model's token
ids: a model directory with the same tokenizer, or beside an n-gram model one with the
same words; beside a transformer, an n-gram model counted over the transformer's ids
with `nlp ngram train -t DIR/tokenizer.json` (its words are ids; every one must be below
the model's vocabulary size, which is how the pairing is checked, since an ARPA file
does not name its tokenizer).

Discriminators (--discriminator, --fudge): a language model of text that has the wanted
attribute (a model directory or an n-gram file with the generator's vocabulary, e.g. an
n-gram model trained on polite text). A text's attribute probability is Bayes' rule
between that model and the generator with equal priors, on per-token likelihoods:
  P(attribute | y) = sigmoid(mean over y's tokens of [log p_disc - log p_model]).
--discard-below P keeps samples with P(attribute | y) >= P; --fudge multiplies each
candidate token's probability by P(attribute | prefix + token) over the --fudge-top-k
best candidates and renormalises (Yang and Klein 2021).

Interactive (--interactive turns|choose): `turns` alternates: type text (Enter), the model
continues it; an empty line lets the model go on. `choose` shows -n continuations (3 if
-n is not given): type a number to keep one, other text to write it yourself, an empty
line for new options. End with Ctrl-D; the whole text is printed at the end.

Examples:
  nlp generate -m model/ --prompt 'ROMEO:' --temperature 0.8 --top-p 0.95 --seed 1
  nlp generate -m model/ --prompt 'ROMEO:' --beam 4 --max-new-tokens 24 --json
  nlp generate -m big/ --draft small/ --draft-k 4 --greedy --prompt 'ROMEO:'
  nlp ngram train --order 5 -t big/tokenizer.json tinyshakespeare -o ids.arpa
  nlp generate -m big/ --draft ids.arpa --greedy --prompt 'ROMEO:'
  nlp generate -m lm.arpa --mbr 16 --mbr-utility bleu --prompt 'the'
  echo 'Q: 2+3? A:' | nlp generate -m model/ - --self-consistency 9 --answer-regex '(\\d+)'";

/// `nlp generate`
#[derive(Debug, clap::Args)]
#[command(after_long_help = AFTER_HELP)]
pub struct GenerateArgs {
    /// A model directory (config.json, model.safetensors, tokenizer.json) or an n-gram
    /// model file (.arpa, .arpa.gz or .bin; words split on whitespace).
    #[arg(short, long, value_name = "MODEL")]
    pub model: PathBuf,

    /// `-` reads the prompt from stdin.
    #[arg(value_name = "-", conflicts_with_all = ["prompt", "prompt_file", "prompt_ids"])]
    pub stdin: Option<String>,

    /// A LoRA adapter directory (PEFT layout) to apply to the model without merging,
    /// optionally with a weight on its update (`DIR:0.5`). Repeatable.
    #[arg(long = "adapter", value_name = "DIR[:WEIGHT]")]
    pub adapters: Vec<super::loaded::AdapterSpec>,

    /// The text to continue (default: empty, or the start-of-sentence of an n-gram model).
    #[arg(long, value_name = "TEXT", conflicts_with_all = ["prompt_file", "prompt_ids"])]
    pub prompt: Option<String>,

    /// Read the prompt from a file (`-` for stdin).
    #[arg(long, value_name = "FILE", conflicts_with = "prompt_ids")]
    pub prompt_file: Option<PathBuf>,

    /// The prompt as token ids, e.g. `--prompt-ids 5,17,3`.
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,

    /// The most tokens to generate per sequence.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub max_new_tokens: usize,

    /// Pick the most likely token at every step (default: sample).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p", "epsilon", "min_p", "typical", "stochastic", "mbr", "self_consistency", "discriminator"])]
    pub greedy: bool,

    /// Sampling temperature (> 0; < 1 sharpens, > 1 flattens).
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,

    /// Sample among the K most likely tokens.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,

    /// Nucleus sampling: the most likely tokens up to mass P, in (0, 1] (Holtzman et al. 2020).
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,

    /// Epsilon sampling: drop tokens below probability E (Hewitt et al. 2022).
    #[arg(long, value_name = "E")]
    pub epsilon: Option<f32>,

    /// Min-p sampling: drop tokens below M times the top probability.
    #[arg(long, value_name = "M")]
    pub min_p: Option<f32>,

    /// Locally typical sampling with mass P (Meister et al. 2023).
    #[arg(long, value_name = "P")]
    pub typical: Option<f32>,

    /// Penalise tokens already present (> 1 discourages repetition), as transformers.
    #[arg(long, value_name = "R")]
    pub repetition_penalty: Option<f32>,

    /// Never repeat an n-gram of N tokens (Paulus et al. 2018).
    #[arg(long, value_name = "N")]
    pub no_repeat_ngram: Option<usize>,

    /// Never generate this word or phrase, in any of its tokenizations (repeatable).
    #[arg(long, value_name = "WORD", num_args = 1..)]
    pub ban: Vec<String>,

    /// Add BIAS to one token's log-probability: `ID=BIAS` or `TOKEN=BIAS` (a token's
    /// text, e.g. `e=-2`; `-inf` bans). Repeatable.
    #[arg(long, value_name = "TOKEN=BIAS", num_args = 1.., allow_hyphen_values = true)]
    pub logit_bias: Vec<String>,

    /// This phrase must appear in the output (repeatable).
    #[arg(long, value_name = "PHRASE", num_args = 1..)]
    pub force: Vec<String>,

    /// The order of the per-step processors (comma-separated stage names; see below).
    #[arg(
        long,
        value_name = "LIST",
        default_value = "ban,logit-bias,no-repeat-ngram,repetition-penalty,temperature,top-k,top-p,min-p,typical,epsilon"
    )]
    pub processor_order: String,

    /// Beam search with N beams (as transformers' `num_beams`).
    #[arg(long = "beam", alias = "num-beams", value_name = "N")]
    pub beam: Option<usize>,

    /// Beam score = sum of log-probs / length^L (> 0 favours longer outputs; default 1).
    #[arg(long, value_name = "L", requires = "beam")]
    pub length_penalty: Option<f32>,

    /// Stop beam search as soon as N hypotheses are finished.
    #[arg(long, requires = "beam")]
    pub early_stopping: bool,

    /// Diverse beam search with G groups (Vijayakumar et al. 2016).
    #[arg(long, value_name = "G", requires = "beam", conflicts_with = "stochastic")]
    pub diverse_groups: Option<usize>,

    /// Penalty per earlier-group beam that chose the same token (default 0.5).
    #[arg(long, value_name = "D", requires = "diverse_groups")]
    pub diversity_penalty: Option<f32>,

    /// Stochastic beam search: N samples without replacement (Kool et al. 2019).
    #[arg(long, requires = "beam")]
    pub stochastic: bool,

    /// Contrastive decoding against this smaller amateur model (Li et al. 2023): a model
    /// directory, or beside a transformer an n-gram model counted over its token ids.
    #[arg(long, value_name = "MODEL")]
    pub amateur: Option<PathBuf>,

    /// Contrastive plausibility threshold: keep tokens with p >= A times the top p (default 0.1).
    #[arg(long, value_name = "A", requires = "amateur")]
    pub contrast_alpha: Option<f32>,

    /// Minimum Bayes risk: sample N sequences, return the one of highest expected
    /// utility against the others.
    #[arg(long, value_name = "N")]
    pub mbr: Option<usize>,

    /// The utility of MBR.
    #[arg(long, value_name = "U", default_value = "chrf", value_parser = ["rouge1", "bleu", "chrf"], requires = "mbr")]
    pub mbr_utility: String,

    /// Rank only the K most probable samples as hypotheses (all N serve as evidence).
    #[arg(long, value_name = "K", requires = "mbr")]
    pub mbr_candidates: Option<usize>,

    /// Speculative decoding with this draft model (Leviathan et al. 2023); same output
    /// distribution as the model alone. Beside a transformer, an n-gram model counted
    /// over its token ids (`nlp ngram train -t DIR/tokenizer.json`) can draft.
    #[arg(long, value_name = "MODEL")]
    pub draft: Option<PathBuf>,

    /// Tokens the draft proposes per round (default 4).
    #[arg(long, value_name = "K", requires = "draft")]
    pub draft_k: Option<usize>,

    /// Self-consistency: sample N sequences and return the answer most of them give.
    #[arg(long, value_name = "N", requires = "answer_regex")]
    pub self_consistency: Option<usize>,

    /// How to find a sample's answer: the last match, its first group if it has one.
    #[arg(long, value_name = "RE", requires = "self_consistency")]
    pub answer_regex: Option<String>,

    /// Sample-and-discard with this discriminator model (see below).
    #[arg(long, value_name = "MODEL", requires = "discard_below")]
    pub discriminator: Option<PathBuf>,

    /// Keep only samples whose attribute probability is at least P.
    #[arg(long, value_name = "P", requires = "discriminator")]
    pub discard_below: Option<f64>,

    /// Draw at most this many samples when discarding.
    #[arg(long, value_name = "N", default_value_t = 100, requires = "discriminator")]
    pub max_samples: usize,

    /// FUDGE with this discriminator model (Yang and Klein 2021; see below).
    #[arg(long, value_name = "MODEL")]
    pub fudge: Option<PathBuf>,

    /// Candidate tokens FUDGE reweights per step.
    #[arg(long, value_name = "K", default_value_t = 50, requires = "fudge")]
    pub fudge_top_k: usize,

    /// How many sequences to return.
    #[arg(short = 'n', long = "num-return", alias = "num-samples", value_name = "N")]
    pub num_return: Option<usize>,

    /// Stop once the output contains this string (repeatable).
    #[arg(long, value_name = "STR", num_args = 1..)]
    pub stop: Vec<String>,

    /// Print the prompt before each continuation.
    #[arg(long)]
    pub echo: bool,

    /// Write with the model: `turns` (take turns) or `choose` (pick one of -n options).
    #[arg(long, value_name = "MODE", value_parser = ["turns", "choose"])]
    pub interactive: Option<String>,
}

/// The decoding strategy the flags ask for.
#[derive(Debug, Clone)]
pub(crate) enum Strategy {
    Plain,
    Beam(BeamSettings),
    DiverseBeam(DiverseBeamSettings),
    StochasticBeam(usize),
    Contrastive(ContrastiveSettings),
    Mbr {
        samples: usize,
        hypotheses: Option<usize>,
        utility: Utility,
    },
    Speculative(usize),
    SelfConsistency {
        samples: usize,
        pattern: regex::Regex,
    },
    Discard {
        threshold: f64,
        max_samples: usize,
    },
    Fudge(usize),
}

impl Strategy {
    fn name(&self) -> &'static str {
        match self {
            Strategy::Plain => "plain",
            Strategy::Beam(_) => "beam",
            Strategy::DiverseBeam(_) => "diverse_beam",
            Strategy::StochasticBeam(_) => "stochastic_beam",
            Strategy::Contrastive(_) => "contrastive",
            Strategy::Mbr { .. } => "mbr",
            Strategy::Speculative(_) => "speculative",
            Strategy::SelfConsistency { .. } => "self_consistency",
            Strategy::Discard { .. } => "sample_and_discard",
            Strategy::Fudge(_) => "fudge",
        }
    }

    /// The JSON key of `Generation::score` for this strategy.
    fn score_name(&self) -> &'static str {
        match self {
            Strategy::Beam(_) | Strategy::DiverseBeam(_) => "beam_score",
            Strategy::StochasticBeam(_) => "gumbel_key",
            Strategy::Contrastive(_) => "contrastive_score",
            Strategy::Mbr { .. } => "expected_utility",
            _ => "processed_logprob",
        }
    }
}

/// Checks the flags that clap cannot and picks the strategy.
pub(crate) fn strategy(args: &GenerateArgs) -> Result<Strategy> {
    let chosen: Vec<&str> = [
        ("--beam", args.beam.is_some()),
        ("--amateur", args.amateur.is_some()),
        ("--mbr", args.mbr.is_some()),
        ("--draft", args.draft.is_some()),
        ("--self-consistency", args.self_consistency.is_some()),
        ("--discriminator", args.discriminator.is_some()),
        ("--fudge", args.fudge.is_some()),
    ]
    .into_iter()
    .filter(|(_, set)| *set)
    .map(|(flag, _)| flag)
    .collect();
    if chosen.len() > 1 {
        bail!("{} each pick a decoding strategy; use one of them", chosen.join(" and "));
    }
    let num_return = args.num_return.unwrap_or(1);
    if num_return == 0 {
        bail!("--num-return must be at least 1");
    }
    if let Some(p) = args.top_p {
        if !(p > 0.0 && p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {p}");
        }
    }
    let sampling_knobs = args.temperature.is_some()
        || args.top_k.is_some()
        || args.top_p.is_some()
        || args.epsilon.is_some()
        || args.min_p.is_some()
        || args.typical.is_some();
    if let Some(num_beams) = args.beam {
        if num_beams == 0 {
            bail!("--beam must be at least 1");
        }
        if num_return > num_beams {
            bail!(
                "--num-return {num_return} is more than --beam {num_beams}: beam search returns at most one sequence per beam"
            );
        }
        if sampling_knobs && !args.stochastic {
            bail!("--temperature/--top-k/--top-p/--epsilon/--min-p/--typical are sampling flags; beam search does not sample (add --stochastic for stochastic beam search)");
        }
        let beam = BeamSettings {
            num_beams,
            length_penalty: args.length_penalty.unwrap_or(1.0),
            early_stopping: if args.early_stopping {
                EarlyStopping::Eager
            } else {
                EarlyStopping::Heuristic
            },
            num_return,
        };
        if args.stochastic {
            return Ok(Strategy::StochasticBeam(num_beams));
        }
        if let Some(groups) = args.diverse_groups {
            if groups == 0 || num_beams % groups != 0 {
                bail!("--diverse-groups {groups} must divide --beam {num_beams}");
            }
            return Ok(Strategy::DiverseBeam(DiverseBeamSettings {
                beam,
                groups,
                diversity_penalty: args.diversity_penalty.unwrap_or(0.5),
            }));
        }
        return Ok(Strategy::Beam(beam));
    }
    if args.amateur.is_some() {
        let alpha = args.contrast_alpha.unwrap_or(0.1);
        if !(0.0..=1.0).contains(&alpha) {
            bail!("--contrast-alpha must be in [0, 1], got {alpha}");
        }
        return Ok(Strategy::Contrastive(ContrastiveSettings {
            alpha,
            ..ContrastiveSettings::default()
        }));
    }
    if let Some(samples) = args.mbr {
        if samples < 2 {
            bail!("--mbr needs at least 2 samples to compare, got {samples}");
        }
        if let Some(k) = args.mbr_candidates {
            if k == 0 || k > samples {
                bail!("--mbr-candidates must be between 1 and --mbr {samples}, got {k}");
            }
        }
        let hypotheses = args.mbr_candidates.unwrap_or(samples);
        if num_return > hypotheses {
            bail!("--num-return {num_return} is more than the {hypotheses} MBR hypotheses");
        }
        return Ok(Strategy::Mbr {
            samples,
            hypotheses: args.mbr_candidates,
            utility: Utility::parse(&args.mbr_utility)?,
        });
    }
    if args.draft.is_some() {
        let k = args.draft_k.unwrap_or(4);
        if k == 0 {
            bail!("--draft-k must be at least 1");
        }
        return Ok(Strategy::Speculative(k));
    }
    if let Some(samples) = args.self_consistency {
        if samples == 0 {
            bail!("--self-consistency needs at least 1 sample");
        }
        let text = args.answer_regex.as_deref().unwrap_or_default();
        let pattern = regex::Regex::new(text).map_err(|error| {
            let first = error.to_string();
            let first = first.lines().last().unwrap_or("invalid").trim().to_string();
            anyhow::anyhow!("--answer-regex `{text}` is not a valid regular expression: {first}")
        })?;
        if num_return > samples {
            bail!("--num-return {num_return} is more than --self-consistency {samples}");
        }
        return Ok(Strategy::SelfConsistency { samples, pattern });
    }
    if args.discriminator.is_some() {
        let threshold = args.discard_below.context("--discriminator needs --discard-below P")?;
        if !(0.0..=1.0).contains(&threshold) {
            bail!("--discard-below is a probability in [0, 1], got {threshold}");
        }
        if args.max_samples < num_return {
            bail!("--max-samples {} is fewer than --num-return {num_return}", args.max_samples);
        }
        return Ok(Strategy::Discard {
            threshold,
            max_samples: args.max_samples,
        });
    }
    if args.fudge.is_some() {
        if args.fudge_top_k == 0 {
            bail!("--fudge-top-k must be at least 1");
        }
        return Ok(Strategy::Fudge(args.fudge_top_k));
    }
    Ok(Strategy::Plain)
}

/// The second model a strategy needs, with its flag.
fn second_model(args: &GenerateArgs) -> Option<(&'static str, &Path)> {
    [
        ("--amateur", &args.amateur),
        ("--draft", &args.draft),
        ("--discriminator", &args.discriminator),
        ("--fudge", &args.fudge),
    ]
    .into_iter()
    .find_map(|(flag, path)| path.as_deref().map(|p| (flag, p)))
}

/// Parses one `--logit-bias` entry into (token id, bias).
fn logit_bias(entry: &str, model: &Loaded) -> Result<(u32, f32)> {
    let (token, bias) = entry
        .rsplit_once('=')
        .with_context(|| format!("--logit-bias `{entry}`: expected ID=BIAS or TOKEN=BIAS"))?;
    let bias: f32 = bias
        .trim()
        .parse()
        .ok()
        .filter(|b: &f32| !b.is_nan() && *b != f32::INFINITY)
        .with_context(|| {
            format!("--logit-bias `{entry}`: the bias `{bias}` is not a number (or -inf)")
        })?;
    let id = match token.parse::<u32>() {
        Ok(id) => {
            if id as usize >= model.vocab_size() {
                bail!(
                    "--logit-bias `{entry}`: token id {id} is outside the model's vocabulary of {}",
                    model.vocab_size()
                );
            }
            id
        }
        Err(_) => {
            let ids = model.encode(token, "--logit-bias")?;
            match ids.as_slice() {
                [id] => *id,
                _ => bail!(
                    "--logit-bias `{entry}`: `{token}` is {} tokens, not one; give one token's text or its id",
                    ids.len()
                ),
            }
        }
    };
    Ok((id, bias))
}

/// The processor chain and the choice rule.
fn processors(args: &GenerateArgs, model: &Loaded, strategy: &Strategy) -> Result<(ProcessorChain, Choice)> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        epsilon: args.epsilon,
        min_p: args.min_p,
        typical: args.typical,
        repetition_penalty: args.repetition_penalty,
    };
    let sampling_knobs = params.temperature.is_some()
        || params.top_k.is_some()
        || params.top_p.is_some()
        || params.epsilon.is_some()
        || params.min_p.is_some()
        || params.typical.is_some();
    let choice = match strategy {
        _ if args.greedy => Choice::Greedy,
        // Contrastive decoding is a search (argmax) unless asked to sample.
        Strategy::Contrastive(_) if !sampling_knobs => Choice::Greedy,
        _ => Choice::Sample,
    };
    let order = Stage::parse_order(&args.processor_order).context("--processor-order")?;
    let missing = |stage: Stage, set: bool| -> Result<()> {
        if set && !order.contains(&stage) {
            bail!("--{} is set but `{}` is not in --processor-order", stage.name(), stage.name());
        }
        Ok(())
    };
    missing(Stage::Ban, !args.ban.is_empty())?;
    missing(Stage::LogitBias, !args.logit_bias.is_empty())?;
    missing(Stage::NoRepeatNgram, args.no_repeat_ngram.is_some())?;
    // Validates the knobs and checks that each set one has its stage.
    ProcessorChain::sampling_in_order(&params, &order)?;

    let mut chain = ProcessorChain::new();
    if let Loaded::Ngram { model, .. } = model {
        // `<unk>` is not a word to print; `<s>` already has probability 0.
        chain.push(BannedTokens(vec![model.unk_id()]));
    }
    for &stage in &order {
        match stage {
            Stage::Ban if !args.ban.is_empty() => {
                let mut banned = Vec::new();
                for phrase in &args.ban {
                    match model.phrase_ids(phrase, "--ban") {
                        Ok(spellings) => banned.extend(spellings),
                        // A word the n-gram model does not know can never be generated anyway.
                        Err(error) if matches!(model, Loaded::Ngram { .. }) => {
                            tracing::warn!("{error:#}; nothing to ban");
                        }
                        Err(error) => return Err(error),
                    }
                }
                chain.push(BannedPhrases(banned));
            }
            Stage::LogitBias if !args.logit_bias.is_empty() => {
                let biases = args
                    .logit_bias
                    .iter()
                    .map(|entry| logit_bias(entry, model))
                    .collect::<Result<Vec<_>>>()?;
                chain.push(LogitBias(biases));
            }
            Stage::NoRepeatNgram => {
                if let Some(n) = args.no_repeat_ngram {
                    if n == 0 {
                        bail!("--no-repeat-ngram must be at least 1");
                    }
                    chain.push(NoRepeatNgram(n));
                }
            }
            _ => {
                if let Some(processor) = params.processor(stage) {
                    chain.push_boxed(processor);
                }
            }
        }
    }
    if !args.force.is_empty() {
        let mut phrases = Vec::new();
        for phrase in &args.force {
            // Force the spelling as given (the first); a leading space is the user's to add.
            let spelling = model.phrase_ids(phrase, "--force")?.swap_remove(0);
            phrases.push(spelling);
        }
        let needed: usize = phrases.iter().map(Vec::len).sum();
        if needed > args.max_new_tokens {
            bail!(
                "the forced phrases need {needed} tokens but --max-new-tokens is {}",
                args.max_new_tokens
            );
        }
        chain.push(ForcedPhrases {
            phrases,
            eos: model.eos(),
        });
    }
    Ok((chain, choice))
}

/// One returned sequence with what the strategy has to add.
pub(crate) struct Output {
    pub(crate) generation: Generation,
    pub(crate) extra: serde_json::Map<String, serde_json::Value>,
}

fn plain(generations: Vec<Generation>) -> Vec<Output> {
    generations
        .into_iter()
        .map(|generation| Output {
            generation,
            extra: serde_json::Map::new(),
        })
        .collect()
}

/// What every strategy run needs besides the models.
pub(crate) struct Job<'a> {
    pub(crate) strategy: &'a Strategy,
    pub(crate) prompt: &'a [u32],
    pub(crate) settings: &'a DecodeSettings,
    pub(crate) num_return: usize,
    /// Ids to text, for utilities and answers.
    pub(crate) detokenize: &'a decode::Detokenizer,
    /// Called with (sequence, generated ids) after every token of plain decoding.
    pub(crate) on_token: &'a mut dyn FnMut(usize, &[u32]),
}

fn one_extra(key: &str, value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    let mut extra = serde_json::Map::new();
    extra.insert(key.into(), value);
    extra
}

/// Runs the strategy on `model` (and `second`: the amateur, draft or discriminator).
fn run_strategy<M: LanguageModel, A: LanguageModel>(
    model: &M,
    second: Option<&A>,
    job: Job,
) -> Result<Vec<Output>> {
    let Job {
        strategy,
        prompt,
        settings,
        num_return,
        detokenize,
        on_token,
    } = job;
    let second = || second.context("this strategy needs a second model");
    Ok(match strategy {
        Strategy::Plain => plain(decode::generate_streaming(model, prompt, settings, 0..num_return, on_token)?),
        Strategy::Beam(beam) => plain(decode::beam_search(model, prompt, beam, settings)?),
        Strategy::DiverseBeam(diverse) => {
            plain(decode::diverse_beam_search(model, prompt, diverse, settings)?)
        }
        Strategy::StochasticBeam(k) => {
            let mut out = decode::stochastic_beam_search(model, prompt, *k, settings)?;
            out.truncate(num_return);
            plain(out)
        }
        Strategy::Contrastive(cs) => {
            plain(decode::contrastive(model, second()?, prompt, cs, settings, num_return)?)
        }
        Strategy::Mbr {
            samples,
            hypotheses,
            utility,
        } => {
            let utility = *utility;
            let result = decode::mbr(model, prompt, *samples, *hypotheses, settings, &|a: &[u32], b: &[u32]| {
                utility.score(&detokenize(a), &detokenize(b))
            })?;
            let mut ranked = result.hypotheses.clone();
            ranked.sort_by(|&a, &b| {
                result.expected_utility[b]
                    .total_cmp(&result.expected_utility[a])
                    .then(a.cmp(&b))
            });
            ranked
                .into_iter()
                .take(num_return)
                .map(|i| {
                    let mut extra = serde_json::Map::new();
                    extra.insert("samples".into(), json!(samples));
                    extra.insert("hypotheses".into(), json!(result.hypotheses.len()));
                    extra.insert("sample_index".into(), json!(i));
                    Output {
                        generation: result.candidates[i].clone(),
                        extra,
                    }
                })
                .collect()
        }
        Strategy::Speculative(k) => {
            decode::speculative(model, second()?, prompt, *k, settings, num_return)?
                .into_iter()
                .map(|r| {
                    let mut extra = serde_json::Map::new();
                    extra.insert("rounds".into(), json!(r.stats.rounds));
                    extra.insert("drafted".into(), json!(r.stats.drafted));
                    extra.insert("accepted".into(), json!(r.stats.accepted));
                    extra.insert("acceptance_rate".into(), json!(r.stats.acceptance_rate()));
                    Output {
                        generation: r.generation,
                        extra,
                    }
                })
                .collect()
        }
        Strategy::SelfConsistency { samples, pattern } => {
            let generations = decode::generate(model, prompt, settings, *samples)?;
            let answers: Vec<Option<String>> = generations
                .iter()
                .map(|g| decode::extract_answer(pattern, &detokenize(&g.tokens)))
                .collect();
            let tally = decode::majority_vote(&answers);
            if tally.is_empty() {
                bail!(
                    "none of the {samples} samples matched --answer-regex `{}`; check the pattern against a sample (drop --self-consistency)",
                    pattern.as_str()
                );
            }
            let tally_json: Vec<serde_json::Value> = tally
                .iter()
                .map(|v| json!({"answer": v.answer, "votes": v.votes}))
                .collect();
            let voted = answers.iter().filter(|a| a.is_some()).count();
            tally
                .iter()
                .take(num_return)
                .map(|vote| {
                    let mut extra = serde_json::Map::new();
                    extra.insert("answer".into(), json!(vote.answer));
                    extra.insert("votes".into(), json!(vote.votes));
                    extra.insert("samples".into(), json!(samples));
                    extra.insert("samples_with_answer".into(), json!(voted));
                    extra.insert("tally".into(), json!(tally_json));
                    extra.insert("sample_index".into(), json!(vote.first));
                    Output {
                        generation: generations[vote.first].clone(),
                        extra,
                    }
                })
                .collect()
        }
        Strategy::Discard {
            threshold,
            max_samples,
        } => {
            let result = decode::sample_and_discard(
                model,
                second()?,
                prompt,
                settings,
                num_return,
                *threshold,
                *max_samples,
            )?;
            let drawn = result.drawn;
            result
                .kept
                .into_iter()
                .map(|judged| {
                    let mut extra = one_extra("attribute_probability", json!(judged.attribute_probability));
                    extra.insert("samples_drawn".into(), json!(drawn));
                    Output {
                        generation: judged.generation,
                        extra,
                    }
                })
                .collect()
        }
        Strategy::Fudge(top_k) => decode::fudge(model, second()?, prompt, settings, *top_k, num_return)?
            .into_iter()
            .map(|judged| Output {
                extra: one_extra("attribute_probability", json!(judged.attribute_probability)),
                generation: judged.generation,
            })
            .collect(),
    })
}

/// Dispatches on the concrete model types.
pub(crate) fn dispatch(model: &Loaded, second: Option<&Companion>, job: Job) -> Result<Vec<Output>> {
    macro_rules! with_second {
        ($m:expr) => {
            match second {
                None => run_strategy::<_, NgramModel>($m, None, job),
                Some(Companion::Model(Loaded::Transformer { model: s, .. })) => run_strategy($m, Some(s), job),
                Some(Companion::Model(Loaded::Ngram { model: s, .. })) => run_strategy($m, Some(s), job),
                Some(Companion::Subword(s)) => run_strategy($m, Some(s), job),
            }
        };
    }
    match model {
        Loaded::Transformer { model, .. } => with_second!(model),
        Loaded::Ngram { model, .. } => with_second!(model),
    }
}

fn read_stdin() -> Result<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text)
        .context("reading the prompt from stdin")?;
    Ok(text)
}

/// The prompt's token ids, from whichever source was given.
fn read_prompt(args: &GenerateArgs, model: &Loaded) -> Result<Vec<u32>> {
    if let Some(ids) = &args.prompt_ids {
        let vocab = model.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("--prompt-ids: token id {bad} is outside the model's vocabulary of {vocab}");
        }
        return Ok(ids.clone());
    }
    let text = match (&args.stdin, &args.prompt, &args.prompt_file) {
        (Some(dash), _, _) if dash == "-" => read_stdin()?,
        (Some(other), _, _) => bail!(
            "unexpected argument `{other}`: the only positional argument is `-` (read the prompt from stdin); use --prompt TEXT"
        ),
        (None, Some(text), _) => text.clone(),
        (None, None, Some(path)) if path.as_os_str() == "-" => read_stdin()?,
        (None, None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the prompt file", path.display()))?,
        (None, None, None) => String::new(),
    };
    model.encode(&text, "the prompt")
}

/// Refuses a prompt of `prompt_len` tokens that does not fit the model's context. The
/// generation itself may run past the context: the transformer slides its window.
pub(crate) fn check_prompt_fits(model: &Loaded, prompt_len: usize) -> Result<()> {
    match model.context_len() {
        Some(context) if prompt_len >= context => bail!(
            "the prompt has {prompt_len} tokens but the model's context is {context} positions \
             (max_position_embeddings in config.json, counting a beginning-of-sequence token); shorten the prompt"
        ),
        _ => Ok(()),
    }
}

/// Everything `run` and the interactive loop share: the loaded models and the built
/// settings.
pub(crate) struct Prepared {
    pub(crate) strategy: Strategy,
    pub(crate) model: Loaded,
    pub(crate) second: Option<Companion>,
    pub(crate) settings: DecodeSettings,
    pub(crate) detokenize: decode::Detokenizer,
}

fn prepare(ctx: &Context, args: &GenerateArgs) -> Result<Prepared> {
    // Parse, then build: every flag is checked before a model is loaded.
    let strategy = strategy(args)?;
    let model = Loaded::open_with_adapters(&args.model, ctx, &args.adapters)?;
    let second = second_model(args)
        .map(|(flag, path)| Companion::open(flag, path, ctx, &model, &args.model))
        .transpose()?;
    let (chain, choice) = processors(args, &model, &strategy)?;
    let detokenize = model.detokenizer();
    let settings = DecodeSettings {
        processors: chain,
        choice,
        stop: StopCriteria {
            max_new_tokens: args.max_new_tokens,
            eos: model.eos(),
            stop_strings: args.stop.clone(),
            detokenize: (!args.stop.is_empty()).then(|| detokenize.clone()),
        },
        seed: ctx.config.run.seed,
    };
    Ok(Prepared {
        strategy,
        model,
        second,
        settings,
        detokenize,
    })
}

/// The ids to print: without a final end-of-sequence token, which is not text.
pub(crate) fn text_ids<'a>(model: &Loaded, ids: &'a [u32]) -> &'a [u32] {
    match (model.eos(), ids.last()) {
        (Some(eos), Some(&last)) if last == eos => &ids[..ids.len() - 1],
        _ => ids,
    }
}

pub fn run(ctx: &Context, args: GenerateArgs) -> Result<()> {
    let prepared = prepare(ctx, &args)?;
    if let Some(mode) = &args.interactive {
        return super::interactive::run(ctx, &args, mode, prepared);
    }
    let prompt = read_prompt(&args, &prepared.model)?;
    check_prompt_fits(&prepared.model, prompt.len())?;
    let Prepared {
        strategy,
        model,
        second,
        settings,
        detokenize,
    } = prepared;
    let num_return = args.num_return.unwrap_or(1);

    // Plain decoding of one sequence streams its text as it is produced.
    let stream = matches!(strategy, Strategy::Plain) && num_return == 1 && !ctx.json;
    let mut printed = String::new();
    let mut stdout = std::io::stdout();
    if stream && args.echo {
        let text = model.decode(&prompt)?;
        write!(stdout, "{text}")?;
        stdout.flush()?;
    }
    let mut stream_error = None;
    let mut on_token = |_: usize, generated: &[u32]| {
        if !stream || stream_error.is_some() {
            return;
        }
        let text = detokenize(text_ids(&model, generated));
        // A byte-level tokenizer may hold half a character: print once the text extends.
        if let Some(new) = text.strip_prefix(printed.as_str()) {
            if !new.is_empty() {
                if let Err(error) = write!(stdout, "{new}").and_then(|()| stdout.flush()) {
                    stream_error = Some(error);
                }
                printed = text;
            }
        }
    };

    let started = Instant::now();
    let outputs = dispatch(
        &model,
        second.as_ref(),
        Job {
            strategy: &strategy,
            prompt: &prompt,
            settings: &settings,
            num_return,
            detokenize: &detokenize,
            on_token: &mut on_token,
        },
    )?;
    if let Some(error) = stream_error {
        return Err(error.into());
    }
    let seconds = started.elapsed().as_secs_f64();
    let new_tokens: usize = outputs.iter().map(|o| o.generation.tokens.len()).sum();
    let tokens_per_s = if seconds > 0.0 { new_tokens as f64 / seconds } else { 0.0 };

    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (index, output) in outputs.iter().enumerate() {
        let generation = &output.generation;
        let ids = text_ids(&model, &generation.tokens);
        let text = if args.echo && !ctx.json {
            let mut all = prompt.clone();
            all.extend_from_slice(ids);
            model.decode(&all)?
        } else {
            model.decode(ids)?
        };
        if ctx.json {
            let mut value = json!({
                "index": index,
                "strategy": strategy.name(),
                "prompt_ids": prompt,
                "ids": generation.tokens,
                "text": text,
                "tokens": model.pieces(&generation.tokens),
                "logprobs": generation.logprobs,
                "logprob": generation.logprob(),
                "score": generation.score,
                strategy.score_name(): generation.score,
                "finish_reason": generation.finish.as_str(),
                "new_tokens": generation.tokens.len(),
                "seconds": seconds,
                "tokens_per_s": tokens_per_s,
                "seed": ctx.config.run.seed,
            });
            if let Some(object) = value.as_object_mut() {
                object.extend(output.extra.clone());
            }
            writeln!(out, "{value}")?;
        } else if stream {
            // The text is out already; end its line.
            writeln!(out)?;
        } else {
            if index > 0 {
                writeln!(out)?;
            }
            writeln!(out, "{text}")?;
            if let Strategy::SelfConsistency { samples, .. } = &strategy {
                let answer = output.extra.get("answer").and_then(|v| v.as_str()).unwrap_or("");
                let votes = output.extra.get("votes").and_then(|v| v.as_u64()).unwrap_or(0);
                writeln!(out, "answer: {answer} ({votes} of {samples} votes)")?;
            }
        }
    }
    out.flush()?;
    if !ctx.quiet && !ctx.json {
        tracing::info!(
            "{} {}: {new_tokens} tokens in {seconds:.2} s ({tokens_per_s:.1} tokens/s)",
            outputs.len(),
            if outputs.len() == 1 { "sequence" } else { "sequences" },
        );
    }
    Ok(())
}
