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
//!   type, bytes ending inside a value.
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
}

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
        Walk { buf, pos: 0, avail }
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
            9 | 10 => self.list(depth, &mut |w, ty, depth| w.value(ty, depth)),
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

    /// A container element: a boolean takes one byte there.
    fn element(&mut self, ty: u8, depth: usize) -> Walked<()> {
        match ty {
            1 | 2 => self.byte().map(drop),
            _ => self.value(ty, depth),
        }
    }

    /// A list (or set) whose elements are each handed to `each` (with their type and
    /// depth); its count checked against the bytes remaining first.
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
            if matches!(ty, 1 | 2) {
                self.byte()?;
            } else {
                each(self, ty, depth + 1)?;
            }
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

/// Checks a Parquet footer (the Thrift `FileMetaData`, without the trailing length and
/// magic): the encoding as the module describes, and the schema's tree (field 2, a list of
/// `SchemaElement`s, each with its `num_children` in field 5): a group cannot claim more
/// children than elements follow it, and groups nest at most [`MAX_DEPTH`] deep (the crate
/// builds the schema recursively).
///
/// # Errors
/// What is wrong, as a phrase ("a list of 230686719 elements in 984 bytes").
pub(super) fn check_footer(footer: &[u8]) -> Result<(), String> {
    let mut children: Vec<Option<i64>> = Vec::new();
    let mut w = Walk::new(footer);
    let walked = w.fields(0, &mut |w, id, ty, depth| {
        if id != 2 || ty != 9 {
            return Ok(false);
        }
        w.list(depth, &mut |w, ty, depth| {
            let mut n = None;
            if ty != STRUCT {
                return w.value(ty, depth);
            }
            w.fields(depth, &mut |w, id, ty, depth| {
                if id == 5 {
                    n = w.int(ty, depth)?;
                    return Ok(true);
                }
                Ok(false)
            })?;
            children.push(n);
            Ok(())
        })?;
        Ok(true)
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
/// column chunk (the header and its page must lie in the chunk).
///
/// # Errors
/// [`Fault::Eof`] when `buf` ends inside the header (read more and retry); [`Fault::Bad`]
/// for an encoding the module refuses.
pub(super) fn page_header(buf: &[u8], avail: u64) -> Walked<PageHeader> {
    let mut h = PageHeader::default();
    let mut w = Walk::window(buf, avail);
    w.fields(0, &mut |w, id, ty, depth| {
        match id {
            1 => h.kind = w.int(ty, depth)?.unwrap_or(-1),
            2 => h.uncompressed = w.int(ty, depth)?.unwrap_or(-1),
            3 => h.compressed = w.int(ty, depth)?.unwrap_or(-1),
            5 | 7 | 8 if ty == STRUCT => w.fields(depth, &mut |w, id, ty, depth| {
                if id == 1 {
                    h.num_values = w.int(ty, depth)?.unwrap_or(-1);
                    return Ok(true);
                }
                Ok(false)
            })?,
            _ => return Ok(false),
        }
        Ok(true)
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

    /// A struct holding field 2 as a list of `n` i32 elements (header `0xf5`, varint `n`)
    /// followed by `body`.
    fn list_of(n: u64, body: &[u8]) -> Vec<u8> {
        let mut b = vec![0x29, 0xf5];
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
        // Booleans in a list: one byte each, not the field encoding's none.
        let e = check_footer(&[0x29, 0xf1, 0xff, 0xff, 0xff, 0x6f, 0]).unwrap_err();
        assert!(e.contains("a list of 234881023 elements in 1 bytes"), "{e}");
    }

    #[test]
    fn binary_lengths_and_truncation_are_refused() {
        // Field 1 binary of 100 bytes, 2 present.
        let e = check_footer(&[0x18, 100, b'a', b'b', 0]).unwrap_err();
        assert!(
            e.contains("a binary value of 100 bytes in 3 remaining"),
            "{e}"
        );
        assert_eq!(check_footer(&[0x18, 2, b'a', b'b', 0]), Ok(()));
        // A struct with no stop byte.
        let e = check_footer(&[0x15, 4]).unwrap_err();
        assert!(e.contains("ends inside a value"), "{e}");
        let e = check_footer(&[0x1d, 0]).unwrap_err();
        assert!(e.contains("unknown Thrift type 13"), "{e}");
        let e = check_footer(&[
            0x15, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 0,
        ]);
        assert!(e.unwrap_err().contains("longer than ten bytes"));
    }

    #[test]
    fn nesting_is_capped() {
        // Field 1 struct, 100 deep, then the stops.
        let mut b = vec![0x1c; 100];
        b.extend(vec![0; 101]);
        let e = check_footer(&b).unwrap_err();
        assert!(e.contains("nested deeper than 64"), "{e}");
        let mut b = vec![0x1c; 10];
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
}
