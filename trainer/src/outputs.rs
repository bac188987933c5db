//! Output paths, checked before any work: an output never replaces an input (compared as
//! files, whatever the spelling: `a/../b`, a hard link and a symbolic link name the same file),
//! two outputs never share a file, and each destination can be written (its directory exists
//! and is writable, and it is not itself a directory). The commands call
//! [`check_outputs`] first, so a bad path costs nothing and the message names the option and
//! the path the user gave, never a temporary file. Writing itself is [`crate::io`]'s.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::hf_dir::{checkpoint_inputs, WEIGHTS_INDEX_FILE};

/// A path given for a named option (`("--out", path)`).
pub type Named<'a> = (&'a str, &'a Path);

/// Whether `a` and `b` are one existing file (same device and inode on Unix; the same
/// canonical path elsewhere). A path that does not exist is no file.
pub fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        ma.dev() == mb.dev() && ma.ino() == mb.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = (ma, mb);
        matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
    }
}

/// Where a file written at `p` ends up: its directory canonicalized, joined with its name
/// (`p` itself canonicalized when it exists). Two outputs collide when these are equal.
fn destination(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Some(c);
    }
    let name = p.file_name()?;
    let parent = parent_dir(p).canonicalize().ok()?;
    Some(parent.join(name))
}

/// The directory a file path lives in (`.` for a bare name).
fn parent_dir(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Whether a file can be created in directory `dir`: creates and removes a probe file (the
/// one test that honors permissions, ACLs and read-only mounts alike).
fn probe_writable(dir: &Path) -> std::io::Result<()> {
    // Unique per call: two threads probing one directory must not collide (EEXIST).
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = dir.join(format!(".difinfo-write-probe-{}-{n}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

/// The longest file name most file systems take (Linux's `NAME_MAX`), in bytes.
pub const NAME_MAX: usize = 255;

/// Checks that the file output `path` of option `option` can be written: not a directory,
/// not a symbolic link (the rename that writes it would replace the link, not its target),
/// not a device, pipe or socket (`/dev/full`, `/dev/stdout`: a rename cannot write them), a
/// name within [`NAME_MAX`], its directory exists and is writable.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the option and the path.
pub fn check_destination(option: &str, path: &Path) -> Result<()> {
    let bad = |why: String| {
        Err(Error::InvalidArgument(format!(
            "{option} {}: {why}",
            path.display()
        )))
    };
    if path.is_dir() {
        return bad("is a directory; give a file name".into());
    }
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if md.file_type().is_symlink() {
            let to = std::fs::read_link(path)
                .map(|t| format!(" (to {})", t.display()))
                .unwrap_or_default();
            return bad(format!(
                "is a symbolic link{to}: the output is written to a new file renamed into \
                 place, which would replace the link, not its target; give the target's path"
            ));
        }
        if !md.is_file() {
            return bad(
                "is not a regular file (a device, pipe or socket): outputs are written to a \
                 new file renamed into place; give a file path"
                    .into(),
            );
        }
    }
    if path.file_name().is_some_and(|n| n.len() > NAME_MAX) {
        return bad(format!(
            "the file name is {} bytes, longer than the {NAME_MAX} a file system takes",
            path.file_name().map_or(0, |n| n.len())
        ));
    }
    let dir = parent_dir(path);
    if !dir.exists() {
        return bad(format!("directory {} does not exist", dir.display()));
    }
    if !dir.is_dir() {
        return bad(format!("{} is not a directory", dir.display()));
    }
    if let Err(e) = probe_writable(dir) {
        return bad(format!("cannot write in directory {}: {e}", dir.display()));
    }
    Ok(())
}

/// Checks that the output directory `dir` of option `option` can be used: an existing one is
/// a writable directory; a missing one can be created (its nearest existing ancestor is a
/// writable directory). Creates nothing.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the option and the path.
pub fn check_output_dir(option: &str, dir: &Path) -> Result<()> {
    let bad = |why: String| {
        Err(Error::InvalidArgument(format!(
            "{option} {}: {why}",
            dir.display()
        )))
    };
    let mut at = dir;
    loop {
        if at.exists() {
            break;
        }
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => {
                at = Path::new(".");
                break;
            }
        }
    }
    if !at.is_dir() {
        return bad(format!("{} exists and is not a directory", at.display()));
    }
    if let Err(e) = probe_writable(at) {
        return bad(format!("cannot write in directory {}: {e}", at.display()));
    }
    Ok(())
}

/// The one check of every command that writes a checkpoint directory (`init`, `convert`,
/// `merge`), before any work: the directory `dir` of option `option` can be created or
/// written ([`check_output_dir`]), it is none of the command's `inputs` (a directory or file
/// given for another option, compared as files: `merge --model B --out B` would replace its
/// own base model), and it is empty unless `overwrite`. Creates and removes nothing.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the option, the path and, for an input, its option.
pub fn check_checkpoint_dir(
    option: &str,
    dir: &Path,
    overwrite: bool,
    inputs: &[Named<'_>],
) -> Result<()> {
    check_output_dir(option, dir)?;
    if let Some((o, p)) = inputs.iter().find(|(_, p)| same_file(dir, p)) {
        return Err(Error::InvalidArgument(format!(
            "{option} {} is {o} {}: writing the checkpoint there would replace that input; \
             choose another {option}",
            dir.display(),
            p.display()
        )));
    }
    if dir.exists() && !dir.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{option} {}: exists and is not a directory",
            dir.display()
        )));
    }
    let names = dir_entries(dir)?;
    if !names.is_empty() && !overwrite {
        let mut shown = names.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
        if names.len() > 4 {
            shown.push_str(", …");
        }
        return Err(Error::InvalidArgument(format!(
            "{option} {} is not empty ({shown}): choose another {option}, or pass --overwrite \
             to replace the checkpoint there",
            dir.display()
        )));
    }
    Ok(())
}

/// The sorted file names in `dir` (none when it does not exist).
pub fn dir_entries(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(dir, e)),
    };
    names.sort();
    Ok(names)
}

/// Files of a checkpoint (or of a training checkpoint) that a command writing a checkpoint
/// directory may not write itself: left beside new weights they would be read as theirs (a
/// sharded index, a chat template that overrides the new tokenizer's, an optimizer state, a
/// trainer state). [`prepare_checkpoint_dir`] removes them with `--overwrite`.
const STALE_FILES: [&str; 7] = [
    WEIGHTS_INDEX_FILE,
    "chat_template.jinja",
    "special_tokens_map.json",
    "optimizer.safetensors",
    "trainer_state.json",
    "train_config.json",
    "checksums.sha256",
];

/// Readies a checkpoint directory that passed [`check_checkpoint_dir`] (its `overwrite` the
/// same): with `overwrite`, removes the checkpoint files there that a new checkpoint would
/// not replace (its shards, optimizer and trainer state, …; other files stay). Returns the
/// files removed.
///
/// # Errors
/// [`check_checkpoint_dir`]'s; I/O errors.
pub fn prepare_checkpoint_dir(option: &str, dir: &Path, overwrite: bool) -> Result<Vec<PathBuf>> {
    check_checkpoint_dir(option, dir, overwrite, &[])?;
    let mut removed = Vec::new();
    for name in dir_entries(dir)? {
        let stale = STALE_FILES.contains(&name.as_str())
            || (name.starts_with("model-") && name.ends_with(".safetensors"));
        if stale {
            let p = dir.join(name);
            std::fs::remove_file(&p).map_err(|e| Error::io(&p, e))?;
            removed.push(p);
        }
    }
    Ok(removed)
}

/// A file a command reads, and how to name it in a message (`--data d.jsonl`, or
/// `m/config.json of --model m`).
#[derive(Debug, Clone)]
pub struct Input {
    /// The message's words for it.
    pub what: String,
    /// The file.
    pub path: PathBuf,
}

/// The inputs of a command: each plain file under its option, and each file of each
/// checkpoint directory ([`checkpoint_inputs`]) under the directory's option.
pub fn inputs(files: &[Named<'_>], checkpoints: &[Named<'_>]) -> Vec<Input> {
    let mut v: Vec<Input> = files
        .iter()
        .map(|&(o, p)| Input {
            what: format!("{o} {}", p.display()),
            path: p.to_path_buf(),
        })
        .collect();
    for &(o, d) in checkpoints {
        v.extend(checkpoint_inputs(d).into_iter().map(|p| Input {
            what: format!("{} of {o} {}", p.display(), d.display()),
            path: p,
        }));
    }
    v
}

/// The checks every command runs before its work: each output's destination can be written
/// ([`check_destination`]), no two outputs are one file, and no output is an input
/// ([`same_file`]).
///
/// # Errors
/// [`Error::InvalidArgument`] naming both options and paths.
pub fn check_outputs(outputs: &[Named<'_>], inputs: &[Input]) -> Result<()> {
    for (i, &(oa, a)) in outputs.iter().enumerate() {
        for &(ob, b) in &outputs[..i] {
            if destination(a).is_some() && destination(a) == destination(b) {
                return Err(Error::InvalidArgument(format!(
                    "{ob} {} and {oa} {} are the same file: one output would replace the other",
                    b.display(),
                    a.display()
                )));
            }
        }
        if let Some(input) = inputs.iter().find(|x| same_file(a, &x.path)) {
            return Err(Error::InvalidArgument(format!(
                "{oa} {} is the same file as {}: writing it would destroy the input; choose another {oa}",
                a.display(),
                input.what
            )));
        }
        check_destination(oa, a)?;
    }
    Ok(())
}

/// Checks that none of the files a command writes under fixed names (`written`, e.g. a run's
/// `metrics.jsonl` in its `--output-dir`) is one of its `inputs`.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the input and the file that would replace it.
pub fn check_written_files(written: &[PathBuf], inputs: &[Input]) -> Result<()> {
    for w in written {
        if let Some(input) = inputs.iter().find(|x| same_file(w, &x.path)) {
            return Err(Error::InvalidArgument(format!(
                "{} is {}, a file this command writes: copy it elsewhere first",
                input.what,
                w.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_file_sees_through_spellings_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        std::fs::write(&a, "x").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert!(same_file(&a, &dir.path().join("sub/../a.txt")));
        std::fs::hard_link(&a, dir.path().join("h.txt")).unwrap();
        assert!(same_file(&a, &dir.path().join("h.txt")));
        let b = dir.path().join("b.txt");
        std::fs::write(&b, "x").unwrap();
        assert!(!same_file(&a, &b));
        assert!(!same_file(&a, &dir.path().join("missing")));
    }

    #[test]
    fn outputs_are_checked_against_inputs_and_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d.jsonl");
        std::fs::write(&d, "{}\n").unwrap();
        let o = dir.path().join("o.jsonl");
        let e = check_outputs(&[("--out", &d)], &inputs(&[("--data", &d)], &[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--out") && e.contains("--data"), "{e}");
        let o2 = dir.path().join("sub/../o.jsonl");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let e = check_outputs(&[("--out", &o), ("--error-report", &o2)], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--out") && e.contains("--error-report"), "{e}");
        check_outputs(&[("--out", &o)], &inputs(&[("--data", &d)], &[])).unwrap();
        let e = check_outputs(&[("--out", dir.path())], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a directory"), "{e}");
        let deep = dir.path().join("x/y/o.jsonl");
        let e = check_outputs(&[("--out", &deep)], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        check_output_dir("--output-dir", &dir.path().join("x/y")).unwrap();
        let e = check_output_dir("--output-dir", &d.join("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a directory"), "{e}");
    }
}
