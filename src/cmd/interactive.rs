//! `nlp generate --interactive`: the two human-in-the-loop modes of the course, on
//! stdin and stdout.
//!
//! - `turns`: a person and the model take turns writing one text. Each line typed is
//!   appended as written (a newline included), then the model continues the whole text
//!   with the chosen strategy; an empty line lets the model go on.
//! - `choose`: the model offers k continuations (numbered); typing a number keeps that
//!   one, other text is appended as written, an empty line asks for new options.
//!
//! Ctrl-D (end of input) ends the session and prints the whole text. Menus and the
//! `> ` prompt go to stderr, so stdout holds the continuations and the final text.
//! Each model turn draws with its own seed (the run's seed plus the turn number), so a
//! session is reproducible from its inputs.

use std::io::{BufRead, Write};

use anyhow::{bail, Result};
use serde_json::json;

use super::generate::{dispatch, text_ids, GenerateArgs, Job, Prepared};
use super::Context;
use crate::model::slid_window;

/// Runs the session until the end of stdin.
pub(super) fn run(ctx: &Context, args: &GenerateArgs, mode: &str, prepared: Prepared) -> Result<()> {
    let Prepared {
        strategy,
        model,
        second,
        mut settings,
        detokenize,
    } = prepared;
    let choose = mode == "choose";
    let num_return = match (choose, args.num_return) {
        (true, None) => 3,
        (true, Some(k)) if k < 2 => bail!("--interactive choose needs at least 2 options (-n), got {k}"),
        (_, Some(k)) => k,
        (false, None) => 1,
    };
    let mut text: Vec<u32> = match (&args.prompt, &args.prompt_ids) {
        (Some(prompt), _) => model.encode(prompt, "the prompt")?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => Vec::new(),
    };
    if args.stdin.is_some() || args.prompt_file.as_deref().is_some_and(|p| p.as_os_str() == "-") {
        bail!("--interactive reads the person's turns from stdin; give the opening with --prompt or --prompt-file FILE");
    }
    if let Some(path) = &args.prompt_file {
        let opening = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read the prompt file: {e}", path.display()))?;
        text = model.encode(&opening, "the prompt")?;
    }
    let seed = settings.seed;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut stdout = std::io::stdout();
    let mut turn: u64 = 0;
    // In `turns` mode the person writes first unless there is an opening already.
    let mut model_turn = choose || !text.is_empty();
    loop {
        if model_turn {
            settings.seed = seed.wrapping_add(turn);
            // A long session outgrows the context: the model reads the recent part.
            let recent = match model.context_len() {
                Some(context) if text.len() >= context => &text[text.len() - slid_window(context)..],
                _ => &text[..],
            };
            turn += 1;
            let outputs = dispatch(
                &model,
                second.as_ref(),
                Job {
                    strategy: &strategy,
                    prompt: recent,
                    settings: &settings,
                    num_return,
                    detokenize: &detokenize,
                    on_token: &mut |_, _| {},
                },
            )?;
            let options: Vec<Vec<u32>> = outputs
                .iter()
                .map(|o| text_ids(&model, &o.generation.tokens).to_vec())
                .collect();
            if choose {
                for (i, option) in options.iter().enumerate() {
                    let shown = model.decode(option)?;
                    if ctx.json {
                        writeln!(stdout, "{}", json!({"turn": turn, "option": i + 1, "ids": option, "text": shown}))?;
                    } else {
                        writeln!(stdout, "[{}] {}", i + 1, shown.replace('\n', "\n    "))?;
                    }
                }
                eprint!("pick 1-{} (or write, or Enter for new options)> ", options.len());
            } else {
                let continuation = options.first().cloned().unwrap_or_default();
                let shown = model.decode(&continuation)?;
                if ctx.json {
                    writeln!(stdout, "{}", json!({"turn": turn, "ids": continuation, "text": shown}))?;
                } else {
                    writeln!(stdout, "{shown}")?;
                }
                text.extend(continuation);
                eprint!("> ");
            }
            stdout.flush()?;
            std::io::stderr().flush()?;
            let Some(line) = lines.next() else { break };
            let line = line?;
            if choose {
                match line.trim().parse::<usize>() {
                    Ok(k) if (1..=options.len()).contains(&k) => text.extend(&options[k - 1]),
                    Ok(k) => eprintln!("no option {k}; pick 1-{}", options.len()),
                    Err(_) if line.is_empty() => {}
                    Err(_) => text.extend(model.encode(&format!("{line}\n"), "your text")?),
                }
            } else if !line.is_empty() {
                text.extend(model.encode(&format!("{line}\n"), "your text")?);
            }
        } else {
            eprint!("> ");
            std::io::stderr().flush()?;
            let Some(line) = lines.next() else { break };
            text.extend(model.encode(&format!("{}\n", line?), "your text")?);
            model_turn = true;
        }
    }
    eprintln!();
    let whole = model.decode(&text)?;
    if ctx.json {
        writeln!(stdout, "{}", json!({"ids": text, "text": whole}))?;
    } else {
        writeln!(stdout, "\n{whole}")?;
    }
    Ok(())
}
