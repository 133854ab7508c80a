//! Opening and validating GGUF model files.
//!
//! A GGUF file is a header (metadata key/values and tensor descriptors) followed by the
//! tensor data. candle's [`gguf_file::Content::read`] parses the header; this module adds
//! what a user needs when a file is wrong: every failure names the file and says what is
//! wrong with it (missing, not GGUF, truncated, a metadata key absent or of the wrong type,
//! a tensor of the wrong shape). Truncation is detected when the file is opened, by
//! checking that every tensor's bytes lie inside the file, rather than half-way through
//! loading the weights.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
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
        let content = gguf_file::Content::read(&mut reader)
            .map_err(|e| bad(format!("not a valid GGUF file ({e})")))?;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if block == 0 || elems % block != 0 {
                return Err(bad(format!(
                    "tensor {name}: {elems} elements is not a multiple of the {:?} block size {block}",
                    info.ggml_dtype
                )));
            }
            let bytes = (elems / block) as u64 * info.ggml_dtype.type_size() as u64;
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > file_size {
                return Err(bad(format!(
                    "truncated: tensor {name} needs bytes up to {end} but the file has {file_size}"
                )));
            }
        }
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
                "metadata key {key} should be a non-negative integer, found {v:?}"
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
            _ => return Err(self.bad(format!("metadata key {key} should be a float, found {v:?}"))),
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
                "metadata key {key} should be a string, found {v:?}"
            ))),
        }
    }

    /// An array-of-strings metadata value.
    ///
    /// # Errors
    /// Missing key, or not an array of strings.
    pub fn string_array(&self, key: &str) -> Result<Vec<&str>, ModelError> {
        let Value::Array(items) = self.get(key)? else {
            return Err(self.bad(format!("metadata key {key} should be an array of strings")));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                v => Err(self.bad(format!(
                    "metadata key {key}: element {i} should be a string, found {v:?}"
                ))),
            })
            .collect()
    }

    /// An array-of-integers metadata value, as `i64`.
    ///
    /// # Errors
    /// Missing key, or not an array of integers.
    pub fn int_array(&self, key: &str) -> Result<Vec<i64>, ModelError> {
        let Value::Array(items) = self.get(key)? else {
            return Err(self.bad(format!("metadata key {key} should be an array of integers")));
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
                    "metadata key {key}: element {i} should be an integer, found {v:?}"
                ))),
            })
            .collect()
    }

    /// Whether the file holds a tensor called `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The shape of tensor `name` in row-major order (GGUF stores dimensions reversed;
    /// a linear layer's weight reads `[out, in]`).
    ///
    /// # Errors
    /// No such tensor.
    pub fn tensor_shape(&self, name: &str) -> Result<Vec<usize>, ModelError> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims().to_vec())
            .ok_or_else(|| self.bad(format!("tensor {name} is missing")))
    }

    /// Read tensor `name`, dequantised to f32, row-major, checking its shape.
    ///
    /// # Errors
    /// Missing tensor, wrong shape, unreadable data or an unsupported quantisation.
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let found = self.tensor_shape(name)?;
        if found != shape {
            return Err(self.bad(format!(
                "tensor {name} has shape {found:?}, expected {shape:?}"
            )));
        }
        let read = |this: &mut Self| -> candle_core::Result<Vec<f32>> {
            let q = this.content.tensor(&mut this.reader, name, &Device::Cpu)?;
            q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()
        };
        let data = read(self).map_err(|e| self.bad(format!("tensor {name}: {e}")))?;
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(self.bad(format!(
                "tensor {name}: element {i} is {} (weights must be finite)",
                data[i]
            )));
        }
        Ok(data)
    }
}
