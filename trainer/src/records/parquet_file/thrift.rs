//! A validating walk over Thrift compact-protocol bytes (the encoding of a Parquet file's
//! footer and page headers), run before the `parquet` crate reads them.
//!
//! The crate sizes its vectors from the counts it reads (`Vec::with_capacity(n)` for a list
//! of `n` elements, a schema group of `n` children, a dictionary of `n` values) before it
//! reads the elements, and skips a list of booleans without reading a byte per element. A few
//! bytes claiming 2³¹ elements are then an allocation of gigabytes, which aborts the process
//! (an allocation failure is not a panic and cannot be caught), or 2³¹ turns of a loop. The
//! walk reads every value of the encoding and refuses, before the crate sees the bytes:
//!
//! - a list or set of `n` elements in fewer than `n` remaining bytes (every element,
//!   a boolean included, takes at least one byte), a map of `n` entries in fewer than `2n`;
//! - a binary or string longer than the bytes remaining;
//! - structs nested deeper than [`MAX_DEPTH`], a varint longer than ten bytes, an unknown
//!   type, bytes ending inside a value;
//! - a field the crate reads (a table per Parquet struct, from the crate's readers) whose
//!   header declares another type, or a list of other elements: the crate picks its reader
//!   by the field id alone, so a field declared a double where it reads a list had its bytes
//!   read as a list header (and 10.5 GB reserved). Fields it skips are walked generically.
//!
//! Compact protocol, as read here: a struct is fields up to a `0` stop byte; a field header
//! byte is `delta << 4 | type` (delta `0`: a zigzag varint field id follows); types are
//! `1`/`2` boolean true/false (no payload in a field, one byte in a list), `3` byte, `4` i16,
//! `5` i32, `6` i64 (zigzag varints), `7` double (8 bytes), `8` binary (varint length, bytes),
//! `9` list and `10` set (header `size << 4 | element type`, size nibble `15`: a varint size
//! follows), `11` map (varint size, then if non-zero `key type << 4 | value type`), `12`
//! struct.

/// The deepest nesting of structs and containers walked (the `parquet` crate's own skip
/// limit); Parquet's footer nests about six deep.
pub(super) const MAX_DEPTH: usize = 64;

const STRUCT: u8 = 12;

/// Why a walk stopped: the bytes ended inside a value (`Eof`: a caller reading a window of a
/// longer stream may retry with more), or the encoding is refused (`Bad`, the reason).
#[derive(Debug, PartialEq)]
pub(super) enum Fault {
    Eof,
    Bad(String),
}

type Walked<T> = Result<T, Fault>;

/// A cursor over compact-protocol bytes that checks each count against what remains.
pub(super) struct Walk<'a> {
    buf: &'a [u8],
    pos: usize,
    /// The bytes of the stream from `buf`'s start (`buf` may be a window of it): what
    /// counts are checked against.
    avail: u64,
    /// Boolean list elements walked so far: the crate skips them without reading a byte, so
    /// they are bounded by count ([`MAX_BOOLEAN_ELEMENTS`]) rather than by bytes.
    booleans: u64,
}

/// The most boolean list elements one walk accepts. The crate's skip reads none of their
/// bytes (a boolean list element is one byte on the wire, but its skip takes the field rule:
/// no payload), so nested lists of booleans are turns of a loop that no byte count bounds;
/// Parquet's own structs hold no list of booleans.
const MAX_BOOLEAN_ELEMENTS: u64 = 1 << 20;

/// Called for each field of a struct with the walk (at the field's value), the field id, its
/// type and the depth of the value; returns whether it consumed the value (`false`: the walk
/// checks and skips it).
pub(super) type OnField<'f, 'a> = dyn FnMut(&mut Walk<'a>, i16, u8, usize) -> Walked<bool> + 'f;

impl<'a> Walk<'a> {
    /// A walk from the first byte of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Walk::window(buf, buf.len() as u64)
    }

    /// A walk over `buf`, the first bytes of a stream of `avail` bytes: counts are checked
    /// against the stream, and reading past `buf` is [`Fault::Eof`].
    pub fn window(buf: &'a [u8], avail: u64) -> Self {
        Walk {
            buf,
            pos: 0,
            avail,
            booleans: 0,
        }
    }

    /// Bytes consumed so far.
    pub fn pos(&self) -> usize {
        self.pos
    }

    fn remaining(&self) -> u64 {
        self.avail.saturating_sub(self.pos as u64)
    }

    fn byte(&mut self) -> Walked<u8> {
        let b = *self.buf.get(self.pos).ok_or(Fault::Eof)?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Walked<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Fault::Bad("a varint longer than ten bytes".into()))
    }

    fn zigzag(&mut self) -> Walked<i64> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    /// An integer field's value (types i16, i32, i64, byte), as the crate reads it (an i32
    /// is the low 32 bits); `None` for any other type (the value is then checked and
    /// skipped).
    pub fn int(&mut self, ty: u8, depth: usize) -> Walked<Option<i64>> {
        match ty {
            3 => Ok(Some(i64::from(self.byte()? as i8))),
            4 => Ok(Some(i64::from(self.zigzag()? as i16))),
            5 => Ok(Some(i64::from(self.zigzag()? as i32))),
            6 => self.zigzag().map(Some),
            _ => self.value(ty, depth).map(|()| None),
        }
    }

    /// Checks and skips one value of type `ty` at nesting `depth`.
    pub fn value(&mut self, ty: u8, depth: usize) -> Walked<()> {
        if depth > MAX_DEPTH {
            return Err(Fault::Bad(format!("values nested deeper than {MAX_DEPTH}")));
        }
        match ty {
            1 | 2 => Ok(()),
            3 => self.byte().map(drop),
            4..=6 => self.varint().map(drop),
            7 => self.bytes(8),
            8 => {
                let n = self.varint()?;
                if n > self.remaining() {
                    return Err(Fault::Bad(format!(
                        "a binary value of {n} bytes in {} remaining",
                        self.remaining()
                    )));
                }
                self.bytes(n as usize)
            }
            9 | 10 => self.list(depth, &mut |w, ty, depth| w.element(ty, depth)),
            11 => {
                let n = self.varint()?;
                if n == 0 {
                    return Ok(());
                }
                let kv = self.byte()?;
                if n.saturating_mul(2) > self.remaining() {
                    return Err(Fault::Bad(format!(
                        "a map of {n} entries in {} bytes",
                        self.remaining()
                    )));
                }
                for _ in 0..n {
                    self.element(kv >> 4, depth + 1)?;
                    self.element(kv & 0x0f, depth + 1)?;
                }
                Ok(())
            }
            STRUCT => self.fields(depth, &mut |_, _, _, _| Ok(false)),
            t => Err(Fault::Bad(format!("an unknown Thrift type {t}"))),
        }
    }

    fn bytes(&mut self, n: usize) -> Walked<()> {
        if n > self.buf.len() - self.pos {
            return Err(Fault::Eof);
        }
        self.pos += n;
        Ok(())
    }

    /// A container element. A boolean is one byte on the wire, but the crate's skip reads
    /// none (it takes the field rule), and the walk must stay where the crate is: it reads
    /// none either and counts the element against [`MAX_BOOLEAN_ELEMENTS`] (found by the
    /// fuzz campaign: lists of booleans, read out of step, made the crate loop for minutes on
    /// a 438-byte file).
    fn element(&mut self, ty: u8, depth: usize) -> Walked<()> {
        match ty {
            1 | 2 => {
                self.booleans += 1;
                if self.booleans > MAX_BOOLEAN_ELEMENTS {
                    return Err(Fault::Bad(format!(
                        "more than {MAX_BOOLEAN_ELEMENTS} boolean list elements"
                    )));
                }
                Ok(())
            }
            _ => self.value(ty, depth),
        }
    }

    /// A list (or set) whose elements are each handed to `each` (with their type and
    /// depth; a boolean element is one byte, see [`Walk::element`]); its count checked
    /// against the bytes remaining first.
    pub fn list(
        &mut self,
        depth: usize,
        each: &mut dyn FnMut(&mut Self, u8, usize) -> Walked<()>,
    ) -> Walked<()> {
        let header = self.byte()?;
        let ty = header & 0x0f;
        let n = match header >> 4 {
            15 => self.varint()?,
            n => u64::from(n),
        };
        // The crate reads the size as an i32 (a negative one is an empty list or a refused
        // allocation) and takes a header byte of 0 as an empty list.
        if n > self.remaining() {
            return Err(Fault::Bad(format!(
                "a list of {n} elements in {} bytes",
                self.remaining()
            )));
        }
        if n > 0 && !(1..=STRUCT).contains(&ty) {
            return Err(Fault::Bad(format!("a list of unknown Thrift type {ty}")));
        }
        for _ in 0..n {
            each(self, ty, depth + 1)?;
        }
        Ok(())
    }

    /// The fields of a struct up to its stop byte, each offered to `on_field` first.
    pub fn fields(&mut self, depth: usize, on_field: &mut OnField<'_, 'a>) -> Walked<()> {
        if depth > MAX_DEPTH {
            return Err(Fault::Bad(format!(
                "structs nested deeper than {MAX_DEPTH}"
            )));
        }
        let mut last = 0i16;
        loop {
            let h = self.byte()?;
            if h == 0 {
                return Ok(());
            }
            let ty = h & 0x0f;
            let id = match h >> 4 {
                0 => self.zigzag()? as i16,
                d => last.wrapping_add(i16::from(d)),
            };
            last = id;
            if !on_field(self, id, ty, depth + 1)? {
                self.value(ty, depth + 1)?;
            }
        }
    }
}

/// What the `parquet` crate reads a field (or a list element) as. The crate picks its reader
/// by the field id alone, whatever the type in the field header (a field declared `i32`
/// where it reads a list is read as a list header out of the varint's bytes), so each known
/// field's type is checked against this before the value is walked.
#[derive(Clone, Copy)]
enum Ty {
    /// Header type `1` or `2` (the value itself, in a field).
    Bool,
    I8,
    I16,
    /// Also the enums.
    I32,
    I64,
    Double,
    /// Also strings.
    Binary,
    List(&'static Ty),
    /// A struct or a union, walked by its table.
    Struct(&'static Table),
}

/// A Thrift struct (or union) as the crate reads it: its name and the fields it reads, by
/// id (field name, type). Fields it skips (unknown ids, fields it does not use, the
/// encryption fields this build leaves out) are walked as [`Walk::value`] does.
struct Table {
    name: &'static str,
    fields: &'static [(i16, &'static str, Ty)],
}

impl Ty {
    /// The compact-protocol header types the crate reads this from.
    fn accepts(self, wire: u8) -> bool {
        wire == match self {
            Ty::Bool => return matches!(wire, 1 | 2),
            Ty::I8 => 3,
            Ty::I16 => 4,
            Ty::I32 => 5,
            Ty::I64 => 6,
            Ty::Double => 7,
            Ty::Binary => 8,
            Ty::List(_) => 9,
            Ty::Struct(_) => STRUCT,
        }
    }
}

impl std::fmt::Display for Ty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ty::Bool => f.write_str("bool"),
            Ty::I8 => f.write_str("byte"),
            Ty::I16 => f.write_str("i16"),
            Ty::I32 => f.write_str("i32"),
            Ty::I64 => f.write_str("i64"),
            Ty::Double => f.write_str("double"),
            Ty::Binary => f.write_str("binary"),
            Ty::List(e) => write!(f, "list<{e}>"),
            Ty::Struct(t) => f.write_str(t.name),
        }
    }
}

/// The name of a compact-protocol type code.
fn wire_name(wire: u8) -> &'static str {
    const NAMES: [&str; 13] = [
        "stop", "bool", "bool", "byte", "i16", "i32", "i64", "double", "binary", "list", "set",
        "map", "struct",
    ];
    NAMES.get(usize::from(wire)).copied().unwrap_or("unknown")
}

// The tables, from the crate's readers (parquet 57: `file/metadata/thrift/mod.rs`,
// `basic.rs`, `file/metadata/mod.rs`).
use Ty::{Binary, Bool, Double, I16, I32, I64, I8};

/// The union members that are empty structs (the crate reads their one stop byte).
static EMPTY: Table = Table {
    name: "empty struct",
    fields: &[],
};
static FILE_META_DATA: Table = Table {
    name: "FileMetaData",
    fields: &[
        (1, "version", I32),
        (2, "schema", Ty::List(&Ty::Struct(&SCHEMA_ELEMENT))),
        (3, "num_rows", I64),
        (4, "row_groups", Ty::List(&Ty::Struct(&ROW_GROUP))),
        (5, "key_value_metadata", Ty::List(&Ty::Struct(&KEY_VALUE))),
        (6, "created_by", Binary),
        (7, "column_orders", Ty::List(&Ty::Struct(&COLUMN_ORDER))),
    ],
};
static SCHEMA_ELEMENT: Table = Table {
    name: "SchemaElement",
    fields: &[
        (1, "type", I32),
        (2, "type_length", I32),
        (3, "repetition_type", I32),
        (4, "name", Binary),
        (5, "num_children", I32),
        (6, "converted_type", I32),
        (7, "scale", I32),
        (8, "precision", I32),
        (9, "field_id", I32),
        (10, "logical_type", Ty::Struct(&LOGICAL_TYPE)),
    ],
};
static LOGICAL_TYPE: Table = Table {
    name: "LogicalType",
    fields: &[
        (1, "STRING", Ty::Struct(&EMPTY)),
        (2, "MAP", Ty::Struct(&EMPTY)),
        (3, "LIST", Ty::Struct(&EMPTY)),
        (4, "ENUM", Ty::Struct(&EMPTY)),
        (5, "DECIMAL", Ty::Struct(&DECIMAL_TYPE)),
        (6, "DATE", Ty::Struct(&EMPTY)),
        (7, "TIME", Ty::Struct(&TIMESTAMP_TYPE)),
        (8, "TIMESTAMP", Ty::Struct(&TIMESTAMP_TYPE)),
        (10, "INTEGER", Ty::Struct(&INT_TYPE)),
        (11, "UNKNOWN", Ty::Struct(&EMPTY)),
        (12, "JSON", Ty::Struct(&EMPTY)),
        (13, "BSON", Ty::Struct(&EMPTY)),
        (14, "UUID", Ty::Struct(&EMPTY)),
        (15, "FLOAT16", Ty::Struct(&EMPTY)),
        (16, "VARIANT", Ty::Struct(&VARIANT_TYPE)),
        (17, "GEOMETRY", Ty::Struct(&GEOMETRY_TYPE)),
        (18, "GEOGRAPHY", Ty::Struct(&GEOGRAPHY_TYPE)),
    ],
};
static DECIMAL_TYPE: Table = Table {
    name: "DecimalType",
    fields: &[(1, "scale", I32), (2, "precision", I32)],
};
/// Also `TimeType` (the crate reads both alike).
static TIMESTAMP_TYPE: Table = Table {
    name: "TimestampType",
    fields: &[
        (1, "isAdjustedToUTC", Bool),
        (2, "unit", Ty::Struct(&TIME_UNIT)),
    ],
};
static TIME_UNIT: Table = Table {
    name: "TimeUnit",
    fields: &[
        (1, "MILLIS", Ty::Struct(&EMPTY)),
        (2, "MICROS", Ty::Struct(&EMPTY)),
        (3, "NANOS", Ty::Struct(&EMPTY)),
    ],
};
static INT_TYPE: Table = Table {
    name: "IntType",
    fields: &[(1, "bitWidth", I8), (2, "isSigned", Bool)],
};
static VARIANT_TYPE: Table = Table {
    name: "VariantType",
    fields: &[(1, "specification_version", I8)],
};
static GEOMETRY_TYPE: Table = Table {
    name: "GeometryType",
    fields: &[(1, "crs", Binary)],
};
static GEOGRAPHY_TYPE: Table = Table {
    name: "GeographyType",
    fields: &[(1, "crs", Binary), (2, "algorithm", I32)],
};
static ROW_GROUP: Table = Table {
    name: "RowGroup",
    fields: &[
        (1, "columns", Ty::List(&Ty::Struct(&COLUMN_CHUNK))),
        (2, "total_byte_size", I64),
        (3, "num_rows", I64),
        (4, "sorting_columns", Ty::List(&Ty::Struct(&SORTING_COLUMN))),
        (5, "file_offset", I64),
        (7, "ordinal", I16),
    ],
};
static COLUMN_CHUNK: Table = Table {
    name: "ColumnChunk",
    fields: &[
        (1, "file_path", Binary),
        (2, "file_offset", I64),
        (3, "meta_data", Ty::Struct(&COLUMN_META_DATA)),
        (4, "offset_index_offset", I64),
        (5, "offset_index_length", I32),
        (6, "column_index_offset", I64),
        (7, "column_index_length", I32),
    ],
};
static COLUMN_META_DATA: Table = Table {
    name: "ColumnMetaData",
    fields: &[
        (1, "type", I32),
        (2, "encodings", Ty::List(&I32)),
        (4, "codec", I32),
        (5, "num_values", I64),
        (6, "total_uncompressed_size", I64),
        (7, "total_compressed_size", I64),
        (9, "data_page_offset", I64),
        (10, "index_page_offset", I64),
        (11, "dictionary_page_offset", I64),
        (12, "statistics", Ty::Struct(&STATISTICS)),
        (
            13,
            "encoding_stats",
            Ty::List(&Ty::Struct(&PAGE_ENCODING_STATS)),
        ),
        (14, "bloom_filter_offset", I64),
        (15, "bloom_filter_length", I32),
        (16, "size_statistics", Ty::Struct(&SIZE_STATISTICS)),
        (
            17,
            "geospatial_statistics",
            Ty::Struct(&GEOSPATIAL_STATISTICS),
        ),
    ],
};
/// Also the page header's `PageStatistics` (the same fields).
static STATISTICS: Table = Table {
    name: "Statistics",
    fields: &[
        (1, "max", Binary),
        (2, "min", Binary),
        (3, "null_count", I64),
        (4, "distinct_count", I64),
        (5, "max_value", Binary),
        (6, "min_value", Binary),
        (7, "is_max_value_exact", Bool),
        (8, "is_min_value_exact", Bool),
    ],
};
static PAGE_ENCODING_STATS: Table = Table {
    name: "PageEncodingStats",
    fields: &[
        (1, "page_type", I32),
        (2, "encoding", I32),
        (3, "count", I32),
    ],
};
static SIZE_STATISTICS: Table = Table {
    name: "SizeStatistics",
    fields: &[
        (1, "unencoded_byte_array_data_bytes", I64),
        (2, "repetition_level_histogram", Ty::List(&I64)),
        (3, "definition_level_histogram", Ty::List(&I64)),
    ],
};
static GEOSPATIAL_STATISTICS: Table = Table {
    name: "GeospatialStatistics",
    fields: &[
        (1, "bbox", Ty::Struct(&BOUNDING_BOX)),
        (2, "geospatial_types", Ty::List(&I32)),
    ],
};
static BOUNDING_BOX: Table = Table {
    name: "BoundingBox",
    fields: &[
        (1, "xmin", Double),
        (2, "xmax", Double),
        (3, "ymin", Double),
        (4, "ymax", Double),
        (5, "zmin", Double),
        (6, "zmax", Double),
        (7, "mmin", Double),
        (8, "mmax", Double),
    ],
};
static KEY_VALUE: Table = Table {
    name: "KeyValue",
    fields: &[(1, "key", Binary), (2, "value", Binary)],
};
static SORTING_COLUMN: Table = Table {
    name: "SortingColumn",
    fields: &[
        (1, "column_idx", I32),
        (2, "descending", Bool),
        (3, "nulls_first", Bool),
    ],
};
static COLUMN_ORDER: Table = Table {
    name: "ColumnOrder",
    fields: &[(1, "TYPE_ORDER", Ty::Struct(&EMPTY))],
};
static PAGE_HEADER: Table = Table {
    name: "PageHeader",
    fields: &[
        (1, "type", I32),
        (2, "uncompressed_page_size", I32),
        (3, "compressed_page_size", I32),
        (4, "crc", I32),
        (5, "data_page_header", Ty::Struct(&DATA_PAGE_HEADER)),
        (6, "index_page_header", Ty::Struct(&INDEX_PAGE_HEADER)),
        (
            7,
            "dictionary_page_header",
            Ty::Struct(&DICTIONARY_PAGE_HEADER),
        ),
        (8, "data_page_header_v2", Ty::Struct(&DATA_PAGE_HEADER_V2)),
    ],
};
static DATA_PAGE_HEADER: Table = Table {
    name: "DataPageHeader",
    fields: &[
        (1, "num_values", I32),
        (2, "encoding", I32),
        (3, "definition_level_encoding", I32),
        (4, "repetition_level_encoding", I32),
        (5, "statistics", Ty::Struct(&STATISTICS)),
    ],
};
static INDEX_PAGE_HEADER: Table = Table {
    name: "IndexPageHeader",
    fields: &[],
};
static DICTIONARY_PAGE_HEADER: Table = Table {
    name: "DictionaryPageHeader",
    fields: &[
        (1, "num_values", I32),
        (2, "encoding", I32),
        (3, "is_sorted", Bool),
    ],
};
static DATA_PAGE_HEADER_V2: Table = Table {
    name: "DataPageHeaderV2",
    fields: &[
        (1, "num_values", I32),
        (2, "num_nulls", I32),
        (3, "num_rows", I32),
        (4, "encoding", I32),
        (5, "definition_levels_byte_length", I32),
        (6, "repetition_levels_byte_length", I32),
        (7, "is_compressed", Bool),
        (8, "statistics", Ty::Struct(&STATISTICS)),
    ],
};

/// Told of each integer field read (its struct, id and value) and of each struct's end
/// (`None`).
type Visit<'v> = dyn FnMut(&'static Table, Option<(i16, i64)>) + 'v;

/// Walks a struct as the crate reads it as `t`: a field of a known id whose header type is
/// not the one the crate reads it as, or a (non-empty) list of other elements, is refused
/// ("field 5 (key_value_metadata) of FileMetaData as Thrift type i32, expected
/// list<KeyValue>"); other fields are checked and skipped.
fn walk_struct<'a>(
    w: &mut Walk<'a>,
    t: &'static Table,
    depth: usize,
    visit: &mut Visit<'_>,
) -> Walked<()> {
    w.fields(depth, &mut |w, id, wire, depth| {
        let Some(&(_, name, ty)) = t.fields.iter().find(|f| f.0 == id) else {
            return Ok(false);
        };
        let field = || format!("field {id} ({name}) of {}", t.name);
        if !ty.accepts(wire) {
            return Err(Fault::Bad(format!(
                "{} as Thrift type {}, expected {ty}",
                field(),
                wire_name(wire)
            )));
        }
        match ty {
            Ty::Struct(s) => walk_struct(w, s, depth, visit)?,
            Ty::List(&e) => w.list(depth, &mut |w, wire, depth| {
                if !e.accepts(wire) {
                    return Err(Fault::Bad(format!(
                        "{} as a list of {}, expected {ty}",
                        field(),
                        wire_name(wire)
                    )));
                }
                match e {
                    Ty::Struct(s) => walk_struct(w, s, depth, visit),
                    _ => w.element(wire, depth),
                }
            })?,
            _ => {
                if let Some(v) = w.int(wire, depth)? {
                    visit(t, Some((id, v)));
                }
            }
        }
        Ok(true)
    })?;
    visit(t, None);
    Ok(())
}

/// Checks a Parquet footer (the Thrift `FileMetaData`, without the trailing length and
/// magic): the encoding as the module describes, each field the crate reads of the type it
/// reads it as, and the schema's tree (field 2, a list of `SchemaElement`s, each with its
/// `num_children` in field 5): a group cannot claim more children than elements follow it,
/// and groups nest at most [`MAX_DEPTH`] deep (the crate builds the schema recursively).
///
/// # Errors
/// What is wrong, as a phrase ("a list of 230686719 elements in 984 bytes").
pub(super) fn check_footer(footer: &[u8]) -> Result<(), String> {
    let mut children: Vec<Option<i64>> = Vec::new();
    let mut n = None;
    let mut w = Walk::new(footer);
    let walked = walk_struct(&mut w, &FILE_META_DATA, 0, &mut |t, field| {
        if std::ptr::eq(t, &SCHEMA_ELEMENT) {
            match field {
                Some((5, v)) => n = Some(v),
                Some(_) => {}
                None => children.push(n.take()),
            }
        }
    });
    match walked {
        Ok(()) => {}
        Err(Fault::Eof) => return Err("the footer ends inside a value".into()),
        Err(Fault::Bad(m)) => return Err(format!("the footer holds {m}")),
    }
    check_schema_tree(&children)
}

/// What the `parquet` crate takes from a page header (Thrift `PageHeader`): the sizes and
/// the value count, for the checks of [`super::check_pages`].
#[derive(Debug, Default, PartialEq)]
pub(super) struct PageHeader {
    /// The header's encoded length.
    pub len: usize,
    /// Field 1: the page type (2: dictionary).
    pub kind: i64,
    /// Field 2: the bytes after decompression.
    pub uncompressed: i64,
    /// Field 3: the bytes in the file after the header.
    pub compressed: i64,
    /// `num_values` (field 1) of the data (5), dictionary (7) or data v2 (8) page header.
    pub num_values: i64,
}

/// Walks a page header at the start of `buf`, the first bytes of the `avail` left in its
/// column chunk (the header and its page must lie in the chunk), each field the crate reads
/// of the type it reads it as.
///
/// # Errors
/// [`Fault::Eof`] when `buf` ends inside the header (read more and retry); [`Fault::Bad`]
/// for an encoding the module refuses.
pub(super) fn page_header(buf: &[u8], avail: u64) -> Walked<PageHeader> {
    let mut h = PageHeader::default();
    let mut w = Walk::window(buf, avail);
    walk_struct(&mut w, &PAGE_HEADER, 0, &mut |t, field| {
        let Some((id, v)) = field else { return };
        if std::ptr::eq(t, &PAGE_HEADER) {
            match id {
                1 => h.kind = v,
                2 => h.uncompressed = v,
                3 => h.compressed = v,
                _ => {}
            }
        } else if id == 1
            && [
                &DATA_PAGE_HEADER,
                &DICTIONARY_PAGE_HEADER,
                &DATA_PAGE_HEADER_V2,
            ]
            .iter()
            .any(|s| std::ptr::eq(t, *s))
        {
            h.num_values = v;
        }
    })?;
    h.len = w.pos();
    Ok(h)
}

/// The schema elements' `num_children`, in order, as a tree: each group's children follow
/// it (depth first).
fn check_schema_tree(children: &[Option<i64>]) -> Result<(), String> {
    // Children still to come of each open group, outermost first.
    let mut open: Vec<i64> = Vec::new();
    for (i, c) in children.iter().enumerate() {
        if let Some(left) = open.last_mut() {
            *left -= 1;
        }
        let after = (children.len() - i - 1) as i64;
        match *c {
            Some(c) if c < 0 || c > after => {
                return Err(format!(
                    "schema element {i} claims {c} children, with {after} elements after it"
                ))
            }
            Some(c) if c > 0 => {
                open.push(c);
                if open.len() > MAX_DEPTH {
                    return Err(format!("a schema nested deeper than {MAX_DEPTH} groups"));
                }
            }
            _ => {}
        }
        while open.last() == Some(&0) {
            open.pop();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A struct holding field 15 (unknown to `FileMetaData`: walked generically) as a list
    /// of `n` i32 elements (header `0xf5`, varint `n`) followed by `body`.
    fn list_of(n: u64, body: &[u8]) -> Vec<u8> {
        let mut b = vec![0xf9, 0xf5];
        let mut v = n;
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                b.push(byte);
                break;
            }
            b.push(byte | 0x80);
        }
        b.extend(body);
        b.push(0);
        b
    }

    #[test]
    fn list_counts_are_checked_against_the_bytes() {
        assert_eq!(check_footer(&list_of(2, &[2, 4])), Ok(()));
        let e = check_footer(&list_of(230_686_719, &[2, 4])).unwrap_err();
        assert!(e.contains("a list of 230686719 elements in 3 bytes"), "{e}");
        // Booleans in a list: counted against the bytes left all the same.
        let e = check_footer(&[0x29, 0xf1, 0xff, 0xff, 0xff, 0x6f, 0]).unwrap_err();
        assert!(e.contains("a list of 234881023 elements in 1 bytes"), "{e}");
    }

    /// The crate skips a list of booleans without reading their bytes; the walk keeps in step
    /// with it (a list of two booleans, then field 6 as a string, then the stop byte), and
    /// bounds their number (fuzz artifact slow-unit-5cb9ca2f: 2 minutes on 438 bytes).
    #[test]
    fn boolean_list_elements_are_read_as_the_crate_skips_them() {
        assert_eq!(
            check_footer(&[0xf9, 0x21, 0x08, 12, 2, b'a', b'b', 0]),
            Ok(())
        );
        // 1,000 lists of 2,000 booleans each: 2M turns of the crate's loop in 3 kB.
        let mut b = vec![0xf9, 0xf9, 0xe8, 0x07];
        for _ in 0..1000 {
            b.extend([0xf1, 0xd0, 0x0f]);
        }
        b.extend(std::iter::repeat_n(0u8, 2100));
        let e = check_footer(&b).unwrap_err();
        assert!(e.contains("more than 1048576 boolean list elements"), "{e}");
    }

    #[test]
    fn binary_lengths_and_truncation_are_refused() {
        // Field 6 (created_by) binary of 100 bytes, 2 present.
        let e = check_footer(&[0x68, 100, b'a', b'b', 0]).unwrap_err();
        assert!(
            e.contains("a binary value of 100 bytes in 3 remaining"),
            "{e}"
        );
        assert_eq!(check_footer(&[0x68, 2, b'a', b'b', 0]), Ok(()));
        // A struct with no stop byte.
        let e = check_footer(&[0x15, 4]).unwrap_err();
        assert!(e.contains("ends inside a value"), "{e}");
        let e = check_footer(&[0xfd, 0]).unwrap_err();
        assert!(e.contains("unknown Thrift type 13"), "{e}");
        let e = check_footer(&[
            0x15, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 0,
        ]);
        assert!(e.unwrap_err().contains("longer than ten bytes"));
    }

    #[test]
    fn nesting_is_capped() {
        // Field 15 (unknown) struct, holding field 1 struct, 100 deep, then the stops.
        let mut b = vec![0x1c; 100];
        b[0] = 0xfc;
        b.extend(vec![0; 101]);
        let e = check_footer(&b).unwrap_err();
        assert!(e.contains("nested deeper than 64"), "{e}");
        let mut b = vec![0x1c; 10];
        b[0] = 0xfc;
        b.extend(vec![0; 11]);
        assert_eq!(check_footer(&b), Ok(()));
    }

    #[test]
    fn schema_children_are_checked_against_the_elements() {
        assert!(check_schema_tree(&[Some(2), None, Some(1), Some(0)]).is_ok());
        assert!(check_schema_tree(&[Some(1), Some(1), Some(1), None]).is_ok());
        let e = check_schema_tree(&[Some(2_000_000_000), None]).unwrap_err();
        assert!(
            e.contains("schema element 0 claims 2000000000 children, with 1 elements after it"),
            "{e}"
        );
        assert!(check_schema_tree(&[Some(-1)]).is_err());
        let mut deep = vec![Some(1); 100];
        deep.push(None);
        let e = check_schema_tree(&deep).unwrap_err();
        assert!(e.contains("nested deeper than 64"), "{e}");
    }

    #[test]
    fn a_known_field_of_another_type_is_refused() {
        // The fuzzer's footer: field 5 (key_value_metadata) declared an i32, whose varint
        // the crate read as a list header (10.5 GB reserved).
        let e = check_footer(&[0x15, 2, 0x45, 0xfc, 0x7f, 0]).unwrap_err();
        assert_eq!(
            e,
            "the footer holds field 5 (key_value_metadata) of FileMetaData as Thrift type i32, \
             expected list<KeyValue>"
        );
        // Nested: field 2 (schema), one SchemaElement whose name (field 4) is an i64.
        let e = check_footer(&[0x29, 0x1c, 0x46, 2, 0, 0]).unwrap_err();
        assert!(
            e.contains("field 4 (name) of SchemaElement as Thrift type i64, expected binary"),
            "{e}"
        );
        // A bool field takes both header types; an int there is refused (the crate would
        // unwrap a missing boolean).
        let sorting = |f: u8| {
            // FileMetaData.4 row_groups: one RowGroup, whose field 4 is one SortingColumn
            // with field 2 (descending) of header type `f`.
            vec![0x49, 0x1c, 0x49, 0x1c, 0x20 | f, 0, 0, 0]
        };
        assert_eq!(check_footer(&sorting(1)), Ok(()));
        assert_eq!(check_footer(&sorting(2)), Ok(()));
        let e = check_footer(&[0x49, 0x1c, 0x49, 0x1c, 0x25, 2, 0, 0, 0]).unwrap_err();
        assert!(
            e.contains("field 2 (descending) of SortingColumn as Thrift type i32, expected bool"),
            "{e}"
        );
        // Unknown field ids of any type are walked generically.
        assert_eq!(check_footer(&[0xf5, 2, 0x18, 0, 0]), Ok(()));
        let e = page_header(&[0x18, 0, 0], 3).unwrap_err();
        assert_eq!(
            e,
            Fault::Bad("field 1 (type) of PageHeader as Thrift type binary, expected i32".into())
        );
    }

    #[test]
    fn a_list_of_other_elements_is_refused() {
        // Field 5 (key_value_metadata): a list of two i32s, not of KeyValue structs.
        let e = check_footer(&[0x59, 0x25, 2, 4, 0]).unwrap_err();
        assert_eq!(
            e,
            "the footer holds field 5 (key_value_metadata) of FileMetaData as a list of i32, \
             expected list<KeyValue>"
        );
        // ColumnMetaData.2 encodings: a list of binaries where the crate reads i32s.
        let column = |list: &[u8]| {
            // row_groups, one RowGroup; its columns, one ColumnChunk; its meta_data.
            let mut b = vec![0x49, 0x1c, 0x19, 0x1c, 0x3c, 0x29];
            b.extend(list);
            b.extend([0, 0, 0, 0, 0]);
            b
        };
        let e = check_footer(&column(&[0x18, 1, b'x'])).unwrap_err();
        assert!(
            e.contains(
                "field 2 (encodings) of ColumnMetaData as a list of binary, expected list<i32>"
            ),
            "{e}"
        );
        assert_eq!(check_footer(&column(&[0x25, 0, 6])), Ok(()));
        // An empty list (header 0, or no elements of any type) holds nothing to misread.
        assert_eq!(check_footer(&column(&[0x00])), Ok(()));
        assert_eq!(check_footer(&column(&[0x08])), Ok(()));
        // A list of booleans where structs are read, counted first.
        let e = check_footer(&[0x59, 0x21, 1, 0]).unwrap_err();
        assert!(
            e.contains("as a list of bool, expected list<KeyValue>"),
            "{e}"
        );
    }
}
