//! `nlp eval`: perplexity, calibration and efficiency of a transformer directory or an
//! n-gram model, and several models side by side.
//!
//! Glue only: read the text (or the ids), open the model, plan the windows, call
//! `crate::eval`, print a table or one JSON object.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use super::loaded::Loaded;
use super::Context;
use crate::data;
use crate::rng::SplitMix64;
use crate::eval::{
    self, calibration::Calibration, choices, efficiency, figure::ImageFormat,
    perplexity::word_count, table::Table, EfficiencySettings, Perplexity, Prediction,
};
use crate::lm::LanguageModel;
use crate::ngram::{NgramModel, SubwordNgram};
use crate::tokenize::IdLines;

/// `nlp eval`
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// A model directory (config.json, model.safetensors, tokenizer.json) or an n-gram
    /// model file (.arpa, .arpa.gz or .bin; words split on whitespace).
    #[arg(short, long, value_name = "MODEL", required_unless_present = "compare")]
    pub model: Option<PathBuf>,

    /// A LoRA adapter directory (PEFT layout) applied to -m's model without merging,
    /// optionally with a weight on its update (`DIR:0.5`). Repeatable.
    #[arg(long = "adapter", value_name = "DIR[:WEIGHT]")]
    pub adapters: Vec<super::loaded::AdapterSpec>,

    /// The text to evaluate on: a file, a known corpus name (optionally sliced, e.g.
    /// `tinyshakespeare[90%:]`) or `-` for stdin. A transformer reads it as one
    /// sequence; an n-gram model as one sentence per line, as `nlp ngram query` does.
    #[arg(value_name = "TEXT", conflicts_with = "ids")]
    pub text: Option<String>,

    /// Evaluate token ids instead of text: one sequence per line, ids separated by spaces.
    /// Each line is scored on its own.
    #[arg(long, value_name = "FILE")]
    pub ids: Option<PathBuf>,

    /// For an n-gram model counted over a tokenizer's ids (`nlp ngram train -t`): that
    /// tokenizer.json. TEXT is encoded with it line by line, as `nlp ngram query -t`
    /// does, and --ids are its ids; bits per byte and word perplexity still count the
    /// text's own bytes and words. Model directories keep their own tokenizer.json.
    #[arg(short = 't', long, value_name = "TOKENIZER")]
    pub tokenizer: Option<PathBuf>,

    /// Report log-likelihood, cross-entropy, token- and word-level perplexity and bits
    /// per byte (the default when no other report is asked for).
    #[arg(long)]
    pub perplexity: bool,

    /// Report calibration: next-token top-1 confidence against accuracy over the text
    /// (ECE, MCE, the bins); with --choices, also answer-level calibration.
    #[arg(long)]
    pub calibration: bool,

    /// Report costs: load time, resident and peak memory, time to first token,
    /// per-token latency percentiles, prompt and generation tokens per second.
    #[arg(long)]
    pub efficiency: bool,

    /// Score the text with each of these models and print one table, side by side.
    /// Bits per byte and word-level perplexity compare across tokenizers.
    #[arg(long, value_name = "MODEL", num_args = 1.., conflicts_with_all = ["model", "calibration", "efficiency"])]
    pub compare: Vec<PathBuf>,

    /// Window length in tokens for long texts (default: the model's
    /// max_position_embeddings). Ignored by n-gram models, whose context is their order.
    #[arg(long, value_name = "N")]
    pub context: Option<usize>,

    /// Tokens between the starts of consecutive windows (default: the context, i.e.
    /// non-overlapping windows). A smaller stride gives every scored token at least
    /// `context - stride` tokens of context, at more cost.
    #[arg(long, value_name = "N")]
    pub stride: Option<usize>,

    /// Windows of one shape per forward pass.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub batch_size: usize,

    /// Add each scored position's log-probability (nats), in order.
    #[arg(long)]
    pub per_token: bool,

    /// Equal-width confidence bins for ECE and MCE.
    #[arg(long, value_name = "N", default_value_t = 15)]
    pub bins: usize,

    /// Write the reliability diagram to FILE: per-bin accuracy bars with their counts,
    /// the gap to each bin's mean confidence shaded, the diagonal of perfect
    /// calibration, ECE and MCE. The extension picks the format: .png (a 960x960
    /// image) or .svg (scalable, with each bar's numbers shown on hover).
    #[arg(long, value_name = "FILE.png|FILE.svg")]
    pub plot: Option<PathBuf>,

    /// Multiple-choice items for answer-level calibration, JSONL: {"prompt": "...",
    /// "choices": [["CMU", "Carnegie Mellon University"], ["MIT"]], "answer": 0}. A
    /// choice's probability is the sum over its forms, normalised over the choices.
    #[arg(long, value_name = "FILE.jsonl")]
    pub choices: Option<PathBuf>,

    /// Prompt length for --efficiency (the start of TEXT when given, else seeded
    /// random ids).
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub prompt_tokens: usize,

    /// Tokens to generate (greedily) per --efficiency run.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub gen_tokens: usize,

    /// Timed --efficiency runs, after one warm-up run.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub repeats: usize,
}

/// What to evaluate on.
enum Input {
    /// Text, named for messages.
    Text { name: String, text: String },
    /// Sequences of ids from a file.
    Ids {
        path: PathBuf,
        sequences: Vec<Vec<u32>>,
    },
}

/// A model's predictions over the input.
struct Scored {
    perplexity: Perplexity,
    /// One per scored position, in order (only when asked for).
    predictions: Vec<Prediction>,
    /// n-gram extras, as `nlp ngram query` reports them.
    ngram: Option<Value>,
}

pub fn run(ctx: &Context, args: EvalArgs) -> Result<()> {
    if args.bins == 0 {
        bail!("--bins 0: calibration needs at least one bin");
    }
    if args.batch_size == 0 {
        bail!("--batch-size 0: a forward pass needs at least one window");
    }
    let plot = args.plot.as_deref().map(plot_format).transpose()?;
    if !args.compare.is_empty() {
        return compare(ctx, &args);
    }
    let path = args.model.as_ref().context("-m MODEL is required")?;
    let perplexity =
        args.perplexity || !(args.calibration || args.efficiency || args.choices.is_some());
    let token_calibration = args.calibration && (args.text.is_some() || args.ids.is_some());
    if (perplexity || (args.calibration && args.choices.is_none()))
        && args.text.is_none()
        && args.ids.is_none()
    {
        bail!("no text to evaluate: give a TEXT file or corpus name, or --ids FILE");
    }
    let started = Instant::now();
    let loaded = Loaded::open_with_adapters(path, ctx, &args.adapters)?;
    let load_seconds = started.elapsed().as_secs_f64();
    if let (Some(tokenizer), Loaded::Transformer { .. }) = (&args.tokenizer, &loaded) {
        bail!(
            "-t {}: {} is a model directory, which reads text with its own tokenizer.json; \
             -t is for n-gram models counted over a tokenizer's ids",
            tokenizer.display(),
            path.display()
        );
    }
    let rss_after_load = efficiency::memory("VmRSS");
    let input = match perplexity || token_calibration || args.efficiency {
        true => read_input(&args, &loaded)?,
        false => None,
    };

    let mut report = json!({ "model": path.display().to_string() });
    let mut out = String::new();
    if let Some(input) = input.as_ref().filter(|_| perplexity || token_calibration) {
        let scoring = Instant::now();
        let scored = score(&loaded, input, &args, token_calibration || args.per_token)?;
        let seconds = scoring.elapsed().as_secs_f64();
        if perplexity {
            add_perplexity(&mut report, &mut out, &scored, &loaded, args.per_token, seconds);
        }
        if token_calibration {
            let calibration = Calibration::new(
                scored
                    .predictions
                    .iter()
                    .map(|p| (p.confidence(), p.correct())),
                args.bins,
            )?;
            add_calibration(
                &mut report,
                &mut out,
                &calibration,
                "next-token calibration",
            );
            if let Some(plot) = plot {
                let title = format!("{}: next-token reliability", path.display());
                write_plot(plot, &calibration, &title)?;
            }
        }
    }
    if let Some(items_path) = &args.choices {
        let items = choices::read_items(items_path)?;
        let answers = choices::score_items(&items, args.bins, |prompt, form| {
            loaded
                .continuation_logprob(prompt, form)
                .map_err(|e| crate::Error::Invalid(format!("{e:#}")))
        })
        .with_context(|| items_path.display().to_string())?;
        let mut section = json!({});
        add_calibration(
            &mut section,
            &mut out,
            &answers.calibration,
            "answer-level calibration",
        );
        section["items"] = answers
            .items
            .iter()
            .zip(&items)
            .map(|(score, item)| {
                json!({
                    "line": item.line,
                    "answer": score.answer,
                    "predicted": score.predicted,
                    "probabilities": score.probabilities,
                })
            })
            .collect();
        report["answers"] = section;
        if let (Some(plot), false) = (plot, token_calibration) {
            let title = format!("{}: answer reliability", path.display());
            write_plot(plot, &answers.calibration, &title)?;
        }
    }
    if args.efficiency {
        let prompt = efficiency_prompt(&loaded, input.as_ref(), &args, ctx.config.run.seed)?;
        let settings = EfficiencySettings {
            prompt_tokens: prompt.len(),
            gen_tokens: args.gen_tokens,
            repeats: args.repeats,
        };
        let measured = match &loaded {
            Loaded::Transformer { model, .. } => {
                efficiency::measure(model, &prompt, settings, load_seconds, rss_after_load)?
            }
            Loaded::Ngram { model, .. } => {
                efficiency::measure(model, &prompt, settings, load_seconds, rss_after_load)?
            }
        };
        add_efficiency(&mut report, &mut out, &measured);
    }
    if ctx.json {
        return ctx.print_json(&report);
    }
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{out}")?;
    Ok(())
}

/// The file of `--plot` and the image format its extension names.
fn plot_format(path: &Path) -> Result<(&Path, ImageFormat)> {
    match ImageFormat::from_path(path) {
        Some(format) => Ok((path, format)),
        None => bail!(
            "--plot {}: the reliability diagram is written as PNG or SVG; name the file .png or .svg",
            path.display()
        ),
    }
}

/// Writes the reliability diagram of `calibration` to `path` (atomically) in `format`.
fn write_plot(
    (path, format): (&Path, ImageFormat),
    calibration: &Calibration,
    title: &str,
) -> Result<()> {
    let image = eval::reliability::figure(calibration, title).encode(format)?;
    crate::fsutil::write_atomic(path, &image)?;
    Ok(())
}

/// The text or the ids the flags name; `None` when neither was given.
fn read_input(args: &EvalArgs, loaded: &Loaded) -> Result<Option<Input>> {
    if let Some(path) = &args.ids {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        // Through -t, an n-gram model reads the tokenizer's ids, which its decoding checks.
        let vocab = match (loaded, &args.tokenizer) {
            (Loaded::Ngram { .. }, Some(_)) => u32::MAX as usize,
            _ => loaded.vocab_size(),
        };
        let mut sequences = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line_number = index + 1;
            if line.trim().is_empty() {
                continue;
            }
            let ids = line
                .split_whitespace()
                .map(|word| {
                    let id: u32 = word.parse().map_err(|_| {
                        anyhow::anyhow!("{}:{line_number}: `{word}` is not a token id", path.display())
                    })?;
                    if id as usize >= vocab {
                        bail!(
                            "{}:{line_number}: token id {id} is outside the model's vocabulary of {vocab}",
                            path.display()
                        );
                    }
                    Ok(id)
                })
                .collect::<Result<Vec<u32>>>()?;
            sequences.push(ids);
        }
        if sequences.is_empty() {
            bail!(
                "{}: no token ids (one sequence per line, ids separated by spaces)",
                path.display()
            );
        }
        return Ok(Some(Input::Ids {
            path: path.clone(),
            sequences,
        }));
    }
    let Some(name) = &args.text else {
        return Ok(None);
    };
    let mut text = String::new();
    if name == "-" {
        std::io::stdin()
            .lock()
            .read_to_string(&mut text)
            .context("reading the text from stdin")?;
    } else {
        data::resolve(name)?
            .open()?
            .read_to_string(&mut text)
            .with_context(|| format!("{name}: reading the text (is it UTF-8?)"))?;
    }
    if text.trim().is_empty() {
        bail!("{name}: the text is empty; give a text with at least two tokens");
    }
    Ok(Some(Input::Text {
        name: name.clone(),
        text,
    }))
}

/// Scores the input; `keep` keeps every prediction.
fn score(loaded: &Loaded, input: &Input, args: &EvalArgs, keep: bool) -> Result<Scored> {
    match loaded {
        Loaded::Transformer { model, .. } => {
            let bos = model.config().bos_token_id;
            let context = args
                .context
                .unwrap_or(model.config().max_position_embeddings);
            let stride = args.stride.unwrap_or(context);
            let (sequences, texts): (Vec<(String, Vec<u32>)>, Vec<String>) = match input {
                Input::Text { name, text } => (
                    vec![(name.clone(), loaded.encode(text, name)?)],
                    vec![text.clone()],
                ),
                Input::Ids { path, sequences } => {
                    let texts = sequences
                        .iter()
                        .map(|ids| loaded.decode(ids))
                        .collect::<Result<_>>()?;
                    let named = sequences
                        .iter()
                        .enumerate()
                        .map(|(i, ids)| {
                            (
                                format!("{}: sequence {}", path.display(), i + 1),
                                ids.clone(),
                            )
                        })
                        .collect();
                    (named, texts)
                }
            };
            let sequences = sequences
                .into_iter()
                .map(|(name, ids)| {
                    let mut sequence: Vec<u32> = bos.into_iter().collect();
                    sequence.extend(ids);
                    if sequence.len() < 2 {
                        bail!(
                            "{name}: the text is {} token(s) long; a model without a beginning-of-sequence \
                             token cannot score its first token, so give at least 2",
                            sequence.len()
                        );
                    }
                    Ok(sequence)
                })
                .collect::<Result<Vec<_>>>()?;
            let rows = eval::rolling_predictions(model, &sequences, context, stride, args.batch_size)?;
            let logprobs: Vec<f32> = rows.iter().flatten().map(|p| p.logprob).collect();
            let predictions = match keep {
                true => rows.into_iter().flatten().collect(),
                false => Vec::new(),
            };
            let words = texts.iter().map(|t| word_count(t)).sum();
            let bytes = texts.iter().map(String::len).sum();
            Ok(Scored {
                perplexity: Perplexity::from_logprobs(&logprobs, words, bytes)?,
                predictions,
                ngram: None,
            })
        }
        Loaded::Ngram { model, words } => {
            let (text, source) = ngram_lines(model, words, input, args.tokenizer.as_deref())?;
            let query = model.query(text.as_bytes())?;
            let mut perplexity = Perplexity::new(
                query.tokens,
                -query.log10_prob * std::f64::consts::LN_10,
                word_count(&source),
                source.len(),
            )?;
            // Exactly the figure `nlp ngram query` prints (not re-derived from mean_nll).
            perplexity.perplexity = query.perplexity;
            let predictions = match keep {
                true => ngram_predictions(model, &text, args.calibration)?,
                false => Vec::new(),
            };
            let ngram = json!({
                "oov": query.oov,
                "log10_prob": query.log10_prob,
                "perplexity_excl_oov": query.perplexity_excl_oov,
            });
            Ok(Scored {
                perplexity,
                predictions,
                ngram: Some(ngram),
            })
        }
    }
}

/// What an n-gram model reads of `input`, lines of words, and the text those stand
/// for, whose bytes and words are counted. With `tokenizer` (a model counted over its
/// ids), text is encoded line by line as `nlp ngram query -t` encodes it, and ids are
/// the tokenizer's; without, ids are the model's own word ids.
fn ngram_lines(
    model: &NgramModel,
    words: &[String],
    input: &Input,
    tokenizer: Option<&Path>,
) -> Result<(String, String)> {
    let Some(tokenizer_path) = tokenizer else {
        let text = match input {
            Input::Text { text, .. } => text.clone(),
            Input::Ids { sequences, .. } => sequences
                .iter()
                .map(|ids| {
                    let line: Vec<&str> = ids.iter().map(|&id| words[id as usize].as_str()).collect();
                    line.join(" ") + "\n"
                })
                .collect(),
        };
        return Ok((text.clone(), text));
    };
    if !SubwordNgram::counts_token_ids(model) {
        bail!(
            "-t {}: the n-gram model's words are not token ids; -t is for a model counted \
             with `nlp ngram train -t`",
            tokenizer_path.display()
        );
    }
    let tokenizer = super::ngram::load_tokenizer(tokenizer_path)?;
    match input {
        Input::Text { text, .. } => {
            let mut lines = String::new();
            IdLines::new(&tokenizer, text.as_bytes())
                .read_to_string(&mut lines)
                .with_context(|| format!("encoding the text with {}", tokenizer_path.display()))?;
            Ok((lines, text.clone()))
        }
        Input::Ids { path, sequences } => {
            let mut lines = String::new();
            let mut source = Vec::new();
            for (index, ids) in sequences.iter().enumerate() {
                let ids_text: Vec<String> = ids.iter().map(u32::to_string).collect();
                lines.push_str(&(ids_text.join(" ") + "\n"));
                let bytes = tokenizer.decode_bytes(ids).with_context(|| {
                    format!("{}:{}: decoding with {}", path.display(), index + 1, tokenizer_path.display())
                })?;
                source.extend(bytes);
                source.push(b'\n');
            }
            Ok((lines, String::from_utf8_lossy(&source).into_owned()))
        }
    }
}

/// Per-token predictions of an n-gram model, position by position as
/// `NgramModel::query` scores them: each line from `<s>`, `</s>` at its end, an unknown
/// word scored as `<unk>` and resetting the context. `top` also finds each position's
/// most likely word (a pass over the vocabulary per position).
fn ngram_predictions(model: &NgramModel, text: &str, top: bool) -> Result<Vec<Prediction>> {
    let unk = model.unk_id();
    let eos = model.eos_id().unwrap_or(unk);
    let mut predictions = Vec::new();
    for line in text.lines() {
        let mut state = model.initial_state();
        let ids = line
            .split([' ', '\t', '\r', '\0'])
            .filter(|w| !w.is_empty())
            .map(|w| model.word_id(w).unwrap_or(unk))
            .chain(std::iter::once(eos));
        for id in ids {
            let logprob = model.log10_prob(&state, id) * std::f32::consts::LN_10;
            let (top_id, top_logprob) = match top {
                true => {
                    let row = model.next_logprobs(std::slice::from_ref(&state))?;
                    row[0]
                        .iter()
                        .enumerate()
                        .fold((0u32, f32::NEG_INFINITY), |best, (i, &lp)| {
                            if lp > best.1 {
                                (i as u32, lp)
                            } else {
                                best
                            }
                        })
                }
                false => (id, logprob),
            };
            predictions.push(Prediction {
                logprob,
                top_logprob,
                top_id,
                target: id,
            });
            model.advance(&mut state, id)?;
        }
    }
    Ok(predictions)
}

fn add_perplexity(
    report: &mut Value,
    out: &mut String,
    scored: &Scored,
    loaded: &Loaded,
    per_token: bool,
    seconds: f64,
) {
    let ppl = &scored.perplexity;
    // Scoring alone, the model loaded and the input read: throughput as the strided
    // recipe's loop is timed.
    let tokens_per_s = ppl.tokens as f64 / seconds.max(f64::MIN_POSITIVE);
    report["seconds"] = json!(seconds);
    report["tokens_per_s"] = json!(tokens_per_s);
    report["tokens"] = json!(ppl.tokens);
    report["words"] = json!(ppl.words);
    report["bytes"] = json!(ppl.bytes);
    report["total_nll"] = json!(ppl.total_nll);
    report["mean_nll"] = json!(ppl.mean_nll);
    report["perplexity"] = json!(ppl.perplexity);
    report["word_perplexity"] = json!(ppl.word_perplexity);
    report["bits_per_byte"] = json!(ppl.bits_per_byte);
    let mut table = Table::new(&["perplexity", ""]);
    table.row(&["tokens scored".to_string(), ppl.tokens.to_string()]);
    table.row(&[
        "words / bytes".to_string(),
        format!("{} / {}", ppl.words, ppl.bytes),
    ]);
    table.row(&[
        "log-likelihood (nats)".to_string(),
        format!("{:.4}", -ppl.total_nll),
    ]);
    table.row(&[
        "cross-entropy (nats/token)".to_string(),
        format!("{:.6}", ppl.mean_nll),
    ]);
    table.row(&["perplexity".to_string(), format!("{:.6}", ppl.perplexity)]);
    table.row(&[
        "cross-entropy (nats/word)".to_string(),
        format!("{:.6}", ppl.total_nll / ppl.words as f64),
    ]);
    table.row(&[
        "word perplexity".to_string(),
        format!("{:.4}", ppl.word_perplexity),
    ]);
    table.row(&[
        "bits per byte".to_string(),
        format!("{:.6}", ppl.bits_per_byte),
    ]);
    table.row(&[
        "scoring time".to_string(),
        format!("{seconds:.3} s ({tokens_per_s:.1} tokens/s)"),
    ]);
    if let Some(ngram) = &scored.ngram {
        for (key, value) in ngram.as_object().into_iter().flatten() {
            report[key] = value.clone();
            table.row(&[key.replace('_', " "), value.to_string()]);
        }
    }
    out.push_str(&table.render());
    if per_token {
        report["logprobs"] = scored
            .predictions
            .iter()
            .map(|p| json!(p.logprob))
            .collect();
        let targets: Vec<u32> = scored.predictions.iter().map(|p| p.target).collect();
        out.push_str("\nposition\ttoken\tlogprob\n");
        for (i, (p, piece)) in scored
            .predictions
            .iter()
            .zip(loaded.pieces(&targets))
            .enumerate()
        {
            out.push_str(&format!("{i}\t{piece:?}\t{}\n", p.logprob));
        }
    }
}

fn add_calibration(report: &mut Value, out: &mut String, calibration: &Calibration, title: &str) {
    report["samples"] = json!(calibration.samples);
    report["accuracy"] = json!(calibration.accuracy);
    report["confidence"] = json!(calibration.confidence);
    report["ece"] = json!(calibration.ece);
    report["mce"] = json!(calibration.mce);
    report["bins"] = calibration
        .bins
        .iter()
        .map(|b| json!({ "lower": b.lower, "upper": b.upper, "count": b.count, "accuracy": b.accuracy, "confidence": b.confidence }))
        .collect();
    out.push_str(&format!(
        "\n{title}: {} predictions, accuracy {:.4}, mean confidence {:.4}, ECE {:.6}, MCE {:.6}\n",
        calibration.samples,
        calibration.accuracy,
        calibration.confidence,
        calibration.ece,
        calibration.mce
    ));
    let mut table = Table::new(&["bin", "count", "accuracy", "confidence", "gap"]);
    for bin in calibration.bins.iter().filter(|b| b.count > 0) {
        table.row(&[
            format!("({:.3}, {:.3}]", bin.lower, bin.upper),
            bin.count.to_string(),
            format!("{:.4}", bin.accuracy),
            format!("{:.4}", bin.confidence),
            format!("{:.4}", (bin.accuracy - bin.confidence).abs()),
        ]);
    }
    out.push_str(&table.render());
}

fn add_efficiency(report: &mut Value, out: &mut String, e: &eval::Efficiency) {
    let stat = |s: &eval::Stat| json!({ "mean": s.mean, "std": s.std, "min": s.min, "max": s.max });
    let [p50, p90, p99] = e.latency_percentiles;
    report["efficiency"] = json!({
        "load_seconds": e.load_seconds,
        "rss_after_load_bytes": e.rss_after_load,
        "peak_rss_bytes": e.peak_rss,
        "prompt_tokens": e.settings.prompt_tokens,
        "gen_tokens": e.settings.gen_tokens,
        "repeats": e.settings.repeats,
        "time_to_first_token_seconds": stat(&e.time_to_first_token),
        "time_to_last_token_seconds": stat(&e.time_to_last_token),
        "prompt_tokens_per_second": stat(&e.prompt_tokens_per_second),
        "gen_tokens_per_second": stat(&e.gen_tokens_per_second),
        "latency_p50_seconds": p50,
        "latency_p90_seconds": p90,
        "latency_p99_seconds": p99,
    });
    let mib = |b: Option<u64>| {
        b.map_or("n/a".to_string(), |b| {
            format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
        })
    };
    let pm = |s: &eval::Stat, scale: f64, unit: &str| {
        format!("{:.3} ± {:.3} {unit}", s.mean * scale, s.std * scale)
    };
    let mut table = Table::new(&["efficiency", ""]);
    table.row(&["load time".to_string(), format!("{:.3} s", e.load_seconds)]);
    table.row(&[
        "resident memory after load".to_string(),
        mib(e.rss_after_load),
    ]);
    table.row(&["peak resident memory".to_string(), mib(e.peak_rss)]);
    table.row(&[
        "runs".to_string(),
        format!(
            "{} x (prompt {} + generate {})",
            e.settings.repeats, e.settings.prompt_tokens, e.settings.gen_tokens
        ),
    ]);
    table.row(&[
        "time to first token".to_string(),
        pm(&e.time_to_first_token, 1e3, "ms"),
    ]);
    table.row(&[
        "time to last token".to_string(),
        pm(&e.time_to_last_token, 1e3, "ms"),
    ]);
    table.row(&[
        "prompt tokens/s".to_string(),
        pm(&e.prompt_tokens_per_second, 1.0, ""),
    ]);
    table.row(&[
        "generation tokens/s".to_string(),
        pm(&e.gen_tokens_per_second, 1.0, ""),
    ]);
    table.row(&[
        "per-token latency p50/p90/p99".to_string(),
        format!("{:.3} / {:.3} / {:.3} ms", p50 * 1e3, p90 * 1e3, p99 * 1e3),
    ]);
    out.push('\n');
    out.push_str(&table.render());
}

/// The prompt of --efficiency: the start of the input, else seeded random ids.
fn efficiency_prompt(
    loaded: &Loaded,
    input: Option<&Input>,
    args: &EvalArgs,
    seed: u64,
) -> Result<Vec<u32>> {
    let n = args.prompt_tokens;
    let ids = match input {
        Some(Input::Text { name, text }) => loaded.encode(text, name)?,
        Some(Input::Ids { sequences, .. }) => sequences.concat(),
        None => {
            let mut rng = SplitMix64::new(seed);
            let vocab = loaded.vocab_size() as u64;
            (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect()
        }
    };
    Ok(ids.into_iter().take(n).collect())
}

/// `--compare`: the same text through every model, one row each.
fn compare(ctx: &Context, args: &EvalArgs) -> Result<()> {
    let mut rows = Vec::new();
    for path in &args.compare {
        let loaded = Loaded::open(path, ctx)?;
        let input = read_input(args, &loaded)?
            .context("no text to evaluate: give a TEXT file or corpus name, or --ids FILE")?;
        let scored = score(&loaded, &input, args, false)?;
        rows.push((path.display().to_string(), scored.perplexity));
    }
    if ctx.json {
        let models: Vec<Value> = rows
            .iter()
            .map(|(model, p)| {
                json!({
                    "model": model,
                    "tokens": p.tokens,
                    "words": p.words,
                    "bytes": p.bytes,
                    "mean_nll": p.mean_nll,
                    "perplexity": p.perplexity,
                    "word_perplexity": p.word_perplexity,
                    "bits_per_byte": p.bits_per_byte,
                })
            })
            .collect();
        return ctx.print_json(&json!({ "models": models }));
    }
    write!(
        std::io::stdout().lock(),
        "{}",
        eval::table::compare(&rows).render()
    )?;
    Ok(())
}
