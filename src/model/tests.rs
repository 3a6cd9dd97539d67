//! Tests against `shared/fixtures/hf_tiny_llama` (computed by transformers 5.24, see its
//! README) and laws every variant must obey.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};

use super::*;
use crate::lm::LanguageModel;

fn fixture_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/hf_tiny_llama"
    ))
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

fn reference_json() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn fixture_model() -> Transformer {
    hf::load(&fixture_dir(), &Device::Cpu, DType::F32).unwrap()
}

/// Reference ids (i64) as the u32 the model takes.
fn ids(reference: &HashMap<String, Tensor>, name: &str) -> Tensor {
    reference[name].to_dtype(DType::U32).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
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

fn json_ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn argmax(row: &[f32]) -> u32 {
    // First maximum, as torch.argmax.
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

// --- 1. logits and log-probs equal transformers' -------------------------------------

#[test]
fn logits_match_transformers() {
    let reference = reference();
    let model = fixture_model();
    let logits = model.forward(&ids(&reference, "input_ids")).unwrap();
    let diff = max_abs_diff(&logits, &reference["logits"]);
    eprintln!("max |logits - transformers| = {diff:e}");
    assert!(diff < 1e-4, "max logit difference {diff}");
}

#[test]
fn tail_logits_match_transformers_last_rows() {
    let reference = reference();
    let model = fixture_model();
    let input = ids(&reference, "input_ids");
    let t = input.dims()[1];
    let tail = model.forward_tail(&input, 5).unwrap();
    let expected = reference["logits"].narrow(1, t - 5, 5).unwrap();
    assert!(max_abs_diff(&tail, &expected) < 1e-4);
    assert!(model.forward_tail(&input, t + 1).is_err());
}

#[test]
fn next_token_logprobs_match_transformers() {
    let reference = reference();
    let model = fixture_model();
    for (input, want) in [
        ("input_ids", "next_token_logprobs"),
        ("text_ids", "text_next_token_logprobs"),
    ] {
        let got = model.next_token_logprobs(&ids(&reference, input)).unwrap();
        let diff = max_abs_diff(&got, &reference[want]);
        eprintln!("max |{want} - transformers| = {diff:e}");
        assert!(diff < 1e-4, "{want}: max difference {diff}");
    }
    // Mean NLL over the validation text, as reference.json's text_mean_nll_nats.
    let got = model
        .next_token_logprobs(&ids(&reference, "text_ids"))
        .unwrap();
    let nll = -got.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let want = reference_json()["text_mean_nll_nats"].as_f64().unwrap();
    assert!((want - 1.5579360723495483).abs() < 1e-12);
    eprintln!(
        "mean NLL {nll} vs {want}: relative {:e}",
        (nll - want).abs() / want
    );
    assert!((nll - want).abs() / want < 1e-4);
}

#[test]
fn score_is_one_pass_and_matches_transformers() {
    let reference = reference();
    let model = fixture_model();
    let text = ids(&reference, "text_ids")
        .i(3)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let scores = model.score(&text).unwrap();
    assert_eq!(scores.len(), 64);
    // No BOS: the first character gets the uniform distribution.
    assert!((scores[0] + (65f32).ln()).abs() < 1e-6);
    let want = reference["text_next_token_logprobs"]
        .i(3)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (got, want) in scores[1..].iter().zip(&want) {
        assert!((got - want).abs() < 1e-4);
    }
    // The trait's token-by-token default (through advance / next_logprobs) agrees.
    let mut state = model.initial_state();
    for (t, &token) in text.iter().enumerate().take(20) {
        let row = model.next_logprobs(std::slice::from_ref(&state)).unwrap();
        assert!(
            (row[0][token as usize] - scores[t]).abs() < 1e-4,
            "position {t}"
        );
        model.advance(&mut state, token).unwrap();
    }
}

// --- 2. KV cache and decoding ---------------------------------------------------------

#[test]
fn kv_cache_steps_match_full_forward() {
    let reference = reference();
    let model = fixture_model();
    let input = ids(&reference, "input_ids"); // (2, 64)
    let full = model.forward(&input).unwrap(); // (2, 64, 65)
    let mut cache = KvCache::new();
    let prefill = model
        .forward_step(&input.narrow(1, 0, 10).unwrap(), &mut cache)
        .unwrap();
    let mut worst = max_abs_diff(&prefill, &full.narrow(1, 0, 10).unwrap());
    for t in 10..64 {
        let step = model
            .forward_step(&input.narrow(1, t, 1).unwrap(), &mut cache)
            .unwrap();
        worst = worst.max(max_abs_diff(&step, &full.narrow(1, t, 1).unwrap()));
    }
    assert_eq!(cache.len(), 64);
    eprintln!("max |cached - full| = {worst:e}");
    // The full pass sums in blocked matrix products, the cached steps row by row: the
    // order of f32 additions differs, not the result beyond rounding, a few units in the
    // last place of the largest logit (about 14 here; measured 1.05e-5, 0.75e-6 of it).
    let largest = full.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(worst < 2e-6 * largest, "cached logits differ by {worst} (largest {largest})");
}

#[test]
fn greedy_decoding_reproduces_transformers() {
    let model = fixture_model();
    let generate = &reference_json()["generate"];
    for i in 0..3 {
        let prompt = json_ids(&generate[format!("prompt_{i}")]);
        let want = json_ids(&generate[format!("greedy_{i}")]);
        let mut state = model.initial_state();
        for &token in &prompt {
            model.advance(&mut state, token).unwrap();
        }
        let mut out = prompt.clone();
        for _ in 0..32 {
            let row = model.next_logprobs(std::slice::from_ref(&state)).unwrap();
            let next = argmax(&row[0]);
            out.push(next);
            model.advance(&mut state, next).unwrap();
        }
        assert_eq!(out, want, "greedy_{i}");
        // Prefilling the prompt in one pass gives the same continuation.
        let state = model.prefill(&prompt).unwrap();
        let row = model.next_logprobs(std::slice::from_ref(&state)).unwrap();
        assert_eq!(argmax(&row[0]), want[prompt.len()]);
    }
}

#[test]
fn batched_advance_matches_one_state_at_a_time() {
    let model = fixture_model();
    let base = model.prefill(&[45, 12, 56, 56]).unwrap();
    let mut batch = vec![base.clone(), base.clone(), base];
    let tokens = [3u32, 17, 40];
    let mut singles = batch.clone();
    model.advance_batch(&mut batch, &tokens).unwrap();
    for (state, &token) in singles.iter_mut().zip(&tokens) {
        model.advance(state, token).unwrap();
    }
    let a = model.next_logprobs(&batch).unwrap();
    let b = model.next_logprobs(&singles).unwrap();
    for (ra, rb) in a.iter().zip(&b) {
        for (x, y) in ra.iter().zip(rb) {
            assert!((x - y).abs() < 1e-5);
        }
    }
    // A second batched step on the unstacked caches stays right.
    model.advance_batch(&mut batch, &[1, 1, 1]).unwrap();
    for state in singles.iter_mut() {
        model.advance(state, 1).unwrap();
    }
    assert_eq!(batch[2].tokens(), singles[2].tokens());
    let a = model.next_logprobs(&batch).unwrap();
    let b = model.next_logprobs(&singles).unwrap();
    assert!(a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .all(|(x, y)| (x - y).abs() < 1e-5));
    // Rows in another order, one of them twice (beams whose parents changed places)
    // are copied into a new batch; the old rows are left as they were.
    let mut reordered = vec![batch[2].clone(), batch[0].clone(), batch[0].clone()];
    let mut singles_reordered = vec![singles[2].clone(), singles[0].clone(), singles[0].clone()];
    model.advance_batch(&mut reordered, &[5, 6, 7]).unwrap();
    for (state, token) in singles_reordered.iter_mut().zip([5, 6, 7]) {
        model.advance(state, token).unwrap();
    }
    for (states, want) in [(&reordered, &singles_reordered), (&batch, &singles)] {
        let a = model.next_logprobs(states).unwrap();
        let b = model.next_logprobs(want).unwrap();
        assert!(a
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .all(|(x, y)| (x - y).abs() < 1e-5));
    }
}

#[test]
fn out_of_vocabulary_token_is_an_error() {
    let model = fixture_model();
    let mut state = model.initial_state();
    let err = model.advance(&mut state, 65).unwrap_err().to_string();
    assert!(err.contains("65"), "{err}");
}

// --- 3. HF import / export ------------------------------------------------------------

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    // The layout transformers writes past its shard size: the tensors split over
    // files, and model.safetensors.index.json mapping each name to its file.
    let tensors =
        candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture_dir().join("config.json"), dir.path().join("config.json")).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let shard: HashMap<String, Tensor> =
            part.iter().map(|&n| (n.clone(), tensors[n].clone())).collect();
        candle_core::safetensors::save(&shard, dir.path().join(&file)).unwrap();
        for name in part {
            weight_map.insert((*name).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.path().join(hf::SHARD_INDEX_FILE), index.to_string()).unwrap();
    let sharded = hf::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let input = ids(&reference(), "input_ids");
    let diff = max_abs_diff(
        &sharded.forward(&input).unwrap(),
        &fixture_model().forward(&input).unwrap(),
    );
    assert_eq!(diff, 0.0);
    // A shard the index names but the folder lacks is an error naming the file.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = hf::load(dir.path(), &Device::Cpu, DType::F32).err().unwrap().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
}

#[test]
fn save_and_reload_gives_identical_logits() {
    let reference = reference();
    let model = fixture_model();
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();
    let reloaded = Transformer::from_pretrained(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(reloaded.config(), model.config());
    let input = ids(&reference, "input_ids");
    let a = model.forward(&input).unwrap();
    let b = reloaded.forward(&input).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["rope_parameters"]["rope_theta"], 10000.0);
    assert_eq!(config["rope_theta"], 10000.0);
    for key in ["norm", "norm_position", "activation", "position", "dropout"] {
        assert!(
            config.get(key).is_none(),
            "a Llama config should not carry `{key}`"
        );
    }
    // Only the two files: atomic writes leave no partial files behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn legacy_top_level_rope_theta_is_read() {
    let text = std::fs::read_to_string(fixture_dir().join("config.json")).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let map = value.as_object_mut().unwrap();
    map.remove("rope_parameters");
    map.insert("rope_theta".into(), serde_json::json!(500000.0));
    let cfg = hf::parse_config(&value.to_string(), std::path::Path::new("config.json")).unwrap();
    assert_eq!(cfg.rope_theta, 500000.0);
    let cfg = hf::parse_config(&text, std::path::Path::new("config.json")).unwrap();
    assert_eq!(cfg.rope_theta, 10000.0);
    assert_eq!(cfg.rms_norm_eps, 1e-5);
    assert_eq!(cfg.kv_heads(), 4);
    assert_eq!(cfg.head_size(), 32);
    assert!(cfg.is_llama() && !cfg.tie_word_embeddings);
}

/// A copy of the fixture directory whose weights went through `edit`.
fn edited_checkpoint(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut tensors =
        candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn wrong_shaped_tensor_is_an_error_naming_it_and_both_shapes() {
    let name = "model.layers.2.mlp.up_proj.weight";
    let dir = edited_checkpoint(|tensors| {
        let cut = tensors[name].narrow(0, 0, 351).unwrap();
        tensors.insert(name.to_string(), cut);
    });
    let err = hf::load(dir.path(), &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains(name), "{err}");
    assert!(
        err.contains("[351, 128]") && err.contains("[352, 128]"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let dir = edited_checkpoint(|tensors| {
        tensors.remove("model.norm.weight");
    });
    let err = hf::load(dir.path(), &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.norm.weight") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn unexpected_tensor_is_an_error_naming_it() {
    let dir = edited_checkpoint(|tensors| {
        let extra = Tensor::zeros(128, DType::F32, &Device::Cpu).unwrap();
        tensors.insert("model.layers.0.self_attn.q_proj.bias".to_string(), extra);
    });
    let err = hf::load(dir.path(), &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.bias"),
        "{err}"
    );
}

#[test]
fn bad_config_is_an_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture_dir().join("config.json")).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        text.replace("\"num_key_value_heads\": 4", "\"num_key_value_heads\": 3"),
    )
    .unwrap();
    std::fs::copy(
        fixture_dir().join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    match hf::load(dir.path(), &Device::Cpu, DType::F32) {
        Err(crate::Error::Config { key, .. }) => assert_eq!(key, "num_key_value_heads"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

// --- 5. parameter count ---------------------------------------------------------------

#[test]
fn param_count_equals_the_fixture_element_count() {
    let tensors =
        candle_core::safetensors::load(fixture_dir().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let elements: usize = tensors.values().map(|t| t.elem_count()).sum();
    let model = fixture_model();
    assert_eq!(param_count(model.config()), elements);
    assert_eq!(
        elements,
        2 * 65 * 128 + 4 * (4 * 128 * 128 + 3 * 128 * 352 + 2 * 128) + 128
    );
}

// --- 4. variants ----------------------------------------------------------------------

fn small(position: PositionKind) -> ModelConfig {
    ModelConfig {
        vocab_size: 23,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        max_position_embeddings: 40,
        initializer_range: 0.2,
        position,
        ..ModelConfig::default()
    }
}

fn variants() -> Vec<(&'static str, ModelConfig)> {
    let mut out = vec![];
    for position in [
        PositionKind::Rope,
        PositionKind::Sinusoidal,
        PositionKind::Learned,
        PositionKind::None,
    ] {
        out.push(("llama", small(position)));
    }
    out.push((
        "vaswani",
        ModelConfig {
            norm: NormKind::Layer,
            norm_position: NormPosition::Post,
            activation: Activation::Relu,
            attention_bias: true,
            mlp_bias: true,
            num_key_value_heads: None,
            dropout: 0.1,
            ..small(PositionKind::Sinusoidal)
        },
    ));
    out.push((
        "gelu-tied",
        ModelConfig {
            activation: Activation::Gelu,
            tie_word_embeddings: true,
            ..small(PositionKind::Learned)
        },
    ));
    out.push((
        "silu-layernorm",
        ModelConfig {
            activation: Activation::Silu,
            norm: NormKind::Layer,
            ..small(PositionKind::Rope)
        },
    ));
    out.push((
        "post-rms-mqa",
        ModelConfig {
            norm_position: NormPosition::Post,
            num_key_value_heads: Some(1),
            ..small(PositionKind::Rope)
        },
    ));
    out
}

fn fresh(cfg: &ModelConfig) -> (VarMap, Transformer) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = Transformer::load(vb, cfg).unwrap();
    (varmap, model)
}

fn random_ids(b: usize, t: usize, vocab: usize, seed: u64) -> Vec<u32> {
    // A 64-bit LCG (Knuth's MMIX constants): deterministic, spread over the vocabulary.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..b * t)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect()
}

#[test]
fn every_variant_has_the_tensors_its_inventory_lists() {
    for (name, cfg) in variants() {
        let (varmap, model) = fresh(&cfg);
        let listed: Vec<(String, Vec<usize>)> = model
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
        assert_eq!(listed, tensor_shapes(&cfg), "{name}");
        let mut created: Vec<(String, Vec<usize>)> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect();
        created.sort();
        let mut listed = listed;
        listed.sort();
        assert_eq!(created, listed, "{name}");
        let elements: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        assert_eq!(param_count(&cfg), elements, "{name}");
    }
}

#[test]
fn every_variant_is_causal_with_the_right_shapes() {
    for (name, cfg) in variants() {
        let (_varmap, model) = fresh(&cfg);
        let (b, t) = (2, 12);
        let mut tokens = random_ids(b, t, cfg.vocab_size, 1);
        let input = Tensor::from_vec(tokens.clone(), (b, t), &Device::Cpu).unwrap();
        let logits = model.forward(&input).unwrap();
        assert_eq!(logits.dims(), &[b, t, cfg.vocab_size], "{name}");
        // Changing token 6 may change logits at positions >= 6, never before.
        tokens[6] = (tokens[6] + 1) % cfg.vocab_size as u32;
        tokens[t + 6] = (tokens[t + 6] + 2) % cfg.vocab_size as u32;
        let changed = model
            .forward(&Tensor::from_vec(tokens, (b, t), &Device::Cpu).unwrap())
            .unwrap();
        let before = max_abs_diff(
            &logits.narrow(1, 0, 6).unwrap(),
            &changed.narrow(1, 0, 6).unwrap(),
        );
        assert_eq!(before, 0.0, "{name}: future token leaked into the past");
        let after = max_abs_diff(
            &logits.narrow(1, 6, t - 6).unwrap(),
            &changed.narrow(1, 6, t - 6).unwrap(),
        );
        assert!(after > 0.0, "{name}: the changed token had no effect");
    }
}

#[test]
fn every_variant_decodes_with_the_cache_as_the_full_forward() {
    for (name, cfg) in variants() {
        let (_varmap, model) = fresh(&cfg);
        let (b, t) = (2, 15);
        let input =
            Tensor::from_vec(random_ids(b, t, cfg.vocab_size, 2), (b, t), &Device::Cpu).unwrap();
        let full = model.forward(&input).unwrap();
        let mut cache = KvCache::new();
        let mut worst = max_abs_diff(
            &model
                .forward_step(&input.narrow(1, 0, 5).unwrap(), &mut cache)
                .unwrap(),
            &full.narrow(1, 0, 5).unwrap(),
        );
        for start in 5..t {
            let step = model
                .forward_step(&input.narrow(1, start, 1).unwrap(), &mut cache)
                .unwrap();
            worst = worst.max(max_abs_diff(&step, &full.narrow(1, start, 1).unwrap()));
        }
        assert!(worst < 1e-5, "{name}: cached logits differ by {worst}");
    }
}

#[test]
fn every_variant_computes_only_the_kept_rows_as_the_full_forward() {
    // The last block runs only the kept rows (the rest just fill the cache): logits
    // equal the full forward's, and so do the steps decoded from that cache, also
    // when the tail starts after cached positions.
    for (name, cfg) in variants() {
        let (_varmap, model) = fresh(&cfg);
        let (b, t) = (2, 15);
        let input =
            Tensor::from_vec(random_ids(b, t, cfg.vocab_size, 4), (b, t), &Device::Cpu).unwrap();
        let full = model.forward(&input).unwrap();
        for keep in [1, 3, t] {
            let tail = model.forward_tail(&input, keep).unwrap();
            let diff = max_abs_diff(&tail, &full.narrow(1, t - keep, keep).unwrap());
            assert!(diff < 1e-5, "{name}: last {keep} rows differ by {diff}");
        }
        for (cached, prefill) in [(0, 10), (4, 6)] {
            let mut cache = KvCache::new();
            if cached > 0 {
                model.forward_step(&input.narrow(1, 0, cached).unwrap(), &mut cache).unwrap();
            }
            let last = model
                .forward_step_tail(&input.narrow(1, cached, prefill).unwrap(), &mut cache, 2)
                .unwrap();
            let end = cached + prefill;
            let mut worst = max_abs_diff(&last, &full.narrow(1, end - 2, 2).unwrap());
            assert_eq!(cache.len(), end, "{name}");
            for start in end..t {
                let step = model
                    .forward_step(&input.narrow(1, start, 1).unwrap(), &mut cache)
                    .unwrap();
                worst = worst.max(max_abs_diff(&step, &full.narrow(1, start, 1).unwrap()));
            }
            assert!(worst < 1e-5, "{name}: steps after a {prefill}-token tail prefill differ by {worst}");
        }
    }
}

#[test]
fn every_variant_saves_and_reloads() {
    for (name, cfg) in variants() {
        let (_varmap, model) = fresh(&cfg);
        let dir = tempfile::tempdir().unwrap();
        model.save_pretrained(dir.path()).unwrap();
        let reloaded = Transformer::from_pretrained(dir.path(), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(reloaded.config(), model.config(), "{name}");
        let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        let written: serde_json::Value = serde_json::from_str(&text).unwrap();
        let extensions = ["norm", "norm_position", "activation", "position", "dropout"];
        let carried = extensions.iter().any(|key| written.get(key).is_some());
        assert_eq!(
            carried,
            !(cfg.is_llama() && cfg.dropout == 0.0),
            "{name}: {text}"
        );
        let input =
            Tensor::from_vec(random_ids(1, 9, cfg.vocab_size, 3), (1, 9), &Device::Cpu).unwrap();
        // Fresh VarMap models run the differentiable graph, reloaded ones the fused
        // kernels: the two forms agree.
        let diff = max_abs_diff(
            &model.forward(&input).unwrap(),
            &reloaded.forward(&input).unwrap(),
        );
        assert!(diff < 1e-5, "{name}: {diff}");
    }
}

#[test]
fn sequences_past_the_position_table_are_an_error() {
    let (_varmap, model) = fresh(&small(PositionKind::Learned));
    let input = Tensor::zeros((1, 41), DType::U32, &Device::Cpu).unwrap();
    let err = model.forward(&input).unwrap_err().to_string();
    assert!(err.contains("max_position_embeddings"), "{err}");
}

#[test]
fn rewinding_drops_the_last_tokens_as_if_never_fed() {
    let model = fixture_model();
    let mut state = model.prefill(&[45, 12, 56]).unwrap();
    let rows = model.advance_scored(&mut state, &[56, 3, 17]).unwrap();
    // Keep 45 12 56 56: the row after the kept prefix is rows[0].
    assert!(model.rewind(&mut state, 2, &rows[0]).unwrap());
    assert_eq!(state.tokens(), &[45, 12, 56, 56]);
    model.advance(&mut state, 40).unwrap();
    let fresh = model.prefill(&[45, 12, 56, 56, 40]).unwrap();
    let (a, b) = (
        model.next_logprobs(std::slice::from_ref(&state)).unwrap(),
        model.next_logprobs(std::slice::from_ref(&fresh)).unwrap(),
    );
    assert!(a[0].iter().zip(&b[0]).all(|(x, y)| (x - y).abs() < 1e-5));
    // Nothing to cut past the start of the window.
    assert!(!model.rewind(&mut state, 99, &rows[0]).unwrap());
}

#[test]
fn decoding_past_the_context_slides_a_window_of_recent_tokens() {
    // Fed one token at a time far past its 40 positions, the model's prediction is
    // always its prediction from scratch on the most recent tokens, at least three
    // quarters of the context of them and never more than the context.
    for position in [PositionKind::Rope, PositionKind::Learned] {
        let cfg = small(position);
        let (_varmap, model) = fresh(&cfg);
        let tokens = random_ids(1, 100, cfg.vocab_size, 7);
        let mut state = model.initial_state();
        for (n, &token) in tokens.iter().enumerate() {
            model.advance(&mut state, token).unwrap();
            let window = state.kv_cache().len();
            assert!(window <= 40, "{window}");
            assert!(window >= (n + 1).min(30), "after {} tokens: {window}", n + 1);
            let fed = &tokens[..=n];
            let scratch = model.prefill(&fed[fed.len() - window..]).unwrap();
            let (a, b) = (
                model.next_logprobs(std::slice::from_ref(&state)).unwrap(),
                model.next_logprobs(std::slice::from_ref(&scratch)).unwrap(),
            );
            assert!(a[0].iter().zip(&b[0]).all(|(x, y)| (x - y).abs() < 1e-5), "token {n}");
        }
        assert_eq!(state.tokens(), &tokens[..], "the history is kept whole");
    }
}

// --- training path --------------------------------------------------------------------

#[test]
fn gradients_reach_every_parameter() {
    for (name, cfg) in variants() {
        let (varmap, model) = fresh(&cfg);
        let (b, t) = (2, 8);
        let tokens = random_ids(b, t + 1, cfg.vocab_size, 4);
        let all = Tensor::from_vec(tokens, (b, t + 1), &Device::Cpu).unwrap();
        let input = all.narrow(1, 0, t).unwrap();
        let targets = all.narrow(1, 1, t).unwrap().flatten_all().unwrap();
        let rng = DropoutRng::new(9);
        let logits = model
            .forward_train(&input, &rng, None)
            .unwrap()
            .reshape((b * t, cfg.vocab_size))
            .unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        let grads = loss.backward().unwrap();
        for (var_name, var) in varmap.data().lock().unwrap().iter() {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {var_name}"));
            let size = grad
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                size.is_finite() && size > 0.0,
                "{name}: zero gradient for {var_name}"
            );
        }
    }
}

#[test]
fn activation_checkpointing_gives_the_same_loss_and_gradients() {
    // Recomputing each block in the backward, with the same dropout draws, is the same
    // function and the same derivative: every variant, with dropout on.
    for (name, cfg) in variants() {
        let cfg = ModelConfig { dropout: 0.2, ..cfg };
        let (varmap, model) = fresh(&cfg);
        let (b, t) = (2, 8);
        let tokens = random_ids(b, t + 1, cfg.vocab_size, 6);
        let all = Tensor::from_vec(tokens, (b, t + 1), &Device::Cpu).unwrap();
        let input = all.narrow(1, 0, t).unwrap();
        let targets = all.narrow(1, 1, t).unwrap().flatten_all().unwrap();
        let run = |checkpointing: Option<&ActivationCheckpointing>| {
            let logits = model
                .forward_train(&input, &DropoutRng::new(3), checkpointing)
                .unwrap()
                .reshape((b * t, cfg.vocab_size))
                .unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
            let mut grads = loss.backward().unwrap();
            if let Some(checkpointing) = checkpointing {
                checkpointing.merge_into(&mut grads).unwrap();
            }
            (loss.to_scalar::<f32>().unwrap(), grads)
        };
        let (plain_loss, plain) = run(None);
        let checkpointing = ActivationCheckpointing::new(&Device::Cpu).unwrap();
        let (loss, recomputed) = run(Some(&checkpointing));
        assert_eq!(loss, plain_loss, "{name}");
        for (var_name, var) in varmap.data().lock().unwrap().iter() {
            let expected = plain.get(var.as_tensor()).unwrap();
            let got = recomputed
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {var_name}"));
            let scale = expected.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = max_abs_diff(expected, got);
            assert!(diff <= 1e-6 * scale.max(1.0), "{name} {var_name}: {diff}");
        }
    }
}

#[test]
fn dropout_is_seeded_and_off_at_inference() {
    let cfg = ModelConfig {
        dropout: 0.3,
        ..small(PositionKind::Rope)
    };
    let (_varmap, model) = fresh(&cfg);
    let input =
        Tensor::from_vec(random_ids(1, 10, cfg.vocab_size, 5), (1, 10), &Device::Cpu).unwrap();
    let a = model.forward_train(&input, &DropoutRng::new(1), None).unwrap();
    let b = model.forward_train(&input, &DropoutRng::new(1), None).unwrap();
    let c = model.forward_train(&input, &DropoutRng::new(2), None).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert!(max_abs_diff(&a, &c) > 0.0);
    let eval = model.forward(&input).unwrap();
    assert!(max_abs_diff(&a, &eval) > 0.0);
    let no_dropout = ModelConfig {
        dropout: 0.0,
        ..cfg
    };
    let (varmap, plain) = fresh(&no_dropout);
    drop(varmap);
    let x = plain.forward_train(&input, &DropoutRng::new(1), None).unwrap();
    assert_eq!(max_abs_diff(&x, &plain.forward(&input).unwrap()), 0.0);
}

#[test]
fn gqa_equals_multi_head_attention_with_repeated_key_value_heads() {
    // The law behind GQA: sharing a kv head across a group is the same function as
    // giving every query head its own copy of it.
    let gqa_cfg = small(PositionKind::Rope); // 4 query heads, 2 kv heads
    let mha_cfg = ModelConfig {
        num_key_value_heads: Some(4),
        ..gqa_cfg.clone()
    };
    let (_varmap, gqa) = fresh(&gqa_cfg);
    let d = gqa_cfg.head_size();
    let mut tensors: HashMap<String, Tensor> = gqa.named_tensors().into_iter().collect();
    for (name, tensor) in tensors.clone() {
        if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
            // (2 * d, c) -> rows of head 0, head 0, head 1, head 1: (4 * d, c)
            let heads: Vec<Tensor> = (0..2)
                .map(|h| tensor.narrow(0, h * d, d).unwrap())
                .collect();
            let repeated = Tensor::cat(&[&heads[0], &heads[0], &heads[1], &heads[1]], 0).unwrap();
            tensors.insert(name, repeated);
        }
    }
    let mha = Transformer::load(
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
        &mha_cfg,
    )
    .unwrap();
    let input = Tensor::from_vec(random_ids(2, 7, 23, 6), (2, 7), &Device::Cpu).unwrap();
    let diff = max_abs_diff(&gqa.forward(&input).unwrap(), &mha.forward(&input).unwrap());
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn tied_output_projection_is_the_embedding() {
    let cfg = ModelConfig {
        tie_word_embeddings: true,
        ..small(PositionKind::Rope)
    };
    let (varmap, model) = fresh(&cfg);
    assert!(varmap
        .data()
        .lock()
        .unwrap()
        .get("lm_head.weight")
        .is_none());
    let logits = model
        .forward(&Tensor::new(&[[3u32]], &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(logits.dims(), &[1, 1, 23]);
    let _ = logits.max_keepdim(D::Minus1).unwrap();
}

#[test]
fn half_precision_checkpoints_load_and_stay_close() {
    let reference = reference();
    let input = ids(&reference, "input_ids");
    for dtype in [DType::F16, DType::BF16] {
        let model = hf::load(&fixture_dir(), &Device::Cpu, dtype).unwrap();
        let logits = model.forward(&input).unwrap().to_dtype(DType::F32).unwrap();
        let diff = max_abs_diff(&logits, &reference["logits"]);
        eprintln!("{dtype:?}: max |logits - transformers f32| = {diff}");
        assert!(diff < 0.5, "{dtype:?}: {diff}");
        // Cached decoding works in half precision too.
        let mut state = model.prefill(&[45, 12, 56]).unwrap();
        model.advance(&mut state, 56).unwrap();
        assert_eq!(model.next_logprobs(&[state]).unwrap()[0].len(), 65);
    }
}

// --- hand-written training pass -------------------------------------------------------

/// The variables of a fresh model of `cfg`, by name, with every norm weight moved away
/// from one so that the norms' gradients see a non-trivial scale.
fn trainable(cfg: &ModelConfig) -> (Transformer, Vec<(String, Var)>) {
    let (varmap, model) = fresh(cfg);
    let mut vars: Vec<(String, Var)> =
        varmap.data().lock().unwrap().iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in vars.iter().filter(|(name, _)| name.ends_with("norm.weight")) {
        let c = var.elem_count();
        let wave = (Tensor::arange(0f32, c as f32, &Device::Cpu).unwrap() * (0.37 + name.len() as f64 * 0.01))
            .unwrap()
            .sin()
            .unwrap();
        var.set(&((wave * 0.3).unwrap() + 1.0).unwrap()).unwrap();
    }
    (model, vars)
}

/// `b` rows of `t` random input ids (from `seed`) with their next ids as targets, and
/// the mean cross-entropy candle's graph computes for them (the autograd reference).
fn autograd_loss(model: &Transformer, cfg: &ModelConfig, b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<u32>, Tensor) {
    let ids = random_ids(b, t + 1, cfg.vocab_size, seed);
    let rows: Vec<&[u32]> = ids.chunks(t + 1).collect();
    let inputs: Vec<u32> = rows.iter().flat_map(|row| &row[..t]).copied().collect();
    let targets: Vec<u32> = rows.iter().flat_map(|row| &row[1..]).copied().collect();
    let input_ids = Tensor::from_vec(inputs.clone(), (b, t), &Device::Cpu).unwrap();
    let target_ids = Tensor::from_vec(targets.clone(), b * t, &Device::Cpu).unwrap();
    let logits = model.forward_train(&input_ids, &DropoutRng::new(0), None).unwrap();
    let loss = fused_cross_entropy(&logits.reshape((b * t, cfg.vocab_size)).unwrap(), &target_ids)
        .unwrap()
        .unwrap();
    (inputs, targets, loss)
}

#[test]
fn hand_written_backprop_matches_autograd() {
    let variants = [
        ("gqa, untied", small(PositionKind::Rope)),
        (
            "mha, tied",
            ModelConfig { tie_word_embeddings: true, num_key_value_heads: None, ..small(PositionKind::Rope) },
        ),
        ("mqa", ModelConfig { num_key_value_heads: Some(1), ..small(PositionKind::Rope) }),
    ];
    // Nine positions keep the attention weights for the backward pass; forty (past
    // four times the width over the heads) recompute them.
    for ((name, cfg), t) in variants.into_iter().flat_map(|v| [(v.clone(), 9), (v, 40)]) {
        let (model, vars) = trainable(&cfg);
        let (b, scale) = (3, 0.5);
        let (inputs, targets, loss) = autograd_loss(&model, &cfg, b, t, 17);
        let expected = (&loss * scale).unwrap().backward().unwrap();

        let backprop = backprop::LlamaBackprop::new(&cfg, &vars, fused::Products::F32).expect("a Llama model");
        // Earlier steps on other ids, one of them with more positions, leave buffers with other
        // contents for this step to reuse.
        for (rows, len) in [(b, t), (b + 1, t - 2)] {
            let other = random_ids(rows, len, cfg.vocab_size, 5);
            backprop.loss_and_grads(&vars, &other, &other, len, 1.0).unwrap();
        }
        let (ours, grads) = backprop.loss_and_grads(&vars, &inputs, &targets, t, scale as f32).unwrap();
        let reference = loss.to_scalar::<f32>().unwrap();
        assert!((ours - reference).abs() < 1e-5, "{name}, t {t}: loss {ours} against {reference}");
        assert_eq!(grads.len(), vars.len());
        for ((var_name, var), grad) in vars.iter().zip(&grads) {
            let autograd = expected.get(var.as_tensor()).unwrap();
            let size = autograd.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let diff = max_abs_diff(grad, autograd);
            assert!(size > 0.0, "{name}: {var_name} got no gradient");
            assert!(diff <= 1e-5 * size.max(1.0), "{name}, t {t}: {var_name} differs by {diff} (largest {size})");
        }
    }
}

#[test]
fn bf16_backprop_stays_within_bf16_rounding_of_autograd() {
    // Mixed precision rounds both operands of every product to bf16 (8 significant
    // bits, a relative step of 2^-8): the loss and every gradient (as a whole, in the
    // Euclidean norm) stay within a few of those steps of the f32 autograd values, and
    // differ from them.
    let cfg = small(PositionKind::Rope);
    let (model, vars) = trainable(&cfg);
    // Fixed weights (the VarMap's initialisation changes from run to run): uniform in
    // +-1/sqrt(fan-in) from a seeded generator.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for (_, var) in vars.iter().filter(|(name, _)| !name.ends_with("norm.weight")) {
        let bound = 1.0 / (*var.dims().last().unwrap() as f32).sqrt();
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
            })
            .collect();
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    let t = 9;
    let (inputs, targets, loss) = autograd_loss(&model, &cfg, 3, t, 23);
    let expected = loss.backward().unwrap();
    let reference = loss.to_scalar::<f32>().unwrap();

    let backprop = backprop::LlamaBackprop::new(&cfg, &vars, fused::Products::Bf16).expect("a Llama model");
    let (ours, grads) = backprop.loss_and_grads(&vars, &inputs, &targets, t, 1.0).unwrap();
    assert!((ours - reference).abs() < 1e-2 * reference, "loss {ours} against {reference}");
    let norm = |x: &Tensor| x.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    let mut largest_relative = 0f32;
    for ((name, var), grad) in vars.iter().zip(&grads) {
        let autograd = expected.get(var.as_tensor()).unwrap();
        let relative = norm(&(grad - autograd).unwrap()) / norm(autograd);
        assert!(relative <= 4e-2, "{name} differs by {relative} of its norm");
        largest_relative = largest_relative.max(relative);
    }
    eprintln!("bf16 against f32 autograd: loss {ours} vs {reference}, largest relative gradient difference (norm) {largest_relative}");
    assert!(largest_relative > 1e-4, "no gradient moved: the products did not round ({largest_relative})");
}

#[test]
fn hand_written_backprop_takes_only_the_plain_llama_recipe() {
    for (name, cfg) in variants() {
        let (_, vars) = trainable(&cfg);
        let applies = backprop::LlamaBackprop::new(&cfg, &vars, fused::Products::F32).is_some();
        let plain = cfg.position == PositionKind::Rope && name == "llama";
        assert_eq!(applies, plain, "{name} {:?}", cfg.position);
    }
    let cfg = ModelConfig { dropout: 0.1, ..small(PositionKind::Rope) };
    let (_, vars) = trainable(&cfg);
    assert!(backprop::LlamaBackprop::new(&cfg, &vars, fused::Products::F32).is_none(), "dropout");
    // A variable it does not know (an adapter, say) leaves the model to autograd.
    let cfg = small(PositionKind::Rope);
    let (_, mut vars) = trainable(&cfg);
    let extra = Var::from_tensor(&Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
    vars.push(("extra".into(), extra));
    assert!(backprop::LlamaBackprop::new(&cfg, &vars, fused::Products::F32).is_none(), "an unknown variable");
}
