//! Opening and validating GGUF model files.
//!
//! A GGUF file is a header (metadata key/values and tensor descriptors) followed by the
//! tensor data. candle's [`gguf_file::Content::read`] parses the header; this module adds
//! what a user needs when a file is wrong: every failure names the file and says what is
//! wrong with it (missing, not GGUF, truncated, a metadata key absent or of the wrong type,
//! a tensor of the wrong shape). Truncation is detected when the file is opened, by
//! checking that every tensor's bytes lie inside the file, rather than half-way through
//! loading the weights.
//!
//! ## Why the header is pre-scanned
//! candle allocates what the header claims (a string of `len` bytes, an array of `len`
//! values, `n` tensor descriptors) as it parses. Its own checks depend on its version, and
//! some values make it panic rather than fail (a `general.alignment` of 0 divides by zero;
//! a tensor shape whose element count overflows). So before candle sees a file,
//! `prescan` walks the whole header without allocating anything it reads, and checks
//! every claimed length against the bytes left in the file and against caps no real model
//! comes near ([`MAX_STRING_BYTES`], [`MAX_ARRAY_ELEMENTS`], ...). A corrupt header is then a
//! [`ModelError::BadFile`] naming the path, the byte offset and what is wrong, never an
//! out-of-memory abort or a panic.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;

use crate::ModelError;

/// An opened, header-validated GGUF file.
pub struct GgufFile {
    path: PathBuf,
    content: gguf_file::Content,
    reader: BufReader<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .field("metadata", &self.content.metadata.len())
            .finish()
    }
}

impl GgufFile {
    /// Open `path`, parse its header and check that all tensor data lies inside the file.
    ///
    /// # Errors
    /// [`ModelError::BadFile`] naming the path when the file is missing or unreadable, is
    /// not GGUF, has a malformed header, or is truncated.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let bad = |problem: String| ModelError::BadFile {
            path: path.display().to_string(),
            problem,
        };
        let file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        let file_size = file
            .metadata()
            .map_err(|e| bad(format!("cannot read its size: {e}")))?
            .len();
        let mut reader = BufReader::new(file);
        prescan(&mut reader, file_size).map_err(|e| match e {
            ScanError::Io(e) => bad(format!("cannot read: {e}")),
            ScanError::Bad { offset, what } => {
                bad(format!("not a valid GGUF file: at byte {offset}: {what}"))
            }
        })?;
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| bad(format!("not a valid GGUF file ({e})")))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata key/values.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn bad(&self, problem: String) -> ModelError {
        ModelError::BadFile {
            path: self.path.display().to_string(),
            problem,
        }
    }

    fn get(&self, key: &str) -> Result<&Value, ModelError> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.bad(format!("metadata key {key} is missing")))
    }

    /// `general.architecture`.
    ///
    /// # Errors
    /// The key is missing or not a string.
    pub fn architecture(&self) -> Result<&str, ModelError> {
        self.string("general.architecture")
    }

    /// Fail with [`ModelError::UnsupportedArchitecture`] unless the file is a Llama model.
    ///
    /// # Errors
    /// As above, or a missing `general.architecture`.
    pub fn require_llama(&self) -> Result<(), ModelError> {
        let arch = self.architecture()?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture {
                path: self.path.display().to_string(),
                arch: arch.to_string(),
            });
        }
        Ok(())
    }

    /// Whether metadata `key` exists.
    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    /// An unsigned integer metadata value (any integer width, non-negative).
    ///
    /// # Errors
    /// Missing key, or a value that is not a non-negative integer fitting in `u64`.
    pub fn uint(&self, key: &str) -> Result<u64, ModelError> {
        let v = self.get(key)?;
        let n: Option<u64> = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.ok_or_else(|| {
            self.bad(format!(
                "metadata key {key} should be a non-negative integer, found {}",
                describe(v)
            ))
        })
    }

    /// A positive integer metadata value as `usize`.
    ///
    /// # Errors
    /// As [`GgufFile::uint`], or zero.
    pub fn positive(&self, key: &str) -> Result<usize, ModelError> {
        let n = self.uint(key)?;
        if n == 0 {
            return Err(self.bad(format!(
                "metadata key {key} is 0, expected a positive value"
            )));
        }
        usize::try_from(n).map_err(|_| self.bad(format!("metadata key {key} = {n} is too large")))
    }

    /// A float metadata value (f32 or f64), finite.
    ///
    /// # Errors
    /// Missing key, not a float, or not finite.
    pub fn float(&self, key: &str) -> Result<f64, ModelError> {
        let v = self.get(key)?;
        let x = match v {
            Value::F32(x) => *x as f64,
            Value::F64(x) => *x,
            _ => {
                return Err(self.bad(format!(
                    "metadata key {key} should be a float, found {}",
                    describe(v)
                )))
            }
        };
        if !x.is_finite() {
            return Err(self.bad(format!(
                "metadata key {key} is {x}, expected a finite number"
            )));
        }
        Ok(x)
    }

    /// A string metadata value.
    ///
    /// # Errors
    /// Missing key or not a string.
    pub fn string(&self, key: &str) -> Result<&str, ModelError> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            v => Err(self.bad(format!(
                "metadata key {key} should be a string, found {}",
                describe(v)
            ))),
        }
    }

    /// A boolean metadata value.
    ///
    /// # Errors
    /// Missing key or not a bool.
    pub fn bool(&self, key: &str) -> Result<bool, ModelError> {
        match self.get(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(self.bad(format!(
                "metadata key {key} should be a bool, found {}",
                describe(v)
            ))),
        }
    }

    /// An array-of-strings metadata value.
    ///
    /// # Errors
    /// Missing key, or not an array of strings.
    pub fn string_array(&self, key: &str) -> Result<Vec<&str>, ModelError> {
        let items = match self.get(key)? {
            Value::Array(items) => items,
            v => {
                return Err(self.bad(format!(
                    "metadata key {key} should be an array of strings, found {}",
                    describe(v)
                )))
            }
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.bad(format!(
                    "metadata key {key}: element {i} should be a string, found {}",
                    describe(v)
                ))),
            })
            .collect()
    }

    /// An array-of-integers metadata value, as `i64`.
    ///
    /// # Errors
    /// Missing key, or not an array of integers.
    pub fn int_array(&self, key: &str) -> Result<Vec<i64>, ModelError> {
        let items = match self.get(key)? {
            Value::Array(items) => items,
            v => {
                return Err(self.bad(format!(
                    "metadata key {key} should be an array of integers, found {}",
                    describe(v)
                )))
            }
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::U8(x) => Ok(*x as i64),
                Value::I8(x) => Ok(*x as i64),
                Value::U16(x) => Ok(*x as i64),
                Value::I16(x) => Ok(*x as i64),
                Value::U32(x) => Ok(*x as i64),
                Value::I32(x) => Ok(*x as i64),
                Value::I64(x) => Ok(*x),
                v => Err(self.bad(format!(
                    "metadata key {key}: element {i} should be an integer, found {}",
                    describe(v)
                ))),
            })
            .collect()
    }

    /// Whether the file holds a tensor called `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The names of all tensors in the file, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .content
            .tensor_infos
            .keys()
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    /// The metadata keys starting with `prefix`, sorted.
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<&str> {
        let mut keys: Vec<&str> = self
            .content
            .metadata
            .keys()
            .map(String::as_str)
            .filter(|k| k.starts_with(prefix))
            .collect();
        keys.sort_unstable();
        keys
    }

    /// The shape of tensor `name` in row-major order (GGUF stores dimensions reversed;
    /// a linear layer's weight reads `[out, in]`).
    ///
    /// # Errors
    /// No such tensor.
    pub fn tensor_shape(&self, name: &str) -> Result<Vec<usize>, ModelError> {
        Ok(self.tensor_info(name)?.shape.dims().to_vec())
    }

    fn tensor_info(&self, name: &str) -> Result<&gguf_file::TensorInfo, ModelError> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.bad(format!("tensor {name} is missing")))
    }

    /// Read tensor `name` as candle holds it, after checking its shape.
    fn read_tensor(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<candle_core::quantized::QTensor, ModelError> {
        let found = self.tensor_shape(name)?;
        if found != shape {
            return Err(self.bad(format!(
                "tensor {name} has shape {}, expected {}",
                shape_text(&found),
                shape_text(shape)
            )));
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| self.bad(format!("tensor {name}: {e}")))
    }

    /// Read tensor `name`, dequantised to f32, row-major, checking its shape.
    ///
    /// # Errors
    /// Missing tensor, wrong shape, unreadable data or an unsupported quantisation.
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let q = self.read_tensor(name, shape)?;
        let data = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| self.bad(format!("tensor {name}: {e}")))?;
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(self.bad(format!(
                "tensor {name}: element {i} is {} (weights must be finite)",
                data[i]
            )));
        }
        Ok(data)
    }

    /// The storage format of tensor `name`.
    ///
    /// # Errors
    /// No such tensor.
    pub fn tensor_dtype(
        &self,
        name: &str,
    ) -> Result<candle_core::quantized::GgmlDType, ModelError> {
        Ok(self.tensor_info(name)?.ggml_dtype)
    }

    /// The raw bytes of tensor `name` as stored (GGML blocks), checking its shape.
    ///
    /// # Errors
    /// Missing tensor, wrong shape or unreadable data.
    pub fn tensor_bytes(&mut self, name: &str, shape: &[usize]) -> Result<Vec<u8>, ModelError> {
        let q = self.read_tensor(name, shape)?;
        q.data()
            .map(|d| d.into_owned())
            .map_err(|e| self.bad(format!("tensor {name}: {e}")))
    }
}

/// A metadata value as an error message shows it: its type, and the value itself when it
/// is short (`the string "gpt2"`, `u32 7`, `an array of 30 u32`).
pub fn describe(value: &Value) -> String {
    match value {
        Value::U8(x) => format!("u8 {x}"),
        Value::I8(x) => format!("i8 {x}"),
        Value::U16(x) => format!("u16 {x}"),
        Value::I16(x) => format!("i16 {x}"),
        Value::U32(x) => format!("u32 {x}"),
        Value::I32(x) => format!("i32 {x}"),
        Value::U64(x) => format!("u64 {x}"),
        Value::I64(x) => format!("i64 {x}"),
        Value::F32(x) => format!("f32 {x}"),
        Value::F64(x) => format!("f64 {x}"),
        Value::Bool(x) => format!("bool {x}"),
        Value::String(s) => {
            let shown: String = s.chars().take(60).collect();
            let more = if shown.len() < s.len() { "…" } else { "" };
            format!("the string \"{}{more}\"", shown.escape_default())
        }
        Value::Array(items) => {
            let kind = items.first().map_or("value", |v| match v {
                Value::U8(_) => "u8",
                Value::I8(_) => "i8",
                Value::U16(_) => "u16",
                Value::I16(_) => "i16",
                Value::U32(_) => "u32",
                Value::I32(_) => "i32",
                Value::U64(_) => "u64",
                Value::I64(_) => "i64",
                Value::F32(_) => "f32",
                Value::F64(_) => "f64",
                Value::Bool(_) => "bool",
                Value::String(_) => "string",
                Value::Array(_) => "array",
            });
            format!("an array of {} {kind}", items.len())
        }
    }
}

/// A tensor shape as `[576, 49152]`.
pub(crate) fn shape_text(dims: &[usize]) -> String {
    let dims: Vec<String> = dims.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// Longest metadata key or tensor name accepted, in bytes (the GGUF spec's limit for keys).
pub const MAX_NAME_BYTES: u64 = 65_535;
/// Longest metadata string value accepted, in bytes (a chat template or an embedded
/// `tokenizer.json` is kilobytes to a few megabytes).
pub const MAX_STRING_BYTES: u64 = 256 << 20;
/// Most metadata array elements accepted, summed over all arrays (and nested arrays) of a
/// file: candle holds each as a 32-byte value, so this bounds the header's memory at
/// about 0.5 GiB. A 256k-token vocabulary with its scores, types and merges needs ~1M.
pub const MAX_ARRAY_ELEMENTS: u64 = 1 << 24;
/// Most metadata entries accepted.
pub const MAX_METADATA_ENTRIES: u64 = 1 << 20;
/// Most tensors accepted.
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_TENSOR_DIMS: u32 = 4;
/// Deepest nesting of arrays inside arrays accepted.
pub const MAX_ARRAY_NESTING: usize = 8;
/// The tensor data alignment when `general.alignment` is absent (the GGUF spec's default).
const DEFAULT_ALIGNMENT: u64 = 32;

/// What [`prescan`] found wrong.
#[derive(Debug)]
enum ScanError {
    /// Reading failed (not a property of the file's contents).
    Io(std::io::Error),
    /// The header is malformed at byte `offset`.
    Bad { offset: u64, what: String },
}

/// The ggml tensor types candle reads, by their id in the file.
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// A metadata value type: its name and, for fixed-size types, its size on disk.
fn value_type(id: u32) -> Option<(&'static str, Option<u64>)> {
    Some(match id {
        0 => ("u8", Some(1)),
        1 => ("i8", Some(1)),
        2 => ("u16", Some(2)),
        3 => ("i16", Some(2)),
        4 => ("u32", Some(4)),
        5 => ("i32", Some(4)),
        6 => ("f32", Some(4)),
        7 => ("bool", Some(1)),
        8 => ("string", None),
        9 => ("array", None),
        10 => ("u64", Some(8)),
        11 => ("i64", Some(8)),
        12 => ("f64", Some(8)),
        _ => return None,
    })
}

/// A cursor over the header that knows how many bytes the file has left.
struct Scan<'a, R> {
    reader: &'a mut R,
    pos: u64,
    size: u64,
    /// GGUF v2 and v3 write lengths and dimensions as u64, v1 as u32.
    wide: bool,
    array_elements: u64,
}

fn bad<T>(offset: u64, what: String) -> Result<T, ScanError> {
    Err(ScanError::Bad { offset, what })
}

impl<R: BufRead> Scan<'_, R> {
    fn left(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    /// Fail unless `n` more bytes are in the file.
    fn need(&self, n: u64, what: &dyn std::fmt::Display) -> Result<(), ScanError> {
        if n > self.left() {
            return bad(
                self.pos,
                format!(
                    "truncated: {what} needs {n} bytes, the file has {} left",
                    self.left()
                ),
            );
        }
        Ok(())
    }

    fn array<const N: usize>(
        &mut self,
        what: &dyn std::fmt::Display,
    ) -> Result<[u8; N], ScanError> {
        self.need(N as u64, what)?;
        let mut buf = [0u8; N];
        self.reader.read_exact(&mut buf).map_err(ScanError::Io)?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &dyn std::fmt::Display) -> Result<u32, ScanError> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn std::fmt::Display) -> Result<u64, ScanError> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    /// A length or a dimension: u64 in v2/v3, u32 in v1.
    fn len(&mut self, what: &dyn std::fmt::Display) -> Result<u64, ScanError> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    fn prefix_bytes(&self) -> u64 {
        if self.wide {
            8
        } else {
            4
        }
    }

    /// Skip `n` bytes (already checked to be in the file).
    fn skip(&mut self, mut n: u64) -> Result<(), ScanError> {
        while n > 0 {
            let buf = self.reader.fill_buf().map_err(ScanError::Io)?;
            if buf.is_empty() {
                return bad(self.pos, "the file ended early while reading".into());
            }
            let k = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            self.reader.consume(k);
            self.pos += k as u64;
            n -= k as u64;
        }
        Ok(())
    }

    /// A string's length, checked against `cap` and the bytes left; returns the length
    /// with the reader at the string's first byte.
    fn string_len(&mut self, what: &dyn std::fmt::Display, cap: u64) -> Result<u64, ScanError> {
        let at = self.pos;
        let len = self.len(what)?;
        if len > cap {
            return bad(
                at,
                format!("{what} claims a length of {len} bytes, more than the {cap} accepted"),
            );
        }
        if len > self.left() {
            return bad(
                at,
                format!(
                    "{what} claims a length of {len} bytes, the file has {} left",
                    self.left()
                ),
            );
        }
        Ok(len)
    }

    /// A key or tensor name, read (at most [`MAX_NAME_BYTES`]) to name it in errors.
    fn name(&mut self, what: &dyn std::fmt::Display) -> Result<String, ScanError> {
        let len = self.string_len(what, MAX_NAME_BYTES)?;
        let mut buf = vec![0u8; len as usize];
        self.reader.read_exact(&mut buf).map_err(ScanError::Io)?;
        self.pos += len;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// One value of type `ty` (whose id was read at `ty_at`); returns it when it is an
    /// integer of up to 32 bits (what `general.alignment` may be).
    fn value(
        &mut self,
        key: &str,
        ty: u32,
        ty_at: u64,
        depth: usize,
    ) -> Result<Option<i64>, ScanError> {
        let at = self.pos;
        let what = format!("the value of {key}");
        let Some((_, size)) = value_type(ty) else {
            return bad(
                ty_at,
                format!("metadata key {key}: unknown value type {ty}"),
            );
        };
        Ok(match ty {
            0 => Some(i64::from(self.array::<1>(&what)?[0])),
            1 => Some(i64::from(i8::from_le_bytes(self.array::<1>(&what)?))),
            2 => Some(i64::from(u16::from_le_bytes(self.array::<2>(&what)?))),
            3 => Some(i64::from(i16::from_le_bytes(self.array::<2>(&what)?))),
            4 => Some(i64::from(self.u32(&what)?)),
            5 => Some(i64::from(i32::from_le_bytes(self.array::<4>(&what)?))),
            7 => {
                let b = self.array::<1>(&what)?[0];
                if b > 1 {
                    return bad(
                        at,
                        format!("metadata key {key}: bool byte {b} is not 0 or 1"),
                    );
                }
                None
            }
            8 => {
                let len =
                    self.string_len(&format!("the string value of {key}"), MAX_STRING_BYTES)?;
                self.skip(len)?;
                None
            }
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return bad(
                        at,
                        format!(
                            "metadata key {key}: arrays nested deeper than {MAX_ARRAY_NESTING}"
                        ),
                    );
                }
                let elem_at = self.pos;
                let elem = self.u32(&what)?;
                let Some((elem_name, elem_size)) = value_type(elem) else {
                    return bad(
                        elem_at,
                        format!("metadata key {key}: unknown array element type {elem}"),
                    );
                };
                let len_at = self.pos;
                let len = self.len(&what)?;
                let total = self.array_elements.saturating_add(len);
                if total > MAX_ARRAY_ELEMENTS {
                    return bad(
                        len_at,
                        format!(
                            "metadata key {key}: an array of {len} {elem_name} elements \
                             (with the earlier arrays {total}) exceeds the {MAX_ARRAY_ELEMENTS} accepted"
                        ),
                    );
                }
                self.array_elements = total;
                let min = elem_size.unwrap_or(if elem == 8 {
                    self.prefix_bytes()
                } else {
                    4 + self.prefix_bytes()
                });
                let needed = len.saturating_mul(min);
                if needed > self.left() {
                    return bad(
                        len_at,
                        format!(
                            "metadata key {key}: an array of {len} {elem_name} elements needs at \
                             least {needed} bytes, the file has {} left",
                            self.left()
                        ),
                    );
                }
                match elem_size {
                    // Fixed-size elements other than bool (which must be 0 or 1): skip.
                    Some(size) if elem != 7 => self.skip(len * size)?,
                    _ => {
                        for _ in 0..len {
                            self.value(key, elem, elem_at, depth + 1)?;
                        }
                    }
                }
                None
            }
            // f32, u64, i64, f64.
            _ => {
                let n = size.unwrap_or(0);
                self.need(n, &what)?;
                self.skip(n)?;
                None
            }
        })
    }
}

/// Walk a GGUF header (the layout of candle's `gguf_file::Content::read`, v1 to v3)
/// without allocating what it claims, checking every length against the `size` of the
/// file and the caps above, and that every tensor's data lies inside the file.
fn prescan<R: BufRead>(reader: &mut R, size: u64) -> Result<(), ScanError> {
    let mut s = Scan {
        reader,
        pos: 0,
        size,
        wide: true,
        array_elements: 0,
    };
    let magic = s.u32(&"the GGUF magic number")?;
    // candle accepts the magic in either byte order.
    if magic != 0x4655_4747 && magic != 0x4747_5546 {
        return bad(0, format!("magic {magic:#010x} is not \"GGUF\""));
    }
    let version = s.u32(&"the version")?;
    s.wide = match version {
        1 => false,
        2 | 3 => true,
        v => {
            return bad(
                4,
                format!("unsupported GGUF version {v} (1, 2 and 3 are read)"),
            )
        }
    };
    let counts_at = s.pos;
    let tensor_count = s.len(&"the tensor count")?;
    let kv_at = s.pos;
    let kv_count = s.len(&"the metadata count")?;
    if tensor_count > MAX_TENSORS {
        return bad(
            counts_at,
            format!("tensor count {tensor_count} exceeds the {MAX_TENSORS} accepted"),
        );
    }
    if kv_count > MAX_METADATA_ENTRIES {
        return bad(
            kv_at,
            format!("metadata count {kv_count} exceeds the {MAX_METADATA_ENTRIES} accepted"),
        );
    }
    // A metadata entry is at least a key length, a type and one byte; a tensor descriptor
    // at least a name length, a dimension count, a type and an offset.
    let p = s.prefix_bytes();
    let needed = kv_count * (p + 5) + tensor_count * (p + 16);
    if needed > s.left() {
        return bad(
            counts_at,
            format!(
                "the header claims {tensor_count} tensors and {kv_count} metadata entries, \
                 at least {needed} bytes, the file has {} left",
                s.left()
            ),
        );
    }

    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..kv_count {
        let key = s.name(&format_args!("metadata key {i}"))?;
        let ty_at = s.pos;
        let ty = s.u32(&format_args!("the type of metadata key {key}"))?;
        let value = s.value(&key, ty, ty_at, 0)?;
        // candle reads general.alignment from these integer types (negative: the default)
        // and divides by it.
        if key == "general.alignment" {
            match value {
                Some(0) => {
                    return bad(ty_at + 4, "general.alignment is 0".into());
                }
                Some(a) if a > 0 => alignment = a as u64,
                _ => alignment = DEFAULT_ALIGNMENT,
            }
        }
    }

    // (name, descriptor offset, data offset, data bytes)
    let mut tensors = Vec::new();
    for i in 0..tensor_count {
        let at = s.pos;
        let name = s.name(&format_args!("the name of tensor {i}"))?;
        let dims_at = s.pos;
        let n_dims = s.u32(&format_args!("tensor {name}'s dimension count"))?;
        if n_dims > MAX_TENSOR_DIMS {
            return bad(
                dims_at,
                format!(
                    "tensor {name} has {n_dims} dimensions, at most {MAX_TENSOR_DIMS} are accepted"
                ),
            );
        }
        let mut elems: u64 = 1;
        for _ in 0..n_dims {
            let dim = s.len(&format_args!("tensor {name}'s shape"))?;
            elems = match elems.checked_mul(dim) {
                Some(e) if usize::try_from(dim).is_ok() && usize::try_from(e).is_ok() => e,
                _ => {
                    return bad(
                        dims_at,
                        format!("tensor {name}: its shape's element count overflows"),
                    )
                }
            };
        }
        let type_at = s.pos;
        let type_id = s.u32(&format_args!("tensor {name}'s type"))?;
        let Some(dtype) = ggml_dtype(type_id) else {
            return bad(
                type_at,
                format!("tensor {name}: unknown tensor type {type_id}"),
            );
        };
        let offset = s.u64(&format_args!("tensor {name}'s data offset"))?;
        let block = dtype.block_size() as u64;
        if block == 0 || !elems.is_multiple_of(block) {
            return bad(
                dims_at,
                format!(
                    "tensor {name}: {elems} elements is not a multiple of the {dtype:?} block size {block}"
                ),
            );
        }
        let bytes = (elems / block).saturating_mul(dtype.type_size() as u64);
        tensors.push((name, at, offset, bytes));
    }
    let data_start = s.pos.div_ceil(alignment).saturating_mul(alignment);
    for (name, at, offset, bytes) in tensors {
        let end = data_start
            .checked_add(offset)
            .and_then(|e| e.checked_add(bytes));
        if end.is_none_or(|e| e > size) {
            let end = end.map_or_else(|| "beyond 2^64".to_string(), |e| e.to_string());
            return bad(
                at,
                format!("truncated: tensor {name} needs bytes up to {end} but the file has {size}"),
            );
        }
    }
    Ok(())
}
