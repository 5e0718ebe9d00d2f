//! GGUF files (llama.cpp's container) and the `model import-gguf` conversion.
//!
//! Owns three things:
//! - a bounded reader for GGUF v2/v3: header, typed metadata, tensor infos and the aligned data
//!   section. Every count and size is checked against the bytes that are really there before
//!   anything is allocated, so a hostile file gives an error value, never a panic or a huge
//!   allocation;
//! - dequantisation of the tensor types a Llama checkpoint commonly ships in (F32, F16, BF16,
//!   Q8_0, Q4_0, Q4_1) and the inverse of llama.cpp's Q/K row permutation;
//! - [`import_gguf`], which turns a Llama GGUF into a Hugging Face style folder (config.json,
//!   model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json) that both
//!   our loader and Hugging Face transformers read.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, View};
use serde_json::{Value as Json, json};

/// GGUF files start with these four bytes ("GGUF").
const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data-section alignment when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal GGUF; real files nest at most once. The bound keeps a hostile
/// file from recursing the parser off its stack.
const MAX_ARRAY_NESTING: u32 = 4;
/// Longest metadata array read. The largest real vocabularies and merge lists are a few hundred
/// thousand entries; the bound keeps a file of one-byte elements from expanding into gigabytes
/// of parsed values.
const MAX_ARRAY_LEN: u64 = 1 << 22;

/// Everything that can be wrong with a GGUF file itself.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The first four bytes are not `GGUF`.
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic {
        /// The bytes found.
        found: Vec<u8>,
    },
    /// Only versions 2 and 3 (64-bit counts) are read.
    #[error("unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion {
        /// The version in the header.
        version: u32,
    },
    /// The file ends before a structure it announces.
    #[error("GGUF truncated: {what} needs {needed} bytes at offset {offset}, file has {file_len}")]
    Truncated {
        /// What was being read.
        what: String,
        /// Where it starts.
        offset: u64,
        /// How many bytes it needs.
        needed: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// A count cannot possibly fit in the remaining bytes.
    #[error("GGUF {what} count {count} cannot fit in the {remaining} bytes left in the file")]
    CountTooLarge {
        /// Which count.
        what: String,
        /// The count found.
        count: u64,
        /// Bytes left after it.
        remaining: u64,
    },
    /// A metadata value type id outside the GGUF specification.
    #[error("GGUF metadata {key:?}: unknown value type {type_id}")]
    UnknownValueType {
        /// The key being read.
        key: String,
        /// The type id.
        type_id: u32,
    },
    /// A metadata array longer than [`MAX_ARRAY_LEN`].
    #[error("GGUF metadata {key:?}: array of {count} elements exceeds the limit of {max}")]
    ArrayTooLong {
        /// The key being read.
        key: String,
        /// The count found.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// Arrays nested deeper than [`MAX_ARRAY_NESTING`].
    #[error("GGUF metadata {key:?}: arrays nested deeper than {max}")]
    NestingTooDeep {
        /// The key being read.
        key: String,
        /// The limit.
        max: u32,
    },
    /// A string is not UTF-8.
    #[error("GGUF {what} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// What was being read.
        what: String,
        /// Where it starts.
        offset: u64,
    },
    /// The same metadata key appears twice.
    #[error("GGUF metadata key {key:?} appears twice")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// The same tensor name appears twice.
    #[error("GGUF tensor {name:?} appears twice")]
    DuplicateTensor {
        /// The tensor.
        name: String,
    },
    /// `general.alignment` is zero or not a power of two.
    #[error("GGUF general.alignment {alignment} is not a power of two")]
    BadAlignment {
        /// The value found.
        alignment: u64,
    },
    /// A metadata value has the wrong type.
    #[error("GGUF metadata {key:?} has type {found}, expected {expected}")]
    WrongValueType {
        /// The key.
        key: String,
        /// What the reader wanted.
        expected: &'static str,
        /// What the file has.
        found: &'static str,
    },
    /// A required metadata key is absent.
    #[error("GGUF metadata key {key:?} is missing")]
    MissingKey {
        /// The key.
        key: String,
    },
    /// A tensor's type id is not a ggml type at all.
    #[error("GGUF tensor {name:?} has unknown ggml type id {type_id}")]
    UnknownTensorType {
        /// The tensor.
        name: String,
        /// The type id.
        type_id: u32,
    },
    /// A tensor's dimension count is zero or more than ggml allows.
    #[error("GGUF tensor {name:?} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")]
    BadDimensionCount {
        /// The tensor.
        name: String,
        /// The count found.
        n_dims: u32,
    },
    /// A tensor's shape is empty, overflows, or does not fit its type's blocks.
    #[error("GGUF tensor {name:?} has invalid shape {dims:?} for type {ggml_type}: {reason}")]
    BadShape {
        /// The tensor.
        name: String,
        /// ggml dims, innermost first.
        dims: Vec<u64>,
        /// Its type.
        ggml_type: GgmlType,
        /// Why.
        reason: &'static str,
    },
    /// A tensor's offset is not aligned to the file's alignment.
    #[error("GGUF tensor {name:?} offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        /// The tensor.
        name: String,
        /// Its offset in the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A tensor's bytes run past the end of the file.
    #[error(
        "GGUF tensor {name:?} data [{start}, {end}) runs past the end of the file ({file_len} bytes)"
    )]
    TensorOutOfBounds {
        /// The tensor.
        name: String,
        /// Absolute start offset.
        start: u64,
        /// Absolute end offset.
        end: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// The tensor is stored in a type this reader cannot dequantise.
    #[error(
        "GGUF tensor {name:?} is stored as {ggml_type}, which cannot be dequantised \
         (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)"
    )]
    UnsupportedTensorType {
        /// The tensor.
        name: String,
        /// Its type.
        ggml_type: GgmlType,
    },
}

/// ggml tensor types, with their ids as stored in GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs, non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

impl GgmlType {
    /// The type for a GGUF type id; `None` for ids ggml never assigned (or retired).
    pub fn from_id(id: u32) -> Option<Self> {
        use GgmlType::*;
        Some(match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2_K,
            11 => Q3_K,
            12 => Q4_K,
            13 => Q5_K,
            14 => Q6_K,
            15 => Q8_K,
            16 => IQ2_XXS,
            17 => IQ2_XS,
            18 => IQ3_XXS,
            19 => IQ1_S,
            20 => IQ4_NL,
            21 => IQ3_S,
            22 => IQ2_S,
            23 => IQ4_XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1_M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            _ => return None,
        })
    }

    /// (elements per block, bytes per block), as in ggml's type traits.
    pub fn block_layout(self) -> (u64, u64) {
        use GgmlType::*;
        match self {
            F32 | I32 => (1, 4),
            F16 | BF16 | I16 => (1, 2),
            I8 => (1, 1),
            I64 | F64 => (1, 8),
            Q4_0 | IQ4_NL => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            MXFP4 => (32, 17),
            Q2_K => (256, 84),
            Q3_K | IQ3_S => (256, 110),
            Q4_K => (256, 144),
            Q5_K => (256, 176),
            Q6_K => (256, 210),
            Q8_K => (256, 292),
            IQ2_XXS | TQ2_0 => (256, 66),
            IQ2_XS => (256, 74),
            IQ3_XXS => (256, 98),
            IQ1_S => (256, 50),
            IQ2_S => (256, 82),
            IQ4_XS => (256, 136),
            IQ1_M => (256, 56),
            TQ1_0 => (256, 54),
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The GGUF name of this value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::F32(_) => "f32",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F64(_) => "f64",
        }
    }

    /// Any non-negative integer value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value as i64 (u64 values above i64::MAX give `None`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::U64(v) => i64::try_from(v).ok(),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float value. f32 values are widened through their shortest decimal form so that
    /// `1e-5f32` reads back as `1e-5`, which is what the model's authors wrote.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => v.to_string().parse().ok(),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// A boolean value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// An array value.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives and what it is.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// ggml dims, innermost (contiguous) first: a `[rows, cols]` matrix is stored as `[cols, rows]`.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Offset of the first byte relative to the data section.
    pub offset: u64,
    /// Number of bytes the tensor occupies.
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in row-major (PyTorch / safetensors) order: the ggml dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A parsed GGUF header: version, metadata and tensor directory.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, GgufValue)>,
    /// Tensor directory in file order.
    pub tensors: Vec<GgufTensorInfo>,
    /// Data-section alignment.
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

impl GgufHeader {
    /// Parses and validates the header of a GGUF file held in `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        let mut r = Reader { bytes, pos: 0 };
        let magic = r.take(4, "magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic {
                found: magic.to_vec(),
            });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion { version });
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Smallest possible entries: a tensor info is name length (8) + n_dims (4) + one dim
        // (8) + type (4) + offset (8); a key-value pair is key length (8) + type (4) + a u8.
        r.check_count("tensor", n_tensors, 32)?;
        r.check_count("metadata", n_kv, 13)?;

        // Capacities are capped: the counts were only checked against the file length.
        let mut metadata = Vec::with_capacity(n_kv.min(1024) as usize);
        let mut index = HashMap::with_capacity(n_kv.min(1024) as usize);
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let type_id = r.u32("metadata value type")?;
            let value = r.value(&key, type_id, 0)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey { key });
            }
            metadata.push((key, value));
        }

        let alignment = match index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let v = &metadata[i].1;
                let a = v.as_u64().ok_or_else(|| GgufError::WrongValueType {
                    key: "general.alignment".into(),
                    expected: "unsigned integer",
                    found: v.type_name(),
                })?;
                if a == 0 || !a.is_power_of_two() {
                    return Err(GgufError::BadAlignment { alignment: a });
                }
                a
            }
        };

        let mut infos = Vec::with_capacity(n_tensors.min(4096) as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors.min(4096) as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::BadDimensionCount { name, n_dims });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let type_id = r.u32("tensor type")?;
            let ggml_type =
                GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
                    name: name.clone(),
                    type_id,
                })?;
            let offset = r.u64("tensor offset")?;
            let n_bytes = tensor_n_bytes(&name, &dims, ggml_type)?;
            if !offset.is_multiple_of(alignment) {
                return Err(GgufError::MisalignedTensor {
                    name,
                    offset,
                    alignment,
                });
            }
            if tensor_index.insert(name.clone(), infos.len()).is_some() {
                return Err(GgufError::DuplicateTensor { name });
            }
            infos.push(GgufTensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_bytes,
            });
        }

        let file_len = bytes.len() as u64;
        let data_offset = (r.pos as u64).next_multiple_of(alignment);
        for t in &infos {
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.n_bytes));
            match (start, end) {
                (Some(_), Some(end)) if end <= file_len => {}
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        name: t.name.clone(),
                        start: data_offset.saturating_add(t.offset),
                        end: data_offset
                            .saturating_add(t.offset)
                            .saturating_add(t.n_bytes),
                        file_len,
                    });
                }
            }
        }

        Ok(GgufHeader {
            version,
            metadata,
            tensors: infos,
            alignment,
            data_offset,
            index,
            tensor_index,
        })
    }

    /// The value of a metadata key, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The tensor info of a name, if present.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// A required string value.
    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| wrong_type(key, "string", v))
    }

    /// A required non-negative integer value.
    pub fn require_u64(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| wrong_type(key, "unsigned integer", v))
    }

    /// An optional non-negative integer value (present with another type is an error).
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| wrong_type(key, "unsigned integer", v))
            })
            .transpose()
    }

    /// An optional float value.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, GgufError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| wrong_type(key, "float", v)))
            .transpose()
    }

    /// An optional boolean value.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| wrong_type(key, "bool", v)))
            .transpose()
    }

    /// An optional string value.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| wrong_type(key, "string", v)))
            .transpose()
    }

    /// A required array value.
    pub fn require_array(&self, key: &str) -> Result<&[GgufValue], GgufError> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| wrong_type(key, "array", v))
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey { key: key.into() })
    }
}

fn wrong_type(key: &str, expected: &'static str, v: &GgufValue) -> GgufError {
    GgufError::WrongValueType {
        key: key.into(),
        expected,
        found: v.type_name(),
    }
}

/// Bytes a tensor of `dims` and `ty` occupies, with every product checked.
fn tensor_n_bytes(name: &str, dims: &[u64], ty: GgmlType) -> Result<u64, GgufError> {
    let bad = |reason| GgufError::BadShape {
        name: name.into(),
        dims: dims.to_vec(),
        ggml_type: ty,
        reason,
    };
    if dims.contains(&0) {
        return Err(bad("a dimension is zero"));
    }
    let n = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad("the element count overflows"))?;
    // usize indexing of the dequantised output must be possible too.
    if usize::try_from(n).is_err() || n > (isize::MAX as u64) / 4 {
        return Err(bad("the element count is too large"));
    }
    let (block, size) = ty.block_layout();
    if !dims[0].is_multiple_of(block) {
        return Err(bad("the row length is not a multiple of the block size"));
    }
    (n / block)
        .checked_mul(size)
        .ok_or_else(|| bad("the byte size overflows"))
}

/// A cursor over the file that refuses to read past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what.into(),
                offset: self.pos as u64,
                needed: n,
                file_len: self.bytes.len() as u64,
            });
        }
        let start = self.pos;
        // n <= remaining, which is a usize difference, so the cast is lossless.
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn check_count(&self, what: &str, count: u64, min_size: u64) -> Result<(), GgufError> {
        let remaining = self.remaining();
        if count.checked_mul(min_size).is_none_or(|b| b > remaining) {
            return Err(GgufError::CountTooLarge {
                what: what.into(),
                count,
                remaining,
            });
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let offset = self.pos as u64;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec()).map_err(|_| GgufError::InvalidUtf8 {
            what: what.into(),
            offset,
        })
    }

    fn value(&mut self, key: &str, type_id: u32, depth: u32) -> Result<GgufValue, GgufError> {
        let what = || format!("value of {key:?}");
        Ok(match type_id {
            0 => GgufValue::U8(u8::from_le_bytes(self.array(&what())?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(&what())?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(&what())?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(&what())?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(&what())?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(&what())?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(&what())?)),
            7 => GgufValue::Bool(self.array::<1>(&what())?[0] != 0),
            8 => GgufValue::String(self.string(&what())?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(GgufError::NestingTooDeep {
                        key: key.into(),
                        max: MAX_ARRAY_NESTING,
                    });
                }
                let elem_type = self.u32(&what())?;
                let count = self.u64(&what())?;
                let min_size = match elem_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => {
                        return Err(GgufError::UnknownValueType {
                            key: key.into(),
                            type_id: elem_type,
                        });
                    }
                };
                if count > MAX_ARRAY_LEN {
                    return Err(GgufError::ArrayTooLong {
                        key: key.into(),
                        count,
                        max: MAX_ARRAY_LEN,
                    });
                }
                self.check_count(&format!("array {key:?} element"), count, min_size)?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(key, elem_type, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(&what())?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(&what())?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(&what())?)),
            _ => {
                return Err(GgufError::UnknownValueType {
                    key: key.into(),
                    type_id,
                });
            }
        })
    }
}

/// A GGUF file: its bytes (memory-mapped when opened from disk) and its parsed header.
pub struct GgufFile<B: AsRef<[u8]> = Mmap> {
    bytes: B,
    /// The parsed header.
    pub header: GgufHeader,
}

impl GgufFile<Mmap> {
    /// Memory-maps and parses a GGUF file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process; the file is an input we
        // only read. Another process truncating it while mapped would be a SIGBUS, which no
        // reader of a memory-mapped model can exclude; imports are short and run on the
        // operator's own files.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::from_bytes(map)
    }
}

impl<B: AsRef<[u8]>> GgufFile<B> {
    /// Parses a GGUF file held in memory.
    pub fn from_bytes(bytes: B) -> Result<Self, GgufError> {
        let header = GgufHeader::parse(bytes.as_ref())?;
        Ok(GgufFile { bytes, header })
    }

    /// The raw bytes of a tensor. Parsing checked the bounds of the file's own tensor infos;
    /// the check is repeated because `info` may come from anywhere.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8], GgufError> {
        let bytes = self.bytes.as_ref();
        let start = self.header.data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(info.n_bytes));
        start
            .zip(end)
            .and_then(|(s, e)| bytes.get(usize::try_from(s).ok()?..usize::try_from(e).ok()?))
            .ok_or_else(|| GgufError::TensorOutOfBounds {
                name: info.name.clone(),
                start: start.unwrap_or(u64::MAX),
                end: end.unwrap_or(u64::MAX),
                file_len: bytes.len() as u64,
            })
    }

    /// The tensor dequantised to f32, in ggml order (which is row-major over the reversed dims).
    pub fn dequantize(&self, info: &GgufTensorInfo) -> Result<Vec<f32>, GgufError> {
        dequantize(
            &info.name,
            info.ggml_type,
            self.tensor_bytes(info)?,
            info.n_elements() as usize,
        )
    }
}

/// Dequantises `n` elements of type `ty` from `data` (which must hold exactly their blocks).
pub fn dequantize(name: &str, ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>, GgufError> {
    let (block, size) = ty.block_layout();
    let (block, size) = (block as usize, size as usize);
    if !n.is_multiple_of(block) || data.len() != n / block * size {
        return Err(GgufError::BadShape {
            name: name.into(),
            dims: vec![n as u64],
            ggml_type: ty,
            reason: "the data length does not match the element count",
        });
    }
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(data.chunks_exact(2).map(|c| f16_at(c, 0))),
        GgmlType::BF16 => out.extend(
            data.chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for b in data.chunks_exact(size) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in data.chunks_exact(size) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| (f32::from(q & 0x0f) - 8.0) * d));
                out.extend(qs.iter().map(|&q| (f32::from(q >> 4) - 8.0) * d));
            }
        }
        GgmlType::Q4_1 => {
            for b in data.chunks_exact(size) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        other => {
            return Err(GgufError::UnsupportedTensorType {
                name: name.into(),
                ggml_type: other,
            });
        }
    }
    Ok(out)
}

/// Undoes llama.cpp's Q/K row permutation of a `[rows, cols]` row-major matrix.
///
/// llama.cpp's converter interleaves the two rotary halves of each head
/// (`reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)`); Hugging Face's rotate-half RoPE
/// wants them back in two contiguous halves. `n_head` is the query head count for Q and the
/// key-value head count for K.
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Option<Vec<f32>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) || w.len() != rows.checked_mul(cols)? {
        return None;
    }
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * head_dim + 2 * i + j;
                let dst = h * head_dim + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

/// The dtype of the imported safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ImportDtype {
    /// 32-bit floats: the exact dequantised values.
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl ImportDtype {
    fn safetensors(self) -> Dtype {
        match self {
            ImportDtype::F32 => Dtype::F32,
            ImportDtype::F16 => Dtype::F16,
            ImportDtype::Bf16 => Dtype::BF16,
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            ImportDtype::F32 => "float32",
            ImportDtype::F16 => "float16",
            ImportDtype::Bf16 => "bfloat16",
        }
    }

    fn size(self) -> usize {
        match self {
            ImportDtype::F32 => 4,
            ImportDtype::F16 | ImportDtype::Bf16 => 2,
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            ImportDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ImportDtype::F16 => values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect(),
            ImportDtype::Bf16 => values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        }
    }
}

/// Everything that can stop an import once the GGUF itself parsed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The GGUF file is unreadable or malformed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// Writing the output failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The path being written.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The output folder already exists and is not empty.
    #[error("output folder {path} already exists and is not empty")]
    OutputExists {
        /// The folder.
        path: PathBuf,
    },
    /// Only Llama-architecture GGUFs are converted.
    #[error("unsupported GGUF architecture {architecture:?} (supported: llama)")]
    UnsupportedArchitecture {
        /// `general.architecture`.
        architecture: String,
    },
    /// A hyper-parameter is zero or inconsistent with the others.
    #[error("invalid model configuration: {reason}")]
    BadConfig {
        /// Why.
        reason: String,
    },
    /// A tensor the Llama layout requires is absent.
    #[error("GGUF has no tensor {name:?}")]
    MissingTensor {
        /// The GGUF tensor name.
        name: String,
    },
    /// A tensor that has no place in a Llama checkpoint.
    #[error("GGUF tensor {name:?} has no Hugging Face Llama equivalent")]
    UnexpectedTensor {
        /// The GGUF tensor name.
        name: String,
    },
    /// A tensor's shape disagrees with the configuration.
    #[error("GGUF tensor {name:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The GGUF tensor name.
        name: String,
        /// Row-major shape found.
        found: Vec<usize>,
        /// Row-major shape the configuration implies.
        expected: Vec<usize>,
    },
    /// The tokenizer metadata cannot be turned into a tokenizer.json.
    #[error("cannot rebuild the tokenizer: {reason}")]
    Tokenizer {
        /// Why.
        reason: String,
    },
    /// Serialising the safetensors file failed.
    #[error("cannot write model.safetensors: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
}

/// The Llama hyper-parameters read from GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaHyperParams {
    /// Transformer blocks.
    pub num_hidden_layers: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Trained context length.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Linear RoPE scaling factor, when the GGUF declares one.
    pub rope_linear_factor: Option<f64>,
    /// No `output.weight`: the LM head reuses the embedding.
    pub tie_word_embeddings: bool,
}

impl LlamaHyperParams {
    /// Reads and checks the hyper-parameters of a Llama GGUF.
    pub fn from_header(h: &GgufHeader) -> Result<Self, ImportError> {
        let arch = h.require_str("general.architecture")?;
        if arch != "llama" {
            return Err(ImportError::UnsupportedArchitecture {
                architecture: arch.into(),
            });
        }
        let usize_of = |key: &str| -> Result<usize, ImportError> {
            let v = h.require_u64(key)?;
            let v = usize::try_from(v).ok().filter(|&v| v > 0 && v <= 1 << 24);
            v.ok_or_else(|| ImportError::BadConfig {
                reason: format!("{key} must be between 1 and 16777216"),
            })
        };
        let num_hidden_layers = usize_of("llama.block_count")?;
        let hidden_size = usize_of("llama.embedding_length")?;
        let intermediate_size = usize_of("llama.feed_forward_length")?;
        let num_attention_heads = usize_of("llama.attention.head_count")?;
        let num_key_value_heads = match h.opt_u64("llama.attention.head_count_kv")? {
            Some(_) => usize_of("llama.attention.head_count_kv")?,
            None => num_attention_heads,
        };
        let max_position_embeddings = usize_of("llama.context_length")?;
        let head_dim = match h.opt_u64("llama.attention.key_length")? {
            Some(_) => usize_of("llama.attention.key_length")?,
            None => hidden_size / num_attention_heads,
        };
        if let Some(v) = h.opt_u64("llama.attention.value_length")?
            && v as usize != head_dim
        {
            return Err(ImportError::BadConfig {
                reason: format!("value_length {v} differs from key_length {head_dim}"),
            });
        }
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(ImportError::BadConfig {
                reason: format!(
                    "{num_attention_heads} query heads are not a multiple of \
                     {num_key_value_heads} key-value heads"
                ),
            });
        }
        if !head_dim.is_multiple_of(2) {
            return Err(ImportError::BadConfig {
                reason: format!("head_dim {head_dim} is odd; RoPE needs pairs"),
            });
        }
        if let Some(rot) = h.opt_u64("llama.rope.dimension_count")?
            && rot as usize != head_dim
        {
            return Err(ImportError::BadConfig {
                reason: format!("partial rotary embedding ({rot} of {head_dim}) is not supported"),
            });
        }
        let embd = h
            .tensor("token_embd.weight")
            .ok_or_else(|| ImportError::MissingTensor {
                name: "token_embd.weight".into(),
            })?;
        let vocab_size = match embd.shape().as_slice() {
            [v, _] => *v,
            other => {
                return Err(ImportError::ShapeMismatch {
                    name: embd.name.clone(),
                    found: other.to_vec(),
                    expected: vec![0, hidden_size],
                });
            }
        };
        let rope_theta = h.opt_f64("llama.rope.freq_base")?.unwrap_or(10_000.0);
        let rms_norm_eps = h
            .opt_f64("llama.attention.layer_norm_rms_epsilon")?
            .unwrap_or(1e-5);
        let rope_linear_factor = match h.opt_str("llama.rope.scaling.type")? {
            None | Some("none") => None,
            Some("linear") => h.opt_f64("llama.rope.scaling.factor")?,
            Some(other) => {
                return Err(ImportError::BadConfig {
                    reason: format!("RoPE scaling {other:?} is not supported (only linear)"),
                });
            }
        };
        if h.tensor("rope_freqs.weight").is_some() {
            return Err(ImportError::BadConfig {
                reason: "rope_freqs.weight (llama3 RoPE scaling factors) is not supported".into(),
            });
        }
        Ok(LlamaHyperParams {
            num_hidden_layers,
            hidden_size,
            intermediate_size,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rope_theta,
            rms_norm_eps,
            rope_linear_factor,
            tie_word_embeddings: h.tensor("output.weight").is_none(),
        })
    }
}

/// Which rows-permutation a tensor needs on import.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Permute {
    None,
    Heads(usize),
}

/// One output tensor: where it comes from and what it must look like.
struct Plan<'a> {
    hf_name: String,
    info: &'a GgufTensorInfo,
    shape: Vec<usize>,
    permute: Permute,
}

/// Maps every GGUF tensor to its Hugging Face name and checks that nothing is missing or extra.
fn plan_tensors<'a>(h: &'a GgufHeader, p: &LlamaHyperParams) -> Result<Vec<Plan<'a>>, ImportError> {
    let (hid, inter) = (p.hidden_size, p.intermediate_size);
    let q_rows = p.num_attention_heads * p.head_dim;
    let kv_rows = p.num_key_value_heads * p.head_dim;
    let mut wanted: Vec<(String, String, Vec<usize>, Permute)> = vec![(
        "token_embd.weight".into(),
        "model.embed_tokens.weight".into(),
        vec![p.vocab_size, hid],
        Permute::None,
    )];
    for l in 0..p.num_hidden_layers {
        let g = |s: &str| format!("blk.{l}.{s}.weight");
        let hf = |s: &str| format!("model.layers.{l}.{s}.weight");
        let entries = [
            ("attn_norm", "input_layernorm", vec![hid], Permute::None),
            (
                "attn_q",
                "self_attn.q_proj",
                vec![q_rows, hid],
                Permute::Heads(p.num_attention_heads),
            ),
            (
                "attn_k",
                "self_attn.k_proj",
                vec![kv_rows, hid],
                Permute::Heads(p.num_key_value_heads),
            ),
            (
                "attn_v",
                "self_attn.v_proj",
                vec![kv_rows, hid],
                Permute::None,
            ),
            (
                "attn_output",
                "self_attn.o_proj",
                vec![hid, q_rows],
                Permute::None,
            ),
            (
                "ffn_norm",
                "post_attention_layernorm",
                vec![hid],
                Permute::None,
            ),
            ("ffn_gate", "mlp.gate_proj", vec![inter, hid], Permute::None),
            ("ffn_up", "mlp.up_proj", vec![inter, hid], Permute::None),
            ("ffn_down", "mlp.down_proj", vec![hid, inter], Permute::None),
        ];
        for (gs, hs, shape, permute) in entries {
            wanted.push((g(gs), hf(hs), shape, permute));
        }
    }
    wanted.push((
        "output_norm.weight".into(),
        "model.norm.weight".into(),
        vec![hid],
        Permute::None,
    ));
    if !p.tie_word_embeddings {
        wanted.push((
            "output.weight".into(),
            "lm_head.weight".into(),
            vec![p.vocab_size, hid],
            Permute::None,
        ));
    }

    let known: HashSet<&str> = wanted.iter().map(|w| w.0.as_str()).collect();
    if let Some(extra) = h.tensors.iter().find(|t| !known.contains(t.name.as_str())) {
        return Err(ImportError::UnexpectedTensor {
            name: extra.name.clone(),
        });
    }
    wanted
        .into_iter()
        .map(|(gguf_name, hf_name, shape, permute)| {
            let info = h
                .tensor(&gguf_name)
                .ok_or_else(|| ImportError::MissingTensor {
                    name: gguf_name.clone(),
                })?;
            if info.shape() != shape {
                return Err(ImportError::ShapeMismatch {
                    name: gguf_name,
                    found: info.shape(),
                    expected: shape,
                });
            }
            Ok(Plan {
                hf_name,
                info,
                shape,
                permute,
            })
        })
        .collect()
}

/// A tensor that is dequantised only when the safetensors writer asks for its bytes, so the
/// import holds one tensor in memory at a time.
struct LazyTensor<'a, B: AsRef<[u8]>> {
    file: &'a GgufFile<B>,
    plan: &'a Plan<'a>,
    dtype: ImportDtype,
    error: &'a std::sync::Mutex<Option<GgufError>>,
    /// Tensors converted so far and the total, shared by all views, for progress logs.
    progress: (&'a AtomicUsize, usize),
}

impl<B: AsRef<[u8]>> LazyTensor<'_, B> {
    fn convert(&self) -> Result<Vec<u8>, GgufError> {
        let info = self.plan.info;
        let values = self.file.dequantize(info)?;
        let values = match self.plan.permute {
            Permute::None => values,
            Permute::Heads(n_head) => {
                let (rows, cols) = (self.plan.shape[0], self.plan.shape[1]);
                unpermute_rows(&values, rows, cols, n_head).ok_or_else(|| GgufError::BadShape {
                    name: info.name.clone(),
                    dims: info.dims.clone(),
                    ggml_type: info.ggml_type,
                    reason: "rows do not split into head pairs",
                })?
            }
        };
        tracing::debug!(tensor = %self.plan.hf_name, shape = ?self.plan.shape, "converted");
        let done = self.progress.0.fetch_add(1, Ordering::Relaxed) + 1;
        let total = self.progress.1;
        if done.is_multiple_of(total.div_ceil(10).max(1)) || done == total {
            tracing::info!("converted {done}/{total} tensors");
        }
        Ok(self.dtype.encode(&values))
    }
}

impl<B: AsRef<[u8]>> View for LazyTensor<'_, B> {
    fn dtype(&self) -> Dtype {
        self.dtype.safetensors()
    }

    fn shape(&self) -> &[usize] {
        &self.plan.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self.convert() {
            Ok(bytes) => Cow::Owned(bytes),
            Err(e) => {
                // The View trait cannot fail; remember the error, write zeros of the right
                // length, and let the caller discard the whole staging folder.
                if let Ok(mut slot) = self.error.lock() {
                    slot.get_or_insert(e);
                }
                Cow::Owned(vec![0u8; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.plan.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The regex llama.cpp and Hugging Face use to pre-split Llama 3 style BPE input.
const LLAMA3_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special tokens named in GGUF metadata, resolved to their text.
#[derive(Debug, Clone, Default)]
struct SpecialTokens {
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    unk: Option<(u32, String)>,
    pad: Option<(u32, String)>,
    eot: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

/// Builds tokenizer.json (as JSON) from the `tokenizer.ggml.*` metadata of a byte-level BPE
/// (`gpt2`) vocabulary, and returns it with the resolved special tokens.
fn build_tokenizer_json(h: &GgufHeader) -> Result<(Json, SpecialTokens), ImportError> {
    let bad = |reason: String| ImportError::Tokenizer { reason };
    let model = h.require_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(bad(format!(
            "tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")"
        )));
    }
    let tokens: Vec<&str> = h
        .require_array("tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.as_str())
        .collect::<Option<_>>()
        .ok_or_else(|| bad("tokenizer.ggml.tokens holds a non-string".into()))?;
    let merges: Vec<&str> = h
        .require_array("tokenizer.ggml.merges")?
        .iter()
        .map(|v| v.as_str())
        .collect::<Option<_>>()
        .ok_or_else(|| bad("tokenizer.ggml.merges holds a non-string".into()))?;
    let types: Vec<i64> = match h.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(|t| t.as_i64()).collect::<Option<_>>())
            .ok_or_else(|| bad("tokenizer.ggml.token_type is not an integer array".into()))?,
    };
    if types.len() != tokens.len() {
        return Err(bad(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    if u32::try_from(tokens.len()).is_err() {
        return Err(bad(format!("{} tokens do not fit u32 ids", tokens.len())));
    }

    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        if vocab.contains_key(tok) {
            return Err(bad(format!("token {tok:?} appears twice (id {id})")));
        }
        vocab.insert(tok.to_string(), json!(id));
        if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
            added.push(json!({
                "id": id,
                "content": tok,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": ty == TOKEN_TYPE_CONTROL,
            }));
        }
    }
    let merges: Vec<Json> = merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => Ok(json!([a, b])),
            _ => Err(bad(format!(
                "merge {m:?} is not two tokens separated by a space"
            ))),
        })
        .collect::<Result<_, _>>()?;

    let token_of = |key: &str| -> Result<Option<(u32, String)>, ImportError> {
        match h.opt_u64(key)? {
            None => Ok(None),
            Some(id) => tokens
                .get(id as usize)
                .map(|t| Some((id as u32, t.to_string())))
                .ok_or_else(|| bad(format!("{key} {id} is outside the vocabulary"))),
        }
    };
    let special = SpecialTokens {
        bos: token_of("tokenizer.ggml.bos_token_id")?,
        eos: token_of("tokenizer.ggml.eos_token_id")?,
        unk: token_of("tokenizer.ggml.unknown_token_id")?,
        pad: token_of("tokenizer.ggml.padding_token_id")?,
        eot: token_of("tokenizer.ggml.eot_token_id")?.map(|(id, _)| id),
        add_bos: h.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
        add_eos: h.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
    };

    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre = h.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre_tokenizer = match pre {
        "smollm" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ],
        }),
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "llama-bpe" | "llama3" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": LLAMA3_SPLIT_REGEX},
                    "behavior": "Isolated",
                    "invert": false,
                },
                byte_level(false),
            ],
        }),
        other => {
            return Err(bad(format!(
                "pre-tokenizer {other:?} is not supported (smollm, gpt2, default, llama-bpe)"
            )));
        }
    };

    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut processor_tokens = serde_json::Map::new();
    if let (true, Some((id, text))) = (special.add_bos, &special.bos) {
        single.push(json!({"SpecialToken": {"id": text, "type_id": 0}}));
        pair.push(json!({"SpecialToken": {"id": text, "type_id": 0}}));
        processor_tokens.insert(
            text.clone(),
            json!({"id": text, "ids": [id], "tokens": [text]}),
        );
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
    if let (true, Some((id, text))) = (special.add_eos, &special.eos) {
        single.push(json!({"SpecialToken": {"id": text, "type_id": 0}}));
        pair.push(json!({"SpecialToken": {"id": text, "type_id": 1}}));
        processor_tokens.insert(
            text.clone(),
            json!({"id": text, "ids": [id], "tokens": [text]}),
        );
    }
    let post_processor = if processor_tokens.is_empty() {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
    } else {
        json!({
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
                {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": processor_tokens},
            ],
        })
    };

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": special.unk.as_ref().map(|(_, t)| t.clone()),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });
    Ok((tokenizer, special))
}

/// What an import produced.
#[derive(Debug, Clone)]
pub struct ImportSummary {
    /// The hyper-parameters written to config.json.
    pub params: LlamaHyperParams,
    /// Tensors written.
    pub n_tensors: usize,
    /// Bytes of model.safetensors.
    pub safetensors_bytes: u64,
}

/// Converts a Llama GGUF into a Hugging Face style folder at `out_dir`.
///
/// Everything is written into a hidden staging folder beside `out_dir` and renamed into place
/// at the end, so a failure leaves no half-written model behind.
pub fn import_gguf(
    gguf_path: &Path,
    out_dir: &Path,
    dtype: ImportDtype,
) -> Result<ImportSummary, ImportError> {
    if out_dir
        .read_dir()
        .is_ok_and(|mut entries| entries.next().is_some())
    {
        return Err(ImportError::OutputExists {
            path: out_dir.to_path_buf(),
        });
    }
    let file = GgufFile::open(gguf_path)?;
    tracing::info!(
        path = %gguf_path.display(),
        version = file.header.version,
        tensors = file.header.tensors.len(),
        metadata = file.header.metadata.len(),
        "read GGUF header"
    );
    let params = LlamaHyperParams::from_header(&file.header)?;
    let plans = plan_tensors(&file.header, &params)?;
    let (tokenizer_json, special) = build_tokenizer_json(&file.header)?;
    let tokenizer_text =
        serde_json::to_string(&tokenizer_json).map_err(|e| ImportError::Tokenizer {
            reason: e.to_string(),
        })?;
    // Prove the rebuilt tokenizer loads before anything is written.
    tokenizers::Tokenizer::from_bytes(tokenizer_text.as_bytes()).map_err(|e| {
        ImportError::Tokenizer {
            reason: format!("the rebuilt tokenizer.json does not load: {e}"),
        }
    })?;
    let chat_template = file.header.opt_str("tokenizer.chat_template")?;

    let parent = match out_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImportError::Io { path, source }
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let leaf = out_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let staging = parent.join(format!(".{leaf}.import-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    std::fs::create_dir(&staging).map_err(io(&staging))?;
    let text_files = TextFiles {
        tokenizer_json: &tokenizer_json,
        tokenizer_text: &tokenizer_text,
        special: &special,
        chat_template,
    };
    let staged = write_folder(&staging, &file, &params, &plans, dtype, &text_files);
    let summary = match staged {
        Ok(bytes) => ImportSummary {
            params,
            n_tensors: plans.len(),
            safetensors_bytes: bytes,
        },
        Err(e) => {
            // Best effort: the staging folder is hidden and named by pid, so a leftover is
            // harmless, but do not leave half a model around when we can help it.
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if out_dir.exists() {
        // Empty (checked above): rename cannot replace a non-empty folder, and an empty one
        // is what the user asked us to fill.
        std::fs::remove_dir(out_dir).map_err(io(out_dir))?;
    }
    if let Err(source) = std::fs::rename(&staging, out_dir) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(ImportError::Io {
            path: out_dir.to_path_buf(),
            source,
        });
    }
    tracing::info!(
        out = %out_dir.display(),
        tensors = summary.n_tensors,
        bytes = summary.safetensors_bytes,
        dtype = dtype.torch_name(),
        "imported GGUF"
    );
    Ok(summary)
}

/// The tokenizer side of an import, prepared (and proven to load) before anything is written.
struct TextFiles<'a> {
    tokenizer_json: &'a Json,
    tokenizer_text: &'a str,
    special: &'a SpecialTokens,
    chat_template: Option<&'a str>,
}

fn write_folder<B: AsRef<[u8]>>(
    dir: &Path,
    file: &GgufFile<B>,
    p: &LlamaHyperParams,
    plans: &[Plan<'_>],
    dtype: ImportDtype,
    text_files: &TextFiles<'_>,
) -> Result<u64, ImportError> {
    let TextFiles {
        tokenizer_json,
        tokenizer_text,
        special,
        chat_template,
    } = *text_files;
    let write_json = |name: &str, value: &Json| -> Result<(), ImportError> {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(value).map_err(|e| ImportError::Io {
            path: path.clone(),
            source: e.into(),
        })?;
        std::fs::write(&path, text).map_err(|source| ImportError::Io { path, source })
    };
    let id = |t: &Option<(u32, String)>| t.as_ref().map(|(id, _)| *id);
    let text = |t: &Option<(u32, String)>| t.as_ref().map(|(_, s)| s.clone());

    let rope_scaling = p
        .rope_linear_factor
        .map(|f| json!({"rope_type": "linear", "type": "linear", "factor": f}));
    write_json(
        "config.json",
        &json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": p.hidden_size,
            "intermediate_size": p.intermediate_size,
            "num_hidden_layers": p.num_hidden_layers,
            "num_attention_heads": p.num_attention_heads,
            "num_key_value_heads": p.num_key_value_heads,
            "head_dim": p.head_dim,
            "vocab_size": p.vocab_size,
            "max_position_embeddings": p.max_position_embeddings,
            "rms_norm_eps": p.rms_norm_eps,
            "rope_theta": p.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": p.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": true,
            "bos_token_id": id(&special.bos),
            "eos_token_id": id(&special.eos),
            "pad_token_id": id(&special.pad),
            "torch_dtype": dtype.torch_name(),
        }),
    )?;

    let mut eos_ids: Vec<u32> = id(&special.eos).into_iter().collect();
    if let Some(eot) = special.eot
        && !eos_ids.contains(&eot)
    {
        eos_ids.push(eot);
    }
    let eos_value = match eos_ids.as_slice() {
        [one] => json!(one),
        many => json!(many),
    };
    write_json(
        "generation_config.json",
        &json!({
            "bos_token_id": id(&special.bos),
            "eos_token_id": eos_value,
            "pad_token_id": id(&special.pad),
        }),
    )?;

    let tok_path = dir.join("tokenizer.json");
    std::fs::write(&tok_path, tokenizer_text).map_err(io_at(&tok_path))?;
    // Hugging Face's tokenizer_config.json lists added tokens by id, without the id field.
    let added: serde_json::Map<String, Json> = tokenizer_json["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let mut t = t.as_object()?.clone();
            let id = t.remove("id")?.as_u64()?;
            Some((id.to_string(), Json::Object(t)))
        })
        .collect();
    write_json(
        "tokenizer_config.json",
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": special.add_bos,
            "add_eos_token": special.add_eos,
            "bos_token": text(&special.bos),
            "eos_token": text(&special.eos),
            "unk_token": text(&special.unk),
            "pad_token": text(&special.pad),
            "chat_template": chat_template,
            "clean_up_tokenization_spaces": false,
            "model_max_length": p.max_position_embeddings,
            "added_tokens_decoder": added,
        }),
    )?;

    let error = std::sync::Mutex::new(None);
    let converted = AtomicUsize::new(0);
    let views: Vec<(String, LazyTensor<'_, B>)> = plans
        .iter()
        .map(|plan| {
            (
                plan.hf_name.clone(),
                LazyTensor {
                    file,
                    plan,
                    dtype,
                    error: &error,
                    progress: (&converted, plans.len()),
                },
            )
        })
        .collect();
    let st_path = dir.join("model.safetensors");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    tracing::info!(tensors = views.len(), "writing model.safetensors");
    safetensors::serialize_to_file(views, Some(metadata), &st_path)?;
    if let Some(e) = error.into_inner().ok().flatten() {
        return Err(e.into());
    }
    let bytes = std::fs::metadata(&st_path).map_err(io_at(&st_path))?.len();
    Ok(bytes)
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> ImportError {
    let path = path.to_path_buf();
    move |source| ImportError::Io { path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's forward permutation (convert_hf_to_gguf.py `permute`), written independently
    /// of `unpermute_rows` from its numpy definition.
    fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        // reshape(n_head, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)
        let half = rows / n_head / 2;
        let mut out = Vec::with_capacity(w.len());
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    let src = (h * 2 + j) * half + i;
                    out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_rows_inverts_llama_cpp_permutation() {
        for (n_head, head_dim, cols) in [(9, 64, 5), (3, 64, 3), (2, 4, 1), (1, 2, 7)] {
            let rows = n_head * head_dim;
            let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let permuted = llama_cpp_permute(&w, rows, cols, n_head);
            if head_dim > 2 {
                assert_ne!(permuted, w, "head_dim {head_dim}: rows must move");
            }
            let back = unpermute_rows(&permuted, rows, cols, n_head).expect("valid shape");
            assert_eq!(back, w);
        }
    }

    #[test]
    fn unpermute_rows_rejects_rows_that_do_not_split_into_head_pairs() {
        assert!(unpermute_rows(&[0.0; 6], 3, 2, 1).is_none());
        assert!(unpermute_rows(&[0.0; 8], 4, 2, 0).is_none());
        assert!(unpermute_rows(&[0.0; 7], 4, 2, 1).is_none());
    }

    #[test]
    fn every_known_type_id_round_trips_and_retired_ids_are_unknown() {
        for id in 0..64 {
            if let Some(t) = GgmlType::from_id(id) {
                let (block, size) = t.block_layout();
                assert!(block >= 1 && size >= 1, "{t}");
            }
        }
        for retired in [4, 5, 31, 32, 33, 36, 37, 38, 40] {
            assert_eq!(GgmlType::from_id(retired), None, "id {retired}");
        }
    }
}
