//! A directory of Parquet shards as one dataset: `*.parquet` in name order, rows counted across
//! the shards, errors naming the shard and its row.

use std::path::Path;

use super::invalid::Collector;
use super::opened::Opened;
use super::{file_error, parquet_rows, Loaded};
use crate::error::{DataError, Error, Result};

/// Whether `p`'s extension is `ext`, in any case (`.PARQUET` is Parquet).
fn has_extension(p: &Path, ext: &str) -> bool {
    p.extension().is_some_and(|x| x.eq_ignore_ascii_case(ext))
}

/// Reads a directory of Parquet shards (`*.parquet` in any case, in name order). A JSON Lines
/// file there (`*.jsonl`) is refused, named, rather than skipped in silence.
pub(super) fn read_shards<T>(
    path: &Path,
    skip_invalid: bool,
    parse: impl Fn(&str, &Path, usize) -> std::result::Result<T, DataError>,
) -> Result<Loaded<T>> {
    let refuse = |file: &Path, message: String| -> Error { file_error(file, 0, message).into() };
    let mut files = Vec::new();
    for e in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let p = e.map_err(|e| Error::io(path, e))?.path();
        if !p.is_file() {
            continue;
        }
        if has_extension(&p, "parquet") {
            files.push(p);
        } else if has_extension(&p, "jsonl") {
            return Err(refuse(
                &p,
                format!(
                    "a JSON Lines file in a dataset directory, which is read as Parquet shards \
                     (*.parquet) only; pass it as --data itself, or move it out of {}",
                    path.display()
                ),
            ));
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(refuse(
            path,
            "a dataset directory must hold Parquet shards (*.parquet); none found".into(),
        ));
    }
    let mut out = Collector::new(skip_invalid);
    let mut shards = Vec::new();
    let mut before = 0;
    for f in files {
        shards.push((f.clone(), before));
        let start = before;
        // Errors name the shard and its row; records count rows across shards.
        let on_row = &mut parquet_rows(&mut out, &parse, &f, start);
        before = Opened::open(&f)?.read_parquet(&f, start, on_row)?;
    }
    Ok(out.finish(shards))
}
