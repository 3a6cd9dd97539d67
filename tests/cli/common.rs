//! What every integration test file shares: a sandbox folder that runs the `nlp`
//! binary, the shared fixtures, and assertions on what a user sees.
// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;

/// The shared corpora and fixtures, beside the repository.
pub fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

/// A temporary working folder and a command that runs `nlp` inside it, with no
/// data folder from the environment.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        Sandbox {
            dir: tempfile::tempdir().expect("a temporary folder"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn nlp(&self) -> Command {
        let mut cmd = Command::cargo_bin("nlp").expect("the nlp binary is built");
        cmd.current_dir(self.path()).env_remove("NLP_DATA_DIR").env_remove("RUST_LOG");
        cmd
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, text).expect("writing a test file");
        path
    }
}

/// A tensor of `hf_tiny_llama/reference.safetensors` (i64 or f32) as rows of its last
/// dimension.
pub fn tensor_rows(name: &str) -> Vec<Vec<f64>> {
    let path = shared().join("fixtures/hf_tiny_llama/reference.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = tensors.tensor(name).unwrap();
    let values: Vec<f64> = match view.dtype() {
        safetensors::Dtype::I64 => view
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::F32 => view
            .data()
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap())))
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    };
    let last = *view.shape().last().unwrap();
    values.chunks(last).map(<[f64]>::to_vec).collect()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts a failure that printed exactly one line, starting `nlp: `.
pub fn assert_one_line_error(output: &Output) -> String {
    assert!(!output.status.success(), "expected failure, got {:?}", output.status);
    let err = stderr(output);
    assert_eq!(err.lines().count(), 1, "expected one line on stderr, got:\n{err}");
    assert!(err.starts_with("nlp: "), "{err}");
    err
}

