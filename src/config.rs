//! Configuration: built-in defaults < `--config FILE` < `--set KEY=VALUE` < explicit flags.
//!
//! Layers are merged as TOML tables over the serialized defaults, so every key a
//! file or `--set` names must exist in the defaults and hold a value of the same
//! type; anything else is an error naming where the key came from. The merged
//! table is then deserialized into [`Config`] and checked by [`Config::validate`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::device::DeviceSpec;
use crate::{Error, Result};

/// The resolved configuration of one run. Later issues add sections here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Settings every command shares.
    pub run: RunConfig,
    /// Where text comes from.
    pub data: DataConfig,
    /// `nlp ngram train`.
    pub ngram: NgramConfig,
    /// The transformer's shape, for `nlp train`.
    pub model: crate::train::ModelSection,
    /// The training loop, for `nlp train`.
    pub train: crate::train::TrainSection,
}

/// `[run]`: settings every command shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Seed for every random source.
    pub seed: u64,
    /// auto, cpu, cuda, cuda:N or metal.
    pub device: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            seed: 1337,
            device: DeviceSpec::Auto.to_string(),
        }
    }
}

/// `[data]`: where text comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// The corpus a command reads when none is given: a path or a known name.
    pub corpus: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            corpus: "tinyshakespeare".to_string(),
        }
    }
}

/// `[ngram]`: how `nlp ngram train` estimates a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NgramConfig {
    /// The highest order N.
    pub order: u64,
    /// mkn, kn, wb, add-k, jm or mle.
    pub smoothing: String,
    /// Pruning thresholds per order, as lmplz's --prune (empty: none).
    pub prune: Vec<u64>,
    /// Drop literal <s>, </s> and <unk> from the training text.
    pub skip_symbols: bool,
    /// Interpolate unigrams with the uniform distribution (lmplz's default).
    pub interpolate_unigrams: bool,
    /// Memory budget for counting, e.g. "1G"; beyond it counts spill to disk.
    pub memory: String,
    /// k of add-k smoothing.
    pub add_k: f64,
}

impl Default for NgramConfig {
    fn default() -> Self {
        NgramConfig {
            order: 3,
            smoothing: "mkn".to_string(),
            prune: Vec::new(),
            skip_symbols: false,
            interpolate_unigrams: true,
            memory: "1G".to_string(),
            add_k: 1.0,
        }
    }
}

/// Parses a byte size: a number with an optional K, M, G or T suffix (powers of
/// 1024, optionally followed by `B` or `iB`), e.g. `512M`, `1G`, `2000000`.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let trimmed = text.trim();
    let upper = trimmed.to_ascii_uppercase();
    let without_b = upper
        .strip_suffix("IB")
        .or_else(|| upper.strip_suffix('B'))
        .unwrap_or(&upper);
    let (number, shift) = match without_b.chars().last() {
        Some('K') => (&without_b[..without_b.len() - 1], 10),
        Some('M') => (&without_b[..without_b.len() - 1], 20),
        Some('G') => (&without_b[..without_b.len() - 1], 30),
        Some('T') => (&without_b[..without_b.len() - 1], 40),
        _ => (without_b, 0),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("`{trimmed}` is not a size; expected e.g. 512M, 1G or 2000000"))?;
    if !(value.is_finite() && value > 0.0) {
        return Err(format!("`{trimmed}`: a size must be positive"));
    }
    Ok((value * (1u64 << shift) as f64) as u64)
}

/// Where a configuration value came from, for error messages.
#[derive(Debug, Clone)]
enum Origin {
    File(PathBuf),
    Override,
}

impl Origin {
    fn path(&self) -> PathBuf {
        match self {
            Origin::File(path) => path.clone(),
            Origin::Override => PathBuf::from("command line"),
        }
    }
}

/// Builds a [`Config`] layer by layer.
#[derive(Debug)]
pub struct ConfigBuilder {
    table: Table,
    origins: BTreeMap<String, Origin>,
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigBuilder {
    /// Starts from the built-in defaults.
    pub fn new() -> Self {
        let table = Table::try_from(Config::default())
            .expect("the default config serializes to a TOML table");
        ConfigBuilder {
            table,
            origins: BTreeMap::new(),
        }
    }

    /// Layers a TOML file over what is there.
    pub fn file(mut self, path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let layer: Table = text.parse().map_err(|e: toml::de::Error| Error::Parse {
            path: path.to_path_buf(),
            line: line_of(&text, e.span().map_or(0, |s| s.start)),
            message: e.message().to_string(),
        })?;
        let origin = Origin::File(path.to_path_buf());
        merge(&mut self.table, layer, "", &origin, &mut self.origins)?;
        Ok(self)
    }

    /// Layers one `section.key=value` override. The value is read as TOML; a bare
    /// word that is not valid TOML is taken as a string.
    pub fn set(mut self, assignment: &str) -> Result<Self> {
        let (key, raw) = assignment.split_once('=').ok_or_else(|| {
            Error::Invalid(format!(
                "--set {assignment}: expected SECTION.KEY=VALUE, e.g. --set run.seed=7"
            ))
        })?;
        let key = key.trim();
        let raw = raw.trim();
        let value = format!("value = {raw}")
            .parse::<Table>()
            .ok()
            .and_then(|mut t| t.remove("value"))
            .unwrap_or_else(|| Value::String(raw.to_string()));
        let mut layer = Table::new();
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().filter(|k| !k.is_empty()).ok_or_else(|| {
            Error::Invalid(format!("--set {assignment}: the key is empty"))
        })?;
        let mut leaf = Table::new();
        leaf.insert(last.to_string(), value);
        let mut node = leaf;
        while let Some(part) = parts.pop() {
            let mut parent = Table::new();
            parent.insert(part.to_string(), Value::Table(node));
            node = parent;
        }
        layer.extend(node);
        merge(&mut self.table, layer, "", &Origin::Override, &mut self.origins)?;
        Ok(self)
    }

    /// Deserializes and validates the merged layers.
    pub fn build(self) -> Result<Config> {
        let config: Config = Value::Table(self.table)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Invalid(format!("configuration: {}", e.message())))?;
        config.validate().map_err(|(key, message)| {
            let path = self
                .origins
                .get(&key)
                .map_or_else(|| PathBuf::from("configuration"), Origin::path);
            Error::Config { path, key, message }
        })?;
        Ok(config)
    }
}

/// Merges `layer` into `base`, refusing keys the defaults lack and values whose
/// type differs from the default's.
fn merge(
    base: &mut Table,
    layer: Table,
    prefix: &str,
    origin: &Origin,
    origins: &mut BTreeMap<String, Origin>,
) -> Result<()> {
    for (key, value) in layer {
        let full_key = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let error = |message: String| Error::Config {
            path: origin.path(),
            key: full_key.clone(),
            message,
        };
        let Some(current) = base.get_mut(&key) else {
            let allowed: Vec<&str> = base.keys().map(String::as_str).collect();
            let scope = if prefix.is_empty() {
                "sections".to_string()
            } else {
                format!("keys in [{prefix}]")
            };
            return Err(error(format!(
                "unknown key; allowed {scope}: {}",
                allowed.join(", ")
            )));
        };
        match (current, value) {
            (Value::Table(current), Value::Table(inner)) => {
                merge(current, inner, &full_key, origin, origins)?;
            }
            (Value::Table(_), other) => {
                return Err(error(format!(
                    "expected a table [{full_key}], found {}",
                    other.type_str()
                )));
            }
            (current @ Value::Float(_), Value::Integer(i)) => {
                *current = Value::Float(i as f64);
                origins.insert(full_key, origin.clone());
            }
            (current, value) => {
                if current.type_str() != value.type_str() {
                    return Err(error(format!(
                        "expected {}, found {} `{value}`",
                        article(current.type_str()),
                        value.type_str()
                    )));
                }
                *current = value;
                origins.insert(full_key, origin.clone());
            }
        }
    }
    Ok(())
}

fn article(type_name: &str) -> String {
    match type_name {
        "integer" => "an integer".to_string(),
        "array" => "an array".to_string(),
        other => format!("a {other}"),
    }
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Config {
    /// Checks values that are well-typed but not allowed. On error, returns the
    /// dotted key and what is allowed.
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        self.device()
            .map_err(|e| ("run.device".to_string(), e.to_string()))?;
        let ngram = &self.ngram;
        if ngram.order < 1 {
            return Err(("ngram.order".to_string(), "must be at least 1".to_string()));
        }
        ngram
            .smoothing
            .parse::<crate::ngram::Smoothing>()
            .map_err(|e| ("ngram.smoothing".to_string(), e.to_string()))?;
        parse_size(&ngram.memory).map_err(|e| ("ngram.memory".to_string(), e))?;
        if !(ngram.add_k > 0.0 && ngram.add_k.is_finite()) {
            return Err(("ngram.add_k".to_string(), "must be a positive number".to_string()));
        }
        if self.data.corpus.trim().is_empty() {
            return Err((
                "data.corpus".to_string(),
                "must name a corpus (a path or a known name such as tinyshakespeare)".to_string(),
            ));
        }
        self.train.validate()?;
        self.model.validate(self.train.seq_len)?;
        Ok(())
    }

    /// The requested device.
    pub fn device(&self) -> Result<DeviceSpec> {
        self.run.device.parse()
    }

    /// The configuration as TOML, as `--print-config` shows it.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes to TOML")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "[run]\nseed = 5\ndevice = \"cpu\"\n");
        let config = ConfigBuilder::new()
            .file(&path)
            .unwrap()
            .set("run.seed=9")
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(config.run.seed, 9);
        assert_eq!(config.run.device, "cpu");
        assert_eq!(config.data.corpus, "tinyshakespeare");
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "[run]\nsede = 5\n");
        let err = ConfigBuilder::new().file(&path).unwrap_err().to_string();
        assert!(err.contains("config.toml") && err.contains("run.sede"), "{err}");
        assert!(err.contains("seed"), "lists the allowed keys: {err}");
    }

    #[test]
    fn wrong_type_names_key_and_expected_type() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "[run]\nseed = \"five\"\n");
        let err = ConfigBuilder::new().file(&path).unwrap_err().to_string();
        assert!(err.contains("run.seed") && err.contains("expected an integer"), "{err}");
    }

    #[test]
    fn bad_value_names_its_origin() {
        let err = ConfigBuilder::new()
            .set("run.device=gpu")
            .unwrap()
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("command line") && err.contains("run.device"), "{err}");
    }

    #[test]
    fn set_parses_toml_values_and_bare_words() {
        let config = ConfigBuilder::new()
            .set("data.corpus=ptb-valid")
            .unwrap()
            .set("run.device=\"cpu\"")
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(config.data.corpus, "ptb-valid");
        assert_eq!(config.run.device, "cpu");
        assert!(ConfigBuilder::new().set("run.seed").is_err());
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("2000000"), Ok(2_000_000));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1.5kB"), Ok(1536));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1G").is_err());
    }

    #[test]
    fn ngram_values_are_validated_with_their_key() {
        let err = ConfigBuilder::new().set("ngram.smoothing=good-turing").unwrap().build().unwrap_err();
        assert!(err.to_string().contains("ngram.smoothing"), "{err}");
        let err = ConfigBuilder::new().set("ngram.order=0").unwrap().build().unwrap_err();
        assert!(err.to_string().contains("ngram.order"), "{err}");
        let err = ConfigBuilder::new().set("ngram.memory=much").unwrap().build().unwrap_err();
        assert!(err.to_string().contains("ngram.memory"), "{err}");
    }

    #[test]
    fn syntax_error_names_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "[run]\nseed = 5\nseed = = 3\n");
        let err = ConfigBuilder::new().file(&path).unwrap_err().to_string();
        assert!(err.contains("config.toml:3"), "{err}");
    }

    #[test]
    fn printed_config_reads_back_to_itself() {
        let config = ConfigBuilder::new().set("run.seed=42").unwrap().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, &config.to_toml());
        assert_eq!(ConfigBuilder::new().file(&path).unwrap().build().unwrap(), config);
    }
}
