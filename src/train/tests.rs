//! End-to-end tests of the training loop on a tiny model and a small text.

use std::ops::ControlFlow;
use std::path::Path;

use candle_core::{DType, Device};

use super::*;
use crate::model::Transformer;
use crate::tokenize::Tokenizer;

fn corpus() -> String {
    let lines = [
        "First Citizen: Before we proceed any further, hear me speak.",
        "All: Speak, speak.",
        "First Citizen: You are all resolved rather to die than to famish?",
        "All: Resolved. resolved.",
        "First Citizen: First, you know Caius Marcius is chief enemy to the people.",
    ];
    lines
        .iter()
        .cycle()
        .take(60)
        .map(|l| format!("{l}\n"))
        .collect()
}

fn tiny_setup(steps: u64) -> TrainSetup {
    TrainSetup {
        model: ModelSection {
            dim: 32,
            n_layers: 2,
            n_heads: 2,
            hidden: 64,
            dropout: 0.1,
            ..Default::default()
        },
        train: TrainSection {
            seq_len: 16,
            batch_size: 4,
            grad_accum: 2,
            steps,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 2,
            eval_every: 2,
            eval_steps: 2,
            checkpoint_every: 0,
            log_every: 1,
            ..Default::default()
        },
        seed: 7,
        corpus_name: "test corpus".into(),
        config_toml: "[train]\nsteps = 6\n".into(),
    }
}

/// (step, train loss, validation loss) of every step.
type Losses = Vec<(u64, f32, Option<f32>)>;

/// Runs `setup` in `dir`, stopping (with a checkpoint) after `stop_at` steps if given;
/// returns the per-step losses and the summary.
fn train(
    setup: &TrainSetup,
    dir: &Path,
    resume: bool,
    stop_at: Option<u64>,
) -> crate::Result<(Losses, TrainSummary)> {
    let text = corpus();
    let mut losses = Vec::new();
    let summary = run_with_control(
        setup,
        &mut text.as_bytes(),
        dir,
        resume,
        &Device::Cpu,
        &mut |r: &StepReport| {
            losses.push((r.step, r.train_loss, r.val_loss));
            match stop_at {
                Some(s) if r.step == s => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        },
    )?;
    Ok((losses, summary))
}

#[test]
fn resumed_run_repeats_the_uninterrupted_losses_exactly() {
    let setup = tiny_setup(6);
    let whole = tempfile::tempdir().unwrap();
    let (all, summary) = train(&setup, whole.path(), false, None).unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(summary.steps, 6);
    assert!(!summary.interrupted);

    let split = tempfile::tempdir().unwrap();
    let (first, summary) = train(&setup, split.path(), false, Some(3)).unwrap();
    assert!(summary.interrupted);
    assert_eq!(summary.steps, 3);
    let (second, summary) = train(&setup, split.path(), true, None).unwrap();
    assert_eq!(summary.resumed_from, Some(3));
    assert_eq!(summary.steps, 6);
    let joined: Vec<_> = first.into_iter().chain(second).collect();
    // Bit-for-bit: the same f32 losses, train and validation.
    assert_eq!(joined, all);
    // The metrics log holds each step once.
    let (train_curve, val_curve) =
        metrics::read_curves(&split.path().join("metrics.jsonl")).unwrap();
    assert_eq!(
        train_curve.iter().map(|p| p.0 as u64).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_eq!(val_curve.len(), 3);
}

#[test]
fn same_seed_same_losses_other_seed_other_losses() {
    let setup = TrainSetup {
        train: TrainSection {
            grad_accum: 1,
            ..tiny_setup(3).train
        },
        ..tiny_setup(3)
    };
    let (a, _) = train(&setup, tempfile::tempdir().unwrap().path(), false, None).unwrap();
    let (b, _) = train(&setup, tempfile::tempdir().unwrap().path(), false, None).unwrap();
    assert_eq!(a, b);
    let other = TrainSetup { seed: 8, ..setup };
    let (c, summary) = train(&other, tempfile::tempdir().unwrap().path(), false, None).unwrap();
    assert_ne!(a, c);
    // Fresh weights predict nearly uniformly: the first loss is about ln(vocab).
    let uniform = (summary.vocab_size as f32).ln();
    assert!(
        (a[0].1 - uniform).abs() < 0.2,
        "first loss {} vs ln V = {uniform}",
        a[0].1
    );
}

#[test]
fn output_folder_is_a_loadable_model_directory() {
    let setup = tiny_setup(2);
    let dir = tempfile::tempdir().unwrap();
    let (_, summary) = train(&setup, dir.path(), false, None).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train.toml",
        "metrics.jsonl",
        "loss.svg",
        "checkpoint.safetensors",
    ] {
        assert!(dir.path().join(file).exists(), "{file} is missing");
    }
    let model = Transformer::from_pretrained(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(model.config().vocab_size, summary.vocab_size);
    let tokenizer = crate::tokenize::load_json(&dir.path().join("tokenizer.json")).unwrap();
    assert_eq!(tokenizer.vocab_size(), summary.vocab_size);
    let ids = tokenizer.encode("First Citizen");
    let input = candle_core::Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    assert_eq!(
        model.forward(&input).unwrap().dims(),
        &[1, ids.len(), summary.vocab_size]
    );
    let first = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let record: serde_json::Value = serde_json::from_str(first.lines().nth(1).unwrap()).unwrap();
    for key in ["step", "lr", "train_loss", "tokens_per_s", "val_loss"] {
        assert!(record.get(key).is_some(), "{key} missing from {record}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("train.toml")).unwrap(),
        setup.config_toml
    );
    // A second fresh run into the same folder is refused rather than clobbering it.
    let err = train(&setup, dir.path(), false, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--resume"), "{err}");
}

#[test]
fn mismatched_missing_and_corrupt_checkpoints_are_errors() {
    let setup = tiny_setup(2);
    let empty = tempfile::tempdir().unwrap();
    let err = train(&setup, empty.path(), true, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no checkpoint"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    train(&setup, dir.path(), false, None).unwrap();
    let wider = TrainSetup {
        model: ModelSection {
            dim: 48,
            ..setup.model.clone()
        },
        ..tiny_setup(4)
    };
    let err = train(&wider, dir.path(), true, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.embed_tokens.weight") && err.contains("48") && err.contains("32"),
        "{err}"
    );

    let path = dir.path().join("checkpoint.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = train(&tiny_setup(4), dir.path(), true, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt"), "{err}");
}

#[test]
fn diverging_loss_stops_with_a_message() {
    let mut setup = tiny_setup(5);
    setup.train.lr = 1e30;
    setup.train.min_lr = 0.0;
    setup.train.warmup_steps = 0;
    setup.train.grad_clip = 0.0;
    let err = train(&setup, tempfile::tempdir().unwrap().path(), false, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("diverged"), "{err}");
}

#[test]
fn bad_config_and_tiny_corpus_are_refused() {
    let mut setup = tiny_setup(2);
    setup.model.dim = 33;
    let err = train(&setup, tempfile::tempdir().unwrap().path(), false, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.dim") && err.contains("n_heads"),
        "{err}"
    );
    let mut setup = tiny_setup(2);
    setup.train.seq_len = 1000;
    setup.model.max_seq_len = 0;
    let err = train(&setup, tempfile::tempdir().unwrap().path(), false, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("seq_len"), "{err}");
    let mut setup = tiny_setup(2);
    setup.train.tokenizer = "/no/such/tokenizer.json".into();
    let err = train(&setup, tempfile::tempdir().unwrap().path(), false, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("train.tokenizer"), "{err}");
}

/// The shakespeare-char recipe on Tiny Shakespeare: throughput and the loss after
/// `NLP_BENCH_STEPS` steps (default 200). Run in release:
/// `cargo test --release train::tests::shakespeare_char_recipe -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark: minutes of training on the real corpus"]
fn shakespeare_char_recipe() {
    let path = Path::new("/work/shared/data/tinyshakespeare.txt");
    let steps: u64 = std::env::var("NLP_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut setup = TrainSetup {
        model: ModelSection::default(),
        train: TrainSection {
            steps,
            eval_every: 0,
            checkpoint_every: 0,
            ..Default::default()
        },
        seed: 1337,
        corpus_name: "tinyshakespeare".into(),
        config_toml: String::new(),
    };
    setup.train.eval_steps = 20;
    let dir = tempfile::tempdir().unwrap();
    let mut file = std::fs::File::open(path).unwrap();
    let started = std::time::Instant::now();
    let mut window = std::time::Instant::now();
    let summary = run(
        &setup,
        &mut file,
        dir.path(),
        false,
        &Device::Cpu,
        &mut |r: &StepReport| {
            if r.step % 50 == 0 {
                let tps = 50.0 * 768.0 / window.elapsed().as_secs_f64();
                eprintln!(
                    "step {} loss {:.4} lr {:.2e} {:.0} tokens/s (last 50 steps)",
                    r.step, r.train_loss, r.lr, tps
                );
                window = std::time::Instant::now();
            }
        },
    )
    .unwrap();
    eprintln!(
        "{} params, {} steps in {:.1}s: {:.0} tokens/s (train steps only), final train loss {:?}, val loss {:?}",
        summary.param_count,
        summary.steps,
        started.elapsed().as_secs_f64(),
        summary.tokens_per_s,
        summary.final_train_loss,
        summary.final_val_loss
    );
}

#[test]
fn shipped_configs_parse_and_have_the_documented_sizes() {
    // file!() is src/train/tests.rs relative to the crate root, or absolute in a harness.
    let root = Path::new(file!())
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .unwrap();
    let mut params = std::collections::HashMap::new();
    for name in ["shakespeare-char", "llama", "vaswani", "small"] {
        let path = root.join("configs").join(format!("{name}.toml"));
        let table: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        let model: ModelSection = table["model"].clone().try_into().unwrap();
        let train: TrainSection = table["train"].clone().try_into().unwrap();
        train.validate().unwrap();
        model.validate(train.seq_len).unwrap();
        let cfg = model.model_config(65, train.seq_len).unwrap();
        params.insert(name, crate::model::param_count(&cfg));
    }
    assert_eq!(params["shakespeare-char"], params["llama"]);
    assert_eq!(params["llama"], 820_608);
    let (llama, vaswani) = (params["llama"] as f64, params["vaswani"] as f64);
    assert!(
        (vaswani / llama - 1.0).abs() < 0.01,
        "llama {llama} vs vaswani {vaswani}"
    );
    assert!(
        (10_000_000..30_000_000).contains(&params["small"]),
        "{}",
        params["small"]
    );
}
