//! Shared test helpers: the demo model on disk, and a writer of small GGUF files.

use std::path::{Path, PathBuf};

pub use crate::demo_model::demo_model_dir;

/// The demo GGUF in the fetch script's cache (present once `demo_model_dir` ran).
pub fn demo_gguf_path() -> PathBuf {
    demo_model_dir();
    let cache = std::env::var_os("PUNICA_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("punica")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/punica")
        });
    let path = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// A metadata value for [`GgufWriter`].
#[derive(Debug, Clone)]
pub enum Kv {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
}

/// Writes GGUF v3 files byte by byte, so tests control every field (including wrong ones).
#[derive(Debug, Default)]
pub struct GgufWriter {
    pub kvs: Vec<(String, Kv)>,
    /// (name, ggml dims innermost first, type id, raw bytes)
    pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl GgufWriter {
    pub fn kv(mut self, key: &str, value: Kv) -> Self {
        self.kvs.push((key.into(), value));
        self
    }

    pub fn tensor(mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> Self {
        self.tensors
            .push((name.into(), dims.to_vec(), type_id, data));
        self
    }

    /// An f32 tensor.
    pub fn f32_tensor(self, name: &str, dims: &[u64], values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, 0, data)
    }

    /// The file's alignment: `general.alignment` when set, else GGUF's default of 32.
    fn alignment(&self) -> usize {
        self.kvs
            .iter()
            .find_map(|(k, v)| match (k.as_str(), v) {
                ("general.alignment", Kv::U32(a)) if a.is_power_of_two() => Some(*a as usize),
                _ => None,
            })
            .unwrap_or(32)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment();
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kvs.len() as u64).to_le_bytes());
        for (key, value) in &self.kvs {
            put_str(&mut out, key);
            match value {
                Kv::U32(v) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                Kv::F32(v) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                Kv::Bool(v) => {
                    out.extend(7u32.to_le_bytes());
                    out.push(u8::from(*v));
                }
                Kv::Str(s) => {
                    out.extend(8u32.to_le_bytes());
                    put_str(&mut out, s);
                }
                Kv::StrArray(items) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(8u32.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for s in items {
                        put_str(&mut out, s);
                    }
                }
                Kv::I32Array(items) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(5u32.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for v in items {
                        out.extend(v.to_le_bytes());
                    }
                }
            }
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (_, _, _, data) in &self.tensors {
            offsets.push(offset);
            offset = (offset + data.len() as u64).next_multiple_of(align as u64);
        }
        for ((name, dims, ty, _), off) in self.tensors.iter().zip(&offsets) {
            put_str(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(off.to_le_bytes());
        }
        out.resize(out.len().next_multiple_of(align), 0);
        let base = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(&offsets) {
            out.resize(base + *off as usize, 0);
            out.extend(data);
        }
        out
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_bytes()).expect("write test GGUF");
    }
}

/// A byte-level BPE vocabulary small enough to hand-write: the 256 byte symbols, a few merges,
/// and two control tokens, in GGUF metadata form.
pub fn tiny_tokenizer_kvs(w: GgufWriter) -> GgufWriter {
    let mut tokens = vec!["<|endoftext|>".to_string(), "<|im_end|>".to_string()];
    tokens.extend(byte_level_alphabet());
    tokens.push("Ġt".into());
    tokens.push("he".into());
    tokens.push("Ġthe".into());
    let mut types = vec![3, 3];
    types.extend(std::iter::repeat_n(1, tokens.len() - 2));
    w.kv("tokenizer.ggml.model", Kv::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Kv::Str("smollm".into()))
        .kv("tokenizer.ggml.tokens", Kv::StrArray(tokens))
        .kv("tokenizer.ggml.token_type", Kv::I32Array(types))
        .kv(
            "tokenizer.ggml.merges",
            Kv::StrArray(vec!["Ġ t".into(), "h e".into(), "Ġt he".into()]),
        )
        .kv("tokenizer.ggml.bos_token_id", Kv::U32(0))
        .kv("tokenizer.ggml.eos_token_id", Kv::U32(1))
        .kv("tokenizer.ggml.add_bos_token", Kv::Bool(false))
        .kv(
            "tokenizer.chat_template",
            Kv::Str(
                "{% for m in messages %}{{ m.role }}: {{ m.content | trim }}\n{% endfor %}".into(),
            ),
        )
}

/// GPT-2's byte-to-unicode table, in byte order.
pub fn byte_level_alphabet() -> Vec<String> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).expect("valid char").to_string()
        })
        .collect()
}
