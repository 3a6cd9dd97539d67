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
    /// Show this build: version, compiled backends, the resolved device, data folders.
    Info,
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
