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
            Origin::Override => PathBuf::from("--set"),
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
        if self.data.corpus.trim().is_empty() {
            return Err((
                "data.corpus".to_string(),
                "must name a corpus (a path or a known name such as tinyshakespeare)".to_string(),
            ));
        }
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
        assert!(err.contains("--set") && err.contains("run.device"), "{err}");
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
