//! The crate's error type.
//!
//! Every user-facing failure (a bad file, a bad option, a checkpoint that does not match its
//! config or its run, a non-finite loss) is a variant of [`Error`], the one error type of the
//! crate (the library layers and the commands alike), so a file / line / field context reaches
//! the process exit as it was built; nothing in the library panics on user input.

use std::path::{Path, PathBuf};

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
    /// A weight is NaN or infinite, in the file or after the conversion to the model's dtype
    /// (`overflow`: a finite value outside that dtype's range).
    #[error("{}", non_finite_weight(name, file, index, *value, *overflow))]
    NonFiniteWeight {
        /// Tensor name.
        name: String,
        /// The checkpoint file holding it.
        file: PathBuf,
        /// Index of the first non-finite element.
        index: Vec<usize>,
        /// Its value (in the file).
        value: f64,
        /// The dtype it overflows on conversion, when the file's value is finite.
        overflow: Option<candle_core::DType>,
    },
    /// A computation would need more memory than the machine has: refused before allocating.
    #[error(
        "{what} needs at least {} of memory ({detail}), more than this machine's {}",
        crate::units::format_bytes(*bytes),
        crate::units::format_bytes(*limit)
    )]
    TooLarge {
        /// What was asked for.
        what: String,
        /// The bytes it needs (a lower bound).
        bytes: u128,
        /// What those bytes are.
        detail: String,
        /// The machine's memory.
        limit: u128,
    },
    /// The model produced a NaN or infinite number where a log-probability or a logit is
    /// written or sampled from: refused rather than written as `null` or sampled as garbage.
    #[error(
        "{what} is {value}: the model produced a non-finite number (NaN or infinite weights, or \
         an activation overflowing the dtype)"
    )]
    NonFiniteOutput {
        /// Which number (the caller adds the example's file and line).
        what: String,
        /// Its value.
        value: f64,
    },
    /// A token id has no row in the model's embedding (a tokenizer from another checkpoint).
    #[error(
        "token id {id} is outside the model's vocabulary of {vocab_size} (`vocab_size` in \
         config.json): the tokenizer does not belong to this checkpoint"
    )]
    TokenOutOfVocab {
        /// The id.
        id: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
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
    /// An option or argument is invalid (a bad command-line combination, an argument outside a
    /// function's domain: shapes, lengths, names).
    #[error("{0}")]
    InvalidArgument(String),
    /// A training option, or a combination of them, is invalid (named as given: `--beta -1: …`
    /// on the command line, `c.toml: beta = -1: …` in a file).
    #[error("invalid configuration: {0}")]
    Options(String),
    /// A file could not be parsed or written in its format (JSON, TOML, safetensors).
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A formula of the `difinfo` library rejected its input.
    #[error("difinfo: {0}")]
    Library(#[from] difinfo::Error),
    /// A non-finite loss or gradient while training: the run stops before the optimizer step,
    /// so the weights and the last checkpoint are those of the last good step.
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
    // A GGUF file that could not be imported ([`crate::gguf`]); each variant names the file.
    /// Not a readable GGUF file (bad magic, truncated header, a tensor past the end).
    #[error("{path}: not a valid GGUF file: {message}")]
    GgufMalformed {
        /// The file.
        path: PathBuf,
        /// What candle's reader or the import found.
        message: String,
    },
    /// A GGUF file's `general.architecture` names a model family the importer does not map.
    #[error("{path}: unsupported GGUF architecture `{found}`; supported: {}", supported.join(", "))]
    GgufUnsupportedArchitecture {
        /// The file.
        path: PathBuf,
        /// The architecture found.
        found: String,
        /// The architectures the importer maps (`gguf::SUPPORTED_ARCHITECTURES`).
        supported: &'static [&'static str],
    },
    /// A GGUF tensor is stored in a GGML type candle cannot dequantize.
    #[error("{path}: unsupported GGUF quantization: {detail}; supported: {}", supported.join(", "))]
    GgufUnsupportedQuantization {
        /// The file.
        path: PathBuf,
        /// The type found (and the tensor, when known).
        detail: String,
        /// The GGML types candle dequantizes (`gguf::SUPPORTED_QUANTIZATIONS`).
        supported: &'static [&'static str],
    },
    /// A GGUF metadata key the import needs is absent.
    #[error("{path}: missing GGUF metadata key `{key}`")]
    GgufMissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A GGUF metadata value has the wrong type or an impossible value.
    #[error("{path}: GGUF metadata `{key}`: {message}")]
    GgufBadKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// `tokenizer.ggml.pre` names a pre-tokenizer this importer does not know.
    #[error("{path}: unknown GGUF pre-tokenizer `tokenizer.ggml.pre = {found}`; known: {known}")]
    GgufUnknownPreTokenizer {
        /// The file.
        path: PathBuf,
        /// The name found.
        found: String,
        /// The pre-tokenizers the importer knows, comma-separated (`gguf::known_pre_tokenizers`).
        known: String,
    },
    /// `tokenizer.ggml.model` names a tokenizer model this importer does not rebuild.
    #[error("{path}: unsupported GGUF tokenizer model `tokenizer.ggml.model = {found}`; supported: gpt2 (byte-level BPE), llama (SentencePiece BPE)")]
    GgufUnsupportedTokenizer {
        /// The file.
        path: PathBuf,
        /// The model found.
        found: String,
    },
    /// A GGUF tensor is missing, unexpected or of the wrong shape for the metadata.
    #[error("{path}: tensor `{name}`: {message}")]
    GgufTensor {
        /// The file.
        path: PathBuf,
        /// The GGUF tensor name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Another process holds the run directory's lock ([`crate::train::run::RunLock`]): two
    /// runs writing one directory would interleave their metrics and checkpoints.
    #[error(
        "{}: in use by another run{} (lock file {}); wait for it to end, or choose another \
         --output-dir",
        dir.display(),
        pid.map_or_else(String::new, |p| format!(" (process {p})")),
        lock.display()
    )]
    RunLocked {
        /// The run directory.
        dir: PathBuf,
        /// The holder's process id, when it could be read.
        pid: Option<u32>,
        /// The lock file (`train::run::LOCK_FILE` in `dir`).
        lock: PathBuf,
    },
    /// A file a resumed run depends on differs from the one the run started with (its
    /// fingerprint in `run_args.json`), or is gone.
    #[error("--resume: {path} {what}; refusing to resume onto it")]
    ResumeChanged {
        /// The file.
        path: PathBuf,
        /// What changed (`changed since the run started (recorded in …)`, …).
        what: String,
    },
    /// A tensor operation failed (shape bug, unsupported dtype on a device, ...).
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The message of [`Error::NonFiniteWeight`].
fn non_finite_weight(
    name: &str,
    file: &std::path::Path,
    index: &[usize],
    value: f64,
    overflow: Option<candle_core::DType>,
) -> String {
    let at = format!("{}: tensor `{name}`", file.display());
    match overflow {
        None => format!(
            "{at} contains {value} at index {index:?}; refusing a checkpoint with non-finite \
             weights (they make every log-prob NaN)"
        ),
        Some(dt) => format!(
            "{at} holds {value} at index {index:?}, which overflows {} (infinite after the \
             conversion); load it with a wider --dtype (f32 or bf16)",
            format!("{dt:?}").to_lowercase()
        ),
    }
}

impl Error {
    /// The same error with a path under the directory `from` named under `to` instead: an
    /// error met while writing a temporary directory names the file the user will look for
    /// ([`crate::io::write_dir_atomic`]).
    pub fn relocated(mut self, from: &Path, to: &Path) -> Self {
        if let Error::Io { path, .. }
        | Error::Checkpoint { path, .. }
        | Error::Format { path, .. }
        | Error::Config { path, .. } = &mut self
        {
            if let Ok(rel) = path.strip_prefix(from) {
                *path = to.join(rel);
            }
        }
        self
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error on `path`.
    pub fn format(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::Format {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

thread_local! {
    /// Whether this thread is inside [`catch_panic`] (its panics are errors, not printed).
    static CONTAINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs third-party parsing code (the `parquet` crate's reader, candle's GGUF reader) so that
/// a panic inside it on a malformed file becomes `Err(message)` for the caller to turn into an
/// error naming the file. The panic is not printed: a process-wide hook, installed once,
/// stays silent for panics of a thread inside `catch_panic` and hands every other panic to the
/// hook it replaced, so other threads' panics still print as before.
///
/// # Errors
/// The panic's message (`"a panic without a message"` when its payload is not text).
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CONTAINED.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let outer = CONTAINED.with(|c| c.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(outer));
    r.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}
