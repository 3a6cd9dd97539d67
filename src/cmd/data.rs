//! `nlp data list|fetch`.

use std::io::Write;

use anyhow::{bail, Result};
use serde_json::json;

use super::Context;
use crate::cli::DataCommand;
use crate::data;

pub fn run(ctx: &Context, command: DataCommand) -> Result<()> {
    match command {
        DataCommand::List => list(ctx),
        DataCommand::Fetch { name, force } => fetch(ctx, &name, force),
    }
}

fn list(ctx: &Context) -> Result<()> {
    let rows: Vec<_> = data::KNOWN_CORPORA
        .iter()
        .map(|corpus| (corpus, data::locate(corpus)))
        .collect();
    if ctx.json {
        let corpora: Vec<_> = rows
            .iter()
            .map(|(corpus, path)| {
                json!({
                    "name": corpus.name,
                    "file": corpus.file_name,
                    "description": corpus.description,
                    "path": path.as_ref().map(|p| p.display().to_string()),
                    "url": corpus.url,
                    "sha256": corpus.sha256,
                })
            })
            .collect();
        let dirs: Vec<_> = data::search_dirs()
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        return ctx.print_json(&json!({ "corpora": corpora, "search_dirs": dirs }));
    }
    let mut out = std::io::stdout().lock();
    for (corpus, path) in &rows {
        let location = path.as_ref().map_or_else(
            || format!("missing (nlp data fetch {})", corpus.name),
            |p| p.display().to_string(),
        );
        writeln!(out, "{:<16} {:<40} {}", corpus.name, location, corpus.description)?;
    }
    let dirs: Vec<_> = data::search_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    writeln!(out, "searched: {}", dirs.join(", "))?;
    Ok(())
}

fn fetch(ctx: &Context, name: &str, force: bool) -> Result<()> {
    let Some(corpus) = data::known(name) else {
        let names: Vec<&str> = data::KNOWN_CORPORA.iter().map(|c| c.name).collect();
        bail!("unknown corpus `{name}`; known corpora: {}", names.join(", "));
    };
    let path = match data::locate(corpus) {
        Some(path) if !force => {
            tracing::info!("{} is already at {} (use --force to download again)", name, path.display());
            path
        }
        _ => data::fetch(corpus, &data::fetch_dir(), ctx.quiet)?,
    };
    if ctx.json {
        ctx.print_json(&json!({ "name": corpus.name, "path": path.display().to_string() }))
    } else {
        writeln!(std::io::stdout().lock(), "{}", path.display())?;
        Ok(())
    }
}
