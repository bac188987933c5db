//! The training core's error type.
//!
//! Every failure a user can cause (a bad option, a missing checkpoint, a non-finite loss) is a
//! variant of [`TrainError`]; nothing here panics on user input.

use std::path::PathBuf;

/// Result alias used throughout the training core.
pub type Result<T> = std::result::Result<T, TrainError>;

/// Everything that can go wrong while training.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A formula of the `difinfo` library rejected its input.
    #[error("difinfo: {0}")]
    Library(#[from] difinfo::Error),
    /// An I/O operation on a named path failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file could not be parsed or written in its format (JSON, TOML, safetensors).
    #[error("{}: {message}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An invalid option or combination of options.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An argument outside the function's domain (shapes, lengths, names).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A checkpoint that does not match the model or the run.
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What does not match.
        message: String,
    },
    /// A non-finite loss or gradient: the run stops before the optimizer step, so the weights
    /// and the last checkpoint are those of the last good step.
    #[error(
        "non-finite {what} at step {step}, batch {batch} (epoch {epoch}, examples {examples:?}); \
         the run stopped without saving; last good checkpoint: {}",
        last_checkpoint.as_ref().map_or_else(|| "none".to_string(), |p| p.display().to_string())
    )]
    NonFinite {
        /// `loss` or `gradient norm` (and its value).
        what: String,
        /// The optimizer step being computed (1-based, as logged).
        step: usize,
        /// The micro-batch's index within its epoch (0-based).
        batch: usize,
        /// The epoch (0-based).
        epoch: usize,
        /// The dataset indices of the micro-batch's examples.
        examples: Vec<usize>,
        /// The last checkpoint written, kept intact.
        last_checkpoint: Option<PathBuf>,
    },
}

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error on `path`.
    pub fn format(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::Format {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

/// A numeric option outside its range: the option (its `TrainConfig` / TOML field name), its
/// value and the range it must lie in. Shown as `field = value: requirement`; the command
/// line and config-file readers name where the value came from instead
/// ([`crate::train::config::merge_onto`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeError {
    /// The field (`adam_beta1`); on the command line `--adam-beta1`.
    pub field: &'static str,
    /// The value given, as written back.
    pub value: String,
    /// What it must satisfy (`must lie in [0, 1) (PyTorch's AdamW)`).
    pub requirement: String,
}

impl RangeError {
    /// `field`'s value `value` fails `requirement`. The value is written as a user would
    /// type it (`1e-300`, not three hundred zeros).
    pub fn new(field: &'static str, value: f64, requirement: &str) -> Self {
        let value = if value != 0.0 && value.is_finite() && !(1e-4..1e16).contains(&value.abs()) {
            format!("{value:e}")
        } else {
            value.to_string()
        };
        Self {
            field,
            value,
            requirement: requirement.to_string(),
        }
    }

    /// The command-line spelling of the field (`--adam-beta1`).
    pub fn flag(&self) -> String {
        format!("--{}", self.field.replace('_', "-"))
    }
}

impl std::fmt::Display for RangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = {}: {}", self.field, self.value, self.requirement)
    }
}

impl From<RangeError> for TrainError {
    fn from(e: RangeError) -> Self {
        TrainError::Config(e.to_string())
    }
}
