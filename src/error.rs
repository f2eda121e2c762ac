//! The crate's error type. Every variant a user can cause names the file, key or row
//! involved and, where there is one, what to do about it.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message rather than a `source`, so that printing the error
    // chain does not say it twice.
    #[error("cannot read {path}: {cause}")]
    Io { path: PathBuf, cause: std::io::Error },

    #[error(
        "{path} is not a valid safetensors file ({cause}); it may be truncated or corrupt: download or save it again"
    )]
    Safetensors { path: PathBuf, cause: safetensors::SafeTensorError },

    /// A file that parsed but whose content is wrong: a missing or mis-shaped tensor,
    /// a quant_state that disagrees with its data, a malformed JSON field.
    #[error("{path}: key `{key}`: {message}")]
    BadEntry { path: PathBuf, key: String, message: String },

    /// A row of the architecture table (assets/architectures.toml) that does not make sense.
    #[error("architecture table, {row}: {message}")]
    Table { row: String, message: String },

    #[error("{0}")]
    UnknownFamily(String),

    #[error("{0}")]
    Invalid(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn bad_entry(path: impl Into<PathBuf>, key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::BadEntry { path: path.into(), key: key.into(), message: message.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), cause: source }
    }
}
