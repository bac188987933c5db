//! The crate's error type.
//!
//! Every user-facing failure (a bad file, a bad option, a checkpoint that does not match its
//! config) is a variant of [`Error`]; nothing in the library panics on user input.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A data error located in an input file: `file:line: field `name`: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError {
    /// The file the record came from.
    pub file: PathBuf,
    /// 1-based line number in that file.
    pub line: usize,
    /// The field at fault (`chosen`, `prompt[1].role`, ...), when one is.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for DataError {}

/// Everything that can go wrong in the trainer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on a named path failed.
    #[error("{path}: {source}")]
    Io {
        /// The path being read or written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A record of a data file is invalid.
    #[error("{0}")]
    Data(#[from] DataError),
    /// `config.json` (or another JSON config) is invalid.
    #[error("{path}: invalid config: {message}")]
    Config {
        /// The config file (or `<input>` when parsed from a string).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// `model_type` names an architecture this crate does not implement.
    #[error("{path}: unsupported model_type `{found}`; supported: {}", supported.join(", "))]
    UnsupportedModelType {
        /// The config file.
        path: PathBuf,
        /// The `model_type` found.
        found: String,
        /// The supported `model_type` values.
        supported: Vec<&'static str>,
    },
    /// A tensor the config requires is absent from the checkpoint.
    #[error("{file}: missing tensor `{name}`")]
    MissingTensor {
        /// Tensor name.
        name: String,
        /// The checkpoint file where it was expected.
        file: PathBuf,
    },
    /// A tensor has the wrong shape for the config.
    #[error("{file}: tensor `{name}` has shape {found:?}, config.json implies {expected:?}")]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// The checkpoint file holding it.
        file: PathBuf,
        /// Shape implied by config.json.
        expected: Vec<usize>,
        /// Shape found in the file.
        found: Vec<usize>,
    },
    /// A checkpoint file is malformed.
    #[error("{path}: {message}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer failed to load, train or encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to compile or render.
    #[error("chat template: {0}")]
    Template(String),
    /// An option or argument is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// A GGUF file could not be imported (see [`crate::gguf`]).
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    /// A tensor operation failed (shape bug, unsupported dtype on a device, ...).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
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
