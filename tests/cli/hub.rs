//! Models named by a Hugging Face Hub repo id: read from a local Hub cache laid out as
//! `huggingface_hub` lays it out, with one-line errors when the cache lacks them and
//! the Hub cannot be reached. No test here leaves the machine: downloads go to a closed
//! port on the loopback address.

use std::path::Path;

use crate::common::*;

const REPO: &str = "nlp-tests/tiny-llama";

/// A Hub cache under `home` (`$HF_HOME`) holding the shared tiny Llama as `REPO` at
/// revision `main`.
fn cache_with_fixture(home: &Path) {
    let repo = home.join("hub/models--nlp-tests--tiny-llama");
    let snapshot = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    let fixture = shared().join("fixtures/hf_tiny_llama");
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture.join(file), snapshot.join(file)).unwrap();
    }
}

fn total_nll(sandbox: &Sandbox, model: &str, offline: bool) -> f64 {
    let mut command = sandbox.nlp();
    command.env("HF_HOME", sandbox.path().join("hf"));
    command.env("HF_ENDPOINT", "http://127.0.0.1:9");
    if offline {
        command.env("HF_HUB_OFFLINE", "1");
    }
    let output = command
        .args(["--json", "eval", "--ids", "ids.txt", "-m", model])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    report["total_nll"].as_f64().unwrap()
}

#[test]
fn a_repo_id_in_the_hub_cache_loads_as_its_directory_would() {
    let sandbox = Sandbox::new();
    cache_with_fixture(&sandbox.path().join("hf"));
    sandbox.write("ids.txt", "10 20 30 40 5 6\n7 8 9 10 11\n");
    let fixture = shared().join("fixtures/hf_tiny_llama");
    let direct = total_nll(&sandbox, fixture.to_str().unwrap(), true);
    // Offline, and online with the files already cached (no request is needed).
    assert_eq!(total_nll(&sandbox, REPO, true), direct);
    assert_eq!(total_nll(&sandbox, REPO, false), direct);
    assert_eq!(total_nll(&sandbox, &format!("{REPO}@main"), true), direct);
}

#[test]
fn a_repo_id_missing_offline_or_unreachable_is_a_one_line_error() {
    let sandbox = Sandbox::new();
    let output = sandbox
        .nlp()
        .env("HF_HOME", sandbox.path().join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .args(["generate", "-m", "nlp-tests/absent", "--prompt", "a"])
        .output()
        .unwrap();
    let err = assert_one_line_error(&output);
    assert!(err.contains("nlp-tests/absent") && err.contains("HF_HUB_OFFLINE"), "{err}");

    let output = sandbox
        .nlp()
        .env("HF_HOME", sandbox.path().join("hf"))
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("HF_HUB_OFFLINE")
        .args(["lora", "train", "--base", "nlp-tests/absent", "--data", "x.txt", "-o", "out"])
        .output()
        .unwrap();
    let err = assert_one_line_error(&output);
    assert!(err.contains("nlp-tests/absent") && err.contains("config.json"), "{err}");
}
