//! Parquet files as records: the `parquet` crate's row reader, run so that a malformed file
//! is an error naming it (never a panic), and each row turned into JSON text for the parse
//! functions of [`crate::records`].
//!
//! Values become JSON as `datasets` reads them for text: strings (`UTF8` / `String`) and
//! binary columns (`BYTE_ARRAY` without the annotation: pyarrow's `binary`, older Spark and
//! Hive writers) are text, decoded as UTF-8; numbers and booleans stay numbers and booleans;
//! lists and structs become arrays and objects. A value with no text form (a date, time,
//! timestamp, decimal, map, or bytes that are not UTF-8) becomes a placeholder number, and a
//! parse error on its column is restated as what the column holds
//! ([`ParquetRow::explain`]), so such a column is refused where text is expected and ignored
//! elsewhere.

use std::path::Path;
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::file::metadata::ParquetMetaData;
use parquet::file::reader::{ChunkReader, FileReader, Length, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::{Map, Value};

use crate::error::{catch_panic, DataError, Result};

mod thrift;

/// One row: its JSON text, and the top-level columns of this row whose value has no text
/// form, with what they hold.
pub(crate) struct ParquetRow {
    /// The row as a JSON object, null fields left out.
    pub text: String,
    opaque: Vec<(String, String)>,
}

impl ParquetRow {
    /// `e` (a parse error of this row) restated when its field lies in a column whose value
    /// has no text form: the parser saw a placeholder number there; the user is told what
    /// the column holds.
    pub fn explain(&self, mut e: DataError) -> DataError {
        let root = e
            .field
            .as_deref()
            .map(|f| f.split(['[', '.']).next().unwrap_or(f));
        if let Some((_, why)) = self.opaque.iter().find(|(c, _)| Some(c.as_str()) == root) {
            e.message = format!("{why}, not text");
        }
        e
    }
}

/// Reads the rows of a Parquet file (`src`, `len` bytes, named `path` in errors) with
/// `on_row(row, row)`, `row` counting from `first + 1`; returns the last row number.
///
/// # Errors
/// A file that is not valid Parquet, whose metadata claims bytes past its end, that uses a
/// codec this build cannot read, or on which the `parquet` crate panics: a [`DataError`]
/// naming the file (and the row being read); `on_row`'s errors.
pub(crate) fn read_parquet<R: ChunkReader + 'static>(
    src: R,
    len: u64,
    path: &Path,
    first: usize,
    on_row: &mut dyn FnMut(usize, &ParquetRow) -> Result<()>,
) -> Result<usize> {
    let bad = |row: usize, message: String| DataError {
        file: path.to_path_buf(),
        line: row,
        field: None,
        message: format!("not a readable Parquet file: {message}"),
    };
    let panicked = |m: String| format!("the Parquet reader failed on it ({m})");
    check_footer(&src, len).map_err(|m| bad(0, m))?;
    let src = Shared(Arc::new(src));
    let reader = catch_panic(|| SerializedFileReader::new(src.clone()))
        .map_err(|m| bad(0, panicked(m)))?
        .map_err(|e| bad(0, e.to_string()))?;
    check_claims(reader.metadata(), len).map_err(|m| bad(0, m))?;
    check_pages(&src, reader.metadata(), path)?;
    let mut rows = catch_panic(|| reader.get_row_iter(None))
        .map_err(|m| bad(0, panicked(m)))?
        .map_err(|e| bad(0, e.to_string()))?;
    let mut row = first;
    loop {
        let next = catch_panic(|| rows.next()).map_err(|m| bad(row + 1 - first, panicked(m)))?;
        let Some(r) = next else { break };
        row += 1;
        let r = r.map_err(|e| bad(row - first, e.to_string()))?;
        on_row(row, &to_json(&r))?;
    }
    Ok(row)
}

/// The footer (the Thrift `FileMetaData` before the last 8 bytes: its length, little-endian
/// u32, and `PAR1`) checked by [`thrift::check_footer`] before the crate decodes it: the
/// crate allocates from the counts there before reading the elements. A file too short for
/// a footer, without the magic or with a length past its start is left to the crate's own
/// error.
fn check_footer<R: ChunkReader>(src: &R, len: u64) -> std::result::Result<(), String> {
    let Some(start) = len.checked_sub(8) else {
        return Ok(());
    };
    let Ok(tail) = src.get_bytes(start, 8) else {
        return Ok(());
    };
    if tail[4..] != super::PARQUET_MAGIC[..] {
        return Ok(());
    }
    let n = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if n > start {
        return Ok(());
    }
    let footer = src
        .get_bytes(start - n, n as usize)
        .map_err(|e| e.to_string())?;
    thrift::check_footer(&footer)
}

/// A chunk reader shared between the `parquet` crate's reader and [`check_pages`].
struct Shared<R>(Arc<R>);

impl<R> Clone for Shared<R> {
    fn clone(&self) -> Self {
        Shared(Arc::clone(&self.0))
    }
}

impl<R: Length> Length for Shared<R> {
    fn len(&self) -> u64 {
        self.0.len()
    }
}

impl<R: ChunkReader> ChunkReader for Shared<R> {
    type T = R::T;

    fn get_read(&self, start: u64) -> parquet::errors::Result<R::T> {
        self.0.get_read(start)
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        self.0.get_bytes(start, length)
    }
}

/// The first read of a page header: enough for any header without long statistics.
const HEADER_WINDOW: u64 = 4096;

/// What the pages claim, checked before the crate reads them (it allocates from these
/// numbers first): every page header of every column chunk (at the chunk's first page, then
/// each header followed by its page, as the crate walks them) walked by
/// [`thrift::page_header`] within the chunk; a page's decompressed size (reserved before
/// decompressing) and a dictionary's values (a vector of that many values, of at least
/// [`DICTIONARY_VALUE`] bytes each, made before one is decoded; a dictionary value takes at
/// least a bit of the page) within the machine's memory; and the rows the row groups declare,
/// each held as a record or its error (at least a [`DataError`]'s bytes), within it too.
///
/// # Errors
/// A [`DataError`] naming the file, row group, column and page; [`crate::Error::TooLarge`]
/// for the memory bounds.
fn check_pages<R: ChunkReader>(src: &R, md: &ParquetMetaData, path: &Path) -> Result<()> {
    let bad = |message: String| DataError {
        file: path.to_path_buf(),
        line: 0,
        field: None,
        message: format!("not a readable Parquet file: {message}"),
    };
    let rows: u128 = md.row_groups().iter().map(|g| g.num_rows() as u128).sum();
    crate::memory::check_memory(
        || format!("reading the {rows} rows that {} declares", path.display()),
        rows * std::mem::size_of::<DataError>() as u128,
        || {
            format!(
                "each row is held as a record or its error, at least {} bytes",
                std::mem::size_of::<DataError>()
            )
        },
    )?;
    for (g, rg) in md.row_groups().iter().enumerate() {
        for c in rg.columns() {
            let col = c.column_path().string();
            let at = |page: usize| format!("row group {g}, column `{col}`, page {page}");
            // check_claims made these non-negative and within the file.
            let mut offset = c.dictionary_page_offset().unwrap_or(c.data_page_offset()) as u64;
            let mut left = c.compressed_size() as u64;
            let mut page = 0;
            while left > 0 {
                let mut window = left.min(HEADER_WINDOW);
                let h = loop {
                    let buf = src
                        .get_bytes(offset, window as usize)
                        .map_err(|e| bad(format!("{}: {e}", at(page))))?;
                    match thrift::page_header(&buf, left) {
                        Ok(h) => break h,
                        Err(thrift::Fault::Eof) if window < left => {
                            window = left.min(window.saturating_mul(4));
                        }
                        Err(thrift::Fault::Eof) => {
                            return Err(bad(format!(
                                "{}: the page header runs past the column chunk",
                                at(page)
                            ))
                            .into())
                        }
                        Err(thrift::Fault::Bad(m)) => {
                            return Err(
                                bad(format!("{}: the page header holds {m}", at(page))).into()
                            )
                        }
                    }
                };
                let after = left - h.len as u64;
                if h.compressed < 0 || h.compressed as u64 > after || h.uncompressed < 0 {
                    return Err(bad(format!(
                        "{}: a page of {} bytes ({} decompressed) where {after} bytes of the \
                         column chunk remain",
                        at(page),
                        h.compressed,
                        h.uncompressed
                    ))
                    .into());
                }
                crate::memory::check_memory(
                    || format!("{}: {}", path.display(), at(page)),
                    h.uncompressed as u128,
                    || "its decompressed size".into(),
                )?;
                if h.kind == DICTIONARY_PAGE {
                    if h.num_values < 0 || h.num_values as u128 > 8 * h.uncompressed as u128 {
                        return Err(bad(format!(
                            "{}: a dictionary of {} values in {} bytes",
                            at(page),
                            h.num_values,
                            h.uncompressed
                        ))
                        .into());
                    }
                    crate::memory::check_memory(
                        || format!("{}: {}", path.display(), at(page)),
                        h.num_values as u128 * DICTIONARY_VALUE as u128,
                        || format!("a dictionary of {} values", h.num_values),
                    )?;
                }
                offset += h.len as u64 + h.compressed as u64;
                left = after - h.compressed as u64;
                page += 1;
            }
        }
    }
    Ok(())
}

/// Thrift `PageType` of a dictionary page.
const DICTIONARY_PAGE: i64 = 2;

/// The bytes of the largest value type the crate builds a dictionary of (a byte array).
const DICTIONARY_VALUE: usize = {
    let a = std::mem::size_of::<parquet::data_type::ByteArray>();
    let b = std::mem::size_of::<parquet::data_type::FixedLenByteArray>();
    if a > b {
        a
    } else {
        b
    }
};

/// What the metadata claims, checked before a page is read: every column chunk lies within
/// the file's `len` bytes, row counts are not negative, and every codec is one this build
/// reads (all but LZO, which no current writer uses).
fn check_claims(md: &ParquetMetaData, len: u64) -> std::result::Result<(), String> {
    for (g, rg) in md.row_groups().iter().enumerate() {
        if rg.num_rows() < 0 {
            return Err(format!("row group {g} claims {} rows", rg.num_rows()));
        }
        for c in rg.columns() {
            let col = c.column_path().string();
            let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
            let size = c.compressed_size();
            let end = start.checked_add(size);
            if start < 0 || size < 0 || end.is_none_or(|e| e as u64 > len) {
                return Err(format!(
                    "row group {g}, column `{col}` claims bytes {start}..{} of a file of {len} bytes",
                    end.map_or_else(|| "overflow".into(), |e| e.to_string())
                ));
            }
            if c.num_values() < 0 {
                return Err(format!(
                    "row group {g}, column `{col}` claims {} values",
                    c.num_values()
                ));
            }
            if c.compression() == Compression::LZO {
                return Err(format!(
                    "column `{col}` is compressed with LZO, which this reader does not support \
                     (it reads uncompressed, snappy, gzip, brotli, lz4, lz4_raw and zstd); \
                     rewrite the file with another codec"
                ));
            }
        }
    }
    Ok(())
}

/// A row as JSON text without its null fields (a null column is a field the record lacks:
/// `datasets` fills absent fields with null).
fn to_json(r: &Row) -> ParquetRow {
    let mut opaque = Vec::new();
    let mut o = Map::new();
    for (name, f) in r.get_column_iter() {
        let mut why = None;
        let v = field_json(f, name, &mut why);
        if let Some(w) = why {
            opaque.push((name.clone(), w));
        }
        if !v.is_null() {
            o.insert(name.clone(), v);
        }
    }
    ParquetRow {
        text: Value::Object(o).to_string(),
        opaque,
    }
}

/// One value as JSON (at `at`, the field's path as the parse errors write it); a value with
/// no text form becomes the placeholder `0` and, for the first such value, `why` says what it
/// is.
fn field_json(f: &Field, at: &str, why: &mut Option<String>) -> Value {
    let mut opaque = |what: String| {
        why.get_or_insert_with(|| match at.find(['[', '.']) {
            Some(_) => format!("holds {what} at `{at}`"),
            None => format!("holds {what}"),
        });
        Value::from(0)
    };
    match f {
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(e) => opaque(format!(
                "binary data that is not valid UTF-8 (at byte {})",
                e.valid_up_to()
            )),
        },
        Field::Date(_) => opaque("a Parquet DATE".into()),
        Field::TimeMillis(_) | Field::TimeMicros(_) => opaque("a Parquet TIME".into()),
        Field::TimestampMillis(_) | Field::TimestampMicros(_) => {
            opaque("a Parquet TIMESTAMP".into())
        }
        Field::Decimal(_) => opaque("a Parquet DECIMAL".into()),
        Field::MapInternal(_) => opaque("a Parquet MAP".into()),
        Field::Group(row) => Value::Object(
            row.get_column_iter()
                .map(|(k, v)| (k.clone(), field_json(v, &format!("{at}.{k}"), why)))
                .collect(),
        ),
        Field::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .enumerate()
                .map(|(i, v)| field_json(v, &format!("{at}[{i}]"), why))
                .collect(),
        ),
        // Null, booleans and numbers as the crate writes them.
        other => other.to_json_value(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;

    /// One UTF-8 column `prompt` of two rows.
    fn small_file() -> Vec<u8> {
        let schema = Arc::new(
            parquet::schema::parser::parse_message_type(
                "message m { required binary prompt (UTF8); }",
            )
            .unwrap(),
        );
        let props = Arc::new(WriterProperties::builder().build());
        let mut w = SerializedFileWriter::new(Vec::new(), schema, props).unwrap();
        let mut rg = w.next_row_group().unwrap();
        let mut c = rg.next_column().unwrap().unwrap();
        let v = [ByteArray::from("a"), ByteArray::from("b")];
        c.typed::<ByteArrayType>()
            .write_batch(&v, None, None)
            .unwrap();
        c.close().unwrap();
        rg.close().unwrap();
        w.into_inner().unwrap()
    }

    #[test]
    fn column_chunks_past_the_end_are_refused_before_reading() {
        let bytes = bytes::Bytes::from(small_file());
        let len = bytes.len() as u64;
        let reader = SerializedFileReader::new(bytes).unwrap();
        assert!(check_claims(reader.metadata(), len).is_ok());
        let e = check_claims(reader.metadata(), 10).unwrap_err();
        assert!(
            e.contains("column `prompt` claims bytes 4..") && e.contains("of a file of 10 bytes"),
            "{e}"
        );
    }
}
