//! Glue between the command line and the library: arguments in, library calls,
//! results out. Nothing here computes.

mod bpe;
mod data;
pub mod eval;
pub mod generate;
mod info;
mod interactive;
mod loaded;
pub mod lora;
mod ngram;
pub mod train;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::cli::{Cli, Command, GlobalArgs};
use crate::config::{Config, ConfigBuilder};

/// What every command gets: the resolved configuration and how to print.
pub struct Context {
    /// Defaults < --config < --set < explicit flags.
    pub config: Config,
    /// Print results as JSON.
    pub json: bool,
    /// Print errors only.
    pub quiet: bool,
}

impl Context {
    /// `path`, or the cached model directory of a Hugging Face Hub repo id (fetched
    /// first where missing; see [`crate::hub`]).
    pub fn model_dir(&self, path: &Path) -> Result<PathBuf> {
        let bars = !self.quiet && std::io::stderr().is_terminal();
        Ok(crate::hub::resolve(path, bars)?)
    }

    /// Prints a JSON value on one line of stdout.
    pub fn print_json(&self, value: &serde_json::Value) -> Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{value}")?;
        Ok(())
    }
}

/// Resolves the configuration layers and flags into one [`Config`].
fn resolve_config(global: &GlobalArgs, command_overrides: &[String]) -> Result<Config> {
    let mut builder = ConfigBuilder::new();
    if let Some(path) = &global.config {
        builder = builder.file(path)?;
    }
    for assignment in &global.overrides {
        builder = builder.set(assignment)?;
    }
    for assignment in command_overrides {
        builder = builder.set(assignment)?;
    }
    if let Some(seed) = global.seed {
        builder = builder.set(&format!("run.seed={seed}"))?;
    }
    if let Some(device) = global.device {
        builder = builder.set(&format!("run.device=\"{device}\""))?;
    }
    Ok(builder.build()?)
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let command_overrides = cli
        .command
        .as_ref()
        .map(Command::config_overrides)
        .unwrap_or_default();
    let config = resolve_config(&cli.global, &command_overrides)?;
    if cli.global.print_config {
        let mut out = std::io::stdout().lock();
        out.write_all(config.to_toml().as_bytes())
            .context("writing the configuration")?;
        return Ok(());
    }
    let ctx = Context {
        config,
        json: cli.global.json,
        quiet: cli.global.quiet,
    };
    match cli.command {
        Some(Command::Data(command)) => data::run(&ctx, command),
        Some(Command::Bpe(command)) => bpe::run(&ctx, command),
        Some(Command::Ngram(command)) => ngram::run(&ctx, command),
        Some(Command::Train(args)) => train::run(&ctx, args),
        Some(Command::Generate(args)) => generate::run(&ctx, *args),
        Some(Command::Eval(args)) => eval::run(&ctx, args),
        Some(Command::Lora(command)) => lora::run(&ctx, command),
        Some(Command::Info) => info::run(&ctx),
        None => {
            use clap::CommandFactory;
            eprintln!("{}", Cli::command().render_help());
            anyhow::bail!("no command given: pick one of the commands listed above")
        }
    }
}
