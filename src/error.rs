//! The library's one error type. Binaries and `cmd/` wrap it in `anyhow` for context;
//! library code returns `crate::Result`.

use std::path::PathBuf;

/// Everything that can go wrong inside the `nlp` library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
    /// An argument or input that the library cannot work with.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
