//! Corrupt GGUF headers give a `ModelError::BadFile` naming the file, the byte offset and
//! what is wrong: never an out-of-memory abort, never a panic.
//!
//! Each case starts from a small valid file written by candle's `gguf_file::write` (GGUF
//! v2: u64 lengths) and patches bytes of its header. An abort or a panic would take this
//! test binary down, so a passing run also proves there was neither.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tilt_models::{GgufFile, ModelError};

/// A valid file: a string, a u32, an array of strings and two F32 tensors.
fn base_file() -> Vec<u8> {
    let tokens = Value::Array(
        ["<s>", "</s>", "hello", "world"]
            .iter()
            .map(|s| Value::String(s.to_string()))
            .collect(),
    );
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(1)),
        ("tokenizer.ggml.tokens", tokens),
    ];
    let a = Tensor::arange(0f32, 8f32, &Device::Cpu)
        .unwrap()
        .reshape((2, 4))
        .unwrap();
    let b = Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap();
    let qa = QTensor::quantize(&a, GgmlDType::F32).unwrap();
    let qb = QTensor::quantize(&b, GgmlDType::F32).unwrap();
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &md, &[("weight.a", &qa), ("weight.b", &qb)]).unwrap();
    out.into_inner()
}

/// Where `needle` first occurs in `bytes`.
fn find(bytes: &[u8], needle: &[u8]) -> usize {
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} not in the file", String::from_utf8_lossy(needle)))
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

struct Files {
    dir: tempfile::TempDir,
    n: usize,
}

impl Files {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            n: 0,
        }
    }

    fn write(&mut self, bytes: &[u8]) -> PathBuf {
        self.n += 1;
        let p = self.dir.path().join(format!("case-{}.gguf", self.n));
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

/// Open `path`, which must fail with a `BadFile` naming it; the problem text.
fn problem(path: &Path) -> String {
    match GgufFile::open(path) {
        Ok(_) => panic!("{} opened, expected an error", path.display()),
        Err(ModelError::BadFile { path: p, problem }) => {
            assert_eq!(p, path.display().to_string());
            problem
        }
        Err(other) => panic!("expected BadFile, got {other}"),
    }
}

/// Assert that `problem` names byte `offset` and contains every one of `words`.
fn assert_names(problem: &str, offset: usize, words: &[&str]) {
    assert!(
        problem.contains(&format!("at byte {offset}:")),
        "expected byte {offset}: {problem}"
    );
    for w in words {
        assert!(problem.contains(w), "expected {w:?}: {problem}");
    }
}

#[test]
fn the_base_file_is_valid() {
    let mut f = Files::new();
    let path = f.write(&base_file());
    let mut g = GgufFile::open(&path).unwrap();
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.string_array("tokenizer.ggml.tokens").unwrap().len(), 4);
    assert_eq!(
        g.tensor_f32("weight.a", &[2, 4]).unwrap(),
        (0..8).map(|x| x as f32).collect::<Vec<_>>()
    );
}

/// Reading a key as the wrong type names the key and what it holds, in words (not Rust's
/// `Debug` of the value, which for an array would print all of it).
#[test]
fn wrong_types_are_named_in_words_and_listings_are_sorted() {
    let mut f = Files::new();
    let path = f.write(&base_file());
    let g = GgufFile::open(&path).unwrap();
    for (result, expected) in [
        (
            g.uint("tokenizer.ggml.tokens").map(|_| ()),
            "metadata key tokenizer.ggml.tokens should be a non-negative integer, found an \
             array of 4 string",
        ),
        (
            g.float("general.architecture").map(|_| ()),
            "metadata key general.architecture should be a float, found the string \"llama\"",
        ),
        (
            g.string("llama.block_count").map(|_| ()),
            "metadata key llama.block_count should be a string, found u32 1",
        ),
        (
            g.bool("llama.block_count").map(|_| ()),
            "metadata key llama.block_count should be a bool, found u32 1",
        ),
        (
            g.string_array("llama.block_count").map(|_| ()),
            "metadata key llama.block_count should be an array of strings, found u32 1",
        ),
        (
            g.int_array("tokenizer.ggml.tokens").map(|_| ()),
            "metadata key tokenizer.ggml.tokens: element 0 should be an integer, found the \
             string \"<s>\"",
        ),
    ] {
        match result {
            Err(ModelError::BadFile { problem, .. }) => assert_eq!(problem, expected),
            other => panic!("expected BadFile, got {other:?}"),
        }
    }
    assert_eq!(g.tensor_names(), ["weight.a", "weight.b"]);
    assert_eq!(g.keys_with_prefix("llama."), ["llama.block_count"]);
    assert!(g.keys_with_prefix("split.").is_empty());
}

#[test]
fn a_huge_string_length_is_rejected_before_allocating() {
    let base = base_file();
    let mut f = Files::new();
    // The value of general.architecture: key, then u32 type (8 = string), then its length.
    let len_at = find(&base, b"general.architecture") + "general.architecture".len() + 4;
    assert_eq!(&base[len_at..len_at + 8], &5u64.to_le_bytes());
    for (claimed, words) in [
        (
            u64::MAX,
            &["claims a length of 18446744073709551615", "accepted"][..],
        ),
        (1 << 40, &["general.architecture", "accepted"][..]),
        // Under the cap, but more than the file holds.
        (10_000_000, &["general.architecture", "the file has"][..]),
    ] {
        let mut bytes = base.clone();
        put_u64(&mut bytes, len_at, claimed);
        let p = problem(&f.write(&bytes));
        assert_names(&p, len_at, words);
    }
    // A key's own length.
    let mut bytes = base.clone();
    put_u64(&mut bytes, 24, u64::MAX);
    assert_names(
        &problem(&f.write(&bytes)),
        24,
        &["metadata key 0", "accepted"],
    );
}

#[test]
fn a_huge_array_length_is_rejected_before_allocating() {
    let base = base_file();
    let mut f = Files::new();
    // tokenizer.ggml.tokens: key, u32 type (9 = array), u32 element type, u64 length.
    let len_at = find(&base, b"tokenizer.ggml.tokens") + "tokenizer.ggml.tokens".len() + 8;
    assert_eq!(&base[len_at..len_at + 8], &4u64.to_le_bytes());
    for (claimed, words) in [
        (
            u64::MAX,
            &["tokenizer.ggml.tokens", "exceeds the 16777216 accepted"][..],
        ),
        (
            1 << 30,
            &["array of 1073741824 string elements", "accepted"][..],
        ),
        (
            1_000_000,
            &["needs at least 8000000 bytes", "the file has"][..],
        ),
    ] {
        let mut bytes = base.clone();
        put_u64(&mut bytes, len_at, claimed);
        let p = problem(&f.write(&bytes));
        assert_names(&p, len_at, words);
    }
    // An array of u8 (1 byte each) claiming more than the file holds.
    let mut bytes = base.clone();
    put_u32(&mut bytes, len_at - 4, 0);
    put_u64(&mut bytes, len_at, 5_000_000);
    assert_names(
        &problem(&f.write(&bytes)),
        len_at,
        &["5000000 u8 elements", "the file has"],
    );
}

#[test]
fn a_huge_tensor_or_metadata_count_is_rejected() {
    let base = base_file();
    let mut f = Files::new();
    // (field, claimed value, byte the problem is at, words)
    for (at, claimed, offset, words) in [
        (
            8,
            u64::MAX,
            8,
            &["tensor count 18446744073709551615 exceeds"][..],
        ),
        (8, 1 << 40, 8, &["tensor count", "exceeds"][..]),
        // Under the cap, but 100k descriptors cannot fit in a file this size.
        (
            8,
            100_000,
            8,
            &["claims 100000 tensors", "the file has"][..],
        ),
        (16, u64::MAX, 16, &["metadata count", "exceeds"][..]),
        (
            16,
            100_000,
            8,
            &["100000 metadata entries", "the file has"][..],
        ),
    ] {
        let mut bytes = base.clone();
        put_u64(&mut bytes, at, claimed);
        assert_names(&problem(&f.write(&bytes)), offset, words);
    }
}

#[test]
fn a_file_cut_in_the_middle_of_the_metadata_is_truncated() {
    let base = base_file();
    let mut f = Files::new();
    // Inside the tokens array: the strings' bytes are cut.
    let cut = find(&base, b"hello") + 2;
    let p = problem(&f.write(&base[..cut]));
    assert!(p.contains("truncated") || p.contains("the file has"), "{p}");
    // Every cut inside the header is an error, and none panics.
    let header_end = find(&base, b"weight.b") + "weight.b".len() + 4 + 8 + 4 + 8;
    for cut in 0..header_end {
        let p = problem(&f.write(&base[..cut]));
        assert!(p.contains("not a valid GGUF file"), "cut at {cut}: {p}");
    }
    // Cut inside the tensor data: the header is whole, the data is not.
    // (weight.b's 16 bytes are the last data, followed by 16 bytes of padding.)
    let p = problem(&f.write(&base[..base.len() - 20]));
    assert!(p.contains("truncated: tensor weight.b"), "{p}");
}

#[test]
fn unknown_types_are_named() {
    let base = base_file();
    let mut f = Files::new();
    // The value type of llama.block_count.
    let ty_at = find(&base, b"llama.block_count") + "llama.block_count".len();
    assert_eq!(&base[ty_at..ty_at + 4], &4u32.to_le_bytes());
    let mut bytes = base.clone();
    put_u32(&mut bytes, ty_at, 99);
    assert_names(
        &problem(&f.write(&bytes)),
        ty_at,
        &["llama.block_count", "unknown value type 99"],
    );
    // An array's element type.
    let elem_at = find(&base, b"tokenizer.ggml.tokens") + "tokenizer.ggml.tokens".len() + 4;
    let mut bytes = base.clone();
    put_u32(&mut bytes, elem_at, 13);
    assert_names(
        &problem(&f.write(&bytes)),
        elem_at,
        &["unknown array element type 13"],
    );
    // A tensor's ggml type: name, u32 n_dims, n_dims u64 dims, u32 type.
    let type_at = find(&base, b"weight.a") + "weight.a".len() + 4 + 2 * 8;
    assert_eq!(&base[type_at..type_at + 4], &0u32.to_le_bytes());
    let mut bytes = base.clone();
    put_u32(&mut bytes, type_at, 77);
    assert_names(
        &problem(&f.write(&bytes)),
        type_at,
        &["weight.a", "unknown tensor type 77"],
    );
}

#[test]
fn bad_tensor_shapes_and_alignment_are_named_not_panics() {
    let base = base_file();
    let mut f = Files::new();
    let dims_at = find(&base, b"weight.a") + "weight.a".len();
    // Too many dimensions.
    let mut bytes = base.clone();
    put_u32(&mut bytes, dims_at, 1000);
    assert_names(
        &problem(&f.write(&bytes)),
        dims_at,
        &["weight.a has 1000 dimensions"],
    );
    // Dimensions whose product overflows u64.
    let mut bytes = base.clone();
    put_u64(&mut bytes, dims_at + 4, 1 << 40);
    put_u64(&mut bytes, dims_at + 12, 1 << 40);
    assert_names(&problem(&f.write(&bytes)), dims_at, &["overflows"]);
    // A data offset far past the end.
    let offset_at = dims_at + 4 + 16 + 4;
    let mut bytes = base.clone();
    put_u64(&mut bytes, offset_at, u64::MAX - 3);
    let p = problem(&f.write(&bytes));
    assert!(p.contains("truncated: tensor weight.a"), "{p}");
    // general.alignment = 0: candle would divide by zero.
    let mut bytes = base.clone();
    let key = b"llama.block_count";
    let at = find(&bytes, key);
    bytes[at..at + key.len()].copy_from_slice(b"general.alignment");
    put_u32(&mut bytes, at + key.len() + 4, 0);
    assert_names(
        &problem(&f.write(&bytes)),
        at + key.len() + 4,
        &["general.alignment is 0"],
    );
    // A bad magic and an unknown version.
    let mut bytes = base.clone();
    bytes[..4].copy_from_slice(b"GGML");
    assert_names(&problem(&f.write(&bytes)), 0, &["is not \"GGUF\""]);
    let mut bytes = base.clone();
    put_u32(&mut bytes, 4, 7);
    assert_names(
        &problem(&f.write(&bytes)),
        4,
        &["unsupported GGUF version 7"],
    );
}

/// Deterministic corruption of every header byte and of every 8-byte field: whatever the
/// file then says, opening it returns (Ok or a BadFile), and never panics or aborts.
#[test]
fn corrupting_any_header_bytes_never_panics() {
    let base = base_file();
    let header_end = find(&base, b"weight.b") + "weight.b".len() + 4 + 8 + 4 + 8;
    let mut f = Files::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for at in 0..header_end {
        for patch in [
            vec![0xff],
            vec![0x00],
            vec![next() as u8],
            u64::MAX.to_le_bytes().to_vec(),
            next().to_le_bytes().to_vec(),
            (1u64 << 33).to_le_bytes().to_vec(),
        ] {
            let mut bytes = base.clone();
            let end = (at + patch.len()).min(bytes.len());
            bytes[at..end].copy_from_slice(&patch[..end - at]);
            match GgufFile::open(&f.write(&bytes)) {
                Ok(_) => {}
                Err(ModelError::BadFile { .. }) => errors += 1,
                Err(other) => panic!("byte {at}: expected BadFile, got {other}"),
            }
        }
    }
    assert!(
        errors > header_end,
        "only {errors} corruptions were noticed"
    );
}

/// A header written by hand: `version`, counts, then `body` (v1 lengths are u32).
fn hand_written(version: u32, tensors: u64, kvs: u64, body: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(version.to_le_bytes());
    if version == 1 {
        b.extend((tensors as u32).to_le_bytes());
        b.extend((kvs as u32).to_le_bytes());
    } else {
        b.extend(tensors.to_le_bytes());
        b.extend(kvs.to_le_bytes());
    }
    b.extend(body);
    b
}

/// One v2/v3 metadata entry.
fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut b = (key.len() as u64).to_le_bytes().to_vec();
    b.extend(key.as_bytes());
    b.extend(ty.to_le_bytes());
    b.extend(value);
    b
}

#[test]
fn hand_written_headers_bools_nesting_and_version_1() {
    let mut f = Files::new();
    // An empty v3 header is valid.
    GgufFile::open(&f.write(&hand_written(3, 0, 0, &[]))).unwrap();
    // A bool must be 0 or 1.
    let p = problem(&f.write(&hand_written(3, 0, 1, &kv("flag", 7, &[2]))));
    assert_names(&p, 24 + 8 + 4 + 4, &["flag", "bool byte 2"]);
    // Arrays of arrays nested deeper than the cap.
    let mut nested = Vec::new();
    for _ in 0..=tilt_models::gguf::MAX_ARRAY_NESTING {
        nested.extend(9u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
    }
    nested.extend(0u32.to_le_bytes());
    nested.extend(0u64.to_le_bytes());
    let p = problem(&f.write(&hand_written(3, 0, 1, &kv("deep", 9, &nested))));
    assert!(p.contains("deep: arrays nested deeper than"), "{p}");
    // GGUF v1: u32 lengths. A string entry is valid as v1 ...
    let mut v1 = 1u32.to_le_bytes().to_vec();
    v1.push(b'k');
    v1.extend(8u32.to_le_bytes());
    v1.extend(2u32.to_le_bytes());
    v1.extend(b"hi");
    let path = f.write(&hand_written(1, 0, 1, &v1));
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.string("k").unwrap(), "hi");
    // ... and the same bytes read as v2 claim lengths the file does not have.
    let mut as_v2 = std::fs::read(&path).unwrap();
    as_v2[4] = 2;
    assert!(problem(&f.write(&as_v2)).contains("not a valid GGUF file: at byte 8:"));
}
