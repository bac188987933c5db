//! The training options' range error ([`RangeError`]); every other failure is a variant of
//! the crate's one [`crate::Error`].

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

impl From<RangeError> for crate::Error {
    fn from(e: RangeError) -> Self {
        crate::Error::Options(e.to_string())
    }
}
