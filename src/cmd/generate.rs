//! `nlp generate`: text from a transformer directory or an n-gram model, by any
//! decoding strategy of `crate::decode`.
//!
//! Glue only: parse and check the flags, load the model(s) and the tokenizer, build the
//! processor chain and stop conditions, call one strategy, print the continuations
//! (stdout) and the speed (stderr, or in the JSON objects).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use super::loaded::Loaded;
use super::Context;
use crate::decode::{
    self, BannedPhrases, BannedTokens, BeamSettings, Choice, ContrastiveSettings, DecodeSettings,
    DiverseBeamSettings, EarlyStopping, ForcedPhrases, Generation, ProcessorChain,
    SamplingParams, StopCriteria,
};
use crate::lm::LanguageModel;
use crate::ngram::NgramModel;

/// `nlp generate`
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// A model directory (config.json, model.safetensors, tokenizer.json) or an n-gram
    /// model file (.arpa, .arpa.gz or .bin; words split on whitespace).
    #[arg(short, long, value_name = "MODEL")]
    pub model: PathBuf,

    /// A LoRA adapter directory (PEFT layout) to apply to the model without merging,
    /// optionally with a weight on its update (`DIR:0.5`). Repeatable.
    #[arg(long = "adapter", value_name = "DIR[:WEIGHT]")]
    pub adapters: Vec<super::loaded::AdapterSpec>,

    /// The text to continue (default: empty, or the start-of-sentence of an n-gram model).
    #[arg(long, value_name = "TEXT", conflicts_with = "prompt_file")]
    pub prompt: Option<String>,

    /// Read the prompt from a file (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,

    /// The most tokens to generate per sample.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub max_new_tokens: usize,

    /// Pick the most likely token at every step (default: sample).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p", "epsilon", "min_p", "typical", "stochastic"])]
    pub greedy: bool,

    /// Sampling temperature (> 0).
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,

    /// Sample among the K most likely tokens.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,

    /// Nucleus sampling: the most likely tokens up to mass P (Holtzman et al. 2020).
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

    /// Beam search with N beams.
    #[arg(long, value_name = "N")]
    pub num_beams: Option<usize>,

    /// Beam score = sum of log-probs / length^L (> 0 favours longer outputs).
    #[arg(long, value_name = "L", requires = "num_beams")]
    pub length_penalty: Option<f32>,

    /// Stop beam search as soon as N hypotheses are finished.
    #[arg(long, requires = "num_beams")]
    pub early_stopping: bool,

    /// Diverse beam search with G groups (Vijayakumar et al. 2016).
    #[arg(long, value_name = "G", requires = "num_beams", conflicts_with = "stochastic")]
    pub diverse_groups: Option<usize>,

    /// Penalty per earlier-group beam that chose the same token.
    #[arg(long, value_name = "D", requires = "diverse_groups")]
    pub diversity_penalty: Option<f32>,

    /// Stochastic beam search: N samples without replacement (Kool et al. 2019).
    #[arg(long, requires = "num_beams")]
    pub stochastic: bool,

    /// Contrastive decoding against this amateur model (Li et al. 2023).
    #[arg(long, value_name = "AMATEUR")]
    pub contrastive: Option<PathBuf>,

    /// Plausibility threshold of contrastive decoding.
    #[arg(long, value_name = "A", requires = "contrastive")]
    pub alpha: Option<f32>,

    /// Minimum Bayes risk: sample N candidates, print the one that agrees most (chrF).
    #[arg(long, value_name = "N")]
    pub mbr: Option<usize>,

    /// Speculative decoding with this draft model (Leviathan et al. 2023).
    #[arg(long, value_name = "MODEL")]
    pub draft: Option<PathBuf>,

    /// Tokens the draft proposes per round.
    #[arg(long, value_name = "K", requires = "draft")]
    pub draft_tokens: Option<usize>,

    /// Never generate this word or phrase (repeatable).
    #[arg(long, value_name = "WORD", num_args = 1..)]
    pub ban: Vec<String>,

    /// This phrase must appear in the output (repeatable).
    #[arg(long, value_name = "PHRASE", num_args = 1..)]
    pub force: Vec<String>,

    /// Stop once the output contains this string (repeatable).
    #[arg(long, value_name = "STR", num_args = 1..)]
    pub stop: Vec<String>,

    /// How many continuations to print.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub num_samples: usize,

    /// Print the prompt before each continuation.
    #[arg(long)]
    pub echo: bool,
}

/// The decoding strategy the flags ask for.
#[derive(Debug, Clone, Copy)]
enum Strategy {
    Plain,
    Beam(BeamSettings),
    DiverseBeam(DiverseBeamSettings),
    StochasticBeam(usize),
    Contrastive(ContrastiveSettings),
    Mbr(usize),
    Speculative(usize),
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::Plain => "plain",
            Strategy::Beam(_) => "beam",
            Strategy::DiverseBeam(_) => "diverse_beam",
            Strategy::StochasticBeam(_) => "stochastic_beam",
            Strategy::Contrastive(_) => "contrastive",
            Strategy::Mbr(_) => "mbr",
            Strategy::Speculative(_) => "speculative",
        }
    }
}

/// Checks the flags that clap cannot and picks the strategy.
fn strategy(args: &GenerateArgs) -> Result<Strategy> {
    let chosen: Vec<&str> = [
        ("--num-beams", args.num_beams.is_some()),
        ("--contrastive", args.contrastive.is_some()),
        ("--mbr", args.mbr.is_some()),
        ("--draft", args.draft.is_some()),
    ]
    .into_iter()
    .filter(|(_, set)| *set)
    .map(|(flag, _)| flag)
    .collect();
    if chosen.len() > 1 {
        bail!("{} each pick a decoding strategy; use one of them", chosen.join(" and "));
    }
    if args.num_samples == 0 {
        bail!("--num-samples must be at least 1");
    }
    let sampling_knobs = args.temperature.is_some()
        || args.top_k.is_some()
        || args.top_p.is_some()
        || args.epsilon.is_some()
        || args.min_p.is_some()
        || args.typical.is_some();
    if let Some(num_beams) = args.num_beams {
        if num_beams == 0 {
            bail!("--num-beams must be at least 1");
        }
        if args.num_samples > num_beams {
            bail!(
                "--num-samples {} is more than --num-beams {num_beams}: beam search returns at most one sequence per beam",
                args.num_samples
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
            num_return: args.num_samples,
        };
        if args.stochastic {
            return Ok(Strategy::StochasticBeam(num_beams));
        }
        if let Some(groups) = args.diverse_groups {
            if groups == 0 || num_beams % groups != 0 {
                bail!("--diverse-groups {groups} must divide --num-beams {num_beams}");
            }
            return Ok(Strategy::DiverseBeam(DiverseBeamSettings {
                beam,
                groups,
                diversity_penalty: args.diversity_penalty.unwrap_or(0.5),
            }));
        }
        return Ok(Strategy::Beam(beam));
    }
    if args.contrastive.is_some() {
        let alpha = args.alpha.unwrap_or(0.1);
        if !(0.0..=1.0).contains(&alpha) {
            bail!("--alpha must be in [0, 1], got {alpha}");
        }
        return Ok(Strategy::Contrastive(ContrastiveSettings {
            alpha,
            ..ContrastiveSettings::default()
        }));
    }
    if let Some(n) = args.mbr {
        if n < 2 {
            bail!("--mbr needs at least 2 candidates to compare, got {n}");
        }
        if args.greedy {
            bail!("--mbr compares sampled candidates; it cannot be combined with --greedy");
        }
        if args.num_samples != 1 {
            bail!("--mbr prints the one chosen candidate; drop --num-samples");
        }
        return Ok(Strategy::Mbr(n));
    }
    if args.draft.is_some() {
        let k = args.draft_tokens.unwrap_or(4);
        if k == 0 {
            bail!("--draft-tokens must be at least 1");
        }
        return Ok(Strategy::Speculative(k));
    }
    Ok(Strategy::Plain)
}

/// The processor chain and the choice rule.
fn processors(args: &GenerateArgs, model: &Loaded, strategy: Strategy) -> Result<(ProcessorChain, Choice)> {
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
    // Bans first (as transformers), then the sampling filters, forced phrases last so no
    // filter removes a forced token.
    let mut chain = ProcessorChain::new();
    if let Loaded::Ngram { model, .. } = model {
        // `<unk>` is not a word to print; `<s>` already has probability 0.
        chain.push(BannedTokens(vec![model.unk_id()]));
    }
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
    if !banned.is_empty() {
        chain.push(BannedPhrases(banned));
    }
    let sampling = ProcessorChain::sampling(&params)?;
    if !sampling.is_empty() {
        chain.push(Chain(sampling));
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

/// A chain as one processor, to nest the sampling chain in the middle of another.
struct Chain(ProcessorChain);

impl decode::LogitsProcessor for Chain {
    fn process(&self, ctx: &decode::StepContext, logits: &mut [f32]) {
        self.0.apply(ctx, logits);
    }
}

/// One printed continuation with what the strategy has to add.
struct Output {
    generation: Generation,
    extra: serde_json::Map<String, serde_json::Value>,
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

/// Runs the strategy on `model` (and `second`, the amateur or the draft).
fn run_strategy<M: LanguageModel, A: LanguageModel>(
    model: &M,
    second: Option<&A>,
    strategy: Strategy,
    prompt: &[u32],
    settings: &DecodeSettings,
    num_samples: usize,
    utility: &dyn Fn(&[u32], &[u32]) -> f64,
) -> Result<Vec<Output>> {
    Ok(match strategy {
        Strategy::Plain => plain(decode::generate(model, prompt, settings, num_samples)?),
        Strategy::Beam(beam) => plain(decode::beam_search(model, prompt, &beam, settings)?),
        Strategy::DiverseBeam(diverse) => {
            plain(decode::diverse_beam_search(model, prompt, &diverse, settings)?)
        }
        Strategy::StochasticBeam(k) => {
            let mut out = decode::stochastic_beam_search(model, prompt, k, settings)?;
            out.truncate(num_samples);
            plain(out)
        }
        Strategy::Contrastive(cs) => {
            let amateur = second.context("contrastive decoding needs an amateur model")?;
            plain(decode::contrastive(model, amateur, prompt, &cs, settings, num_samples)?)
        }
        Strategy::Mbr(n) => {
            let result = decode::mbr(model, prompt, n, settings, utility)?;
            let mut extra = serde_json::Map::new();
            extra.insert("candidates".into(), json!(n));
            extra.insert("chosen_index".into(), json!(result.best));
            extra.insert("expected_utility".into(), json!(result.expected_utility[result.best]));
            vec![Output {
                generation: result.chosen().clone(),
                extra,
            }]
        }
        Strategy::Speculative(k) => {
            let draft = second.context("speculative decoding needs a draft model")?;
            decode::speculative(model, draft, prompt, k, settings, num_samples)?
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
    })
}

/// Dispatches on the concrete model types.
fn dispatch(
    model: &Loaded,
    second: Option<&Loaded>,
    strategy: Strategy,
    prompt: &[u32],
    settings: &DecodeSettings,
    num_samples: usize,
    utility: &dyn Fn(&[u32], &[u32]) -> f64,
) -> Result<Vec<Output>> {
    macro_rules! with_second {
        ($m:expr) => {
            match second {
                None => run_strategy::<_, NgramModel>($m, None, strategy, prompt, settings, num_samples, utility),
                Some(Loaded::Transformer { model: s, .. }) => {
                    run_strategy($m, Some(s), strategy, prompt, settings, num_samples, utility)
                }
                Some(Loaded::Ngram { model: s, .. }) => {
                    run_strategy($m, Some(s), strategy, prompt, settings, num_samples, utility)
                }
            }
        };
    }
    match model {
        Loaded::Transformer { model, .. } => with_second!(model),
        Loaded::Ngram { model, .. } => with_second!(model),
    }
}

fn read_prompt(args: &GenerateArgs) -> Result<String> {
    match (&args.prompt, &args.prompt_file) {
        (Some(text), _) => Ok(text.clone()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text)
                .context("reading the prompt from stdin")?;
            Ok(text)
        }
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the prompt file", path.display())),
        (None, None) => Ok(String::new()),
    }
}

pub fn run(ctx: &Context, args: GenerateArgs) -> Result<()> {
    // Parse, then build: every flag is checked before a model is loaded.
    let strategy = strategy(&args)?;
    let prompt_text = read_prompt(&args)?;

    let model = Loaded::open_with_adapters(&args.model, ctx, &args.adapters)?;
    let second_path = args.contrastive.as_ref().or(args.draft.as_ref());
    let second = match second_path {
        Some(path) => {
            let second = Loaded::open(path, ctx)?;
            if second.vocab_size() != model.vocab_size() {
                bail!(
                    "{} has a vocabulary of {} tokens but {} has {}; the two models must share one tokenizer",
                    path.display(),
                    second.vocab_size(),
                    args.model.display(),
                    model.vocab_size()
                );
            }
            Some(second)
        }
        None => None,
    };
    let prompt = model.encode(&prompt_text, "the prompt")?;
    let (chain, choice) = processors(&args, &model, strategy)?;
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
    let utility_detokenize = detokenize.clone();
    let utility = move |a: &[u32], b: &[u32]| {
        decode::chrf(&utility_detokenize(a), &utility_detokenize(b))
    };

    let started = Instant::now();
    let outputs = dispatch(
        &model,
        second.as_ref(),
        strategy,
        &prompt,
        &settings,
        args.num_samples,
        &utility,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let new_tokens: usize = outputs.iter().map(|o| o.generation.tokens.len()).sum();
    let tokens_per_s = if seconds > 0.0 { new_tokens as f64 / seconds } else { 0.0 };

    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (index, output) in outputs.iter().enumerate() {
        let generation = &output.generation;
        // The end-of-sequence token ends the output; it is not text.
        let mut ids = generation.tokens.as_slice();
        if let (Some(eos), Some(&last)) = (model.eos(), ids.last()) {
            if last == eos {
                ids = &ids[..ids.len() - 1];
            }
        }
        let text = if args.echo {
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
                "text": text,
                "ids": generation.tokens,
                "tokens": model.pieces(&generation.tokens),
                "logprob": generation.logprob(),
                "logprobs": generation.logprobs,
                "score": generation.score,
                "finish_reason": generation.finish.as_str(),
                "prompt_tokens": prompt.len(),
                "new_tokens": generation.tokens.len(),
                "seconds": seconds,
                "tokens_per_s": tokens_per_s,
                "seed": ctx.config.run.seed,
            });
            if let Some(object) = value.as_object_mut() {
                object.extend(output.extra.clone());
            }
            writeln!(out, "{value}")?;
        } else {
            if index > 0 {
                writeln!(out)?;
            }
            writeln!(out, "{text}")?;
        }
    }
    out.flush()?;
    if !ctx.quiet && !ctx.json {
        tracing::info!(
            "{} {}: {new_tokens} tokens in {seconds:.2} s ({tokens_per_s:.1} tokens/s)",
            outputs.len(),
            if outputs.len() == 1 { "sample" } else { "samples" },
        );
    }
    Ok(())
}
