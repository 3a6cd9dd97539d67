//! `nlp train` from the command line: the model directory it writes, exact resumption
//! after Ctrl-C, and one-line errors for bad configurations.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;

/// A model small enough to train hundreds of steps in seconds.
const TINY: [&str; 22] = [
    "--set", "model.dim=32",
    "--set", "model.n_layers=2",
    "--set", "model.n_heads=2",
    "--set", "model.hidden=64",
    "--set", "train.seq_len=16",
    "--set", "train.batch_size=4",
    "--set", "train.eval_every=50",
    "--set", "train.eval_steps=2",
    "--set", "train.log_every=1",
    "--set", "train.warmup_steps=5",
    "--set", "train.checkpoint_every=0",
];

/// The first 20 kB of Tiny Shakespeare, in the sandbox.
fn small_corpus(sandbox: &Sandbox) -> String {
    let text = std::fs::read(shared().join("data/tinyshakespeare.txt")).unwrap();
    sandbox.write("small.txt", &String::from_utf8_lossy(&text[..20_000]));
    "small.txt".to_string()
}

/// (step, train loss) of every line of a run's metrics.jsonl.
fn train_losses(dir: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            (v["step"].as_u64().unwrap(), v["train_loss"].as_f64().unwrap())
        })
        .collect()
}

#[test]
fn train_writes_a_model_directory_that_generate_reads() {
    let sandbox = Sandbox::new();
    let corpus = small_corpus(&sandbox);
    let out = sandbox
        .nlp()
        .args(TINY)
        .args(["--json", "train", &corpus, "-o", "run", "--steps", "20"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(summary["steps"], 20);
    let run = sandbox.path().join("run");
    for file in ["config.json", "model.safetensors", "tokenizer.json", "train.toml", "loss.svg"] {
        assert!(run.join(file).is_file(), "{file} missing");
    }
    // One metrics line per logged step; the loss of a fresh model is near ln(vocab).
    let losses = train_losses(&run);
    assert_eq!(losses.iter().map(|l| l.0).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
    let vocab = summary["vocab_size"].as_f64().unwrap();
    assert!((losses[0].1 - vocab.ln()).abs() < 0.5, "{losses:?} vs ln {vocab}");
    // config.json is Hugging Face's Llama config.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["hidden_size"], 32);

    let out = sandbox
        .nlp()
        .args(["--json", "generate", "-m", "run", "--prompt", "First", "--greedy"])
        .args(["--max-new-tokens", "10"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let generated: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(generated["ids"].as_array().unwrap().len(), 10);
}

#[test]
fn checkpointed_activations_give_the_same_losses() {
    let sandbox = Sandbox::new();
    let corpus = small_corpus(&sandbox);
    for (out, recompute) in [("kept", "false"), ("recomputed", "true")] {
        let setting = format!("train.checkpoint_activations={recompute}");
        let output = sandbox
            .nlp()
            .args(TINY)
            .args(["--set", "model.dropout=0.1", "--set", &setting])
            .args(["train", &corpus, "-o", out, "--steps", "8"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
    }
    let (kept, recomputed) = (
        train_losses(&sandbox.path().join("kept")),
        train_losses(&sandbox.path().join("recomputed")),
    );
    assert_eq!(kept.len(), 8);
    for ((step, a), (_, b)) in kept.iter().zip(&recomputed) {
        assert!((a - b).abs() < 1e-5, "step {step}: {a} vs {b}");
    }
}

#[test]
fn bf16_mixed_precision_trains_on_the_cpu_beside_f32() {
    let sandbox = Sandbox::new();
    let corpus = small_corpus(&sandbox);
    for precision in ["f32", "bf16-mixed"] {
        let setting = format!("train.precision=\"{precision}\"");
        let out = sandbox
            .nlp()
            .args(TINY)
            .args(["--set", &setting, "--json", "train", &corpus, "-o", precision, "--steps", "40"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let summary: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        assert_eq!(summary["precision"], precision);
    }
    // Rounding the products' operands to bf16 moves each loss by far less than
    // training lowers it.
    let (full, mixed) = (train_losses(&sandbox.path().join("f32")), train_losses(&sandbox.path().join("bf16-mixed")));
    assert_eq!(mixed.len(), 40);
    for ((step, a), (_, b)) in full.iter().zip(&mixed) {
        assert!((a - b).abs() < 0.05, "step {step}: f32 {a} vs bf16-mixed {b}");
    }
    let mean = |losses: &[(u64, f64)]| losses.iter().map(|l| l.1).sum::<f64>() / losses.len() as f64;
    assert!(mean(&mixed[35..]) < mean(&mixed[..5]) - 0.2, "{mixed:?}");
    assert!(full.iter().zip(&mixed).any(|((_, a), (_, b))| a != b), "bf16-mixed gave the f32 losses");

    // Other architectures train through autograd, where the CPU has no bf16 path.
    let out = sandbox
        .nlp()
        .args(TINY)
        .args(["--set", "model.norm=\"layer\"", "--set", "train.precision=\"bf16-mixed\""])
        .args(["train", &corpus, "-o", "layer-norm", "--steps", "2"])
        .output()
        .unwrap();
    let err = assert_one_line_error(&out);
    assert!(err.contains("train.precision"), "{err}");
    assert!(!sandbox.path().join("layer-norm").exists(), "the refused run wrote its folder");
}

#[cfg(unix)]
#[test]
fn ctrl_c_checkpoints_and_resume_repeats_the_uninterrupted_losses() {
    let sandbox = Sandbox::new();
    let corpus = small_corpus(&sandbox);
    let steps = "400";
    let out = sandbox
        .nlp()
        .args(TINY)
        .args(["train", &corpus, "-o", "whole", "--steps", steps])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let whole = train_losses(&sandbox.path().join("whole"));

    // Start the same run and press Ctrl-C once it has logged a few steps.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_nlp"))
        .current_dir(sandbox.path())
        .args(TINY)
        .args(["train", &corpus, "-o", "cut", "--steps", steps])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = sandbox.path().join("cut/metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(start.elapsed() < Duration::from_secs(60), "the run logged nothing");
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let cut = train_losses(&sandbox.path().join("cut"));
    assert!(cut.len() < whole.len(), "the run finished before Ctrl-C arrived");
    assert!(!out.status.success(), "an interrupted run must not exit 0");
    let err = stderr(&out);
    assert!(err.contains("--resume"), "{err}");

    let out = sandbox
        .nlp()
        .args(TINY)
        .args(["train", &corpus, "-o", "cut", "--steps", steps, "--resume"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(train_losses(&sandbox.path().join("cut")), whole);
}

#[test]
fn bad_configurations_are_one_line_errors() {
    let sandbox = Sandbox::new();
    let corpus = small_corpus(&sandbox);
    let cases: [(&[&str], &str); 4] = [
        (&["--set", "model.dim=30", "--set", "model.n_heads=4"], "model.dim"),
        (&["--set", "model.widht=3"], "model.widht"),
        (&["--set", "train.lr=\"fast\""], "train.lr"),
        (&["--set", "train.token_dtype=\"u8\""], "train.token_dtype"),
    ];
    for (flags, key) in cases {
        let out = sandbox
            .nlp()
            .args(flags)
            .args(["train", &corpus, "-o", "bad"])
            .output()
            .unwrap();
        let err = assert_one_line_error(&out);
        assert!(err.contains(key), "{flags:?}: {err}");
        assert!(!sandbox.path().join("bad/model.safetensors").exists());
    }
    let out = sandbox.nlp().args(["train", "no-such-corpus.txt", "-o", "bad"]).output().unwrap();
    let err = assert_one_line_error(&out);
    assert!(err.contains("no-such-corpus.txt"), "{err}");
}
