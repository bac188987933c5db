//! Issue 20, GGUF: a header that panicked candle's reader (`general.alignment = 0`), metadata
//! arrays that cost 32 bytes of memory per byte of file, duplicate keys and tensor names, a
//! conversion cache fooled by an in-place rewrite that keeps the mtime, NaN weights converted
//! with exit 0, and a non-GGUF `--model x.gguf`.

#[allow(unused_imports)]
use super::*;

use std::collections::BTreeMap;
use std::process::Command;

use super::common::gguf::{gguf_config, micro_gguf, write_gguf, F32};
use super::common::{checkpoint, TempDir};
use candle_core::quantized::gguf_file::{self, Value as G};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use difinfo_trainer::config_json::Architecture;
use difinfo_trainer::gguf::import_file;
use difinfo_trainer::gguf_cache::resolve_model_in;
use difinfo_trainer::pretrained::read_tensors;

/// Runs the binary with the GGUF cache in `cache`; returns (success, stderr).
fn run_cached(cache: &Path, args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_difinfo-train"))
        .args(args)
        .env("DIFINFO_CACHE", cache)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    eprintln!("$ difinfo-train {}\n{err}", args.join(" "));
    (o.status.code(), err)
}

/// `logps --model <model>` on the repository's preference file, with the cache in `dir/cache`:
/// must fail cleanly; returns stderr.
fn logps_refused(dir: &Path, model: &Path) -> String {
    let out = dir.join("logps.jsonl");
    let (code, err) = run_cached(
        &dir.join("cache"),
        &[
            "logps",
            "--model",
            s(model),
            "--data",
            s(&prefs()),
            "--out",
            s(&out),
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists());
    err
}

/// A micro GGUF rewritten with `metadata` and `tensors` edited by `edit` (candle's writer
/// keeps duplicates: it writes what it is given).
fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, G)>, &mut Vec<(String, QTensor)>),
) {
    let mut f = std::fs::File::open(src).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let mut md: Vec<(String, G)> = c
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    md.sort_by(|a, b| a.0.cmp(&b.0));
    let names: BTreeMap<&String, ()> = c.tensor_infos.keys().map(|k| (k, ())).collect();
    let mut ts: Vec<(String, QTensor)> = names
        .keys()
        .map(|n| (n.to_string(), c.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    edit(&mut md, &mut ts);
    let md_refs: Vec<(&str, &G)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(dst).unwrap(), &md_refs, &t_refs).unwrap();
}

/// Inserts a metadata entry (`key`, GGUF value type `ty`, raw value bytes `value`) before the
/// others of a version 2/3 file, bumping the count. The entry's size must be a multiple of 32
/// so that the tensor data stays aligned.
fn insert_kv(bytes: &[u8], key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut entry = Vec::new();
    entry.extend((key.len() as u64).to_le_bytes());
    entry.extend(key.as_bytes());
    entry.extend(ty.to_le_bytes());
    entry.extend(value);
    assert_eq!(entry.len() % 32, 0, "entry of {} bytes", entry.len());
    let n_kv = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let mut out = bytes[..16].to_vec();
    out.extend((n_kv + 1).to_le_bytes());
    out.extend(entry);
    out.extend(&bytes[24..]);
    out
}

/// An array header (element type `ety`, `n` elements) followed by `data`.
fn array(ety: u32, n: u64, data: &[u8]) -> Vec<u8> {
    let mut v = ety.to_le_bytes().to_vec();
    v.extend(n.to_le_bytes());
    v.extend(data);
    v
}

/// Class 1: `general.alignment = 0` panicked candle's reader (division by zero) in `convert`
/// and `--model x.gguf`; now refused naming the file and the key. A non-power of two is
/// refused the same way.
#[test]
fn alignment_zero_is_refused() {
    for bad in [0u32, 3] {
        let (_src, g) = micro_gguf(
            Architecture::Llama,
            F32,
            &[("general.alignment", G::U32(bad))],
        );
        let gguf = g.join("micro.gguf");
        let out = g.join("hf");
        let e = refused(
            &["convert", "--gguf", s(&gguf), "--out", s(&out)],
            &["micro.gguf", "general.alignment", "power of two"],
        );
        assert!(!out.join("model.safetensors").exists(), "{e}");
        let e = logps_refused(g.path(), &gguf);
        assert!(
            e.contains("micro.gguf") && e.contains("general.alignment"),
            "{e}"
        );
    }
}

/// Class 1: hostile header fields give errors naming the file and the key or tensor, never a
/// panic: huge array and string lengths, nested arrays, a tensor past the end of the file,
/// too many dimensions, an overflowing shape, a misaligned offset.
#[test]
fn hostile_header_fields_are_named() {
    let (_src, g) = micro_gguf(Architecture::Llama, F32, &[]);
    let good = std::fs::read(g.join("micro.gguf")).unwrap();
    let p = g.join("hostile.gguf");
    let check = |bytes: &[u8], names: &[&str]| {
        std::fs::write(&p, bytes).unwrap();
        let e = import_file(&p).unwrap_err().to_string();
        for n in names {
            assert!(e.contains(n), "`{n}` not named: {e}");
        }
        assert!(e.contains("hostile.gguf"), "{e}");
    };
    // 2^40 u8 elements declared in a file of a few kB. (key 8+7, type 4, array head 12: pad)
    let mut v = array(0, 1 << 40, &[]);
    v.extend([0u8; 1]);
    check(
        &insert_kv(&good, "x.blob1", 9, &v),
        &["x.blob1", "1099511627776 elements", "bytes are left"],
    );
    // A string of 2^40 bytes.
    let mut v = (1u64 << 40).to_le_bytes().to_vec();
    v.extend([0u8; 4]);
    check(
        &insert_kv(&good, "x.string", 8, &v),
        &["x.string", "1099511627776 bytes"],
    );
    // Arrays of arrays of 2^40 elements each, skipped without allocating.
    let inner = array(0, 1 << 40, &[]);
    let mut v = array(9, 1, &inner);
    v.extend([0u8; 20]);
    check(
        &insert_kv(&good, "x.nested", 9, &v),
        &["x.nested", "elements"],
    );
    // The tokens array with 2^40 entries.
    let key = "tokenizer.ggml.tokens";
    let mut e = array(8, 1 << 40, &[]);
    e.extend(vec![0u8; 32 - (8 + key.len() + 4 + 12) % 32]);
    check(&insert_kv(&good, key, 9, &e), &[key]);
    // A tensor dimension patched to 2^40: its bytes are past the end of the file.
    let name = b"output_norm.weight";
    let at = good.windows(name.len()).position(|w| w == name).unwrap();
    let mut b = good.clone();
    b[at + name.len() + 4..at + name.len() + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    check(&b, &["output_norm.weight", "past the end"]);
    // n_dims = 9.
    let mut b = good.clone();
    b[at + name.len()..at + name.len() + 4].copy_from_slice(&9u32.to_le_bytes());
    check(&b, &["output_norm.weight", "9 dimensions"]);
    // An offset that is not a multiple of the alignment.
    let mut b = good.clone();
    let off = at + name.len() + 4 + 8 + 4;
    let o = u64::from_le_bytes(b[off..off + 8].try_into().unwrap());
    b[off..off + 8].copy_from_slice(&(o + 1).to_le_bytes());
    check(&b, &["output_norm.weight", "alignment"]);
}

/// Class 2: an unused metadata array cost 32 bytes of memory per byte of file (candle made
/// each element a 32-byte `Value`): 100 M one-byte elements took 3.2 GB and aborted `convert`
/// under a 2 GB address-space limit. Now the array is walked over without being kept and the
/// conversion succeeds in a fraction of that.
#[test]
fn unused_metadata_array_is_not_materialised() {
    let (_src, g) = micro_gguf(Architecture::Llama, F32, &[]);
    let good = std::fs::read(g.join("micro.gguf")).unwrap();
    let key = "x.unused_blob";
    let head = 8 + key.len() + 4 + 12;
    let n = 100_000_000 + (32 - (head + 100_000_000) % 32) % 32;
    let big = insert_kv(&good, key, 9, &array(0, n as u64, &vec![7u8; n]));
    let gguf = g.join("big.gguf");
    std::fs::write(&gguf, &big).unwrap();
    drop(big);
    let out = g.join("hf");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 2000000 && exec \"{}\" convert --gguf \"{}\" --out \"{}\"",
            env!("CARGO_BIN_EXE_difinfo-train"),
            s(&gguf),
            s(&out)
        ))
        .env("MALLOC_ARENA_MAX", "2")
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{:?}\n{err}", o.status);
    assert!(out.join("model.safetensors").exists());
}

/// Class 6: a duplicate metadata key was accepted (the last won); refused naming the file and
/// the key, through `convert` and the library.
#[test]
fn duplicate_metadata_key_is_refused() {
    let (_src, g) = micro_gguf(Architecture::Llama, F32, &[]);
    let dup = g.join("dup_key.gguf");
    rewrite(&g.join("micro.gguf"), &dup, |md, _| {
        md.push(("general.name".into(), G::String("other".into())));
    });
    let out = g.join("hf");
    refused(
        &["convert", "--gguf", s(&dup), "--out", s(&out)],
        &["dup_key.gguf", "general.name", "appears twice"],
    );
    assert!(!out.join("model.safetensors").exists());
}

/// Class 6: a duplicate tensor name was accepted (the last won); refused naming the file and
/// the tensor.
#[test]
fn duplicate_tensor_name_is_refused() {
    let (_src, g) = micro_gguf(Architecture::Llama, F32, &[]);
    let dup = g.join("dup_tensor.gguf");
    rewrite(&g.join("micro.gguf"), &dup, |_, ts| {
        let i = ts
            .iter()
            .position(|(n, _)| n == "output_norm.weight")
            .unwrap();
        let zeros = Tensor::zeros(32, candle_core::DType::F32, &Device::Cpu).unwrap();
        ts.insert(
            i + 1,
            (
                "output_norm.weight".into(),
                QTensor::quantize(&zeros, GgmlDType::F32).unwrap(),
            ),
        );
    });
    let e = import_file(&dup).unwrap_err().to_string();
    assert!(
        e.contains("dup_tensor.gguf") && e.contains("output_norm.weight") && e.contains("twice"),
        "{e}"
    );
    let out = g.join("hf");
    refused(
        &["convert", "--gguf", s(&dup), "--out", s(&out)],
        &["dup_tensor.gguf", "output_norm.weight", "appears twice"],
    );
}

/// Class 6: the `--model x.gguf` cache was keyed by path, size and mtime; an in-place rewrite
/// with other weights and the same mtime (`cp -p`) gave the old conversion. Keyed by content
/// now: the new weights are used.
#[test]
fn cache_follows_content_not_mtime() {
    let (src_a, g) = micro_gguf(Architecture::Llama, F32, &[]);
    let gguf = g.join("micro.gguf");
    let (src_b, _) = checkpoint(gguf_config(Architecture::Llama), 8);
    let b = g.join("b.gguf");
    write_gguf(src_b.path(), &b, F32, &[]);
    let (bytes_a, bytes_b) = (std::fs::read(&gguf).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(bytes_a.len(), bytes_b.len(), "same size, other weights");
    assert_ne!(bytes_a, bytes_b);
    let root = g.join("cache");
    let embed = |dir: &Path| {
        read_tensors(dir).unwrap().tensors["model.embed_tokens.weight"]
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let first = resolve_model_in(&gguf, &root, &mut |_| {}).unwrap();
    assert_eq!(embed(&first), embed(src_a.path()));
    // Rewrite in place, keeping the modification time.
    let mtime = std::fs::metadata(&gguf).unwrap().modified().unwrap();
    std::fs::write(&gguf, &bytes_b).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&gguf)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert_eq!(std::fs::metadata(&gguf).unwrap().modified().unwrap(), mtime);
    let mut converted = false;
    let second = resolve_model_in(&gguf, &root, &mut |_| converted = true).unwrap();
    assert!(converted, "the rewritten file is converted again");
    assert_eq!(embed(&second), embed(src_b.path()));
    // And the unchanged file keeps its conversion.
    let third = resolve_model_in(&gguf, &root, &mut |_| panic!("cached")).unwrap();
    assert_eq!(third, second);
}

/// Weak: `convert` wrote NaN weights with exit 0; refused now, naming the tensor and the file.
#[test]
fn nan_weight_is_refused_by_convert() {
    let (_src, g) = micro_gguf(Architecture::Llama, F32, &[]);
    let nan = g.join("nan.gguf");
    rewrite(&g.join("micro.gguf"), &nan, |_, ts| {
        let (_, t) = ts
            .iter_mut()
            .find(|(n, _)| n == "blk.0.ffn_down.weight")
            .unwrap();
        let mut v = t
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        v[5] = f32::NAN;
        let shape = t.shape().clone();
        *t = QTensor::quantize(
            &Tensor::from_vec(v, shape, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
    });
    let out = g.join("hf");
    refused(
        &["convert", "--gguf", s(&nan), "--out", s(&out)],
        &["nan.gguf", "blk.0.ffn_down.weight", "NaN"],
    );
    assert!(!out.join("model.safetensors").exists());
}

/// Weak: a file named `.gguf` that is not a GGUF file, given as `--model`, was reported as
/// "tokenizer.json: Not a directory"; now: not a GGUF file (bad magic), naming it.
#[test]
fn non_gguf_model_file_is_named() {
    let dir = TempDir::new();
    let fake = dir.join("x.gguf");
    std::fs::write(&fake, b"PK\x03\x04 not a model at all").unwrap();
    let e = logps_refused(dir.path(), &fake);
    assert!(
        e.contains("x.gguf") && e.contains("not a valid GGUF file") && e.contains("magic"),
        "{e}"
    );
    assert!(!e.contains("Not a directory"), "{e}");
    let out = dir.join("hf");
    refused(
        &["convert", "--gguf", s(&fake), "--out", s(&out)],
        &["x.gguf", "not a valid GGUF file", "magic"],
    );
}
