//! The foundation (help, flags, config layers, corpora), `nlp ngram` and `nlp bpe`
//! from the command line.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

use crate::common::*;

#[test]
fn help_lists_the_commands_and_exits_zero() {
    let out = Sandbox::new().nlp().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = stdout(&out);
    for word in ["data", "--device", "--seed", "--json", "--config", "--set", "--print-config"] {
        assert!(help.contains(word), "help lacks {word}:\n{help}");
    }
}

#[test]
fn version_names_the_package_version() {
    let out = Sandbox::new().nlp().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(stdout(&out).trim(), format!("nlp {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn unknown_subcommand_is_one_line_and_nonzero() {
    let out = Sandbox::new().nlp().arg("frobnicate").output().unwrap();
    let err = assert_one_line_error(&out);
    assert!(err.contains("frobnicate"), "{err}");
}

#[test]
fn bad_flag_is_one_line_and_nonzero() {
    let out = Sandbox::new().nlp().args(["data", "list", "--no-such-flag"]).output().unwrap();
    let err = assert_one_line_error(&out);
    assert!(err.contains("--no-such-flag"), "{err}");
}

#[test]
fn bad_device_value_is_rejected_at_parse_time() {
    let out = Sandbox::new().nlp().args(["--device", "gpu", "info"]).output().unwrap();
    let err = assert_one_line_error(&out);
    assert!(err.contains("gpu") && err.contains("cuda:N"), "{err}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_without_the_feature_names_the_feature() {
    let out = Sandbox::new().nlp().args(["--device", "cuda:1", "info"]).output().unwrap();
    let err = assert_one_line_error(&out);
    assert!(err.contains("--features cuda"), "{err}");
}

#[test]
fn config_with_unknown_key_names_file_and_key() {
    let sandbox = Sandbox::new();
    sandbox.write("bad.toml", "[run]\nseed = 3\nlearning_rate = 0.1\n");
    let out = sandbox.nlp().args(["--config", "bad.toml", "info"]).output().unwrap();
    let err = assert_one_line_error(&out);
    assert!(err.contains("bad.toml") && err.contains("run.learning_rate"), "{err}");
}

#[test]
fn config_with_wrong_type_names_file_and_key() {
    let sandbox = Sandbox::new();
    sandbox.write("bad.toml", "[data]\ncorpus = 12\n");
    let out = sandbox.nlp().args(["--config", "bad.toml", "info"]).output().unwrap();
    let err = assert_one_line_error(&out);
    assert!(err.contains("bad.toml") && err.contains("data.corpus") && err.contains("string"), "{err}");
}

#[test]
fn missing_config_file_is_named() {
    let out = Sandbox::new().nlp().args(["--config", "nope.toml", "info"]).output().unwrap();
    let err = assert_one_line_error(&out);
    assert!(err.contains("nope.toml"), "{err}");
}

#[test]
fn flags_override_set_which_overrides_the_file() {
    let sandbox = Sandbox::new();
    sandbox.write("run.toml", "[run]\nseed = 3\ndevice = \"cpu\"\n[data]\ncorpus = \"ptb-valid\"\n");
    let out = sandbox
        .nlp()
        .args(["--config", "run.toml", "--set", "run.seed=4", "--set", "data.corpus=x.txt"])
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let printed: toml::Table = stdout(&out).parse().unwrap();
    assert_eq!(printed["run"]["seed"].as_integer(), Some(4));
    assert_eq!(printed["run"]["device"].as_str(), Some("cpu"));
    assert_eq!(printed["data"]["corpus"].as_str(), Some("x.txt"));

    let out = sandbox
        .nlp()
        .args(["--config", "run.toml", "--set", "run.seed=4", "--seed", "5", "--print-config"])
        .output()
        .unwrap();
    let printed: toml::Table = stdout(&out).parse().unwrap();
    assert_eq!(printed["run"]["seed"].as_integer(), Some(5));
}

#[test]
fn info_json_reports_the_cpu() {
    let out = Sandbox::new().nlp().args(["--device", "cpu", "--json", "info"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["resolved_device"], "cpu");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn data_list_finds_corpora_through_nlp_data_dir() {
    let sandbox = Sandbox::new();
    let dir = sandbox.path().join("corpora");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("ptb.valid.txt"), "a b c\n").unwrap();
    let out = sandbox
        .nlp()
        .env("NLP_DATA_DIR", &dir)
        .args(["--json", "data", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ptb = listing["corpora"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "ptb-valid")
        .unwrap();
    assert_eq!(ptb["path"].as_str().map(PathBuf::from), Some(dir.join("ptb.valid.txt")));
    // Nothing else is in that folder or ./data, and ../shared/data is not beside a temp folder.
    let wiki = listing["corpora"].as_array().unwrap().iter().find(|c| c["name"] == "wikitext2-valid").unwrap();
    assert!(wiki["path"].is_null(), "{wiki}");
}

#[test]
fn data_list_finds_the_shared_corpora_from_the_repository_root() {
    let mut cmd = Command::cargo_bin("nlp").unwrap();
    let out = cmd
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("NLP_DATA_DIR")
        .args(["--json", "data", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for corpus in listing["corpora"].as_array().unwrap() {
        let path = PathBuf::from(corpus["path"].as_str().expect("every corpus is in ../shared/data"));
        let found = std::fs::canonicalize(path).unwrap();
        let expected = std::fs::canonicalize(shared().join("data").join(corpus["file"].as_str().unwrap())).unwrap();
        assert_eq!(found, expected);
    }
}

#[test]
fn fetch_of_an_unknown_corpus_lists_the_known_ones() {
    let out = Sandbox::new().nlp().args(["data", "fetch", "imdb"]).output().unwrap();
    let err = assert_one_line_error(&out);
    assert!(err.contains("imdb") && err.contains("tinyshakespeare"), "{err}");
}

#[test]
fn fetch_of_a_present_corpus_downloads_nothing() {
    let sandbox = Sandbox::new();
    let dir = sandbox.path().join("corpora");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("tinyshakespeare.txt"), "First Citizen:\n").unwrap();
    let out = sandbox
        .nlp()
        .env("NLP_DATA_DIR", &dir)
        .args(["data", "fetch", "tinyshakespeare"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(PathBuf::from(stdout(&out).trim()), dir.join("tinyshakespeare.txt"));
}

#[test]
fn closed_stdout_pipe_exits_zero_quietly() {
    use std::process::{Command as Std, Stdio};
    let bin = assert_cmd::cargo::cargo_bin("nlp");
    let mut child = Std::new(bin)
        .args(["data", "list"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?} {}", out.status, stderr(&out));
}

#[test]
fn no_command_prints_help_and_fails() {
    let out = Sandbox::new().nlp().output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Usage"));
}

// ---------------------------------------------------------------------------
// nlp ngram

/// The first `n` lines of a shared corpus, written into the sandbox.
fn head_lines(sandbox: &Sandbox, corpus: &str, skip: usize, take: usize, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(shared().join("data").join(corpus)).unwrap();
    let lines: String = text.split_inclusive('\n').skip(skip).take(take).collect();
    sandbox.write(name, &lines)
}

/// log10 prob and backoff of every n-gram of an ARPA file (plain or gzip).
fn read_arpa_table(path: &Path) -> std::collections::HashMap<String, (f64, f64)> {
    use std::io::Read;
    let bytes = std::fs::read(path).unwrap();
    let mut text = String::new();
    if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(bytes.as_slice()).read_to_string(&mut text).unwrap();
    } else {
        text = String::from_utf8(bytes).unwrap();
    }
    let mut table = std::collections::HashMap::new();
    let mut in_section = false;
    for line in text.lines() {
        if line.starts_with('\\') {
            in_section = line.ends_with("-grams:");
            continue;
        }
        if !in_section || line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let backoff = fields.get(2).map_or(0.0, |b| b.parse().unwrap());
        table.insert(fields[1].to_string(), (fields[0].parse().unwrap(), backoff));
    }
    table
}

#[test]
fn ngram_train_reproduces_lmplz_and_query_reproduces_kenlm_query() {
    let sandbox = Sandbox::new();
    let train = head_lines(&sandbox, "tinyshakespeare.txt", 0, 2000, "train.txt");
    head_lines(&sandbox, "tinyshakespeare.txt", 2000, 200, "test.txt");
    let out = sandbox
        .nlp()
        .args(["ngram", "train", "--order", "3"])
        .arg(&train)
        .args(["-o", "model.arpa"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // Every n-gram of lmplz's model, and no other, within 1e-4 in log10.
    let ours = read_arpa_table(&sandbox.path().join("model.arpa"));
    let kenlm = read_arpa_table(&shared().join("fixtures/kenlm/tinyshakespeare2000_o3.arpa.gz"));
    assert_eq!(ours.len(), kenlm.len());
    for (ngram, (prob, backoff)) in &kenlm {
        let (our_prob, our_backoff) = ours.get(ngram).unwrap_or_else(|| panic!("missing {ngram}"));
        assert!((our_prob - prob).abs() < 1e-4 && (our_backoff - backoff).abs() < 1e-4, "{ngram}");
    }

    // KenLM's `query -v summary` figures (fixture README), from ARPA and from binary.
    let out = sandbox.nlp().args(["ngram", "convert", "model.arpa", "-o", "model.bin"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for model in ["model.arpa", "model.bin"] {
        let out = sandbox
            .nlp()
            .args(["--json", "ngram", "query", "-m", model, "--per-sentence", "test.txt"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let close = |key: &str, expected: f64| {
            let got = report[key].as_f64().unwrap();
            assert!(((got - expected) / expected).abs() < 1e-6, "{model} {key}: {got} vs {expected}");
        };
        close("perplexity", 293.20571895921455);
        close("perplexity_excl_oov", 133.78653336148176);
        assert_eq!(report["oov"], 190);
        assert_eq!(report["tokens"], 1127);
        let first: Vec<f64> = report["sentences"].as_array().unwrap()[..3]
            .iter()
            .map(|s| s["log10_prob"].as_f64().unwrap())
            .collect();
        for (got, expected) in first.iter().zip([-0.6812177, -1.595737, -10.614995]) {
            assert!((got - expected).abs() < 1e-5, "{model}: {got} vs {expected}");
        }
    }
}

#[test]
fn ngram_query_reads_stdin_and_gzip_arpa_from_other_tools() {
    let sandbox = Sandbox::new();
    let fixture = shared().join("fixtures/kenlm/wikitext2valid_o3.arpa.gz");
    let ptb = std::fs::read(shared().join("data/ptb.valid.txt")).unwrap();
    let out = sandbox
        .nlp()
        .args(["--json", "ngram", "query", "-m"])
        .arg(&fixture)
        .write_stdin(ptb)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let perplexity = report["perplexity"].as_f64().unwrap();
    assert!((perplexity / 3058.2512559701154 - 1.0).abs() < 1e-6, "{perplexity}");
    assert_eq!(report["oov"], 12945);
    assert_eq!(report["tokens"], 73760);
}

#[test]
fn ngram_train_on_a_corpus_slice_by_name() {
    // nanoGPT's split of Tiny Shakespeare: the first 90% to train, the rest to test.
    let sandbox = Sandbox::new();
    let out = sandbox
        .nlp()
        .env("NLP_DATA_DIR", shared().join("data"))
        .args(["--json", "ngram", "train", "--order", "2", "tinyshakespeare[:90%]", "-o", "m.bin"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = sandbox
        .nlp()
        .env("NLP_DATA_DIR", shared().join("data"))
        .args(["--json", "ngram", "query", "-m", "m.bin", "tinyshakespeare[90%:]"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Held-out lines: some words are unseen, and the model is far better than uniform.
    assert!(report["oov"].as_u64().unwrap() > 0);
    let vocab_words = 12_000.0;
    assert!(report["perplexity_excl_oov"].as_f64().unwrap() < vocab_words);
}

#[test]
fn ngram_literal_sentence_marker_suggests_skip_symbols_and_writes_nothing() {
    let sandbox = Sandbox::new();
    sandbox.write("text.txt", "a b c\nd <s> e\n");
    let out = sandbox.nlp().args(["ngram", "train", "text.txt", "-o", "m.arpa"]).output().unwrap();
    let err = assert_one_line_error(&out);
    assert!(err.contains("text.txt:2") && err.contains("--skip-symbols"), "{err}");
    assert!(!sandbox.path().join("m.arpa").exists());
    assert_eq!(std::fs::read_dir(sandbox.path()).unwrap().count(), 1, "no partial file left");

    let out = sandbox
        .nlp()
        .args(["ngram", "train", "--skip-symbols", "text.txt", "-o", "m.arpa"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn ngram_prune_takes_lmplz_space_separated_thresholds_too() {
    let sandbox = Sandbox::new();
    sandbox.write("text.txt", "a b c a b\nb c a b c\na b d\n");
    let train = |args: &[&str], output: &str| {
        let out = sandbox
            .nlp()
            .args(["ngram", "train", "--order", "3"])
            .args(args)
            .args(["-o", output])
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        std::fs::read_to_string(sandbox.path().join(output)).unwrap()
    };
    let spaced = train(&["--prune", "0", "1", "1", "text.txt"], "spaced.arpa");
    let commas = train(&["text.txt", "--prune", "0,1,1"], "commas.arpa");
    let full = train(&["text.txt"], "full.arpa");
    assert_eq!(spaced, commas);
    // Thresholds of 1 drop the bigrams and trigrams seen once.
    assert_ne!(spaced, full);
    assert!(spaced.len() < full.len());
}

#[test]
fn ngram_with_a_tokenizer_counts_the_ids_bpe_encode_gives() {
    let sandbox = Sandbox::new();
    let text = std::fs::read(shared().join("data/tinyshakespeare.txt")).unwrap();
    sandbox.write("text.txt", &String::from_utf8_lossy(&text[..100_000]));
    let run = |args: &[&str]| {
        let out = sandbox.nlp().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    run(&["bpe", "train", "--vocab-size", "400", "text.txt", "-o", "tok.json"]);
    let ids = run(&["bpe", "encode", "-t", "tok.json", "text.txt"]);
    sandbox.write("ids.txt", &ids);
    // Counting through the tokenizer equals counting its ids written out first.
    run(&["ngram", "train", "--order", "3", "-t", "tok.json", "text.txt", "-o", "sub.arpa"]);
    run(&["ngram", "train", "--order", "3", "ids.txt", "-o", "ids.arpa"]);
    let read = |name: &str| std::fs::read(sandbox.path().join(name)).unwrap();
    assert!(read("sub.arpa") == read("ids.arpa"), "the two models differ");
    let through_tokenizer = run(&["--json", "ngram", "query", "-m", "sub.arpa", "-t", "tok.json", "text.txt"]);
    let from_ids = run(&["--json", "ngram", "query", "-m", "sub.arpa", "ids.txt"]);
    assert_eq!(through_tokenizer, from_ids);
    let report: serde_json::Value = serde_json::from_str(from_ids.trim()).unwrap();
    assert_eq!(report["oov"], 0);
    let tokens = ids.split_whitespace().count() + ids.lines().count();
    assert_eq!(report["tokens"].as_u64().unwrap() as usize, tokens, "ids plus one </s> per line");
}

#[test]
fn ngram_bad_inputs_are_one_line_errors() {
    let sandbox = Sandbox::new();
    sandbox.write("empty.txt", "");
    sandbox.write("text.txt", "a b\n");
    sandbox.write("bad.arpa", "\\data\\\nngram 1=2\n\n\\1-grams:\n-1.0\t<s>\n-1.0\n\\end\\\n");
    let cases: [(&[&str], &str); 5] = [
        (&["ngram", "train", "empty.txt", "-o", "m.arpa"], "empty"),
        (&["ngram", "train", "--smoothing", "good-turing", "text.txt", "-o", "m.arpa"], "ngram.smoothing"),
        (&["ngram", "train", "--order", "0", "text.txt", "-o", "m.arpa"], "ngram.order"),
        (&["ngram", "train", "text.txt", "-o", "m.model"], "--format"),
        (&["ngram", "query", "-m", "bad.arpa", "text.txt"], "bad.arpa:6"),
    ];
    for (args, expected) in cases {
        let out = sandbox.nlp().args(args).output().unwrap();
        let err = assert_one_line_error(&out);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    assert!(!sandbox.path().join("m.arpa").exists());
}

#[test]
fn ngram_smoothing_methods_all_train_and_rank_as_expected() {
    let sandbox = Sandbox::new();
    head_lines(&sandbox, "tinyshakespeare.txt", 0, 4000, "train.txt");
    head_lines(&sandbox, "tinyshakespeare.txt", 4000, 400, "test.txt");
    let mut perplexity = std::collections::HashMap::new();
    for method in ["mkn", "kn", "wb", "add-k", "jm", "mle"] {
        let model = format!("{method}.bin");
        let out = sandbox
            .nlp()
            .args(["-q", "ngram", "train", "--order", "3", "--smoothing", method, "train.txt", "-o", &model])
            .output()
            .unwrap();
        assert!(out.status.success(), "{method}: {}", stderr(&out));
        let out = sandbox.nlp().args(["--json", "ngram", "query", "-m", &model, "test.txt"]).output().unwrap();
        assert!(out.status.success(), "{method}: {}", stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        perplexity.insert(method, report["perplexity_excl_oov"].as_f64().unwrap());
    }
    // Chen & Goodman's finding: Kneser-Ney variants beat Witten-Bell and add-k,
    // and every smoothed model beats the unsmoothed one by far.
    assert!(perplexity["mkn"] < perplexity["wb"] && perplexity["kn"] < perplexity["wb"], "{perplexity:?}");
    assert!(perplexity["wb"] < perplexity["add-k"], "{perplexity:?}");
    assert!(perplexity["add-k"] < perplexity["mle"] && perplexity["jm"] < perplexity["mle"], "{perplexity:?}");
}

// ---------------------------------------------------------------------------
// nlp bpe

#[test]
fn bpe_train_learns_the_merges_huggingface_tokenizers_learns() {
    let sandbox = Sandbox::new();
    let out = sandbox
        .nlp()
        .args(["bpe", "train", "--vocab-size", "300", "--special-tokens", "<|endoftext|>"])
        .arg(shared().join("data/tinyshakespeare.txt"))
        .args(["-o", "tok.json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let ours: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sandbox.path().join("tok.json")).unwrap()).unwrap();
    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(shared().join("fixtures/tokenizers/bytelevel_bpe_300_tinyshakespeare.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ours["model"]["vocab"], reference["model"]["vocab"]);
    let merges = |v: &serde_json::Value| -> Vec<String> {
        v["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => s.clone(),
                pair => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
            })
            .collect()
    };
    assert_eq!(merges(&ours), merges(&reference));
}

#[test]
fn bpe_encode_gives_the_ids_huggingface_tokenizers_gives() {
    let sandbox = Sandbox::new();
    let tokenizer = shared().join("fixtures/tokenizers/bytelevel_bpe_8000_shakespeare.json");
    let text = std::fs::read_to_string(shared().join("data/wikitext2.valid.txt")).unwrap();
    let out = sandbox.nlp().args(["bpe", "encode", "-t"]).arg(&tokenizer).arg("-").write_stdin(text.clone()).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let oracle = tokenizers::Tokenizer::from_file(&tokenizer).unwrap();
    let printed = stdout(&out);
    let ours: Vec<&str> = printed.lines().collect();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(ours.len(), lines.len());
    for (line, encoded) in lines.iter().zip(&ours) {
        let expected = oracle.encode(*line, false).unwrap();
        let expected: Vec<String> = expected.get_ids().iter().map(u32::to_string).collect();
        assert_eq!(*encoded, expected.join(" "), "line {line:?}");
    }
}

#[test]
fn bpe_encode_then_decode_round_trips_any_bytes() {
    let sandbox = Sandbox::new();
    let tokenizer = shared().join("fixtures/tokenizers/bytelevel_bpe_300_tinyshakespeare.json");
    // Invalid UTF-8, control characters, every byte value, and non-Latin text.
    let mut input: Vec<u8> = (0u8..=255).filter(|&b| b != b'\n' && b != b'\r').collect();
    input.extend_from_slice(b"\nplain line\n\xff\xfe broken \xc3\n\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e text\n\n");
    let encoded = sandbox.nlp().args(["bpe", "encode", "-t"]).arg(&tokenizer).write_stdin(input.clone()).output().unwrap();
    assert!(encoded.status.success(), "{}", stderr(&encoded));
    let decoded = sandbox.nlp().args(["bpe", "decode", "-t"]).arg(&tokenizer).write_stdin(encoded.stdout).output().unwrap();
    assert!(decoded.status.success(), "{}", stderr(&decoded));
    assert_eq!(decoded.stdout, input);
}

#[test]
fn bpe_dropout_is_seeded_and_still_decodes_to_the_input() {
    let sandbox = Sandbox::new();
    let tokenizer = shared().join("fixtures/tokenizers/bytelevel_bpe_8000_shakespeare.json");
    let text = "To be, or not to be, that is the question\n";
    let run = |seed: &str| {
        let out = sandbox
            .nlp()
            .args(["--seed", seed, "bpe", "encode", "--dropout", "0.3", "-t"])
            .arg(&tokenizer)
            .write_stdin(text)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let (a, b, c) = (run("1"), run("1"), run("2"));
    assert_eq!(a, b, "same seed, same segmentation");
    assert_ne!(a, c, "another seed, another segmentation");
    let plain = sandbox.nlp().args(["bpe", "encode", "-t"]).arg(&tokenizer).write_stdin(text).output().unwrap();
    assert!(a.split_whitespace().count() > stdout(&plain).split_whitespace().count(), "dropout splits more");
    let decoded = sandbox.nlp().args(["bpe", "decode", "-t"]).arg(&tokenizer).write_stdin(a).output().unwrap();
    assert_eq!(stdout(&decoded), text);
}

#[test]
fn bpe_bad_inputs_are_one_line_errors_and_leave_no_file() {
    let sandbox = Sandbox::new();
    sandbox.write("empty.txt", "");
    sandbox.write("text.txt", "some words here\n");
    sandbox.write("corrupt.json", r#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a"]}}"#);
    sandbox.write("ids.txt", "1 2 x\n");
    let fixture = shared().join("fixtures/tokenizers/bytelevel_bpe_300_tinyshakespeare.json");
    let fixture = fixture.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["bpe", "train", "empty.txt", "-o", "tok.json"], "empty"),
        (&["bpe", "train", "--vocab-size", "100", "text.txt", "-o", "tok.json"], "use at least 256"),
        (&["bpe", "encode", "-t", "corrupt.json", "text.txt"], "merges"),
        (&["bpe", "decode", "-t", fixture, "ids.txt"], "ids.txt:1"),
        (&["bpe", "train", "missing.txt", "-o", "tok.json"], "missing.txt"),
    ];
    for (args, expected) in cases {
        let out = sandbox.nlp().args(args).output().unwrap();
        let err = assert_one_line_error(&out);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    assert!(!sandbox.path().join("tok.json").exists());
    let leftovers: Vec<_> = std::fs::read_dir(sandbox.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".nlp-partial"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn bpe_unigram_trains_a_file_that_tokenizers_loads_and_agrees_with() {
    let sandbox = Sandbox::new();
    let out = sandbox
        .nlp()
        .args(["bpe", "train", "--model", "unigram", "--vocab-size", "1000"])
        .arg(shared().join("data/ptb.valid.txt"))
        .args(["-o", "uni.json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let path = sandbox.path().join("uni.json");
    let oracle = tokenizers::Tokenizer::from_file(&path).unwrap();
    let text = "the company said it expects higher earnings next year";
    let out = sandbox.nlp().args(["bpe", "encode", "-t", "uni.json"]).write_stdin(text).output().unwrap();
    let expected: Vec<String> = oracle.encode(text, false).unwrap().get_ids().iter().map(u32::to_string).collect();
    assert_eq!(stdout(&out).trim(), expected.join(" "));
}

#[test]
fn set_flags_before_and_after_the_subcommand_all_apply() {
    let sandbox = Sandbox::new();
    let output = sandbox
        .nlp()
        .args(["--set", "train.batch_size=2", "train", "-o", "run", "--print-config"])
        .args(["--set", "train.seq_len=8", "--set=train.steps=3"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let config: toml::Table = stdout(&output).parse().unwrap();
    let train = config["train"].as_table().unwrap();
    assert_eq!(train["batch_size"].as_integer(), Some(2));
    assert_eq!(train["seq_len"].as_integer(), Some(8));
    assert_eq!(train["steps"].as_integer(), Some(3));
}
