//! The command line: global flags shared by every subcommand, and the subcommands.
//!
//! Parsing only; the work is done by `cmd::*`, which turn validated arguments into
//! library calls.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::device::DeviceSpec;

/// nlp: the whole life of a language model from the command line.
///
/// Results go to stdout (`--json` for scripts); progress and logs go to stderr.
/// Configuration is layered: built-in defaults < `--config FILE` < `--set KEY=VALUE`
/// < explicit flags.
#[derive(Debug, Parser)]
#[command(name = "nlp", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// Parses a command line (program name first). Every `--set` is moved in front of
    /// the subcommand first: clap keeps only the innermost level's values of a
    /// repeated global flag, so `nlp --set a=1 train --set b=2` would lose `a=1`.
    pub fn parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString>,
    {
        let mut args = args.into_iter().map(Into::into);
        let program = args.next();
        let (mut sets, mut rest) = (Vec::new(), Vec::new());
        while let Some(arg) = args.next() {
            if arg == "--" {
                rest.push(arg);
                rest.extend(args.by_ref());
            } else if arg == "--set" {
                match args.next() {
                    Some(value) => sets.extend([arg, value]),
                    None => rest.push(arg), // clap reports the missing value
                }
            } else if arg.to_str().is_some_and(|a| a.starts_with("--set=")) {
                sets.push(arg);
            } else if arg == "--prune" {
                // lmplz's form `--prune 0 1 1`: the counts that follow join into
                // `0,1,1`, and the next word that is not a count (the corpus) is left.
                rest.push(arg);
                let (mut counts, mut after): (Vec<String>, _) = (Vec::new(), None);
                for word in args.by_ref() {
                    let text = word.to_string_lossy();
                    if counts.is_empty() || text.split(',').all(|piece| piece.parse::<u64>().is_ok()) {
                        counts.push(text.into_owned());
                    } else {
                        after = Some(word);
                        break;
                    }
                }
                if !counts.is_empty() {
                    rest.push(counts.join(",").into());
                }
                rest.extend(after);
            } else {
                rest.push(arg);
            }
        }
        Cli::try_parse_from(program.into_iter().chain(sets).chain(rest))
    }
}

/// Flags every subcommand accepts.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Where tensors live: auto, cpu, cuda, cuda:N or metal. `auto` picks a compiled-in
    /// GPU backend when one is usable, else the CPU.
    #[arg(long, global = true, value_name = "DEVICE")]
    pub device: Option<DeviceSpec>,

    /// Seed for every random source (sampling, initialisation, data order).
    #[arg(long, global = true, value_name = "N")]
    pub seed: Option<u64>,

    /// Print results as JSON on stdout, for scripts.
    #[arg(long, global = true)]
    pub json: bool,

    /// Only print errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// More logging on stderr (-v: debug, -vv: trace). RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// TOML configuration file, layered over the built-in defaults.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Override one configuration key, e.g. `--set run.seed=7`. Repeatable; the value
    /// is read as TOML (numbers, booleans, "strings"; bare words are strings).
    #[arg(long = "set", global = true, value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,

    /// Print the resolved configuration as TOML and exit.
    #[arg(long, global = true)]
    pub print_config: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Corpora: list the known ones and where they were found, or download one.
    #[command(subcommand)]
    Data(DataCommand),
    /// Subword tokenizers: train byte-level BPE, Unigram or char vocabularies; encode,
    /// decode and measure text; read and write Hugging Face tokenizer.json.
    #[command(subcommand)]
    Bpe(BpeCommand),
    /// Count-based n-gram language models: train (modified Kneser-Ney as KenLM's
    /// lmplz, and the classic alternatives), query, convert ARPA <-> binary.
    #[command(subcommand)]
    Ngram(NgramCommand),
    /// Train a LLaMA-style (or Vaswani-style) transformer from a TOML config; the
    /// output folder is a Hugging Face Llama model directory. Resumes with --resume.
    Train(crate::cmd::train::TrainArgs),
    /// Decode from a model directory or an n-gram model: greedy, sampling (temperature,
    /// top-k, top-p, epsilon, ...), beam family, contrastive, MBR, speculative,
    /// self-consistency, discriminators (discard, FUDGE), interactive.
    Generate(Box<crate::cmd::generate::GenerateArgs>),
    /// Evaluate a model directory or an n-gram model: perplexity and bits per byte
    /// (sliding windows for long texts), calibration (ECE, MCE, reliability diagram,
    /// multiple-choice answers), efficiency (memory, latency, throughput), or several
    /// models side by side.
    ///
    /// Examples: `nlp eval --perplexity -m runs/shakespeare tinyshakespeare[90%:]`;
    /// `nlp eval --calibration --plot reliability.png -m runs/shakespeare valid.txt`;
    /// `nlp eval --calibration --choices questions.jsonl -m runs/shakespeare`;
    /// `nlp eval --efficiency -m runs/shakespeare --prompt-tokens 256 --gen-tokens 64`;
    /// `nlp eval valid.txt --compare 3gram.arpa 5gram.arpa runs/shakespeare`.
    Eval(crate::cmd::eval::EvalArgs),
    /// LoRA fine-tuning (Hu et al. 2021) in Hugging Face PEFT's file layout: train
    /// adapters on a frozen model (or fine-tune every weight with --full), merge them.
    #[command(subcommand)]
    Lora(crate::cmd::lora::LoraCommand),
    /// Show this build: version, compiled backends, the resolved device, data folders.
    Info,
}

impl Command {
    /// Configuration overrides implied by this command's own flags, as
    /// `section.key=value` assignments applied after `--set`.
    pub fn config_overrides(&self) -> Vec<String> {
        match self {
            Command::Ngram(NgramCommand::Train(args)) => args.config_overrides(),
            Command::Train(args) => args.config_overrides(),
            Command::Lora(crate::cmd::lora::LoraCommand::Train(args)) => args.config_overrides(),
            _ => Vec::new(),
        }
    }
}

/// `nlp bpe ...`
#[derive(Debug, Subcommand)]
pub enum BpeCommand {
    /// Learn a vocabulary from text and write it as a Hugging Face tokenizer.json.
    ///
    /// Example: `nlp bpe train --vocab-size 8000 tinyshakespeare -o tokenizer.json`
    Train(BpeTrainArgs),
    /// Encode text, one output line of ids (or pieces) per input line.
    ///
    /// Example: `nlp bpe encode -t tokenizer.json ptb-valid > ids.txt`
    Encode(BpeEncodeArgs),
    /// Decode lines of space-separated ids back to text.
    Decode(BpeDecodeArgs),
    /// Measure a tokenizer on a text: bytes per token, tokens per word, the longest
    /// pieces, and the share of unknown or byte-fallback tokens.
    Stats(BpeStatsArgs),
    /// Write a byte-level BPE tokenizer's ranks as a tiktoken `.tiktoken` file.
    Export(BpeExportArgs),
}

/// Which kind of subword model `nlp bpe train` learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SubwordModel {
    /// Byte-level BPE (Sennrich et al. 2016, GPT-2's byte mapping): never an unknown token.
    Bpe,
    /// Unigram language model (Kudo 2018) with SentencePiece-style spaces.
    Unigram,
    /// One token per character seen, bytes for the rest.
    Char,
}

/// `nlp bpe train`
#[derive(Debug, Args)]
pub struct BpeTrainArgs {
    /// Training text: paths or known corpus names (default: the config's data.corpus).
    pub corpus: Vec<String>,

    /// Where to write tokenizer.json.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,

    /// The kind of model.
    #[arg(long, value_enum, default_value = "bpe")]
    pub model: SubwordModel,

    /// Vocabulary size, special tokens included.
    #[arg(long, default_value_t = 32000, value_name = "N")]
    pub vocab_size: usize,

    /// BPE: pairs seen fewer times than this are never merged.
    #[arg(long, default_value_t = 0, value_name = "F")]
    pub min_frequency: u64,

    /// Special tokens, given ids 0, 1, ... in this order: comma-separated or
    /// repeated (e.g. --special-tokens '<|endoftext|>,<pad>').
    #[arg(long, value_delimiter = ',', value_name = "TOKEN,...")]
    pub special_tokens: Vec<String>,

    /// Longest token, in characters.
    #[arg(long, value_name = "L")]
    pub max_token_length: Option<usize>,

    /// Memory for counting words, e.g. 512M; past it the rarest words are dropped,
    /// with a warning that says how many.
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,
}

/// `nlp bpe encode`
#[derive(Debug, Args)]
pub struct BpeEncodeArgs {
    /// The tokenizer.json to use.
    #[arg(short, long, value_name = "FILE")]
    pub tokenizer: PathBuf,

    /// Text to encode: a path, a known corpus name, or - for stdin.
    #[arg(default_value = "-")]
    pub input: String,

    /// Print pieces instead of ids.
    #[arg(long)]
    pub pieces: bool,

    /// BPE-dropout probability (Provilkov et al. 2020), seeded by --seed.
    #[arg(long, value_name = "P")]
    pub dropout: Option<f32>,

    /// Unigram sampling smoothing (Kudo 2018): sample segmentations with
    /// probability proportional to p^alpha, seeded by --seed.
    #[arg(long, value_name = "ALPHA")]
    pub alpha: Option<f32>,

    /// With --alpha: sample among the N best segmentations of each word instead of
    /// the whole lattice (SentencePiece's nbest_size; 0 = whole lattice).
    #[arg(long, value_name = "N")]
    pub nbest: Option<usize>,
}

/// `nlp bpe decode`
#[derive(Debug, Args)]
pub struct BpeDecodeArgs {
    /// The tokenizer.json to use.
    #[arg(short, long, value_name = "FILE")]
    pub tokenizer: PathBuf,

    /// Lines of space-separated ids: a path, or - for stdin.
    #[arg(default_value = "-")]
    pub input: String,
}

/// `nlp bpe stats`
#[derive(Debug, Args)]
pub struct BpeStatsArgs {
    /// The tokenizer.json to measure.
    #[arg(short, long, value_name = "FILE")]
    pub tokenizer: PathBuf,

    /// Text to measure it on: a path or a known corpus name.
    pub text: String,
}

/// `nlp bpe export`
#[derive(Debug, Args)]
pub struct BpeExportArgs {
    /// A byte-level BPE tokenizer.json.
    #[arg(short, long, value_name = "FILE")]
    pub tokenizer: PathBuf,

    /// Where to write the `.tiktoken` rank file.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
}

/// `nlp ngram ...`
#[derive(Debug, Subcommand)]
pub enum NgramCommand {
    /// Estimate a model from text, one sentence per line, words split on whitespace.
    ///
    /// Modified Kneser-Ney (the default) reproduces KenLM's `lmplz`. Example:
    /// `nlp ngram train --order 5 tinyshakespeare -o shakespeare.arpa`
    Train(NgramTrainArgs),
    /// Score text: per-sentence log10 probabilities, OOVs and perplexity, as KenLM's
    /// `query` reports them.
    ///
    /// Example: `nlp ngram query -m shakespeare.bin ptb-valid`
    Query(NgramQueryArgs),
    /// Convert a model between ARPA (plain or gzip) and the binary format.
    ///
    /// The binary format memory-maps and loads many times faster than parsing ARPA.
    /// Example: `nlp ngram convert shakespeare.arpa -o shakespeare.bin`
    Convert(NgramConvertArgs),
}

/// Output format of a model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelFormat {
    /// ARPA text, readable by KenLM, SRILM and others.
    Arpa,
    /// nlp's memory-mapped binary format.
    Binary,
}

/// `nlp ngram train`
#[derive(Debug, Args)]
pub struct NgramTrainArgs {
    /// Training text: a path or a known corpus name (default: the config's data.corpus).
    pub corpus: Option<String>,

    /// Where to write the model.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,

    /// Output format; by default taken from the extension (.arpa or .bin).
    #[arg(long, value_enum)]
    pub format: Option<ModelFormat>,

    /// The highest order N [config: ngram.order, default 3].
    #[arg(long, value_name = "N")]
    pub order: Option<u64>,

    /// mkn (modified Kneser-Ney), kn (Kneser-Ney), wb (Witten-Bell), add-k,
    /// jm (Jelinek-Mercer) or mle [config: ngram.smoothing, default mkn].
    #[arg(long, value_name = "METHOD")]
    pub smoothing: Option<String>,

    /// Pruning thresholds per order, as lmplz's --prune: n-grams of order n >= 2 seen
    /// at most T_n times are dropped; the first value must be 0 and the last repeats
    /// for higher orders. Comma- or space-separated: 0,1,1 or 0 1 1.
    #[arg(long, value_delimiter = ',', value_name = "T1,T2,...")]
    pub prune: Vec<u64>,

    /// Drop literal <s>, </s> and <unk> from the training text (lmplz's
    /// --skip_symbols); without it such a token is an error.
    #[arg(long)]
    pub skip_symbols: bool,

    /// 1: interpolate unigrams with the uniform distribution (lmplz's default);
    /// 0: give <unk> the left-over unigram mass instead.
    #[arg(long, value_name = "0|1", value_parser = clap::value_parser!(u8).range(0..=1))]
    pub interpolate_unigrams: Option<u8>,

    /// Memory budget for counting, e.g. 512M or 2G; beyond it sorted runs spill to
    /// temporary files and are merged [config: ngram.memory, default 1G].
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,

    /// k for add-k smoothing [config: ngram.add_k, default 1].
    #[arg(long, value_name = "K")]
    pub add_k: Option<f64>,

    /// Held-out text for tuning Jelinek-Mercer weights (default: the last 10% of
    /// the training lines).
    #[arg(long, value_name = "TEXT")]
    pub heldout: Option<String>,

    /// Count subword units instead of words: encode each line with this
    /// tokenizer.json (from `nlp bpe train`, or a model directory's); the model's words
    /// are the token ids, so it can draft for or be the amateur of that transformer
    /// (`nlp generate -m DIR --draft ids.arpa`).
    #[arg(short, long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
}

impl NgramTrainArgs {
    fn config_overrides(&self) -> Vec<String> {
        let mut sets = Vec::new();
        if let Some(order) = self.order {
            sets.push(format!("ngram.order={order}"));
        }
        if let Some(smoothing) = &self.smoothing {
            sets.push(format!("ngram.smoothing={}", toml_string(smoothing)));
        }
        if !self.prune.is_empty() {
            let list: Vec<String> = self.prune.iter().map(u64::to_string).collect();
            sets.push(format!("ngram.prune=[{}]", list.join(", ")));
        }
        if self.skip_symbols {
            sets.push("ngram.skip_symbols=true".to_string());
        }
        if let Some(flag) = self.interpolate_unigrams {
            sets.push(format!("ngram.interpolate_unigrams={}", flag == 1));
        }
        if let Some(memory) = &self.memory {
            sets.push(format!("ngram.memory={}", toml_string(memory)));
        }
        if let Some(k) = self.add_k {
            sets.push(format!("ngram.add_k={k:?}"));
        }
        if let Some(corpus) = &self.corpus {
            sets.push(format!("data.corpus={}", toml_string(corpus)));
        }
        sets
    }
}

/// A TOML string literal.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// `nlp ngram query`
#[derive(Debug, Args)]
pub struct NgramQueryArgs {
    /// The model: ARPA (plain or gzip) or binary.
    #[arg(short, long, value_name = "MODEL")]
    pub model: PathBuf,

    /// Text to score, one sentence per line: a path, a known corpus name, or - for stdin.
    #[arg(default_value = "-")]
    pub text: String,

    /// Also print each sentence's log10 probability, OOV count and token count.
    #[arg(long)]
    pub per_sentence: bool,

    /// Encode the text with this tokenizer.json first, as the model was trained
    /// (`nlp ngram train -t`).
    #[arg(short, long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
}

/// `nlp ngram convert`
#[derive(Debug, Args)]
pub struct NgramConvertArgs {
    /// The model to read: ARPA (plain or gzip) or binary.
    pub input: PathBuf,

    /// Where to write it.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,

    /// Output format; by default taken from the extension (.arpa or .bin).
    #[arg(long, value_enum)]
    pub format: Option<ModelFormat>,
}

/// `nlp data ...`
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// List the known corpora and the file each one resolves to.
    List,
    /// Download a known corpus from its canonical address and verify its SHA-256.
    ///
    /// The file goes to $NLP_DATA_DIR when set, else ./data.
    Fetch {
        /// A known corpus name (see `nlp data list`).
        name: String,
        /// Download again even when the corpus is already found.
        #[arg(long)]
        force: bool,
    },
}
