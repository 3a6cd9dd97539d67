//! Tests against KenLM's reference outputs (../shared/fixtures/kenlm) and the
//! laws every model must obey.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::*;
use crate::lm::LanguageModel;

fn shared(relative: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/")).join(relative)
}

/// Lines `first..=last` (1-based) of a shared corpus, each ending in '\n'.
fn lines(relative: &str, first: usize, last: usize) -> String {
    let mut text = String::new();
    File::open(shared(relative))
        .and_then(|mut f| f.read_to_string(&mut text))
        .expect("shared corpus");
    text.lines()
        .skip(first - 1)
        .take(last + 1 - first)
        .map(|l| format!("{l}\n"))
        .collect()
}

fn train_text(text: &str, opts: &TrainOptions) -> Trained {
    train_reader(text.as_bytes(), Path::new("train.txt"), opts).expect("trains")
}

/// Largest |difference| of log10 probs and of backoffs between two models with
/// the same n-grams; panics if the n-gram sets or counts differ.
fn compare(ours: &Arpa, reference: &Arpa) -> (f32, f32) {
    assert_eq!(ours.counts(), reference.counts(), "n-gram counts per order");
    let (mut prob_diff, mut backoff_diff) = (0.0_f32, 0.0_f32);
    for (mine, theirs) in ours.orders.iter().zip(&reference.orders) {
        let index: HashMap<String, usize> = (0..theirs.len())
            .map(|row| (reference.ngram_text(theirs.ngram(row)), row))
            .collect();
        for row in 0..mine.len() {
            let text = ours.ngram_text(mine.ngram(row));
            let Some(&other) = index.get(&text) else {
                panic!("{}-gram `{text}` is not in the reference", mine.order)
            };
            prob_diff = prob_diff.max((mine.log10_prob[row] - theirs.log10_prob[other]).abs());
            backoff_diff =
                backoff_diff.max((mine.log10_backoff[row] - theirs.log10_backoff[other]).abs());
        }
    }
    (prob_diff, backoff_diff)
}

/// Number of lines that differ between our ARPA text and the reference file.
fn differing_lines(ours: &Arpa, reference: &Path) -> usize {
    let mut written = Vec::new();
    write_arpa_to(ours, &mut written).expect("writes");
    let mut expected = String::new();
    arpa::open_maybe_gzip(reference)
        .and_then(|mut r| {
            r.read_to_string(&mut expected)
                .map_err(|e| Error::io(reference, e))
        })
        .expect("fixture");
    let written = String::from_utf8(written).expect("utf8");
    let differing = written
        .lines()
        .zip(expected.lines())
        .filter(|(a, b)| a != b)
        .count();
    differing + written.lines().count().abs_diff(expected.lines().count())
}

#[test]
fn tinyshakespeare_matches_lmplz() {
    let trained = train_text(
        &lines("data/tinyshakespeare.txt", 1, 2000),
        &TrainOptions::default(),
    );
    assert!(trained.warnings.is_empty(), "{:?}", trained.warnings);
    assert_eq!(trained.model.counts(), [3202, 8390, 8981]);
    let fixture = shared("fixtures/kenlm/tinyshakespeare2000_o3.arpa.gz");
    let reference = read_arpa(&fixture).expect("fixture parses");
    let (prob_diff, backoff_diff) = compare(&trained.model, &reference);
    let differing = differing_lines(&trained.model, &fixture);
    eprintln!("tinyshakespeare: max |dlog10 p| = {prob_diff:e}, max |dlog10 backoff| = {backoff_diff:e}, differing lines = {differing}");
    assert!(
        prob_diff < 1e-6 && backoff_diff < 1e-6,
        "{prob_diff} {backoff_diff}"
    );
    // In fact the written file is byte for byte lmplz's.
    assert_eq!(differing, 0);
}

#[test]
fn wikitext2_matches_lmplz_and_its_discounts() {
    let opts = TrainOptions {
        skip_symbols: true,
        ..TrainOptions::default()
    };
    let trained = train(&shared("data/wikitext2.valid.txt"), &opts).expect("trains");
    assert_eq!(trained.model.counts(), [13778, 97171, 165229]);
    // From the fixture README (lmplz's log).
    let expected = [
        [0.518627, 1.08675, 1.66978],
        [0.774051, 1.21648, 1.55101],
        [0.873482, 1.32102, 1.50242],
    ];
    for (d, e) in trained.discounts.iter().zip(expected) {
        eprintln!("discount {d:?}");
        assert!(
            (d.d1 - e[0]).abs() < 1e-5
                && (d.d2 - e[1]).abs() < 1e-5
                && (d.d3_plus - e[2]).abs() < 1e-5,
            "{d:?} vs {e:?}"
        );
    }
    let fixture = shared("fixtures/kenlm/wikitext2valid_o3.arpa.gz");
    let reference = read_arpa(&fixture).expect("fixture parses");
    let (prob_diff, backoff_diff) = compare(&trained.model, &reference);
    let differing = differing_lines(&trained.model, &fixture);
    eprintln!("wikitext2: max |dlog10 p| = {prob_diff:e}, max |dlog10 backoff| = {backoff_diff:e}, differing lines = {differing}");
    assert!(
        prob_diff < 1e-6 && backoff_diff < 1e-6,
        "{prob_diff} {backoff_diff}"
    );
    assert_eq!(differing, 0);
}

/// |a - b| relative to b.
fn relative(a: f64, b: f64) -> f64 {
    ((a - b) / b).abs()
}

fn assert_query(report: &QueryReport, perplexity: f64, excl_oov: f64, oov: usize, tokens: usize) {
    eprintln!(
        "perplexity {} (excl. OOV {}), OOVs {}, tokens {}",
        report.perplexity, report.perplexity_excl_oov, report.oov, report.tokens
    );
    assert_eq!((report.oov, report.tokens), (oov, tokens));
    assert!(
        relative(report.perplexity, perplexity) < 1e-12,
        "{} vs {perplexity}",
        report.perplexity
    );
    assert!(
        relative(report.perplexity_excl_oov, excl_oov) < 1e-12,
        "{} vs {excl_oov}",
        report.perplexity_excl_oov
    );
}

#[test]
fn tinyshakespeare_query_matches_kenlm() {
    let trained = train_text(
        &lines("data/tinyshakespeare.txt", 1, 2000),
        &TrainOptions::default(),
    );
    let heldout = lines("data/tinyshakespeare.txt", 2001, 2200);
    let from_training = NgramModel::from_arpa(&trained.model).expect("builds");
    let from_fixture =
        load(&shared("fixtures/kenlm/tinyshakespeare2000_o3.arpa.gz")).expect("loads");
    for model in [&from_training, &from_fixture] {
        let report = model.query(heldout.as_bytes()).expect("scores");
        assert_query(
            report_ref(&report),
            293.20571895921455,
            133.78653336148176,
            190,
            1127,
        );
        let first: Vec<f64> = report.sentences[..3].iter().map(|s| s.log10_prob).collect();
        for (got, want) in first.iter().zip([-0.6812177, -1.595737, -10.614995]) {
            assert!((got - want).abs() < 1e-5, "{first:?}");
        }
        assert_eq!(report.sentences[2].oov, 1);
    }
}

fn report_ref(report: &QueryReport) -> &QueryReport {
    report
}

#[test]
fn wikitext2_query_over_ptb_matches_kenlm() {
    let model = load(&shared("fixtures/kenlm/wikitext2valid_o3.arpa.gz")).expect("loads");
    let mut text = Vec::new();
    File::open(shared("data/ptb.valid.txt"))
        .and_then(|mut f| f.read_to_end(&mut text))
        .expect("ptb");
    let report = model.query(text.as_slice()).expect("scores");
    assert_query(
        &report,
        3058.2512559701154,
        1301.8320402870409,
        12945,
        73760,
    );
}

#[test]
fn binary_scores_like_arpa_and_rejects_bad_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trained = train_text(
        &lines("data/tinyshakespeare.txt", 1, 2000),
        &TrainOptions::default(),
    );
    let arpa_path = dir.path().join("model.arpa");
    let binary_path = dir.path().join("model.bin");
    write_arpa(&trained.model, &arpa_path).expect("writes arpa");
    write_binary(&trained.model, &binary_path).expect("writes binary");
    let from_arpa = load(&arpa_path).expect("loads arpa");
    let from_binary = load(&binary_path).expect("loads binary");
    assert_eq!(from_binary.order(), 3);
    assert_eq!(from_binary.counts(), [3202, 8390, 8981]);
    let heldout = lines("data/tinyshakespeare.txt", 2001, 2600);
    let a = from_arpa.query(heldout.as_bytes()).expect("scores");
    let b = from_binary.query(heldout.as_bytes()).expect("scores");
    assert_eq!(a, b);

    let bytes = std::fs::read(&binary_path).expect("reads");
    let err = read_arpa(&binary_path)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("cannot be turned back into ARPA"), "{err}");

    let mut bad_version = bytes.clone();
    bad_version[8] = 99;
    let path = dir.path().join("bad_version.bin");
    std::fs::write(&path, &bad_version).expect("writes");
    let err = load(&path).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains("format version 99") && err.contains("bad_version.bin"),
        "{err}"
    );

    let mut bad_magic = bytes.clone();
    bad_magic[0] = b'X';
    let path = dir.path().join("bad_magic.bin");
    std::fs::write(&path, &bad_magic).expect("writes");
    let err = load(&path).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("not an n-gram model"), "{err}");

    let path = dir.path().join("truncated.bin");
    std::fs::write(&path, &bytes[..bytes.len() - 16]).expect("writes");
    let err = load(&path).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn failed_writes_leave_no_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let trained = train_text("a b c\nb c d\n", &TrainOptions::default());
    let path = dir.path().join("missing-dir").join("model.arpa");
    assert!(write_arpa(&trained.model, &path).is_err());
    assert!(!path.exists());
    // An existing file is replaced whole, and no temporary file remains.
    let path = dir.path().join("model.arpa");
    std::fs::write(&path, "old").expect("writes");
    write_arpa(&trained.model, &path).expect("writes");
    assert!(std::fs::read_to_string(&path)
        .expect("reads")
        .starts_with("\\data\\"));
    assert_eq!(std::fs::read_dir(dir.path()).expect("lists").count(), 1);
}

/// sum_w p(w | context) over the vocabulary, from the LanguageModel rows.
fn row_sums(model: &NgramModel, contexts: &[Vec<u32>]) -> Vec<f64> {
    let rows = model.next_logprobs(contexts).expect("rows");
    rows.iter()
        .map(|row| row.iter().map(|&lp| f64::from(lp).exp()).sum())
        .collect()
}

/// Contexts to test the law with: start of sentence, a frequent history, a rare
/// one, after an unknown word, and one unseen as a whole.
fn law_contexts(model: &NgramModel, words: &[&str]) -> Vec<Vec<u32>> {
    let id = |w: &str| model.word_id(w).expect("word in vocabulary");
    let mut contexts = vec![model.initial_state(), Vec::new()];
    let mut state = model.initial_state();
    for w in words {
        model.advance(&mut state, id(w)).expect("advances");
        contexts.push(state.clone());
    }
    contexts.push(vec![id(words[words.len() - 1]), id(words[0])]);
    contexts
}

fn assert_sums_to_one(model: &NgramModel, words: &[&str], what: &str) {
    for (context, sum) in law_contexts(model, words)
        .iter()
        .zip(row_sums(model, &law_contexts(model, words)))
    {
        assert!(
            (sum - 1.0).abs() < 1e-4,
            "{what}: context {context:?} sums to {sum}"
        );
    }
}

#[test]
fn distributions_sum_to_one_for_trained_and_loaded_models() {
    let text = lines("data/tinyshakespeare.txt", 1, 2000);
    let words = ["First", "Citizen:", "We", "are", "accounted"];
    for smoothing in Smoothing::ALL.map(|(_, s)| s) {
        for interpolate_unigrams in [true, false] {
            let opts = TrainOptions {
                smoothing,
                interpolate_unigrams,
                order: 4,
                ..TrainOptions::default()
            };
            let trained = train_text(&text, &opts);
            let model = NgramModel::from_arpa(&trained.model).expect("builds");
            assert_sums_to_one(
                &model,
                &words,
                &format!("{smoothing} interpolate_unigrams={interpolate_unigrams}"),
            );
        }
    }
    let fixture = load(&shared("fixtures/kenlm/wikitext2valid_o3.arpa.gz")).expect("loads");
    assert_sums_to_one(&fixture, &["The", "game", "was"], "wikitext2 fixture");
    // The LanguageModel agrees with query's scores.
    let trained = train_text(&text, &TrainOptions::default());
    let model = NgramModel::from_arpa(&trained.model).expect("builds");
    let heldout = lines("data/tinyshakespeare.txt", 2001, 2100);
    let report = model.query(heldout.as_bytes()).expect("scores");
    for (line, sentence) in heldout.lines().zip(&report.sentences) {
        if sentence.oov > 0 {
            continue;
        }
        let ids: Vec<u32> = line
            .split_whitespace()
            .map(|w| model.word_id(w).expect("known"))
            .chain(model.eos_id())
            .collect();
        let nats: f32 = model.score(&ids).expect("scores").iter().sum();
        assert!(
            (f64::from(nats) / std::f64::consts::LN_10 - sentence.log10_prob).abs() < 1e-4,
            "{line}"
        );
    }
}

#[test]
fn pruning_drops_rare_ngrams_and_keeps_the_law() {
    let text = lines("data/tinyshakespeare.txt", 1, 2000);
    let full = train_text(&text, &TrainOptions::default());
    let opts = TrainOptions {
        prune: vec![0, 1],
        ..TrainOptions::default()
    };
    let pruned = train_text(&text, &opts);
    let (before, after) = (full.model.counts(), pruned.model.counts());
    assert_eq!(before[0], after[0]);
    assert!(
        after[1] < before[1] && after[2] < before[2],
        "{before:?} -> {after:?}"
    );
    // Every surviving n-gram's context and suffix survive too.
    let model = NgramModel::from_arpa(&pruned.model).expect("builds");
    for n in 2..=3 {
        let lower: std::collections::HashSet<&[u32]> = (0..pruned.model.orders[n - 2].len())
            .map(|r| pruned.model.orders[n - 2].ngram(r))
            .collect();
        for row in 0..pruned.model.orders[n - 1].len() {
            let ngram = pruned.model.orders[n - 1].ngram(row);
            assert!(lower.contains(&ngram[..n - 1]) && lower.contains(&ngram[1..]));
        }
    }
    assert_sums_to_one(&model, &["First", "Citizen:", "We", "are"], "pruned mkn");
    let wb = train_text(
        &text,
        &TrainOptions {
            smoothing: Smoothing::WittenBell,
            ..opts.clone()
        },
    );
    assert_sums_to_one(
        &NgramModel::from_arpa(&wb.model).expect("builds"),
        &["First", "Citizen:", "We", "are"],
        "pruned wb",
    );

    for bad in [vec![1, 1], vec![0, 2, 1]] {
        let opts = TrainOptions {
            prune: bad,
            ..TrainOptions::default()
        };
        assert!(train_reader(text.as_bytes(), Path::new("t"), &opts).is_err());
    }
}

#[test]
fn tiny_data_falls_back_to_default_discounts_with_warnings() {
    let trained = train_text("a b c\na b d\n", &TrainOptions::default());
    assert!(!trained.warnings.is_empty());
    assert!(trained.discounts.iter().all(|d| *d == Discount::FALLBACK));
    let model = NgramModel::from_arpa(&trained.model).expect("builds");
    assert_sums_to_one(&model, &["a", "b"], "tiny");
}

#[test]
fn spilling_to_disk_gives_the_same_model() {
    let text = lines("data/tinyshakespeare.txt", 1, 2000);
    let in_memory = train_text(
        &text,
        &TrainOptions {
            order: 4,
            ..TrainOptions::default()
        },
    );
    let spilled = train_text(
        &text,
        &TrainOptions {
            order: 4,
            memory_bytes: Some(64 * 1024),
            ..TrainOptions::default()
        },
    );
    let (mut a, mut b) = (Vec::new(), Vec::new());
    write_arpa_to(&in_memory.model, &mut a).expect("writes");
    write_arpa_to(&spilled.model, &mut b).expect("writes");
    assert!(a == b);
}

#[test]
fn options_are_checked() {
    let err = "bogus"
        .parse::<Smoothing>()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert_eq!(
        err,
        "unknown smoothing method `bogus`; expected one of mkn, kn, wb, add-k, jm, mle"
    );
    for (name, smoothing) in Smoothing::ALL {
        assert_eq!(name.parse::<Smoothing>().ok(), Some(smoothing));
    }
    let opts = TrainOptions {
        order: 0,
        ..TrainOptions::default()
    };
    assert!(train_reader("a\n".as_bytes(), Path::new("t"), &opts).is_err());
    let opts = TrainOptions {
        smoothing: Smoothing::AddK,
        add_k: 0.0,
        ..TrainOptions::default()
    };
    assert!(train_reader("a\n".as_bytes(), Path::new("t"), &opts).is_err());
}

#[test]
fn smoothing_methods_rank_as_expected_on_held_out_text() {
    let text = lines("data/tinyshakespeare.txt", 1, 4000);
    let heldout = lines("data/tinyshakespeare.txt", 4001, 4400);
    let mut perplexity = HashMap::new();
    for (name, smoothing) in Smoothing::ALL {
        let trained = train_text(
            &text,
            &TrainOptions {
                smoothing,
                ..TrainOptions::default()
            },
        );
        let model = NgramModel::from_arpa(&trained.model).expect("builds");
        let report = model.query(heldout.as_bytes()).expect("scores");
        eprintln!(
            "{name}: perplexity excl. OOV {:.1} {:?}",
            report.perplexity_excl_oov, trained.lambdas
        );
        perplexity.insert(name, report.perplexity_excl_oov);
    }
    assert!(perplexity["mkn"] < perplexity["wb"]);
    assert!(perplexity["kn"] < perplexity["add-k"]);
    assert!(perplexity["jm"] < perplexity["add-k"]);
    assert!(perplexity["mle"] > 1e10);
}

#[test]
fn jelinek_mercer_tunes_on_a_held_out_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let heldout = dir.path().join("heldout.txt");
    std::fs::write(&heldout, lines("data/tinyshakespeare.txt", 2001, 2200)).expect("writes");
    let opts = TrainOptions {
        smoothing: Smoothing::JelinekMercer,
        heldout: Some(heldout),
        ..TrainOptions::default()
    };
    let trained = train_text(&lines("data/tinyshakespeare.txt", 1, 2000), &opts);
    assert_eq!(trained.lambdas.len(), 3);
    assert!(
        trained.lambdas.iter().all(|&l| l > 0.0 && l < 1.0),
        "{:?}",
        trained.lambdas
    );
}

#[test]
fn every_order_from_one_to_six_sums_to_one() {
    let text = lines("data/tinyshakespeare.txt", 1, 1000);
    for order in 1..=6 {
        let trained = train_text(
            &text,
            &TrainOptions {
                order,
                ..TrainOptions::default()
            },
        );
        assert_eq!(trained.model.order(), order);
        let model = NgramModel::from_arpa(&trained.model).expect("builds");
        assert_sums_to_one(
            &model,
            &["First", "Citizen:", "Before", "we", "proceed"],
            &format!("order {order}"),
        );
        let report = model
            .query(lines("data/tinyshakespeare.txt", 1001, 1100).as_bytes())
            .expect("scores");
        assert!(report.perplexity.is_finite() && report.perplexity > 1.0);
    }
}

#[test]
fn without_unigram_interpolation_unk_takes_the_left_over_mass() {
    let text = lines("data/tinyshakespeare.txt", 1, 2000);
    let unk_log10 = |interpolate_unigrams| {
        let trained = train_text(
            &text,
            &TrainOptions {
                interpolate_unigrams,
                ..TrainOptions::default()
            },
        );
        trained.model.orders[0].log10_prob[0]
    };
    // lmplz's default gives <unk> gamma / V; SRILM's style gives it all of gamma.
    let (interpolated, not) = (unk_log10(true), unk_log10(false));
    assert!(
        (not - interpolated - (3201_f32).log10()).abs() < 1e-4,
        "{interpolated} {not}"
    );
}
