//! Integration tests of `nlp eval`: perplexity against `transformers` and KenLM,
//! calibration against the values worked from `transformers`' logits, the sliding
//! window, multiple-choice answers, efficiency and the comparison table, and one-line
//! errors for bad input.

use crate::common::*;

use std::path::PathBuf;

use serde_json::Value;

fn tiny_llama() -> PathBuf {
    shared().join("fixtures/hf_tiny_llama")
}

fn kenlm_arpa() -> PathBuf {
    shared().join("fixtures/kenlm/tinyshakespeare2000_o3.arpa.gz")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(tiny_llama().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Writes the rows of ids as an --ids file, one sequence per line.
fn write_ids(sandbox: &Sandbox, name: &str, ids: &[Vec<f64>]) -> PathBuf {
    let lines: Vec<String> = ids
        .iter()
        .map(|row| row.iter().map(|&id| (id as u32).to_string()).collect::<Vec<_>>().join(" "))
        .collect();
    sandbox.write(name, &(lines.join("\n") + "\n"))
}

fn eval_json(sandbox: &Sandbox, args: &[&str]) -> Value {
    let out = sandbox.nlp().arg("--json").arg("eval").args(args).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn close(got: f64, expected: f64, relative: f64, what: &str) {
    assert!(((got - expected) / expected).abs() < relative, "{what}: {got} vs {expected}");
}

#[test]
fn tiny_llama_perplexity_equals_transformers_on_the_fixture_ids() {
    let sandbox = Sandbox::new();
    let reference = reference();
    let ids = write_ids(&sandbox, "ids.txt", &tensor_rows("text_ids"));
    let model = tiny_llama();
    let report = eval_json(
        &sandbox,
        &["--perplexity", "--per-token", "-m", model.to_str().unwrap(), "--ids", ids.to_str().unwrap()],
    );
    // 8 windows of 64, each scored on its own: 8 x 63 predictions.
    assert_eq!(report["tokens"], 504);
    close(report["mean_nll"].as_f64().unwrap(), reference["text_mean_nll_nats"].as_f64().unwrap(), 1e-4, "mean_nll");
    close(report["perplexity"].as_f64().unwrap(), reference["text_perplexity"].as_f64().unwrap(), 1e-4, "perplexity");
    let expected: Vec<f64> = tensor_rows("text_next_token_logprobs").concat();
    let got: Vec<f64> = report["logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert!((g - e).abs() < 1e-4, "position {i}: {g} vs {e}");
    }
    // Bits per byte: the same log-likelihood over the decoded characters (one byte each).
    let bits = report["bits_per_byte"].as_f64().unwrap();
    let bytes = report["bytes"].as_f64().unwrap();
    assert_eq!(bytes, 512.0);
    close(bits, 504.0 * reference["text_mean_nll_nats"].as_f64().unwrap() / std::f64::consts::LN_2 / 512.0, 1e-4, "bits_per_byte");
    // Throughput: the scored tokens over the scoring time.
    let seconds = report["seconds"].as_f64().unwrap();
    assert!(seconds > 0.0);
    close(report["tokens_per_s"].as_f64().unwrap() * seconds, 504.0, 1e-9, "tokens_per_s x seconds");
}

#[test]
fn stride_equal_to_context_is_the_score_of_non_overlapping_chunks() {
    // The fixture's text_ids are the first 512 characters of its text cut into chunks
    // of 64: a window of 64 every 64 tokens over the text must give transformers' score
    // of those chunks.
    let sandbox = Sandbox::new();
    let reference = reference();
    let text = sandbox.write("text.txt", reference["text"].as_str().unwrap());
    let model = tiny_llama();
    let (model, text) = (model.to_str().unwrap(), text.to_str().unwrap());
    let chunked = eval_json(&sandbox, &["-m", model, text, "--context", "64", "--stride", "64", "--batch-size", "3"]);
    assert_eq!(chunked["tokens"], 504);
    close(chunked["mean_nll"].as_f64().unwrap(), reference["text_mean_nll_nats"].as_f64().unwrap(), 1e-4, "mean_nll");
    // Overlapping windows score every character but the first, each with more context.
    let strided = eval_json(&sandbox, &["-m", model, text, "--context", "64", "--stride", "16"]);
    assert_eq!(strided["tokens"], 511);
    assert!(strided["mean_nll"].as_f64().unwrap() < chunked["mean_nll"].as_f64().unwrap());
}

#[test]
fn ngram_perplexity_equals_kenlm_and_ngram_query() {
    let sandbox = Sandbox::new();
    let text = std::fs::read_to_string(shared().join("data/tinyshakespeare.txt")).unwrap();
    let lines: String = text.split_inclusive('\n').skip(2000).take(200).collect();
    sandbox.write("heldout.txt", &lines);
    let arpa = kenlm_arpa();
    let report = eval_json(&sandbox, &["--perplexity", "--per-token", "-m", arpa.to_str().unwrap(), "heldout.txt"]);
    // KenLM's query over lines 2001-2200 (fixtures/kenlm/README.md).
    assert_eq!(report["tokens"], 1127);
    assert_eq!(report["oov"], 190);
    close(report["perplexity"].as_f64().unwrap(), 293.20571895921455, 1e-6, "perplexity");
    close(report["perplexity_excl_oov"].as_f64().unwrap(), 133.78653336148176, 1e-6, "perplexity_excl_oov");
    let out = sandbox.nlp().args(["--json", "ngram", "query", "-m", arpa.to_str().unwrap(), "heldout.txt"]).output().unwrap();
    let query: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["perplexity"], query["perplexity"]);
    assert_eq!(report["tokens"], query["tokens"]);
    // mean_nll is the same figure in nats; the per-token log-probs add up to it.
    let mean_nll = report["mean_nll"].as_f64().unwrap();
    close(mean_nll, 293.20571895921455f64.ln(), 1e-6, "mean_nll");
    let logprobs = report["logprobs"].as_array().unwrap();
    assert_eq!(logprobs.len(), 1127);
    let sum: f64 = logprobs.iter().map(|v| v.as_f64().unwrap()).sum();
    close(-sum / 1127.0, mean_nll, 1e-5, "sum of per-token log-probs");
    // The first three sentences score log10 -0.6812177, -1.595737, -10.614995 in KenLM
    // (README): each line's words plus its `</s>`.
    let mut position = 0;
    for (line, expected) in lines.lines().zip([-0.6812177, -1.595737, -10.614995]) {
        let n = line.split_whitespace().count() + 1;
        let log10: f64 = logprobs[position..position + n].iter().map(|v| v.as_f64().unwrap()).sum::<f64>()
            / std::f64::consts::LN_10;
        assert!((log10 - expected).abs() < 1e-5, "{line:?}: {log10} vs {expected}");
        position += n;
    }
}

#[test]
fn ngram_over_token_ids_reads_text_through_its_tokenizer() {
    let sandbox = Sandbox::new();
    let text = std::fs::read_to_string(shared().join("data/tinyshakespeare.txt")).unwrap();
    sandbox.write("train.txt", &text[..100_000]);
    // Held-out lines without blank ones, so the text and its --ids hold the same lines.
    let heldout: String = text.lines().skip(3000).filter(|l| !l.trim().is_empty()).take(150).map(|l| format!("{l}\n")).collect();
    sandbox.write("heldout.txt", &heldout);
    let run = |args: &[&str]| {
        let out = sandbox.nlp().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    run(&["-q", "bpe", "train", "--vocab-size", "400", "train.txt", "-o", "tok.json"]);
    run(&["-q", "ngram", "train", "--order", "3", "-t", "tok.json", "train.txt", "-o", "sub.arpa"]);
    let query: Value = serde_json::from_str(&run(&["--json", "ngram", "query", "-m", "sub.arpa", "-t", "tok.json", "heldout.txt"])).unwrap();
    let report = eval_json(&sandbox, &["-m", "sub.arpa", "-t", "tok.json", "heldout.txt"]);
    assert_eq!(report["perplexity"], query["perplexity"]);
    assert_eq!(report["tokens"], query["tokens"]);
    assert_eq!(report["oov"], 0);
    // Bits per byte and word perplexity count the text itself, not its ids.
    assert_eq!(report["bytes"].as_u64().unwrap() as usize, heldout.len());
    assert_eq!(report["words"].as_u64().unwrap() as usize, heldout.split_whitespace().count());
    // The same lines as the tokenizer's ids score the same.
    sandbox.write("ids.txt", &run(&["bpe", "encode", "-t", "tok.json", "heldout.txt"]));
    let from_ids = eval_json(&sandbox, &["-m", "sub.arpa", "-t", "tok.json", "--ids", "ids.txt"]);
    for field in ["tokens", "log10_prob", "bytes", "words"] {
        assert_eq!(from_ids[field], report[field], "{field}");
    }
    // -t is refused where the model has words, or a tokenizer of its own.
    for (model, message) in [(kenlm_arpa(), "not token ids"), (tiny_llama(), "own tokenizer.json")] {
        let out = sandbox.nlp().args(["eval", "-t", "tok.json", "-m"]).arg(&model).arg("heldout.txt").output().unwrap();
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains(message) && err.trim().lines().count() == 1, "{err}");
    }
}

#[test]
fn token_calibration_equals_the_values_worked_from_transformers_logits() {
    let sandbox = Sandbox::new();
    let ids = tensor_rows("input_ids");
    let ids_file = write_ids(&sandbox, "ids.txt", &ids);
    let model = tiny_llama();
    let bins = 10;
    let report = eval_json(
        &sandbox,
        &["--calibration", "--bins", "10", "-m", model.to_str().unwrap(), "--ids", ids_file.to_str().unwrap(), "--plot", "r.svg"],
    );
    // Top-1 confidence and correctness of every next-token prediction, from the
    // reference logits (2, 64, 65), binned by hand into (i/10, (i+1)/10].
    let logits: Vec<Vec<Vec<f64>>> = tensor_rows("logits").chunks(64).map(<[Vec<f64>]>::to_vec).collect();
    let mut count = vec![0f64; bins];
    let mut correct = vec![0f64; bins];
    let mut confidence = vec![0f64; bins];
    for (b, row) in logits.iter().enumerate() {
        let positions = row;
        for t in 0..positions.len() - 1 {
            let l = &positions[t];
            let max = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = l.iter().map(|x| (x - max).exp()).sum();
            let top = l.iter().position(|&x| x == max).unwrap();
            let p = 1.0 / z;
            let bin = ((p * bins as f64).ceil() as usize).max(1) - 1;
            count[bin] += 1.0;
            confidence[bin] += p;
            correct[bin] += f64::from(u8::from(top as f64 == ids[b][t + 1]));
        }
    }
    let n: f64 = count.iter().sum();
    let gaps: Vec<f64> = (0..bins)
        .filter(|&i| count[i] > 0.0)
        .map(|i| (correct[i] / count[i] - confidence[i] / count[i]).abs())
        .collect();
    let ece: f64 = (0..bins)
        .filter(|&i| count[i] > 0.0)
        .map(|i| count[i] / n * (correct[i] / count[i] - confidence[i] / count[i]).abs())
        .sum();
    let mce = gaps.iter().cloned().fold(0.0, f64::max);
    assert_eq!(report["samples"], 126);
    assert!((report["ece"].as_f64().unwrap() - ece).abs() < 1e-4, "{} vs {ece}", report["ece"]);
    assert!((report["mce"].as_f64().unwrap() - mce).abs() < 1e-4, "{} vs {mce}", report["mce"]);
    let counts: Vec<f64> = report["bins"].as_array().unwrap().iter().map(|b| b["count"].as_f64().unwrap()).collect();
    assert_eq!(counts, count);
    let svg = std::fs::read_to_string(sandbox.path().join("r.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("ECE"));
}

#[test]
fn plot_png_is_a_decodable_image_and_other_extensions_are_refused() {
    let sandbox = Sandbox::new();
    let ids = write_ids(&sandbox, "ids.txt", &tensor_rows("input_ids"));
    let ids = ids.to_str().unwrap();
    let model = tiny_llama();
    let model = model.to_str().unwrap();
    let report = eval_json(&sandbox, &["--calibration", "-m", model, "--ids", ids, "--plot", "r.png"]);
    assert_eq!(report["samples"], 126);
    let bytes = std::fs::read(sandbox.path().join("r.png")).unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut pixels).unwrap();
    // The 480-unit page at 2 pixels per unit, 8-bit RGB, on white.
    assert_eq!((info.width, info.height, info.color_type), (960, 960, png::ColorType::Rgb));
    assert_eq!(pixels[..3], [255, 255, 255]);
    // Nothing but the PNG was left in the folder (the write is atomic).
    let mut names: Vec<String> = std::fs::read_dir(sandbox.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["ids.txt", "r.png"]);

    // The multiple-choice path writes its diagram in the same formats.
    sandbox.write("items.jsonl", "{\"prompt\": \"First\", \"choices\": [\" Citizen\", \" king\"], \"answer\": 0}\n");
    eval_json(&sandbox, &["--calibration", "--choices", "items.jsonl", "-m", model, "--plot", "answers.PNG"]);
    assert_eq!(std::fs::read(sandbox.path().join("answers.PNG")).unwrap()[1..4], *b"PNG");
    for args in [
        &["eval", "--calibration", "-m", model, "--ids", ids, "--plot", "x.jpg"][..],
        &["eval", "--calibration", "--choices", "items.jsonl", "-m", model, "--plot", "x"][..],
    ] {
        let out = sandbox.nlp().args(args).output().unwrap();
        let err = assert_one_line_error(&out);
        assert!(err.contains("--plot x") && err.contains(".png or .svg"), "{err}");
    }
    assert!(!sandbox.path().join("x.jpg").exists());
}

#[test]
fn answer_probabilities_add_forms_and_normalise_over_choices() {
    let sandbox = Sandbox::new();
    // Law: a choice made of two forms gets the sum of their probabilities, so its
    // normalised probability is the sum of the two single-form choices'.
    sandbox.write(
        "items.jsonl",
        concat!(
            "{\"prompt\": \"First Citizen :\", \"choices\": [\"the king\", \"the people\", \"my lord\"], \"answer\": 0}\n",
            "\n",
            "{\"prompt\": \"First Citizen :\", \"choices\": [[\"the king\", \"the people\"], \"my lord\"], \"answer\": \"my lord\"}\n",
        ),
    );
    let arpa = kenlm_arpa();
    let report = eval_json(&sandbox, &["--calibration", "--choices", "items.jsonl", "-m", arpa.to_str().unwrap()]);
    let items = report["answers"]["items"].as_array().unwrap();
    assert_eq!(items[0]["line"], 1);
    assert_eq!(items[1]["line"], 3);
    let p = |i: usize| -> Vec<f64> {
        items[i]["probabilities"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
    };
    let (three, two) = (p(0), p(1));
    assert!((three.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    assert!((two[0] - (three[0] + three[1])).abs() < 1e-9, "{two:?} {three:?}");
    assert!((two[1] - three[2]).abs() < 1e-9);
    assert_eq!(report["answers"]["samples"], 2);
}

#[test]
fn answer_probabilities_of_the_transformer_come_from_transformers_log_probs() {
    // The prompt is the first 32 characters of the fixture's text; the choices are the
    // next 8 characters and the next 4. Their log-probs are sums of transformers'
    // next-token log-probs, so the normalised probabilities are known.
    let sandbox = Sandbox::new();
    let reference = reference();
    let text: Vec<char> = reference["text"].as_str().unwrap().chars().collect();
    let logprobs = tensor_rows("text_next_token_logprobs");
    let prompt: String = text[..32].iter().collect();
    let long: String = text[32..40].iter().collect();
    let short: String = text[32..36].iter().collect();
    let item = serde_json::json!({ "prompt": prompt, "choices": [[long], [short]], "answer": 1 });
    sandbox.write("items.jsonl", &format!("{item}\n"));
    let report = eval_json(&sandbox, &["--choices", "items.jsonl", "-m", tiny_llama().to_str().unwrap()]);
    let long_logprob: f64 = logprobs[0][31..39].iter().sum();
    let short_logprob: f64 = logprobs[0][31..35].iter().sum();
    let expected = long_logprob.exp() / (long_logprob.exp() + short_logprob.exp());
    let got = report["answers"]["items"][0]["probabilities"][0].as_f64().unwrap();
    assert!((got - expected).abs() < 1e-4, "{got} vs {expected}");
    assert_eq!(report["answers"]["items"][0]["predicted"], 1);
}

#[test]
fn efficiency_reports_memory_latency_and_throughput() {
    let sandbox = Sandbox::new();
    let report = eval_json(
        &sandbox,
        &["--efficiency", "-m", tiny_llama().to_str().unwrap(), "--prompt-tokens", "16", "--gen-tokens", "8", "--repeats", "3"],
    );
    let e = &report["efficiency"];
    assert_eq!(e["prompt_tokens"], 16);
    assert_eq!(e["repeats"], 3);
    let rss = e["rss_after_load_bytes"].as_f64().unwrap();
    let peak = e["peak_rss_bytes"].as_f64().unwrap();
    assert!(rss > 0.0 && peak >= rss, "{rss} {peak}");
    let p = |k: &str| e[k].as_f64().unwrap();
    assert!(p("latency_p50_seconds") <= p("latency_p90_seconds") && p("latency_p90_seconds") <= p("latency_p99_seconds"));
    assert!(e["prompt_tokens_per_second"]["mean"].as_f64().unwrap() > 0.0);
    assert!(e["gen_tokens_per_second"]["std"].as_f64().unwrap() >= 0.0);
    let first = |k: &str| e["time_to_first_token_seconds"][k].as_f64().unwrap();
    assert!(first("min") <= first("mean") && first("mean") <= first("max"), "{}", e["time_to_first_token_seconds"]);
    assert!(e["time_to_last_token_seconds"]["mean"].as_f64().unwrap() >= e["time_to_first_token_seconds"]["mean"].as_f64().unwrap());
}

#[test]
fn compare_puts_each_models_own_report_side_by_side() {
    let sandbox = Sandbox::new();
    let text = std::fs::read_to_string(shared().join("data/tinyshakespeare.txt")).unwrap();
    let lines: String = text.split_inclusive('\n').skip(2000).take(20).collect();
    sandbox.write("heldout.txt", &lines);
    let (arpa, llama) = (kenlm_arpa(), tiny_llama());
    let (arpa, llama) = (arpa.to_str().unwrap(), llama.to_str().unwrap());
    let table = eval_json(&sandbox, &["heldout.txt", "--compare", arpa, llama]);
    let models = table["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    for (row, model) in models.iter().zip([arpa, llama]) {
        let alone = eval_json(&sandbox, &["-m", model, "heldout.txt"]);
        for key in ["tokens", "mean_nll", "perplexity", "bits_per_byte"] {
            assert_eq!(row[key], alone[key], "{model} {key}");
        }
    }
    let out = sandbox.nlp().args(["eval", "heldout.txt", "--compare", arpa, llama]).output().unwrap();
    assert!(out.status.success());
    assert!(stdout(&out).contains("bits_per_byte") && stdout(&out).contains("hf_tiny_llama"));
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let sandbox = Sandbox::new();
    let llama = tiny_llama();
    let llama = llama.to_str().unwrap();
    sandbox.write("empty.txt", "");
    sandbox.write("one.txt", "A");
    sandbox.write("four.txt", "ABCD");
    sandbox.write("ids.txt", "1 2 3\n4 65 6\n");
    sandbox.write("bad.jsonl", "{\"prompt\": \"a\", \"choices\": [\"b\", \"c\"], \"answer\": 0}\n{\"prompt\": \"a\", \"choices\": [\"b\"\n");
    let cases: [(&[&str], &str); 6] = [
        (&["eval", "-m", llama, "empty.txt"], "empty"),
        (&["eval", "-m", llama, "one.txt"], "1 token"),
        (&["eval", "-m", llama, "--ids", "ids.txt"], "ids.txt:2: token id 65 is outside the model's vocabulary of 65"),
        (&["eval", "--calibration", "--bins", "0", "-m", llama, "one.txt"], "--bins 0"),
        (&["eval", "--choices", "bad.jsonl", "-m", llama], "bad.jsonl:2:"),
        (&["eval", "-m", llama, "four.txt", "--stride", "0"], "--stride 0"),
    ];
    for (args, needle) in cases {
        let out = sandbox.nlp().args(args).output().unwrap();
        let err = assert_one_line_error(&out);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
