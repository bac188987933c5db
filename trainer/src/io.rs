//! The one way outputs are written: through a temporary sibling renamed into place
//! ([`write_atomic`]; [`write_bytes`], [`write_json`], [`write_jsonl`] over it; a directory
//! through [`write_dir_atomic`]), so a stopped command never leaves a half-written file. The
//! checks made before any work, on the paths themselves, are [`crate::outputs`]'.

use std::path::Path;

use crate::error::{Error, Result};

/// Writes `path` atomically: `write` fills a temporary sibling file, which is then renamed.
///
/// # Errors
/// I/O errors, and whatever `write` returns.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // A short name whatever the destination's (a legal 250-byte name stays within NAME_MAX),
    // with the destination's extension last (`.tmp-123-0.png`): writers that choose the
    // format by it (the PNG backend) see the real one.
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .filter(|e| e.len() <= 16)
        .map(|e| format!(".{e}"))
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".tmp-{}-{n}{ext}", std::process::id()));
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        // Name the destination the user gave, not the hidden temporary file.
        return Err(match e {
            Error::Io { path: p, source } if p == tmp => Error::io(path, source),
            e => e,
        });
    }
    // Some writers create 0600 files; outputs are ordinary files (0644 before the umask).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes the checkpoint directory `dir` as a whole or not at all: `write` fills a temporary
/// sibling directory, whose files are then renamed into `dir` (the directory itself when `dir`
/// does not exist yet). On an error (a full disk, a bad tensor) the temporary directory is
/// removed, `dir` keeps what it held before, and an I/O error names the file under `dir`, not
/// the temporary one.
///
/// # Errors
/// I/O errors, and whatever `write` returns.
pub fn write_dir_atomic<T>(dir: &Path, write: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let stage = dir.with_file_name(format!(".tmp-{}-{n}.d", std::process::id()));
    std::fs::create_dir(&stage).map_err(|e| Error::io(dir, e))?;
    let moved = write(&stage).and_then(|value| {
        if !dir.exists() {
            std::fs::rename(&stage, dir).map_err(|e| Error::io(dir, e))?;
            return Ok(value);
        }
        for entry in std::fs::read_dir(&stage).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let to = dir.join(entry.file_name());
            std::fs::rename(entry.path(), &to).map_err(|e| Error::io(&to, e))?;
        }
        std::fs::remove_dir(&stage).map_err(|e| Error::io(dir, e))?;
        Ok(value)
    });
    moved.map_err(|e| {
        let _ = std::fs::remove_dir_all(&stage);
        e.relocated(&stage, dir)
    })
}

/// Writes `rows` as JSON Lines (one value per line) to `path` atomically ([`write_atomic`]).
///
/// # Errors
/// I/O errors.
pub fn write_jsonl(path: &Path, rows: impl IntoIterator<Item = serde_json::Value>) -> Result<()> {
    write_jsonl_from(path, |emit| rows.into_iter().try_for_each(|r| emit(&r)))
}

/// Writes JSON Lines to `path` atomically ([`write_atomic`]) as `fill` produces them, one
/// `emit(row)` a line: rows reach the (temporary) file as they are made, so memory holds none
/// of them, and an error of `fill` leaves `path` as it was.
///
/// # Errors
/// I/O errors, and whatever `fill` returns.
pub fn write_jsonl_from(
    path: &Path,
    fill: impl FnOnce(&mut dyn FnMut(&serde_json::Value) -> Result<()>) -> Result<()>,
) -> Result<()> {
    use std::io::Write;
    write_atomic(path, |tmp| {
        let f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        let mut w = std::io::BufWriter::new(f);
        fill(&mut |r| writeln!(w, "{r}").map_err(|e| Error::io(tmp, e)))?;
        w.flush().map_err(|e| Error::io(tmp, e))
    })
}

/// Writes `value` as pretty-printed JSON, ending in a newline as Hugging Face's JSON files do,
/// to `path` atomically ([`write_atomic`]).
///
/// # Errors
/// I/O errors; a value that does not serialize.
pub fn write_json<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?
        + "\n";
    write_atomic(path, |tmp| {
        std::fs::write(tmp, text).map_err(|e| Error::io(tmp, e))
    })
}

/// Writes `bytes` to `path` atomically ([`write_atomic`]).
///
/// # Errors
/// I/O errors naming `path`.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Copies file `src` to `dst` atomically ([`write_bytes`]): a failure to read names `src`,
/// a failure to write (a full disk) names `dst`, never the input.
///
/// # Errors
/// I/O errors naming the file at fault.
pub fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
    write_bytes(dst, &bytes)
}

/// SHA-256 of a file, in lower-case hex (read in 1 MiB blocks).
///
/// # Errors
/// I/O errors naming the file.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
