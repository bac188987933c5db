//! Issue 20: see the module list in `hostile_round2.rs`. Data files: malformed Parquet (class
//! 1), binary, date and decimal columns (class 4), piped data and FIFOs (class 5), shard
//! directories and Parquet codecs (weak results).

#[allow(unused_imports)]
use super::*;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use difinfo_trainer::records::{parse_preference_line, read_records, PreferenceExample, Text};
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int32Type, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;

/// A column of a test Parquet file: byte strings (`binary`, with or without the `UTF8`
/// annotation: the schema says which), or 32- / 64-bit integers (plain, or under a logical
/// type such as `DATE`).
enum Col {
    Bytes(Vec<Vec<u8>>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

/// Writes one row group of `required` columns with the parquet crate's writer; `schema` lists
/// the fields in the order of `cols`.
fn write_pq(path: &Path, schema: &str, compression: Compression, cols: &[Col]) {
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(&format!("message m {{ {schema} }}")).unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(compression)
            .build(),
    );
    let mut w =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    for c in cols {
        let mut col = rg.next_column().unwrap().unwrap();
        match c {
            Col::Bytes(v) => {
                let v: Vec<ByteArray> = v.iter().map(|b| ByteArray::from(b.clone())).collect();
                col.typed::<ByteArrayType>().write_batch(&v, None, None)
            }
            Col::I32(v) => col.typed::<Int32Type>().write_batch(v, None, None),
            Col::I64(v) => col.typed::<Int64Type>().write_batch(v, None, None),
        }
        .unwrap();
        col.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
}

fn texts(v: &[&str]) -> Col {
    Col::Bytes(v.iter().map(|s| s.as_bytes().to_vec()).collect())
}

/// The standard preference file: `prompt`, `chosen`, `rejected` UTF-8 strings, two rows.
const STRINGS: &str =
    "required binary prompt (UTF8); required binary chosen (UTF8); required binary rejected (UTF8);";

fn two_prefs() -> [Col; 3] {
    [
        texts(&["What is 2+2?", "Capital of France?"]),
        texts(&[" 4", " Paris"]),
        texts(&[" 5", " Lyon"]),
    ]
}

fn plain(e: &PreferenceExample) -> [&str; 3] {
    fn t(x: &Text) -> &str {
        match x {
            Text::Plain(s) => s.as_str(),
            Text::Chat(_) => panic!("chat"),
        }
    }
    [t(&e.prompt), t(&e.chosen), t(&e.rejected)]
}

fn read_prefs(p: &Path) -> Result<Vec<PreferenceExample>, String> {
    read_records(p, false, parse_preference_line)
        .map(|l| l.examples.into_iter().map(|e| e.value).collect())
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------
// Class 1: random byte mutations of a small Parquet file.

/// Every single-byte mutation (three masks at every offset) of pyarrow's small preference
/// file is read without a panic (an error or records); those on which the `parquet` crate
/// itself panics are errors naming the file, and `logps` on one exits 1 with that message
/// and no panic text.
#[test]
fn parquet_byte_mutations_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/prefs_standard.pyarrow.parquet"),
    )
    .unwrap();
    let p = dir.path().join("mutant.parquet");
    let (mut panics, mut errors, mut total) = (Vec::new(), 0, 0);
    for off in 0..good.len() {
        for mask in [0x01u8, 0x10, 0xff] {
            let mut b = good.clone();
            b[off] ^= mask;
            std::fs::write(&p, &b).unwrap();
            total += 1;
            let r = std::panic::catch_unwind(|| read_prefs(&p));
            let r =
                r.unwrap_or_else(|_| panic!("offset {off}, mask {mask:#x}: the reader panicked"));
            if let Err(e) = r {
                errors += 1;
                assert!(e.contains("mutant.parquet"), "offset {off}: {e}");
                if e.contains("the Parquet reader failed on it") {
                    panics.push((off, mask, b));
                }
            }
        }
    }
    eprintln!(
        "{total} mutations: {errors} errors, {} contained panics of the parquet crate",
        panics.len()
    );
    assert!(
        !panics.is_empty(),
        "no mutation reaches a panic of the parquet crate"
    );
    let (off, mask, bytes) = &panics[0];
    eprintln!("the CLI on offset {off}, mask {mask:#x}");
    std::fs::write(&p, bytes).unwrap();
    let model = tiny_model(dir.path());
    let out = dir.path().join("out.jsonl");
    let e = refused(
        &[
            "logps",
            "--model",
            s(&model),
            "--data",
            s(&p),
            "--out",
            s(&out),
        ],
        &["mutant.parquet", "not a readable Parquet file"],
    );
    assert!(
        !e.contains("RUST_BACKTRACE") && !e.contains("thread '"),
        "{e}"
    );
    assert!(!out.exists());
}

// ---------------------------------------------------------------------------------------
// Class 4: binary, date, timestamp and decimal columns.

/// `binary` columns without the `UTF8` annotation (pyarrow's `binary`, older Spark and Hive
/// writers) are text as `datasets` decodes it: UTF-8, not base64.
#[test]
fn binary_columns_are_read_as_utf8_text() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("binary.parquet");
    write_pq(
        &p,
        "required binary prompt; required binary chosen; required binary rejected;",
        Compression::SNAPPY,
        &two_prefs(),
    );
    let got = read_prefs(&p).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(plain(&got[0]), ["What is 2+2?", " 4", " 5"]);
    assert_eq!(plain(&got[1]), ["Capital of France?", " Paris", " Lyon"]);
}

/// A binary value that is not UTF-8 is refused naming the file, the row and the column.
#[test]
fn binary_not_utf8_is_refused_naming_row_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bytes.parquet");
    let [prompt, chosen, _] = two_prefs();
    write_pq(
        &p,
        "required binary prompt; required binary chosen; required binary rejected;",
        Compression::SNAPPY,
        &[
            prompt,
            chosen,
            Col::Bytes(vec![b" 5".to_vec(), vec![b' ', 0xff, 0xfe, b'x']]),
        ],
    );
    let e = read_prefs(&p).unwrap_err();
    assert!(
        e.contains("bytes.parquet:2: field `rejected`") && e.contains("not valid UTF-8"),
        "{e}"
    );
    let model = tiny_model(dir.path());
    let out = dir.path().join("out.jsonl");
    refused(
        &[
            "logps",
            "--model",
            s(&model),
            "--data",
            s(&p),
            "--out",
            s(&out),
        ],
        &["bytes.parquet:2", "`rejected`", "not valid UTF-8"],
    );
}

/// Date, timestamp and decimal columns where text is expected are refused naming the column
/// and the type (before: the date's text "2022-01-08" was the completion); the same columns
/// beside the text are ignored, as any other extra column.
#[test]
fn date_timestamp_decimal_columns_are_refused_where_text_is_expected() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Col, &str); 4] = [
        (
            "required int32 rejected (DATE);",
            Col::I32(vec![19000, 19001]),
            "DATE",
        ),
        (
            "required int64 rejected (TIMESTAMP_MILLIS);",
            Col::I64(vec![1_700_000_000_000, 1_700_000_000_001]),
            "TIMESTAMP",
        ),
        (
            "required int32 rejected (DECIMAL(9,2));",
            Col::I32(vec![12345, 678]),
            "DECIMAL",
        ),
        (
            "required int32 rejected (TIME_MILLIS);",
            Col::I32(vec![1, 2]),
            "TIME",
        ),
    ];
    for (i, (field, col, ty)) in cases.into_iter().enumerate() {
        let p = dir.path().join(format!("typed{i}.parquet"));
        let [prompt, chosen, _] = two_prefs();
        write_pq(
            &p,
            &format!("required binary prompt (UTF8); required binary chosen (UTF8); {field}"),
            Compression::SNAPPY,
            &[prompt, chosen, col],
        );
        let e = read_prefs(&p).unwrap_err();
        assert!(
            e.contains(&format!("typed{i}.parquet:1: field `rejected`")) && e.contains(ty),
            "{ty}: {e}"
        );
        // The same type in an extra column is ignored.
        let q = dir.path().join(format!("extra{i}.parquet"));
        let extra = field.replace("rejected", "created");
        let [a, b, c] = two_prefs();
        let col = match i {
            1 => Col::I64(vec![1, 2]),
            _ => Col::I32(vec![1, 2]),
        };
        write_pq(
            &q,
            &format!("{STRINGS} {extra}"),
            Compression::SNAPPY,
            &[a, b, c, col],
        );
        assert_eq!(read_prefs(&q).unwrap().len(), 2, "{ty} beside the text");
    }
}

// ---------------------------------------------------------------------------------------
// Class 5: piped data and FIFOs.

/// JSONL of 40 records of exactly 128 bytes each: 5120 bytes, a line boundary at byte 4096.
fn jsonl_over_4k() -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    for i in 0..40 {
        let head = format!("{{\"prompt\": \"Question {i:02}:");
        let tail = "\", \"chosen\": \" yes\", \"rejected\": \" no\"}\n";
        let pad = 128 - head.len() - tail.len();
        out.extend_from_slice(format!("{head}{}{tail}", " x".repeat(pad / 2)).as_bytes());
        if pad % 2 == 1 {
            out.insert(out.len() - tail.len(), b'y');
        }
    }
    assert_eq!(out.len(), 40 * 128);
    assert_eq!(out[4095], b'\n');
    (out, 40)
}

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// `cat data.jsonl | difinfo-train logps --data /dev/stdin`: every record is scored (before:
/// the sniffer's first 4 KiB were lost, 8 of 40 records scored, exit 0).
#[test]
fn piped_jsonl_keeps_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out = dir.path().join("out.jsonl");
    let (data, n) = jsonl_over_4k();
    let mut child = Command::new(env!("CARGO_BIN_EXE_difinfo-train"))
        .args([
            "logps",
            "--model",
            s(&model),
            "--data",
            "/dev/stdin",
            "--out",
            s(&out),
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        // Two writes, so the pipe's first read is not the whole file.
        let _ = stdin.write_all(&data[..1000]);
        std::thread::sleep(Duration::from_millis(50));
        let _ = stdin.write_all(&data[1000..]);
    });
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(lines(&out), n, "{err}");
}

/// `--data` a FIFO: opened once, read whole, no hang (before: the second open waited for a
/// writer forever).
#[test]
fn fifo_data_is_read_once_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out = dir.path().join("out.jsonl");
    let fifo = dir.path().join("data.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let (data, n) = jsonl_over_4k();
    let f = fifo.clone();
    // Not joined: if the command never opens the FIFO, the writer waits for it forever.
    std::thread::spawn(move || {
        if let Ok(mut w) = std::fs::OpenOptions::new().write(true).open(&f) {
            let _ = w.write_all(&data);
        }
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_difinfo-train"))
        .args([
            "logps",
            "--model",
            s(&model),
            "--data",
            s(&fifo),
            "--out",
            s(&out),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("logps on a FIFO still running after 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(status.success(), "{err}");
    assert_eq!(lines(&out), n, "{err}");
}

/// A Parquet file piped through `/dev/stdin` (not seekable) is read from memory.
#[test]
fn piped_parquet_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.parquet");
    write_pq(&p, STRINGS, Compression::SNAPPY, &two_prefs());
    let model = tiny_model(dir.path());
    let out = dir.path().join("out.jsonl");
    let data = std::fs::read(&p).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_difinfo-train"))
        .args([
            "logps",
            "--model",
            s(&model),
            "--data",
            "/dev/stdin",
            "--out",
            s(&out),
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(lines(&out), 2, "{err}");
}

// ---------------------------------------------------------------------------------------
// Weak results: shard directories, codecs.

/// A shard directory reads `*.PARQUET` as Parquet (before: skipped in silence) and refuses a
/// `.jsonl` file, naming it (before: skipped in silence).
#[test]
fn shard_directories_read_upper_case_and_refuse_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    write_pq(
        &shards.join("a.parquet"),
        STRINGS,
        Compression::SNAPPY,
        &two_prefs(),
    );
    write_pq(
        &shards.join("b.PARQUET"),
        STRINGS,
        Compression::SNAPPY,
        &two_prefs(),
    );
    std::fs::write(shards.join("README.md"), "# a dataset\n").unwrap();
    assert_eq!(read_prefs(&shards).unwrap().len(), 4);
    std::fs::copy(prefs(), shards.join("extra.jsonl")).unwrap();
    let e = read_prefs(&shards).unwrap_err();
    assert!(
        e.contains("extra.jsonl") && e.contains("Parquet shards"),
        "{e}"
    );
    let model = tiny_model(dir.path());
    let out = dir.path().join("out.jsonl");
    refused(
        &[
            "logps",
            "--model",
            s(&model),
            "--data",
            s(&shards),
            "--out",
            s(&out),
        ],
        &["extra.jsonl"],
    );
}

/// Parquet written with each codec the field's writers use reads (before: gzip, brotli and
/// lz4 were "Disabled feature at compile time").
#[test]
fn parquet_codecs_gzip_brotli_lz4_zstd_are_read() {
    use parquet::basic::{BrotliLevel, GzipLevel, ZstdLevel};
    let dir = tempfile::tempdir().unwrap();
    for (name, c) in [
        ("gzip", Compression::GZIP(GzipLevel::default())),
        ("brotli", Compression::BROTLI(BrotliLevel::default())),
        ("lz4", Compression::LZ4),
        ("lz4_raw", Compression::LZ4_RAW),
        ("zstd", Compression::ZSTD(ZstdLevel::default())),
        ("snappy", Compression::SNAPPY),
        ("none", Compression::UNCOMPRESSED),
    ] {
        let p = dir.path().join(format!("{name}.parquet"));
        write_pq(&p, STRINGS, c, &two_prefs());
        let got = read_prefs(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            plain(&got[1]),
            ["Capital of France?", " Paris", " Lyon"],
            "{name}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Fuzz findings of the `parquet_file` target (round 2 campaign).

/// A fixture of `tests/fixtures/`.
fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The fuzzer's 1.2 kB file whose footer declares a schema list of 230 686 719 elements: the
/// `parquet` crate reserved 22 GB for it before reading one (an allocation failure, which
/// aborts the process: before, `logps --data` on it died with "memory allocation of
/// 22145925024 bytes failed"). It is refused naming the file and the list, quickly.
#[test]
fn a_footer_list_longer_than_the_footer_is_refused() {
    let p = fixture("fuzz_parquet_schema_list_22gb.parquet");
    let t = Instant::now();
    let e = read_prefs(&p).unwrap_err();
    assert!(
        e.contains("fuzz_parquet_schema_list_22gb.parquet:0: not a readable Parquet file")
            && e.contains("the footer holds a list of 230686719 elements in 982 bytes"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

/// The fuzzer's 409-byte file whose footer declares field 5 (`key_value_metadata`) a double:
/// the `parquet` crate picks its reader by the field id, not the declared type, read a list
/// header out of the double's bytes and reserved 10.5 GB for it (an allocation failure,
/// which aborts the process). It is refused naming the file, the field and both types.
#[test]
fn a_footer_field_of_another_thrift_type_is_refused() {
    let p = fixture("fuzz_parquet_kv_double_10gb.parquet");
    let t = Instant::now();
    let e = read_prefs(&p).unwrap_err();
    assert!(
        e.contains("fuzz_parquet_kv_double_10gb.parquet:0: not a readable Parquet file: the footer holds field 5 (key_value_metadata) of FileMetaData as Thrift type double, expected list<KeyValue>"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

/// The fuzzer's 580-byte file whose column metadata holds a list of 234 881 023 booleans in a
/// few bytes: the crate skips a list of booleans without reading a byte per element, 2³¹
/// turns of a loop for a few bytes (14 s under the fuzzer's instrumentation). Refused naming
/// the file and the list, at once.
#[test]
fn a_footer_list_of_booleans_is_refused_without_walking_it() {
    let p = fixture("fuzz_parquet_bool_list_slow.parquet");
    let t = Instant::now();
    let e = read_prefs(&p).unwrap_err();
    assert!(
        e.contains("fuzz_parquet_bool_list_slow.parquet:0: not a readable Parquet file")
            && e.contains("the footer holds a list of 234881023 elements in"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

/// `v` as a Thrift compact i32: zigzag, then a varint.
fn thrift_i32(v: i32) -> Vec<u8> {
    let mut z = ((v << 1) ^ (v >> 31)) as u32;
    let mut out = Vec::new();
    loop {
        if z < 0x80 {
            out.push(z as u8);
            return out;
        }
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
}

/// The standard preference file (uncompressed, at `p`) with its first column chunk replaced by
/// one page: a header of the fields 1-3 (`kind`, then both sizes: the rest of the chunk),
/// then `more` (fields from 4 on, their stop byte and the header's), then filler bytes.
fn with_first_chunk(p: &Path, kind: i32, more: &[u8]) {
    write_pq(p, STRINGS, Compression::UNCOMPRESSED, &two_prefs());
    let mut b = std::fs::read(p).unwrap();
    let (start, len) = {
        use parquet::file::reader::FileReader;
        let r = parquet::file::reader::SerializedFileReader::new(bytes::Bytes::from(b.clone()))
            .unwrap();
        r.metadata().row_group(0).column(0).byte_range()
    };
    let header = |size: i32| {
        let mut h = vec![0x15];
        h.extend(thrift_i32(kind));
        for _ in 0..2 {
            h.push(0x15);
            h.extend(thrift_i32(size));
        }
        h.extend(more);
        h
    };
    let size = len as i32 - header(0).len() as i32;
    let mut chunk = header(size);
    let size = len as i32 - chunk.len() as i32;
    chunk = header(size);
    assert_eq!(
        chunk.len() as i32 + size,
        len as i32,
        "the sizes' varints differ in length"
    );
    chunk.resize(len as usize, b'x');
    b[start as usize..(start + len) as usize].copy_from_slice(&chunk);
    std::fs::write(p, &b).unwrap();
}

/// A dictionary page of a few bytes declaring 2³¹ - 1 values: the crate made a vector of that
/// many values (64 GB) before decoding one, an allocation failure that aborts. Refused naming
/// the file, column and page.
#[test]
fn a_dictionary_of_more_values_than_its_bytes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dict.parquet");
    // Field 7 (dictionary_page_header): num_values, encoding PLAIN; then the stops.
    let mut more = vec![0x4c, 0x15];
    more.extend(thrift_i32(i32::MAX));
    more.extend([0x15, 0x00, 0x00, 0x00]);
    with_first_chunk(&p, 2, &more);
    let e = read_prefs(&p).unwrap_err();
    assert!(
        e.contains("dict.parquet:0: not a readable Parquet file: row group 0, column `prompt`, page 0: a dictionary of 2147483647 values in"),
        "{e}"
    );
}

/// A page header holding a list of 2³¹ - 1 booleans in a few bytes: the crate skipped it in
/// 2³¹ turns of a loop (seconds per header, a few bytes each). Refused at once naming the
/// file, column and page.
#[test]
fn a_page_header_list_of_booleans_is_refused_without_walking_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bools.parquet");
    // Field 9, a list of booleans (header 0xf1, varint count), then the stop.
    with_first_chunk(&p, 0, &[0x69, 0xf1, 0xff, 0xff, 0xff, 0xff, 0x07, 0x00]);
    let t = Instant::now();
    let e = read_prefs(&p).unwrap_err();
    assert!(
        e.contains("bools.parquet:0: not a readable Parquet file: row group 0, column `prompt`, page 0: the page header holds a list of 2147483647 elements in"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

/// Class 1 (fuzz finding slow-unit-5cb9ca2f, 438 bytes): lists of booleans the walk read out
/// of step with the crate (a boolean list element is one byte on the wire, none in the crate's
/// skip) let the crate loop for two minutes on the file; refused at once, naming the file.
#[test]
fn boolean_lists_read_out_of_step_are_refused_at_once() {
    // Read as the fuzz target reads it: the bytes as Parquet (the file does not start with
    // the magic, so `--data` would sniff it as JSON Lines).
    let p = fixture("fuzz_parquet_nested_bool_lists_slow.parquet");
    let bytes = std::fs::read(&p).unwrap();
    let t = Instant::now();
    let e = difinfo_trainer::records::read_parquet_bytes(&bytes, &p, false, parse_preference_line)
        .map(drop)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fuzz_parquet_nested_bool_lists_slow.parquet:0: not a readable Parquet file"),
        "{e}"
    );
    eprintln!("{e}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}
