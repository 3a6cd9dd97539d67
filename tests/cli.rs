//! Integration tests: run the `nlp` binary in temporary folders and check what a
//! user sees — exit codes, one-line errors, and results on stdout.

use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;

/// The shared corpora and fixtures, beside the repository.
fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

/// A temporary working folder and a command that runs `nlp` inside it, with no
/// data folder from the environment.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        Sandbox {
            dir: tempfile::tempdir().expect("a temporary folder"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn nlp(&self) -> Command {
        let mut cmd = Command::cargo_bin("nlp").expect("the nlp binary is built");
        cmd.current_dir(self.path()).env_remove("NLP_DATA_DIR").env_remove("RUST_LOG");
        cmd
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, text).expect("writing a test file");
        path
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts a failure that printed exactly one line, starting `nlp: `.
fn assert_one_line_error(output: &Output) -> String {
    assert!(!output.status.success(), "expected failure, got {:?}", output.status);
    let err = stderr(output);
    assert_eq!(err.lines().count(), 1, "expected one line on stderr, got:\n{err}");
    assert!(err.starts_with("nlp: "), "{err}");
    err
}

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
