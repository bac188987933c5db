//! Datasets as users hold them: JSON arrays, Parquet files (written here with the parquet
//! crate's writer, and by pyarrow in `tests/fixtures/`) and directories of Parquet shards, in
//! the standard, conversational and implicit-prompt layouts; their records equal their JSONL
//! twin's, their errors name file, line (or row) and field, and a preference run on a Parquet
//! file or a JSON array logs the same metrics, bit for bit, as on the JSONL file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use difinfo_trainer::records::{
    parse_preference_line, parse_prompt_line, parse_sft_line, read_records, DataFormat,
    PreferenceExample,
};
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_difinfo-train");

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn jsonl_rows(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Writes `rows` as a JSON array, one element per line after an opening line (so element `i`
/// starts on line `i + 2`).
fn write_json_array(path: &Path, rows: &[Value]) {
    let body: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(path, format!("[\n{}\n]\n", body.join(",\n"))).unwrap();
}

/// Writes `rows` as Parquet with the parquet crate's low-level writer: each field of any row
/// becomes a column, a string (`optional binary (UTF8)`) or a list of `{role, content}`
/// messages (an optional `LIST` of a required group), with repetition and definition levels
/// as pyarrow writes them; a field a row lacks is null there.
fn write_parquet(path: &Path, rows: &[Value], row_group_size: usize) {
    let mut cols: Vec<(String, bool)> = Vec::new();
    for r in rows {
        for (k, v) in r.as_object().unwrap() {
            if !v.is_null() && !cols.iter().any(|(c, _)| c == k) {
                cols.push((k.clone(), v.is_array()));
            }
        }
    }
    let mut fields = String::new();
    for (name, chat) in &cols {
        if *chat {
            fields.push_str(&format!(
                "optional group {name} (LIST) {{ repeated group list {{ required group element {{ required binary role (UTF8); required binary content (UTF8); }} }} }}\n"
            ));
        } else {
            fields.push_str(&format!("optional binary {name} (UTF8);\n"));
        }
    }
    let schema = Arc::new(
        parquet::schema::parser::parse_message_type(&format!("message m {{ {fields} }}")).unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut w =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    for group in rows.chunks(row_group_size) {
        let mut rg = w.next_row_group().unwrap();
        for (name, chat) in &cols {
            // A list of messages is two leaf columns, role then content.
            let leaves: &[&str] = if *chat { &["role", "content"] } else { &[""] };
            for leaf in leaves {
                let mut col = rg.next_column().unwrap().unwrap();
                let (mut vals, mut def, mut rep) = (Vec::new(), Vec::new(), Vec::new());
                for r in group {
                    match r.get(name.as_str()).unwrap_or(&Value::Null) {
                        Value::String(s) => {
                            vals.push(ByteArray::from(s.as_str()));
                            def.push(1);
                        }
                        Value::Null => {
                            def.push(0);
                            rep.push(0);
                        }
                        Value::Array(ms) => {
                            if ms.is_empty() {
                                def.push(1);
                                rep.push(0);
                            }
                            for (i, m) in ms.iter().enumerate() {
                                vals.push(ByteArray::from(m[*leaf].as_str().unwrap()));
                                def.push(2);
                                rep.push(i16::from(i > 0));
                            }
                        }
                        other => panic!("{other}"),
                    }
                }
                let w = col.typed::<ByteArrayType>();
                if *chat {
                    w.write_batch(&vals, Some(&def), Some(&rep)).unwrap();
                } else {
                    w.write_batch(&vals, Some(&def), None).unwrap();
                }
                col.close().unwrap();
            }
        }
        rg.close().unwrap();
    }
    w.close().unwrap();
}

fn prefs(path: &Path) -> Vec<(usize, PreferenceExample)> {
    read_records(path, false, parse_preference_line)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .examples
        .into_iter()
        .map(|l| (l.line, l.value))
        .collect()
}

fn values(v: Vec<(usize, PreferenceExample)>) -> Vec<PreferenceExample> {
    v.into_iter().map(|(_, x)| x).collect()
}

#[test]
fn every_format_and_layout_reads_as_its_jsonl_twin() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, jsonl, pyarrow) in [
        (
            "standard",
            repo("data/example_prefs.jsonl"),
            "prefs_standard.pyarrow.parquet",
        ),
        (
            "chat",
            repo("data/example_prefs_chat.jsonl"),
            "prefs_chat.pyarrow.parquet",
        ),
        (
            "implicit",
            fixture("hh_implicit.jsonl"),
            "hh_implicit.pyarrow.parquet",
        ),
    ] {
        let rows = jsonl_rows(&jsonl);
        let want = prefs(&jsonl);
        assert_eq!(want.len(), rows.len());
        let arr = tmp.path().join(format!("{name}.json"));
        write_json_array(&arr, &rows);
        let pq = tmp.path().join(format!("{name}.parquet"));
        write_parquet(&pq, &rows, 5);
        assert_eq!(DataFormat::detect(&arr).unwrap(), DataFormat::JsonArray);
        assert_eq!(DataFormat::detect(&pq).unwrap(), DataFormat::Parquet);
        assert_eq!(DataFormat::detect(&jsonl).unwrap(), DataFormat::Jsonl);
        let got_arr = prefs(&arr);
        // A JSON array's records are located at the line their element starts on.
        assert_eq!(
            got_arr.iter().map(|x| x.0).collect::<Vec<_>>(),
            (2..rows.len() + 2).collect::<Vec<_>>()
        );
        assert_eq!(values(got_arr), values(want.clone()), "{name}: JSON array");
        let got_pq = prefs(&pq);
        assert_eq!(
            got_pq.iter().map(|x| x.0).collect::<Vec<_>>(),
            (1..=rows.len()).collect::<Vec<_>>(),
            "{name}: Parquet rows count from 1 across row groups"
        );
        assert_eq!(values(got_pq), values(want.clone()), "{name}: Parquet");
        assert_eq!(
            values(prefs(&fixture(pyarrow))),
            values(want.clone()),
            "{name}: pyarrow's file"
        );
        // The kind of record matches: chat layouts give message lists.
        assert_eq!(want[0].1.prompt.is_chat(), name == "chat");
    }
    // A compact one-line array and a byte-order mark read too.
    let rows = jsonl_rows(&repo("data/example_prefs.jsonl"));
    let one = tmp.path().join("one.json");
    std::fs::write(&one, format!("\u{feff}  {}", Value::Array(rows.clone()))).unwrap();
    assert_eq!(prefs(&one).len(), rows.len());
    assert!(prefs(&one).iter().all(|x| x.0 == 1));
    let empty = tmp.path().join("empty.json");
    std::fs::write(&empty, " [ ] ").unwrap();
    assert!(prefs(&empty).is_empty());
}

#[test]
fn sft_and_prompt_files_read_from_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = jsonl_rows(&repo("data/example_sft.jsonl"));
    let jsonl = repo("data/example_sft.jsonl");
    let pq = tmp.path().join("sft.parquet");
    write_parquet(&pq, &rows, 100);
    let arr = tmp.path().join("sft.json");
    write_json_array(&arr, &rows);
    let v = |p: &Path| -> Vec<_> {
        read_records(p, false, parse_sft_line)
            .unwrap()
            .examples
            .into_iter()
            .map(|l| l.value)
            .collect()
    };
    assert_eq!(v(&pq), v(&jsonl));
    assert_eq!(v(&arr), v(&jsonl));
    // The prompt file mixes string and message prompts, which one Parquet column cannot:
    // each kind gets its own file, and the JSON array holds both.
    let prompts = jsonl_rows(&repo("data/example_prompts.jsonl"));
    let p = |p: &Path| -> Vec<_> {
        read_records(p, false, parse_prompt_line)
            .unwrap()
            .examples
            .into_iter()
            .map(|l| l.value)
            .collect()
    };
    let want = p(&repo("data/example_prompts.jsonl"));
    let (chat, plain): (Vec<Value>, Vec<Value>) = prompts
        .iter()
        .cloned()
        .partition(|r| r["prompt"].is_array());
    assert!(!chat.is_empty() && !plain.is_empty());
    let (pc, pp) = (tmp.path().join("pc.parquet"), tmp.path().join("pp.parquet"));
    write_parquet(&pc, &chat, 3);
    write_parquet(&pp, &plain, 3);
    let (wc, wp): (Vec<_>, Vec<_>) = want.iter().cloned().partition(|x| x.prompt.is_chat());
    assert_eq!(p(&pc), wc);
    assert_eq!(p(&pp), wp);
    let arr = tmp.path().join("prompts.json");
    write_json_array(&arr, &prompts);
    assert_eq!(p(&arr), want);
}

#[test]
fn a_directory_of_shards_reads_in_name_order_and_locates_rows_in_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = jsonl_rows(&repo("data/example_prefs.jsonl"));
    let dir = tmp.path().join("shards");
    std::fs::create_dir(&dir).unwrap();
    // Hugging Face's naming: train-00000-of-00003.parquet, ...; written out of order.
    let parts: Vec<&[Value]> = vec![&rows[..10], &rows[10..25], &rows[25..]];
    for i in [2, 0, 1] {
        write_parquet(
            &dir.join(format!("train-{i:05}-of-00003.parquet")),
            parts[i],
            4,
        );
    }
    std::fs::write(dir.join("README.md"), "not a shard").unwrap();
    assert_eq!(DataFormat::detect(&dir).unwrap(), DataFormat::ParquetShards);
    let got = prefs(&dir);
    assert_eq!(
        got.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=36).collect::<Vec<_>>()
    );
    assert_eq!(
        values(got),
        values(prefs(&repo("data/example_prefs.jsonl")))
    );
    let loaded = read_records(&dir, false, parse_preference_line).unwrap();
    assert_eq!(
        loaded.locate(&dir, 12),
        (dir.join("train-00001-of-00003.parquet"), 2)
    );
    assert_eq!(
        loaded.locate(&dir, 1),
        (dir.join("train-00000-of-00003.parquet"), 1)
    );
    // A bad row in the second shard: named by shard, row and field.
    let mut bad = parts[1].to_vec();
    bad[3]["chosen"] = Value::Null;
    write_parquet(&dir.join("train-00001-of-00003.parquet"), &bad, 4);
    let e = read_records(&dir, false, parse_preference_line)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train-00001-of-00003.parquet:4: field `chosen`"),
        "{e}"
    );
    let skipped = read_records(&dir, true, parse_preference_line).unwrap();
    assert_eq!(skipped.examples.len(), 35);
    assert_eq!(skipped.errors[0].line, 4);
    let empty = tmp.path().join("none");
    std::fs::create_dir(&empty).unwrap();
    let e = read_records(&empty, false, parse_preference_line)
        .unwrap_err()
        .to_string();
    assert!(e.contains("none") && e.contains("Parquet shards"), "{e}");
}

#[test]
fn errors_name_file_line_or_row_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rows = jsonl_rows(&repo("data/example_prefs.jsonl"));
    rows.truncate(6);
    rows[4].as_object_mut().unwrap().remove("rejected");
    // JSON array: the element's first line.
    let arr = tmp.path().join("a.json");
    write_json_array(&arr, &rows);
    let e = read_records(&arr, false, parse_preference_line)
        .unwrap_err()
        .to_string();
    assert_eq!(e, format!("{}:6: field `rejected`: missing", arr.display()));
    // Parquet: the row (1-based), the same field message (a null is a missing field, as a
    // row of a Hugging Face dataset lacking a field has it).
    let pq = tmp.path().join("a.parquet");
    write_parquet(&pq, &rows, 2);
    let e = read_records(&pq, false, parse_preference_line)
        .unwrap_err()
        .to_string();
    assert_eq!(e, format!("{}:5: field `rejected`: missing", pq.display()));
    // Chat rows: the message field inside the list.
    let mut chat = jsonl_rows(&repo("data/example_prefs_chat.jsonl"));
    chat.truncate(3);
    chat[2]["prompt"][0]["role"] = Value::String("wizard".into());
    let pq = tmp.path().join("c.parquet");
    write_parquet(&pq, &chat, 10);
    let e = read_records(&pq, false, parse_preference_line)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "{}:3: field `prompt[0].role`: unknown role `wizard`",
            pq.display()
        )),
        "{e}"
    );
    // Elements that are not objects: at their line (skippable); an array that is not closed
    // or has a syntax error: at its line, skipping or not (the records cannot be told apart).
    let bad = tmp.path().join("b.json");
    let good = r#"{"prompt": "a", "chosen": "b", "rejected": "c"}"#;
    std::fs::write(&bad, format!("[\n{good},\n 7, \"x\",\n{good}]")).unwrap();
    let e = read_records(&bad, false, parse_preference_line)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "{}:3: expected a JSON object, found a number",
            bad.display()
        )),
        "{e}"
    );
    let skipped = read_records(&bad, true, parse_preference_line).unwrap();
    assert_eq!(
        skipped.examples.iter().map(|x| x.line).collect::<Vec<_>>(),
        [2, 4]
    );
    assert_eq!(
        skipped.errors.iter().map(|x| x.line).collect::<Vec<_>>(),
        [3, 3]
    );
    std::fs::write(&bad, format!("[\n{good},\n 7,\n")).unwrap();
    let e = read_records(&bad, true, parse_preference_line)
        .unwrap_err()
        .to_string();
    assert!(e.contains(":4: the JSON array is not closed"), "{e}");
    std::fs::write(&bad, "[{\"prompt\": \"a\",\n\n \"chosen\": }]").unwrap();
    let e = read_records(&bad, true, parse_preference_line)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("{}:3: invalid JSON in the array", bad.display())),
        "{e}"
    );
    std::fs::write(&bad, "[{}] [").unwrap();
    let e = read_records(&bad, true, parse_preference_line)
        .unwrap_err()
        .to_string();
    assert!(e.contains("text after the JSON array"), "{e}");
    // A truncated Parquet file: named, never a panic.
    let bytes = std::fs::read(fixture("prefs_standard.pyarrow.parquet")).unwrap();
    for cut in [4, 100, bytes.len() - 20] {
        let t = tmp.path().join("t.parquet");
        let mut b = bytes[..cut].to_vec();
        if cut > 8 {
            b.extend_from_slice(b"PAR1");
        }
        std::fs::write(&t, &b).unwrap();
        let e = read_records(&t, false, parse_preference_line)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.parquet") && e.contains("Parquet"),
            "{cut}: {e}"
        );
    }
}

fn run(args: &[&std::ffi::OsStr]) -> String {
    let o = Command::new(BIN).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{:?}\n{}",
        args,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// metrics.jsonl without the wall-clock throughput.
fn metrics(run_dir: &Path) -> Vec<serde_json::Map<String, Value>> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut m: serde_json::Map<String, Value> = serde_json::from_str(l).unwrap();
            m.remove("tokens_per_second");
            m
        })
        .collect()
}

#[test]
fn parquet_and_json_array_train_like_their_jsonl_twin() {
    use difinfo_trainer::config_json::Architecture;
    use difinfo_trainer::init::{arch_config, init_checkpoint, ModelSize, BUILTIN_CORPUS};
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    init_checkpoint(
        &model,
        arch_config(ModelSize::Tiny, Architecture::Llama),
        BUILTIN_CORPUS,
        0,
    )
    .unwrap();
    for (name, jsonl) in [
        ("standard", repo("data/example_prefs.jsonl")),
        ("chat", repo("data/example_prefs_chat.jsonl")),
    ] {
        let rows = jsonl_rows(&jsonl);
        let arr = tmp.path().join(format!("{name}.json"));
        write_json_array(&arr, &rows);
        let pq = tmp.path().join(format!("{name}.parquet"));
        write_parquet(&pq, &rows, 7);
        let train = |data: &Path, out: &str, pg: bool| -> PathBuf {
            let dir = tmp.path().join(out);
            let mut args: Vec<&std::ffi::OsStr> = vec![
                "dpo".as_ref(),
                "--model".as_ref(),
                model.as_os_str(),
                "--data".as_ref(),
                data.as_os_str(),
                "--output-dir".as_ref(),
                dir.as_os_str(),
                "--max-steps".as_ref(),
                "4".as_ref(),
                "--per-device-train-batch-size".as_ref(),
                "4".as_ref(),
                "--learning-rate".as_ref(),
                "1e-3".as_ref(),
                "--logging-steps".as_ref(),
                "1".as_ref(),
                "--max-length".as_ref(),
                "96".as_ref(),
            ];
            if pg {
                args.push("--objective".as_ref());
                args.push("dpo-pg".as_ref());
            }
            run(&args);
            dir
        };
        for pg in [false, true] {
            let tag = format!("{name}-{}", if pg { "pg" } else { "dpo" });
            let a = train(&jsonl, &format!("{tag}-jsonl"), pg);
            let b = train(&pq, &format!("{tag}-parquet"), pg);
            let c = train(&arr, &format!("{tag}-json"), pg);
            let ma = metrics(&a);
            assert_eq!(ma.len(), 4, "{tag}");
            assert_eq!(ma, metrics(&b), "{tag}: Parquet");
            assert_eq!(ma, metrics(&c), "{tag}: JSON array");
            let w = |d: &Path| std::fs::read(d.join("checkpoint-4/model.safetensors")).unwrap();
            assert!(
                w(&a) == w(&b) && w(&a) == w(&c),
                "{tag}: final weights differ"
            );
        }
    }
}
