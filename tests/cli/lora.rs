//! `nlp lora` and LoRA adapters, checked against the adapter and logits that Hugging
//! Face PEFT wrote (shared/fixtures/peft_lora_tiny, for shared/fixtures/hf_tiny_llama),
//! against hand-computed merges, and against the laws of LoRA (B = 0 leaves the model
//! unchanged; merging does not change the outputs; only adapters train).

use crate::common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use nlp::lora::{Adapter, LoraConfig};
use nlp::model::Transformer;

fn base_dir() -> PathBuf {
    shared().join("fixtures/hf_tiny_llama")
}

fn peft_dir() -> PathBuf {
    shared().join("fixtures/peft_lora_tiny")
}

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("a safetensors file")
}

fn base_model() -> Transformer {
    Transformer::from_pretrained(&base_dir(), &Device::Cpu, DType::F32).expect("the fixture loads")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// PEFT's reference: the input ids (as u32) and the logits it computed with the adapter.
fn peft_reference() -> (Tensor, Tensor) {
    let reference = load_tensors(&peft_dir().join("reference.safetensors"));
    let ids = reference["input_ids"].to_dtype(DType::U32).unwrap();
    (ids, reference["logits"].clone())
}

#[test]
fn peft_adapter_gives_peft_logits() {
    let (ids, expected) = peft_reference();
    let mut model = base_model();
    let adapter = Adapter::load(&peft_dir(), &Device::Cpu).unwrap();
    assert_eq!(adapter.config.scale(), 2.0); // lora_alpha 8 / r 4, as the README says
    assert_eq!(adapter.pairs.len(), 12); // 3 targets x 4 layers
    adapter.attach(&mut model, 1.0, &peft_dir()).unwrap();
    let logits = model.forward(&ids).unwrap();
    let diff = max_abs_diff(&logits, &expected);
    assert!(diff < 1e-4, "max |ours - PEFT| = {diff}");
}

#[test]
fn fresh_adapter_with_zero_b_leaves_the_logits_exactly_unchanged() {
    let (ids, _) = peft_reference();
    let base = base_model().forward(&ids).unwrap();
    let mut model = base_model();
    let config = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: vec!["all-linear".into()],
        rslora: false,
        base_model: String::new(),
    };
    let (adapter, vars) = Adapter::init(&config, &mut model, 7).unwrap();
    assert_eq!(vars.len(), 2 * 7 * 4); // A and B for 7 projections in 4 layers
    // Through the file, as `generate --adapter` would load a freshly made adapter.
    let sandbox = Sandbox::new();
    adapter.save(sandbox.path()).unwrap();
    let adapter = Adapter::load(sandbox.path(), &Device::Cpu).unwrap();
    adapter.attach(&mut model, 1.0, sandbox.path()).unwrap();
    let adapted = model.forward(&ids).unwrap();
    assert_eq!(max_abs_diff(&base, &adapted), 0.0);
}

#[test]
fn merge_matches_unmerged_and_peft() {
    let sandbox = Sandbox::new();
    let out = sandbox.path().join("merged");
    let output = sandbox
        .nlp()
        .args(["--json", "lora", "merge", "--base"])
        .arg(base_dir())
        .arg("--adapter")
        .arg(peft_dir())
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    let reported = report["max_abs_logit_diff"].as_f64().unwrap();
    // Two f32 computations of the same function: x (W + s B A) with the sum rounded
    // once, and x W + s (x A) B. Their rounding differs by a few units in the last
    // place of logits near 10, carried through four layers: the issue's bound is 1e-5.
    assert!(reported < 1e-5, "{reported}");
    // The merged directory is an ordinary model that gives PEFT's logits.
    let (ids, expected) = peft_reference();
    let merged = Transformer::from_pretrained(&out, &Device::Cpu, DType::F32).unwrap();
    let diff = max_abs_diff(&merged.forward(&ids).unwrap(), &expected);
    assert!(diff < 1e-4, "max |merged - PEFT| = {diff}");
    let mut unmerged = base_model();
    Adapter::load(&peft_dir(), &Device::Cpu)
        .unwrap()
        .attach(&mut unmerged, 1.0, &peft_dir())
        .unwrap();
    let unmerged = unmerged.forward(&ids).unwrap();
    let diff = max_abs_diff(&merged.forward(&ids).unwrap(), &unmerged);
    // On these inputs f32 rounding alone moves PEFT's own merged logits by 1.1e-5
    // (fixture reference.json); ours stay within the issue's 1e-5.
    assert!(diff < 1e-5, "max |merged - unmerged| = {diff}");
    assert!(out.join("tokenizer.json").is_file());
}

/// A copy of the PEFT adapter with `edit` applied to its adapter_config.json.
fn edited_adapter(sandbox: &Sandbox, name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let dir = sandbox.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        peft_dir().join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(peft_dir().join("adapter_config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    dir
}

/// W + scale * B A for layer 0's q_proj, by hand from the files.
fn hand_merged_q_proj(scale: f32) -> Vec<f32> {
    let base = load_tensors(&base_dir().join("model.safetensors"));
    let adapter = load_tensors(&peft_dir().join("adapter_model.safetensors"));
    let w = base["model.layers.0.self_attn.q_proj.weight"].to_vec2::<f32>().unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_proj";
    let a = adapter[&format!("{key}.lora_A.weight")].to_vec2::<f32>().unwrap();
    let b = adapter[&format!("{key}.lora_B.weight")].to_vec2::<f32>().unwrap();
    let mut out = Vec::new();
    for (i, row) in w.iter().enumerate() {
        for (j, &wij) in row.iter().enumerate() {
            let ba: f32 = (0..a.len()).map(|k| b[i][k] * a[k][j]).sum();
            out.push(wij + scale * ba);
        }
    }
    out
}

fn merged_q_proj(sandbox: &Sandbox, adapter: &str, out: &str) -> Vec<f32> {
    let output = sandbox
        .nlp()
        .args(["lora", "merge", "--base"])
        .arg(base_dir())
        .args(["--adapter", adapter, "-o", out])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let merged = load_tensors(&sandbox.path().join(out).join("model.safetensors"));
    merged["model.layers.0.self_attn.q_proj.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn assert_close(ours: &[f32], expected: &[f32], tolerance: f32) {
    let diff = ours
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < tolerance, "max diff {diff}");
}

#[test]
fn scaling_is_alpha_over_r_or_alpha_over_sqrt_r_with_rslora() {
    let sandbox = Sandbox::new();
    edited_adapter(&sandbox, "plain", |_| {});
    edited_adapter(&sandbox, "rs", |c| c["use_rslora"] = true.into());
    // r = 4, alpha = 8: alpha / r = 2, alpha / sqrt(r) = 4; a weight of 0.5 halves it.
    assert_close(&merged_q_proj(&sandbox, "plain", "m1"), &hand_merged_q_proj(2.0), 1e-5);
    assert_close(&merged_q_proj(&sandbox, "rs", "m2"), &hand_merged_q_proj(4.0), 1e-5);
    assert_close(&merged_q_proj(&sandbox, "plain:0.5", "m3"), &hand_merged_q_proj(1.0), 1e-5);
}

/// A short run on Shakespeare text (in the fixture's alphabet).
fn fine_tune(sandbox: &Sandbox, out: &str, steps: u32, extra: &[&str]) -> serde_json::Value {
    let text = std::fs::read_to_string(shared().join("data/tinyshakespeare.txt")).unwrap();
    let text: String = text.chars().take(20_000).collect();
    sandbox.write("shakespeare.txt", &text);
    let output = sandbox
        .nlp()
        .args(["--json", "--set", "train.batch_size=4", "--set", "train.seq_len=32"])
        .args(["--set", "train.eval_steps=2", "--set", "train.eval_every=3"])
        .args(["--set", "train.warmup_steps=0", "--set", "train.schedule=constant"])
        .args(["lora", "train", "--base"])
        .arg(base_dir())
        .args(["--data", "shakespeare.txt", "-o", out, "--lr", "0.01"])
        .args(["--steps", &steps.to_string()])
        .args(extra)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    serde_json::from_str(stdout(&output).trim()).unwrap()
}

#[test]
fn training_changes_only_adapter_tensors_and_writes_peft_layout() {
    let sandbox = Sandbox::new();
    let before = std::fs::read(base_dir().join("model.safetensors")).unwrap();
    let report = fine_tune(&sandbox, "adapter", 6, &["--target", "q_proj,v_proj", "--rank", "4"]);
    // 4 layers x (q: 4x128 + 128x4, v: the same) = 8192 trainable parameters.
    assert_eq!(report["trainable_parameters"], 8192);
    let total = report["total_parameters"].as_f64().unwrap();
    let percent = report["trainable_percent"].as_f64().unwrap();
    assert!((percent - 100.0 * 8192.0 / total).abs() < 1e-9);
    assert!(report["peak_memory_bytes"].as_u64().unwrap() > 0);
    assert_eq!(std::fs::read(base_dir().join("model.safetensors")).unwrap(), before);
    let dir = sandbox.path().join("adapter");
    let tensors = load_tensors(&dir.join("adapter_model.safetensors"));
    assert_eq!(tensors.len(), 16);
    for (name, tensor) in &tensors {
        assert!(
            name.starts_with("base_model.model.model.layers.")
                && (name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")),
            "{name}"
        );
        if name.ends_with("lora_B.weight") {
            // B starts at zero; training moved it.
            let norm = tensor.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{name} did not train");
        }
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 16);
    assert_eq!(config["bias"], "none");
    for file in ["metrics.jsonl", "checkpoint.safetensors", "train.toml", "loss.svg"] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    // The adapter we wrote loads back (generate accepts it) on the base.
    let output = sandbox
        .nlp()
        .args(["generate", "-m"])
        .arg(base_dir())
        .args(["--adapter", "adapter:0.5", "--prompt", "ROMEO:", "--max-new-tokens", "5"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn full_fine_tune_trains_every_weight_and_resume_continues() {
    let sandbox = Sandbox::new();
    let report = fine_tune(&sandbox, "full", 6, &["--full"]);
    assert_eq!(report["trainable_percent"].as_f64().unwrap(), 100.0);
    let base = load_tensors(&base_dir().join("model.safetensors"));
    let tuned = load_tensors(&sandbox.path().join("full/model.safetensors"));
    for (name, tensor) in &base {
        assert!(max_abs_diff(tensor, &tuned[name]) > 0.0, "{name} did not train");
    }
}

#[test]
fn resumed_lora_run_equals_an_uninterrupted_one() {
    let sandbox = Sandbox::new();
    fine_tune(&sandbox, "straight", 6, &[]);
    // Stop after 3 of the steps, then resume to 6: the cosine schedule's length differs,
    // so both runs use a constant learning rate.
    let first = fine_tune(&sandbox, "resumed", 3, &[]);
    assert_eq!(first["steps"], 3);
    let output = sandbox
        .nlp()
        .args(["--json", "--set", "train.batch_size=4", "--set", "train.seq_len=32"])
        .args(["--set", "train.eval_steps=2", "--set", "train.eval_every=3"])
        .args(["--set", "train.warmup_steps=0", "--set", "train.schedule=constant"])
        .args(["lora", "train", "--base"])
        .arg(base_dir())
        .args(["-o", "resumed", "--steps", "6", "--lr", "0.01", "--resume"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let straight = load_tensors(&sandbox.path().join("straight/adapter_model.safetensors"));
    let resumed = load_tensors(&sandbox.path().join("resumed/adapter_model.safetensors"));
    for (name, tensor) in &straight {
        assert_eq!(max_abs_diff(tensor, &resumed[name]), 0.0, "{name}");
    }
}

#[test]
fn checkpointed_activations_train_the_same_adapter() {
    // Recomputing each block in the backward (with its dropout redrawn) changes memory,
    // not the arithmetic: the adapters after a few steps agree to rounding (AdamW's
    // normalised steps carry the last bits of the gradients into the weights).
    let sandbox = Sandbox::new();
    let text = std::fs::read_to_string(shared().join("data/tinyshakespeare.txt")).unwrap();
    sandbox.write("shakespeare.txt", &text.chars().take(20_000).collect::<String>());
    for (out, recompute) in [("kept", "false"), ("recomputed", "true")] {
        let setting = format!("train.checkpoint_activations={recompute}");
        let output = sandbox
            .nlp()
            .args(["--set", "train.batch_size=4", "--set", "train.seq_len=32"])
            .args(["--set", "train.eval_steps=1", "--set", &setting])
            .args(["lora", "train", "--base"])
            .arg(base_dir())
            .args(["--data", "shakespeare.txt", "-o", out, "--lr", "0.01"])
            .args(["--steps", "4", "--dropout", "0.1"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
    }
    let kept = load_tensors(&sandbox.path().join("kept/adapter_model.safetensors"));
    let recomputed = load_tensors(&sandbox.path().join("recomputed/adapter_model.safetensors"));
    for (name, tensor) in &kept {
        let diff = max_abs_diff(tensor, &recomputed[name]);
        assert!(diff < 1e-5, "{name}: {diff}");
    }
}

#[test]
fn target_that_matches_nothing_lists_the_modules() {
    let sandbox = Sandbox::new();
    sandbox.write("t.txt", "hello there");
    let output = sandbox
        .nlp()
        .args(["lora", "train", "--base"])
        .arg(base_dir())
        .args(["--data", "t.txt", "-o", "x", "--target", "q_proj,qkv"])
        .output()
        .unwrap();
    let err = assert_one_line_error(&output);
    assert!(err.contains("`qkv`"), "{err}");
    assert!(err.contains("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"), "{err}");
}

#[test]
fn rank_zero_is_refused() {
    let sandbox = Sandbox::new();
    sandbox.write("t.txt", "hello there");
    let output = sandbox
        .nlp()
        .args(["lora", "train", "--base"])
        .arg(base_dir())
        .args(["--data", "t.txt", "-o", "x", "--rank", "0"])
        .output()
        .unwrap();
    let err = assert_one_line_error(&output);
    assert!(err.contains("--rank 0"), "{err}");
}

#[test]
fn adapter_for_another_base_names_the_tensor_and_both_shapes() {
    let sandbox = Sandbox::new();
    // An adapter as PEFT would write it for a model 64 wide: A is [4, 64], not [4, 128].
    let dir = edited_adapter(&sandbox, "other", |_| {});
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    let mut tensors = load_tensors(&dir.join("adapter_model.safetensors"));
    tensors.insert(key.into(), Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    let output = sandbox
        .nlp()
        .args(["lora", "merge", "--base"])
        .arg(base_dir())
        .args(["--adapter", "other", "-o", "m"])
        .output()
        .unwrap();
    let err = assert_one_line_error(&output);
    assert!(err.contains(key), "{err}");
    assert!(err.contains("[4, 64]") && err.contains("[4, 128]"), "{err}");
}

#[test]
fn eval_with_an_adapter_scores_as_the_merged_model_does() {
    let sandbox = Sandbox::new();
    let text = std::fs::read(shared().join("data/tinyshakespeare.txt")).unwrap();
    sandbox.write("text.txt", &String::from_utf8_lossy(&text[..3000]));
    let mean_nll = |model: &Path, adapter: Option<&Path>| -> f64 {
        let mut cmd = sandbox.nlp();
        cmd.args(["--json", "eval", "--perplexity", "text.txt", "-m"]).arg(model);
        if let Some(adapter) = adapter {
            cmd.arg("--adapter").arg(adapter);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        report["mean_nll"].as_f64().unwrap()
    };
    let merged = sandbox.path().join("merged");
    let out = sandbox
        .nlp()
        .args(["lora", "merge", "--base"])
        .arg(base_dir())
        .arg("--adapter")
        .arg(peft_dir())
        .arg("-o")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let base = mean_nll(&base_dir(), None);
    let adapted = mean_nll(&base_dir(), Some(&peft_dir()));
    let folded = mean_nll(&merged, None);
    assert!((adapted - folded).abs() / folded < 1e-5, "{adapted} vs merged {folded}");
    assert!((adapted - base).abs() > 1e-4, "the adapter changed nothing: {adapted} vs {base}");
}
