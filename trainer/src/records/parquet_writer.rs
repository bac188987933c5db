//! Preference pairs written as Parquet, laid out as `datasets` (pyarrow) writes TRL's
//! preference format: `prompt`, `chosen`, `rejected` as strings (standard format) or as lists
//! of `{content, role}` structs (conversational format), and, when given, the float columns
//! `score_chosen` and `score_rejected` (as in `HuggingFaceH4/ultrafeedback_binarized`).
//!
//! The schema, for conversational pairs (strings: `optional binary prompt (STRING)` each):
//!
//! ```text
//! message schema {
//!   optional group prompt (LIST) {
//!     repeated group list {
//!       optional group element { optional binary content (STRING); optional binary role (STRING); }
//!     }
//!   }
//!   … chosen, rejected alike …
//!   optional double score_chosen;
//!   optional double score_rejected;
//! }
//! ```
//!
//! Written with the `parquet` crate's column writers (snappy pages, pyarrow's default), in
//! row groups of [`ROWS_PER_GROUP`] rows, to a temporary file renamed into place.

use std::path::Path;
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, DoubleType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;

use super::{PreferenceExample, Text};
use crate::error::{Error, Result};

/// Rows per row group: a reader holds one group's pages at a time.
pub const ROWS_PER_GROUP: usize = 10_000;

/// The three text columns of a preference row, in schema order.
const TEXT_COLUMNS: [&str; 3] = ["prompt", "chosen", "rejected"];

/// Writes `pairs` (all standard or all conversational) to `path` as Parquet, atomically;
/// `scores`, when given, holds each pair's `[score_chosen, score_rejected]`.
///
/// # Errors
/// Pairs that mix the two formats, or a side whose kind differs from its prompt's (the
/// message is about the pair's index); `scores` of another length; I/O and encoding errors
/// naming `path`.
pub fn write_preferences_parquet(
    path: &Path,
    pairs: &[PreferenceExample],
    scores: Option<&[[f64; 2]]>,
) -> Result<()> {
    let chat = pairs.first().is_some_and(|p| p.prompt.is_chat());
    for (i, p) in pairs.iter().enumerate() {
        if [&p.prompt, &p.chosen, &p.rejected]
            .iter()
            .any(|t| t.is_chat() != chat)
        {
            return Err(Error::InvalidArgument(format!(
                "{}: pair {i} is not in the format of pair 0 (a Parquet column holds strings \
                 or message lists, not both)",
                path.display()
            )));
        }
    }
    if let Some(s) = scores {
        if s.len() != pairs.len() {
            return Err(Error::InvalidArgument(format!(
                "{}: {} scores for {} pairs",
                path.display(),
                s.len(),
                pairs.len()
            )));
        }
    }
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(&schema_text(chat, scores.is_some()))
            .map_err(|e| encoding(path, e))?,
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    crate::io::write_atomic(path, |tmp| {
        let f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        let mut w = SerializedFileWriter::new(std::io::BufWriter::new(f), schema, props)
            .map_err(|e| encoding(path, e))?;
        for (g, group) in pairs.chunks(ROWS_PER_GROUP).enumerate() {
            let first = g * ROWS_PER_GROUP;
            let scores = scores.map(|s| &s[first..first + group.len()]);
            write_group(&mut w, group, scores, chat).map_err(|e| encoding(path, e))?;
        }
        // `into_inner` writes the footer and hands back the buffered file.
        let inner = w.into_inner().map_err(|e| encoding(path, e))?;
        inner
            .into_inner()
            .map_err(|e| Error::io(tmp, e.into_error()))?
            .sync_all()
            .map_err(|e| Error::io(tmp, e))
    })
}

/// The schema in Parquet's message syntax (see the module's doc).
fn schema_text(chat: bool, scores: bool) -> String {
    let column = |name: &str| {
        if chat {
            format!(
                "optional group {name} (LIST) {{ repeated group list {{ optional group element {{ \
                 optional binary content (STRING); optional binary role (STRING); }} }} }}"
            )
        } else {
            format!("optional binary {name} (STRING);")
        }
    };
    let mut s = String::from("message schema {\n");
    for name in TEXT_COLUMNS {
        s += &column(name);
        s.push('\n');
    }
    if scores {
        s += "optional double score_chosen;\noptional double score_rejected;\n";
    }
    s + "}"
}

/// One row group: the text columns' leaves in schema order, then the scores.
fn write_group<W: std::io::Write + Send>(
    w: &mut SerializedFileWriter<W>,
    pairs: &[PreferenceExample],
    scores: Option<&[[f64; 2]]>,
    chat: bool,
) -> parquet::errors::Result<()> {
    let mut rg = w.next_row_group()?;
    let side = |p: &PreferenceExample, c: usize| match c {
        0 => p.prompt.clone(),
        1 => p.chosen.clone(),
        _ => p.rejected.clone(),
    };
    for c in 0..TEXT_COLUMNS.len() {
        let texts: Vec<Text> = pairs.iter().map(|p| side(p, c)).collect();
        let leaves: &[fn(&crate::template::Message) -> &str] = if chat {
            &[|m| &m.content, |m| &m.role]
        } else {
            &[|_| ""]
        };
        for leaf in leaves {
            let (values, def, rep) = leaf_levels(&texts, *leaf);
            let mut col = rg
                .next_column()?
                .ok_or_else(|| parquet::errors::ParquetError::General("schema too short".into()))?;
            let rep = chat.then_some(&rep[..]);
            col.typed::<ByteArrayType>()
                .write_batch(&values, Some(&def), rep)?;
            col.close()?;
        }
    }
    if let Some(s) = scores {
        for k in 0..2 {
            let values: Vec<f64> = s.iter().map(|v| v[k]).collect();
            let def = vec![1i16; values.len()];
            let mut col = rg
                .next_column()?
                .ok_or_else(|| parquet::errors::ParquetError::General("schema too short".into()))?;
            col.typed::<DoubleType>()
                .write_batch(&values, Some(&def), None)?;
            col.close()?;
        }
    }
    rg.close()?;
    Ok(())
}

/// The values and definition / repetition levels of one leaf column: for strings, each value
/// at definition level 1 (present); for message lists, one value per message at level 4
/// (column, list, element and leaf present), repetition level 0 for a row's first message and
/// 1 for the others (an empty list: level 1, no value; `leaf` picks the content or the
/// role).
fn leaf_levels(
    texts: &[Text],
    leaf: fn(&crate::template::Message) -> &str,
) -> (Vec<ByteArray>, Vec<i16>, Vec<i16>) {
    let (mut values, mut def, mut rep) = (Vec::new(), Vec::new(), Vec::new());
    for t in texts {
        match t {
            Text::Plain(s) => {
                values.push(ByteArray::from(s.as_str()));
                def.push(1);
            }
            Text::Chat(messages) if messages.is_empty() => {
                def.push(1);
                rep.push(0);
            }
            Text::Chat(messages) => {
                for (i, m) in messages.iter().enumerate() {
                    values.push(ByteArray::from(leaf(m)));
                    def.push(4);
                    rep.push(i16::from(i > 0));
                }
            }
        }
    }
    (values, def, rep)
}

/// A Parquet encoding error, naming the output.
fn encoding(path: &Path, e: parquet::errors::ParquetError) -> Error {
    Error::InvalidArgument(format!("{}: writing Parquet: {e}", path.display()))
}
