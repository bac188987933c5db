//! A data file opened once: its first bytes sniffed for the format and kept in front of the
//! rest, so a pipe (`--data /dev/stdin`) or a FIFO reads whole; Parquet from a pipe read into
//! memory first, within a bound.

use std::io::Read;
use std::path::Path;

use super::parquet_file;
use super::{file_error, DataFormat};
use crate::error::{Error, Result};

/// How many bytes the format sniffer looks at.
const SNIFF_BYTES: usize = 4096;

/// A data file opened once, its first bytes read to sniff its [`DataFormat`] and kept in
/// front of the rest for the reader: nothing is read twice, so a pipe or a FIFO (which can be
/// read, and for a FIFO opened, only once) reads whole.
pub(super) struct Opened {
    /// The format its first bytes show.
    pub(super) format: DataFormat,
    /// The first bytes (up to [`SNIFF_BYTES`]), already read from `file`.
    head: Vec<u8>,
    file: std::fs::File,
}

impl Opened {
    /// Opens `path` and reads its first bytes.
    pub(super) fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut head = Vec::with_capacity(SNIFF_BYTES);
        (&mut file)
            .take(SNIFF_BYTES as u64)
            .read_to_end(&mut head)
            .map_err(|e| Error::io(path, e))?;
        Ok(Opened {
            format: DataFormat::sniff(&head),
            head,
            file,
        })
    }

    /// The whole file as a buffered reader, from its first byte.
    pub(super) fn reader(self) -> std::io::BufReader<impl Read> {
        std::io::BufReader::new(std::io::Cursor::new(self.head).chain(self.file))
    }

    /// Reads the file as Parquet: a regular file in place (the reader seeks), anything else
    /// (a pipe) into memory first, up to a quarter of the machine's memory.
    pub(super) fn read_parquet(
        self,
        path: &Path,
        first: usize,
        on_row: &mut dyn FnMut(usize, &parquet_file::ParquetRow) -> Result<()>,
    ) -> Result<usize> {
        let meta = self.file.metadata().map_err(|e| Error::io(path, e))?;
        if meta.is_file() {
            return parquet_file::read_parquet(self.file, meta.len(), path, first, on_row);
        }
        let limit = crate::memory::physical_memory().map_or(u64::MAX, |m| (m / 4) as u64);
        let mut bytes = Vec::new();
        self.reader()
            .take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io(path, e))?;
        if bytes.len() as u64 > limit {
            let message = format!(
                "a Parquet file that is not a regular file (a pipe) is read into memory, \
                 and this one is larger than {} (a quarter of this machine's memory); \
                 save it to a file and pass that",
                crate::units::format_bytes(u128::from(limit))
            );
            return Err(file_error(path, 0, message).into());
        }
        let len = bytes.len() as u64;
        parquet_file::read_parquet(bytes::Bytes::from(bytes), len, path, first, on_row)
    }
}
