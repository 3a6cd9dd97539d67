//! The library's one error type. Binaries and `cmd/` wrap it in `anyhow` for context;
//! library code returns `crate::Result`.

use std::path::PathBuf;

/// Everything that can go wrong inside the `nlp` library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read or written. (The I/O error is part of
    /// the message rather than a `source`, so `{:#}` does not print it twice.)
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    /// A file was read but its content is malformed at a given line.
    #[error("{}:{line}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A configuration key holds a value that is not allowed.
    #[error("{}: key `{key}`: {message}", path.display())]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// A corpus name could not be resolved to a file.
    #[error("{0}")]
    CorpusNotFound(String),
    /// An error from the tensor library, with what was being done.
    #[error("{0}")]
    Tensor(String),
    /// A JSON file (such as `tokenizer.json`) has a missing, malformed or unsupported field.
    #[error("{}: {field}: {message}", path.display())]
    Json {
        path: PathBuf,
        field: String,
        message: String,
    },
    /// An argument or input that the library cannot work with.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
}

/// `Result` with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
