//! `nlp info`: what this build can do and where it looks for data.

use std::io::Write;

use anyhow::Result;
use serde_json::json;

use super::Context;
use crate::{data, device};

pub fn run(ctx: &Context) -> Result<()> {
    let spec = ctx.config.device()?;
    let resolved = device::describe(&spec.resolve()?);
    let backends = device::compiled_backends();
    let dirs: Vec<String> = data::search_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    if ctx.json {
        return ctx.print_json(&json!({
            "version": env!("CARGO_PKG_VERSION"),
            "backends": backends,
            "device": spec.to_string(),
            "resolved_device": resolved,
            "seed": ctx.config.run.seed,
            "data_dirs": dirs,
        }));
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "nlp {}", env!("CARGO_PKG_VERSION"))?;
    writeln!(out, "backends:  {}", backends.join(", "))?;
    writeln!(out, "device:    {spec} -> {resolved}")?;
    writeln!(out, "seed:      {}", ctx.config.run.seed)?;
    writeln!(out, "data dirs: {}", dirs.join(", "))?;
    Ok(())
}
