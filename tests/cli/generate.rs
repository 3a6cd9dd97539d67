//! `nlp generate` end to end: greedy and beam search against `transformers` on the tiny
//! Llama fixture (`shared/fixtures/hf_tiny_llama`, see its README), the flags that shape
//! the output, the laws that tie strategies together, and one-line errors.
use crate::common::*;

use std::path::PathBuf;

use serde_json::Value;

fn fixture() -> PathBuf {
    shared().join("fixtures/hf_tiny_llama")
}

fn refs() -> Value {
    let text = std::fs::read_to_string(fixture().join("reference.json")).expect("reference.json");
    let value: Value = serde_json::from_str(&text).expect("reference.json is JSON");
    value["generate"].clone()
}

fn ids(value: &Value) -> Vec<u64> {
    value
        .as_array()
        .expect("an id list")
        .iter()
        .map(|v| v.as_u64().expect("an id"))
        .collect()
}

fn csv(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// The fixture's characters in id order (its vocab.json).
fn chars() -> Vec<String> {
    let text = std::fs::read_to_string(fixture().join("vocab.json")).expect("vocab.json");
    serde_json::from_str(&text).expect("a list of characters")
}

fn spell(ids: &[u64]) -> String {
    let chars = chars();
    ids.iter().map(|&id| chars[id as usize].as_str()).collect()
}

/// Runs `nlp --json generate -m fixture ARGS` and returns the JSON lines.
fn generate_json(sandbox: &Sandbox, args: &[&str]) -> Vec<Value> {
    let fixture = fixture();
    let output = sandbox
        .nlp()
        .arg("--json")
        .arg("generate")
        .arg("-m")
        .arg(&fixture)
        .args(args)
        .output()
        .expect("nlp runs");
    assert!(output.status.success(), "{}", stderr(&output));
    stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

fn full_ids(value: &Value) -> Vec<u64> {
    let mut all = ids(&value["prompt_ids"]);
    all.extend(ids(&value["ids"]));
    all
}

#[test]
fn greedy_ids_equal_transformers_generate() {
    let sandbox = Sandbox::new();
    let refs = refs();
    for i in 0..3 {
        let prompt = ids(&refs[format!("prompt_{i}")]);
        let out = generate_json(
            &sandbox,
            &["--prompt-ids", &csv(&prompt), "--greedy", "--max-new-tokens", "32"],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(full_ids(&out[0]), ids(&refs[format!("greedy_{i}")]), "greedy_{i}");
        assert_eq!(ids(&out[0]["prompt_ids"]), prompt);
        assert_eq!(out[0]["logprobs"].as_array().unwrap().len(), 32);
        // The text is the generated ids spelled with the fixture's vocabulary.
        assert_eq!(out[0]["text"].as_str().unwrap(), spell(&ids(&out[0]["ids"])));
    }
}

#[test]
fn beam4_ids_equal_transformers_generate() {
    let sandbox = Sandbox::new();
    let refs = refs();
    for i in 0..3 {
        let prompt = ids(&refs[format!("prompt_{i}")]);
        let out = generate_json(
            &sandbox,
            &[
                "--prompt-ids",
                &csv(&prompt),
                "--beam",
                "4",
                "--length-penalty",
                "1.0",
                "--max-new-tokens",
                "24",
            ],
        );
        assert_eq!(full_ids(&out[0]), ids(&refs[format!("beam4_{i}")]), "beam4_{i}");
        // The beam score is the length-normalised sum of the token log-probabilities.
        let sum: f64 = out[0]["logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
        let score = out[0]["beam_score"].as_f64().unwrap();
        assert!((score - sum / 24.0).abs() < 1e-4, "{score} vs {}", sum / 24.0);
    }
}

#[test]
fn text_prompts_from_flag_file_and_stdin_tokenize_as_the_ids() {
    let sandbox = Sandbox::new();
    let refs = refs();
    let prompt = ids(&refs["prompt_1"]);
    let text = spell(&prompt);
    let expected = ids(&refs["greedy_1"]);
    let by_flag = generate_json(&sandbox, &["--prompt", &text, "--greedy", "--max-new-tokens", "32"]);
    assert_eq!(full_ids(&by_flag[0]), expected);
    let file = sandbox.write("prompt.txt", &text);
    let by_file = generate_json(
        &sandbox,
        &["--prompt-file", file.to_str().unwrap(), "--greedy", "--max-new-tokens", "32"],
    );
    assert_eq!(full_ids(&by_file[0]), expected);
    let output = sandbox
        .nlp()
        .args(["--json", "generate", "-m"])
        .arg(fixture())
        .args(["-", "--greedy", "--max-new-tokens", "32"])
        .write_stdin(text.clone())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let by_stdin: Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    assert_eq!(full_ids(&by_stdin), expected);

    // Plain text output streams the same continuation, with --echo the prompt first.
    let output = sandbox
        .nlp()
        .args(["generate", "-m"])
        .arg(fixture())
        .args(["--prompt", &text, "--greedy", "--max-new-tokens", "32", "--echo"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), format!("{}\n", spell(&expected)));
}

#[test]
fn the_same_seed_gives_the_same_text() {
    let sandbox = Sandbox::new();
    let run = |seed: &str| {
        let out = generate_json(
            &sandbox,
            &["--prompt", "ROMEO:", "--temperature", "0.9", "--top-k", "20", "--seed", seed, "-n", "2", "--max-new-tokens", "40"],
        );
        out.iter().map(|v| v["text"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    let first = run("7");
    assert_eq!(first.len(), 2);
    assert_eq!(first, run("7"));
    assert_ne!(first, run("8"));
    assert_ne!(first[0], first[1], "two samples of one run differ");
}

/// Greedy speculative decoding of the fixture's prompt `i`, 32 new tokens, with `draft`
/// proposing `k` tokens a round; asserts the output is `transformers`' greedy output.
fn speculative_greedy(sandbox: &Sandbox, i: usize, draft: &std::path::Path, k: usize) -> Value {
    let refs = refs();
    let prompt = ids(&refs[&format!("prompt_{i}")]);
    let out = generate_json(
        sandbox,
        &[
            "--prompt-ids",
            &csv(&prompt),
            "--greedy",
            "--max-new-tokens",
            "32",
            "--draft",
            draft.to_str().unwrap(),
            "--draft-k",
            &k.to_string(),
        ],
    );
    // Exactness: the target's greedy output whatever the draft proposes.
    assert_eq!(full_ids(&out[0]), ids(&refs[&format!("greedy_{i}")]), "prompt {i}");
    out[0].clone()
}

#[test]
fn speculative_greedy_equals_greedy_and_reports_acceptance() {
    let sandbox = Sandbox::new();
    let out = speculative_greedy(&sandbox, 0, &fixture(), 3);
    // The target as its own draft agrees with itself (up to float rounding between a
    // one-token step and a k-token verification pass).
    assert!(out["acceptance_rate"].as_f64().unwrap() > 0.9, "{out}");
}

#[test]
fn logit_bias_no_repeat_ngram_and_processor_order() {
    let sandbox = Sandbox::new();
    let refs = refs();
    let prompt = csv(&ids(&refs["prompt_0"]));
    let greedy = ids(&refs["greedy_0"]);
    let first = greedy[ids(&refs["prompt_0"]).len()];
    // A huge bias on token 5 makes it the argmax at every step.
    let out = generate_json(
        &sandbox,
        &["--prompt-ids", &prompt, "--greedy", "--max-new-tokens", "6", "--logit-bias", "5=100"],
    );
    assert_eq!(ids(&out[0]["ids"]), vec![5; 6]);
    // -inf on the greedy first token: the first token changes, by id or by its text.
    let chars = chars();
    for entry in [format!("{first}=-inf"), format!("{}=-inf", chars[first as usize])] {
        let out = generate_json(
            &sandbox,
            &["--prompt-ids", &prompt, "--greedy", "--max-new-tokens", "1", "--logit-bias", &entry],
        );
        assert_ne!(ids(&out[0]["ids"])[0], first, "{entry}");
    }
    // No bigram twice in prompt + output.
    let out = generate_json(
        &sandbox,
        &["--prompt-ids", &prompt, "--greedy", "--max-new-tokens", "40", "--no-repeat-ngram", "2"],
    );
    let all = full_ids(&out[0]);
    let prompt_len = ids(&refs["prompt_0"]).len();
    for i in prompt_len..all.len() {
        let bigram = &all[i - 1..=i];
        assert!(!all[..i].windows(2).any(|w| w == bigram), "bigram {bigram:?} repeated at {i}");
    }
    // An order without a set knob's stage is refused.
    let output = sandbox
        .nlp()
        .args(["generate", "-m"])
        .arg(fixture())
        .args(["--top-k", "5", "--processor-order", "temperature,top-p"])
        .output()
        .unwrap();
    let err = assert_one_line_error(&output);
    assert!(err.contains("top-k"), "{err}");
}

#[test]
fn self_consistency_reports_the_majority_of_the_samples() {
    let sandbox = Sandbox::new();
    // The "answer" of a sample is its first letter; the vote must agree with the same
    // seeded samples drawn plainly (sample i has the same stream either way).
    let common = ["--prompt", "The ", "--max-new-tokens", "6", "--seed", "3"];
    let samples = generate_json(&sandbox, &[&common[..], &["-n", "9"]].concat());
    let mut counts: Vec<(String, usize)> = Vec::new();
    for sample in &samples {
        let text = sample["text"].as_str().unwrap();
        let Some(letter) = text.chars().find(|c| c.is_alphabetic()) else { continue };
        match counts.iter_mut().find(|(a, _)| *a == letter.to_string()) {
            Some((_, n)) => *n += 1,
            None => counts.push((letter.to_string(), 1)),
        }
    }
    let best = counts.iter().map(|(_, n)| *n).max().unwrap();
    let voted = generate_json(
        &sandbox,
        &[&common[..], &["--self-consistency", "9", "--answer-regex", r"^[^A-Za-z]*([A-Za-z])"]].concat(),
    );
    assert_eq!(voted.len(), 1);
    assert_eq!(voted[0]["votes"].as_u64().unwrap() as usize, best);
    let answer = voted[0]["answer"].as_str().unwrap();
    assert!(counts.iter().any(|(a, n)| a == answer && *n == best), "{answer} in {counts:?}");
}

#[test]
fn mbr_returns_the_sample_of_highest_expected_utility() {
    let sandbox = Sandbox::new();
    let common = ["--prompt", "KING: ", "--max-new-tokens", "12", "--seed", "5"];
    let samples = generate_json(&sandbox, &[&common[..], &["-n", "6"]].concat());
    let texts: Vec<String> = samples.iter().map(|s| s["text"].as_str().unwrap().to_string()).collect();
    // ROUGE-1 F1 on whitespace words, by hand.
    let rouge1 = |a: &str, b: &str| -> f64 {
        let (a, b): (Vec<&str>, Vec<&str>) = (a.split_whitespace().collect(), b.split_whitespace().collect());
        if a.is_empty() && b.is_empty() {
            return 1.0;
        }
        let mut rest = b.clone();
        let mut matches = 0;
        for w in &a {
            if let Some(i) = rest.iter().position(|x| x == w) {
                rest.remove(i);
                matches += 1;
            }
        }
        if matches == 0 {
            return 0.0;
        }
        let (p, r) = (matches as f64 / a.len() as f64, matches as f64 / b.len() as f64);
        2.0 * p * r / (p + r)
    };
    let expected: Vec<f64> = (0..6)
        .map(|i| (0..6).filter(|&j| j != i).map(|j| rouge1(&texts[i], &texts[j])).sum::<f64>() / 5.0)
        .collect();
    let best = expected.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let out = generate_json(&sandbox, &[&common[..], &["--mbr", "6", "--mbr-utility", "rouge1"]].concat());
    let chosen = out[0]["text"].as_str().unwrap();
    let utility = out[0]["expected_utility"].as_f64().unwrap();
    assert!((utility - best).abs() < 1e-5, "{utility} vs {best} ({expected:?})");
    let index = texts.iter().position(|t| t == chosen).expect("the chosen text is a sample");
    assert!((expected[index] - best).abs() < 1e-9);
}

#[test]
fn a_discriminator_equal_to_the_model_is_indifferent() {
    let sandbox = Sandbox::new();
    let fixture = fixture();
    let fixture = fixture.to_str().unwrap();
    let common = ["--prompt", "ROMEO:", "--max-new-tokens", "10", "--seed", "2"];
    let plain = generate_json(&sandbox, &[&common[..], &["-n", "2"]].concat());
    // FUDGE over the whole vocabulary with the model as its own discriminator
    // multiplies every token by the same 1/2: plain sampling, draw for draw.
    let fudged = generate_json(
        &sandbox,
        &[&common[..], &["-n", "2", "--fudge", fixture, "--fudge-top-k", "65"]].concat(),
    );
    for (p, f) in plain.iter().zip(&fudged) {
        assert_eq!(p["ids"], f["ids"]);
        assert!((f["attribute_probability"].as_f64().unwrap() - 0.5).abs() < 1e-6);
    }
    // Every sample scores 1/2 (up to rounding between one pass and step by step): all
    // kept at 0.49, none at 0.51.
    let kept = generate_json(
        &sandbox,
        &[&common[..], &["-n", "2", "--discriminator", fixture, "--discard-below", "0.49"]].concat(),
    );
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0]["ids"], plain[0]["ids"]);
    let output = sandbox
        .nlp()
        .args(["generate", "-m", fixture, "--discriminator", fixture, "--discard-below", "0.51", "--max-samples", "3"])
        .args(common)
        .output()
        .unwrap();
    let err = assert_one_line_error(&output);
    assert!(err.contains("only 0 of 3 samples"), "{err}");
}

#[test]
fn interactive_choose_keeps_the_picked_option() {
    let sandbox = Sandbox::new();
    let output = sandbox
        .nlp()
        .args(["--json", "generate", "-m"])
        .arg(fixture())
        .args(["--prompt", "ROMEO:", "--max-new-tokens", "5", "--interactive", "choose", "-n", "2"])
        .write_stdin("2\n")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let lines: Vec<Value> = stdout(&output).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // Two options for the first turn, two after the pick, then the whole text.
    let last = lines.last().unwrap();
    let picked = lines.iter().find(|l| l["turn"] == 1 && l["option"] == 2).unwrap();
    assert_eq!(last["text"].as_str().unwrap(), format!("ROMEO:{}", picked["text"].as_str().unwrap()));

    let output = sandbox
        .nlp()
        .args(["generate", "-m"])
        .arg(fixture())
        .args(["--greedy", "--max-new-tokens", "4", "--interactive", "turns"])
        .write_stdin("KING:\n")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    // The person writes first; the model's turn is the greedy continuation of it.
    let greedy = generate_json(&sandbox, &["--prompt", "KING:\n", "--greedy", "--max-new-tokens", "4"]);
    let turn = greedy[0]["text"].as_str().unwrap();
    assert!(text.ends_with(&format!("KING:\n{turn}\n")), "{text:?}");
}

#[test]
fn bad_input_is_one_line() {
    let sandbox = Sandbox::new();
    let fixture = fixture();
    let fixture = fixture.to_str().unwrap();
    let arpa = sandbox.write(
        "tiny.arpa",
        "\\data\\\nngram 1=4\n\n\\1-grams:\n-0.5\t<unk>\n-99\t<s>\t0\n-0.5\t</s>\n-0.3\tthe\n\n\\end\\\n",
    );
    let arpa = arpa.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--greedy", "--top-p", "0.9"], "--greedy"),
        (vec!["--beam", "4", "--mbr", "8"], "--beam and --mbr"),
        (vec!["--top-p", "1.5"], "(0, 1]"),
        (vec!["--top-p", "0"], "(0, 1]"),
        (vec!["--amateur", arpa], "vocabulary"),
        (vec!["--draft", arpa], "vocabulary"),
        (vec!["--discriminator", arpa, "--discard-below", "0.5"], "vocabulary"),
        (vec!["--fudge", arpa], "vocabulary"),
        (vec!["--self-consistency", "4"], "--answer-regex"),
        (vec!["--self-consistency", "4", "--answer-regex", "("], "regular expression"),
        (vec!["--prompt-ids", "1,2,99"], "vocabulary"),
        (vec!["--logit-bias", "ab=2"], "2 tokens"),
        (vec!["--logit-bias", "3=x"], "not a number"),
        (vec!["--processor-order", "top-k,nonsense"], "nonsense"),
        (vec!["--mbr", "4", "--mbr-utility", "meteor"], "meteor"),
    ];
    for (args, needle) in cases {
        let output = sandbox.nlp().args(["generate", "-m", fixture]).args(&args).output().unwrap();
        let err = assert_one_line_error(&output);
        assert!(err.contains(needle), "{args:?}: {err}");
    }

    // A prompt longer than the model's context: the fixture with a 16-position context.
    let small = sandbox.path().join("small");
    std::fs::create_dir(&small).unwrap();
    for file in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(shared().join("fixtures/hf_tiny_llama").join(file), small.join(file)).unwrap();
    }
    let config = std::fs::read_to_string(shared().join("fixtures/hf_tiny_llama/config.json")).unwrap();
    std::fs::write(
        small.join("config.json"),
        config.replace("\"max_position_embeddings\": 2048", "\"max_position_embeddings\": 16"),
    )
    .unwrap();
    let output = sandbox
        .nlp()
        .args(["generate", "-m"])
        .arg(&small)
        .args(["--prompt", "A prompt of twenty chars"])
        .output()
        .unwrap();
    let err = assert_one_line_error(&output);
    assert!(err.contains("context is 16"), "{err}");
    // A generation longer than the context slides its window instead of stopping.
    let output = sandbox
        .nlp()
        .args(["generate", "-m"])
        .arg(&small)
        .args(["--prompt", "ROMEO:", "--greedy", "--max-new-tokens", "40", "--json"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(ids(&json["ids"]).len(), 40, "{json}");
}

/// Counts a `order`-gram model over the fixture tokenizer's ids on the first `bytes` of
/// Tiny Shakespeare (`nlp ngram train -t`), as a draft or amateur for the fixture.
fn ngram_over_fixture_ids(sandbox: &Sandbox, order: usize, bytes: usize) -> PathBuf {
    let text = std::fs::read_to_string(shared().join("data/tinyshakespeare.txt")).unwrap();
    let corpus = sandbox.write("corpus.txt", &text[..bytes]);
    let arpa = sandbox.path().join("ids.arpa");
    let output = sandbox
        .nlp()
        .args(["-q", "ngram", "train", "--order", &order.to_string(), "-t"])
        .arg(fixture().join("tokenizer.json"))
        .arg(&corpus)
        .arg("-o")
        .arg(&arpa)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    arpa
}

#[test]
fn speculative_with_an_ngram_draft_equals_transformers_greedy() {
    let sandbox = Sandbox::new();
    let draft = ngram_over_fixture_ids(&sandbox, 4, 100_000);
    for i in 0..3 {
        let out = speculative_greedy(&sandbox, i, &draft, 4);
        let rate = out["acceptance_rate"].as_f64().unwrap();
        let (drafted, accepted) = (out["drafted"].as_u64().unwrap(), out["accepted"].as_u64().unwrap());
        assert!((rate - accepted as f64 / drafted as f64).abs() < 1e-12, "{out}");
        // The text model agrees with the character n-gram on some of "the see the see".
        assert!(accepted > 0, "{out}");
    }
}

/// The row an n-gram model over token ids gives every context when it has unigrams
/// only, in the tokenizer's ids: listed ids keep their probability, the `unseen` others
/// share `<unk>`'s equally, `</s>` (no token) is dropped and the rest renormalised.
fn unigram_row(vocab: usize, listed: &[(usize, f64)], unk_log10: f64) -> Vec<f64> {
    let unseen = vocab - listed.len();
    let mut probs = vec![10f64.powf(unk_log10) / unseen as f64; vocab];
    for &(id, log10_prob) in listed {
        probs[id] = 10f64.powf(log10_prob);
    }
    let total: f64 = probs.iter().sum();
    probs.iter().map(|p| (p / total).ln()).collect()
}

#[test]
fn contrastive_with_an_ngram_amateur_picks_the_hand_computed_token() {
    let sandbox = Sandbox::new();
    // The expert's next-token rows after random prefixes, from `transformers`.
    let input_ids = tensor_rows("input_ids");
    let logits = tensor_rows("logits");
    let log_softmax = |row: &[f64]| {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let norm = max + row.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
        row.iter().map(|l| l - norm).collect::<Vec<f64>>()
    };
    let alpha = 0.1f64;
    let plausible = |row: &[f64]| -> Vec<usize> {
        let best = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (0..row.len()).filter(|&v| row[v] >= best + alpha.ln()).collect()
    };
    // A prefix after which the expert finds at least three tokens plausible.
    let t = (8..64).find(|&t| plausible(&log_softmax(&logits[t - 1])).len() >= 3).expect("a prefix");
    let expert = log_softmax(&logits[t - 1]);
    let head = plausible(&expert);
    let expert_best = *head.iter().max_by(|&&a, &&b| expert[a].total_cmp(&expert[b])).unwrap();
    let other = *head.iter().find(|&&v| v != expert_best).unwrap();
    // An amateur (unigrams over token ids) that is sure of the expert's favourite.
    let listed = [(expert_best, -0.05), (other, -1.5)];
    let unk_log10 = -1.2;
    let arpa = format!(
        "\\data\\\nngram 1=5\n\n\\1-grams:\n{unk_log10}\t<unk>\n-99\t<s>\n-1.0\t</s>\n\
         {}\t{expert_best}\n{}\t{other}\n\n\\end\\\n",
        listed[0].1, listed[1].1
    );
    let amateur_path = sandbox.write("amateur.arpa", &arpa);
    let amateur = unigram_row(65, &listed, unk_log10);
    let score = |v: usize| expert[v] - amateur[v];
    let wanted = *head.iter().max_by(|&&a, &&b| score(a).total_cmp(&score(b))).unwrap();
    assert_ne!(wanted, expert_best, "the amateur changes the pick");

    let prompt: Vec<u64> = input_ids[0][..t].iter().map(|&id| id as u64).collect();
    let out = generate_json(
        &sandbox,
        &[
            "--prompt-ids",
            &csv(&prompt),
            "--amateur",
            amateur_path.to_str().unwrap(),
            "--contrast-alpha",
            "0.1",
            "--max-new-tokens",
            "3",
        ],
    );
    assert_eq!(out[0]["strategy"], "contrastive");
    assert_eq!(ids(&out[0]["ids"])[0], wanted as u64, "{}", out[0]);
    let logprob = out[0]["logprobs"][0].as_f64().unwrap();
    assert!((logprob - expert[wanted]).abs() < 1e-4, "the expert's log-prob: {logprob} vs {}", expert[wanted]);
}

#[test]
fn an_ngram_counted_with_another_tokenizer_is_one_line() {
    let sandbox = Sandbox::new();
    let text = std::fs::read_to_string(shared().join("data/tinyshakespeare.txt")).unwrap();
    let corpus = sandbox.write("corpus.txt", &text[..20_000]);
    let run = |args: &[&str]| {
        let output = sandbox.nlp().arg("-q").args(args).output().unwrap();
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
    };
    // Byte-level BPE: 256 byte tokens and merges, so ids run past the fixture's 65.
    run(&["bpe", "train", "--vocab-size", "300", corpus.to_str().unwrap(), "-o", "bpe.json"]);
    run(&["ngram", "train", "--order", "3", "-t", "bpe.json", corpus.to_str().unwrap(), "-o", "bpe.arpa"]);
    let fixture = fixture();
    for flag in ["--draft", "--amateur", "--fudge"] {
        let output = sandbox
            .nlp()
            .args(["generate", "-m"])
            .arg(&fixture)
            .args([flag, "bpe.arpa", "--prompt", "ROMEO:"])
            .output()
            .unwrap();
        let err = assert_one_line_error(&output);
        assert!(err.contains(flag) && err.contains("bpe.arpa") && err.contains("below 65"), "{err}");
    }
}
