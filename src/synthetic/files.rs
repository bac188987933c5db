//! How the experiments' files reach the disk: every file is written to a temporary name in its
//! folder, then renamed into place, so a reader never sees half a file. Tables and records
//! ([`super::output`]) and figures ([`super::plot`]) both write through here.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::SynthError;

/// Write `bytes` to `path` through a temporary file in the same folder and a rename.
///
/// # Errors
/// [`SynthError::Io`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SynthError> {
    let tmp = temp_path(path);
    let mut f = fs::File::create(&tmp).map_err(|e| SynthError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| SynthError::io(&tmp, e))?;
    f.sync_all().map_err(|e| SynthError::io(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| SynthError::io(path, e))
}

/// `.<file stem>.tmp.<extension>` beside `path` (the extension is kept: the PNG encoder picks
/// the format from it).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) => (s.to_string(), format!(".{e}")),
        None => (name.clone(), String::new()),
    };
    path.with_file_name(format!(".{stem}.tmp{ext}"))
}

/// Pretty JSON, written atomically.
///
/// # Errors
/// [`SynthError::Io`].
pub fn write_json(path: &Path, v: &Value) -> Result<(), SynthError> {
    let mut s = serde_json::to_string_pretty(v).expect("JSON values serialize");
    s.push('\n');
    write_atomic(path, s.as_bytes())
}
