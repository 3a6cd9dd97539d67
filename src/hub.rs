//! Models named by a Hugging Face Hub repo id (`HuggingFaceTB/SmolLM-135M`, or
//! `owner/name@revision`) wherever a model directory is expected.
//!
//! The files a model directory needs (`config.json`, `tokenizer.json` and the
//! safetensors weights, one file or shards with their index) come from the local Hub
//! cache, laid out as Python's `huggingface_hub` lays it out under `$HF_HOME/hub`, or
//! are downloaded into it with the `hf-hub` crate. `HF_HUB_OFFLINE=1` reads the cache
//! alone; `HF_ENDPOINT` points at a mirror. The result is the cached snapshot folder,
//! an ordinary model directory.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, CacheRepo, Repo, RepoType};

use crate::model::hf::{SHARD_INDEX_FILE, WEIGHTS_FILE};
use crate::{Error, Result};

/// The files besides the weights that every model directory needs.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];

/// The repo id and revision `text` names, if it has the shape of one (`owner/name`,
/// optionally `@revision`; letters, digits, `-`, `_` and `.`) and is not a path that
/// exists.
pub fn repo_id(path: &Path) -> Option<(String, String)> {
    if path.exists() {
        return None;
    }
    let text = path.to_str()?;
    let (id, revision) = match text.split_once('@') {
        Some((id, revision)) if !revision.is_empty() => (id, revision),
        Some(_) => return None,
        None => (text, "main"),
    };
    let (owner, name) = id.split_once('/')?;
    let valid = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (valid(owner) && valid(name)).then(|| (id.to_string(), revision.to_string()))
}

/// `path` itself, or for a repo id (see [`repo_id`]) the cached snapshot folder holding
/// the model's files, fetched first where missing. `progress` shows download bars.
pub fn resolve(path: &Path, progress: bool) -> Result<PathBuf> {
    match repo_id(path) {
        Some((id, revision)) => fetch(&id, &revision, progress),
        None => Ok(path.to_path_buf()),
    }
}

/// Whether `HF_HUB_OFFLINE` asks for the cache alone (as `huggingface_hub` reads it).
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// Where a repo's files come from.
enum Source {
    /// The local cache alone (`HF_HUB_OFFLINE`).
    Cache(CacheRepo),
    /// The cache, then the Hub for what it lacks.
    Hub(ApiRepo),
}

impl Source {
    /// The cached path of `file` of repo `id`.
    fn get(&self, id: &str, file: &str) -> Result<PathBuf> {
        match self {
            Source::Cache(cache) => cache.get(file).ok_or_else(|| {
                Error::Invalid(format!(
                    "{id}: {file} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE \
                     is set; unset it to download, or pass a model directory",
                    Cache::from_env().path().display()
                ))
            }),
            Source::Hub(api) => api.get(file).map_err(|e| {
                Error::Invalid(format!(
                    "{id}: could not fetch {file} from the Hugging Face Hub ({e}); check the \
                     network, or pass a local model directory"
                ))
            }),
        }
    }
}

/// The snapshot folder of `id` at `revision` with every file a model directory needs.
fn fetch(id: &str, revision: &str, progress: bool) -> Result<PathBuf> {
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    let source = match offline() {
        true => Source::Cache(Cache::from_env().repo(repo)),
        false => Source::Hub(
            ApiBuilder::from_env()
                .with_progress(progress)
                .build()
                .map_err(|e| Error::Invalid(format!("{id}: cannot use the Hugging Face Hub: {e}")))?
                .repo(repo),
        ),
    };
    let config = source.get(id, REQUIRED[0])?;
    for file in &REQUIRED[1..] {
        source.get(id, file)?;
    }
    // One weights file, or an index naming the shards.
    if let Err(single) = source.get(id, WEIGHTS_FILE) {
        let index = source.get(id, SHARD_INDEX_FILE).map_err(|_| single)?;
        for shard in crate::model::hf::shard_files(&index)? {
            source.get(id, &shard)?;
        }
    }
    let dir = config.parent().expect("a cached file has a folder");
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_owner_slash_name_with_an_optional_revision() {
        let id = |s: &str| repo_id(Path::new(s));
        let main = |owner_name: &str| Some((owner_name.to_string(), "main".to_string()));
        assert_eq!(id("HuggingFaceTB/SmolLM-135M"), main("HuggingFaceTB/SmolLM-135M"));
        assert_eq!(id("TinyLlama/TinyLlama_v1.1"), main("TinyLlama/TinyLlama_v1.1"));
        assert_eq!(
            id("gpt2/x@v1.0"),
            Some(("gpt2/x".to_string(), "v1.0".to_string()))
        );
        for not_an_id in ["model", "a/b/c", "/abs/path", "./x/y", "a/", "/b", "a/b@", "a b/c", "../x"]
        {
            assert_eq!(id(not_an_id), None, "{not_an_id}");
        }
        // A file that exists is a path even when it has the shape of an id.
        assert!(Path::new("configs/small.toml").is_file());
        assert_eq!(id("configs/small.toml"), None);
    }
}
