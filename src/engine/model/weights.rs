//! Model weights from `*.safetensors`: a single `model.safetensors` or shards listed in
//! `model.safetensors.index.json`. Files are memory-mapped and each tensor's bytes go straight to
//! [`Backend::upload_raw`]; nothing is read into an intermediate buffer on the host except what
//! the backend itself keeps (the CPU backend keeps f32 copies; CUDA converts to its dtype on the
//! device side of the copy).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, Metadata};

use crate::engine::backend::{Backend, BackendError, DType};

/// Why weights cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("no model.safetensors or model.safetensors.index.json in {0}")]
    NoWeights(String),
    #[error("bad shard index {path}: {reason}")]
    Index { path: String, reason: String },
    #[error("{path} is not a valid safetensors file: {reason}")]
    Header { path: String, reason: String },
    #[error("tensor {0} is missing from the checkpoint")]
    Missing(String),
    #[error("tensor {name} has dtype {dtype}; only F32, F16 and BF16 are supported")]
    Dtype { name: String, dtype: String },
    #[error("tensor {name} has shape {got:?}, the config implies {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

type Result<T, E = WeightsError> = std::result::Result<T, E>;

/// One tensor's raw little-endian bytes inside a mapped file.
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    meta: Metadata,
}

/// The tensors of a checkpoint, memory-mapped. The files must not be modified while open.
pub struct ModelWeights {
    files: Vec<MappedFile>,
    by_name: HashMap<String, usize>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |source| WeightsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Map a backend dtype from a safetensors dtype, if supported.
pub fn dtype_of(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

impl ModelWeights {
    /// Open the checkpoint in `dir`: the shard index if present, else `model.safetensors`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| WeightsError::Index {
                    path: index.display().to_string(),
                    reason: e.to_string(),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| WeightsError::Index {
                    path: index.display().to_string(),
                    reason: "no weight_map object".into(),
                })?;
            let mut shards = BTreeSet::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| WeightsError::Index {
                    path: index.display().to_string(),
                    reason: format!("weight_map entry {name} is not a file name"),
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(WeightsError::Index {
                        path: index.display().to_string(),
                        reason: format!("shard name {file:?} leaves the model folder"),
                    });
                }
                shards.insert(file.to_string());
            }
            let paths: Vec<PathBuf> = shards.iter().map(|f| dir.join(f)).collect();
            return Self::open_files(&paths);
        }
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Self::open_files(&[single]);
        }
        Err(WeightsError::NoWeights(dir.display().to_string()))
    }

    /// Open the given safetensors files as one checkpoint.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut by_name = HashMap::new();
        for path in paths {
            let file = File::open(path).map_err(io_err(path))?;
            // SAFETY: the map is read-only and the checkpoint files are documented as immutable
            // while loaded; a concurrent truncation would be the only way to fault.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| WeightsError::Header {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
            for name in meta.tensors().keys() {
                by_name.insert(name.clone(), files.len());
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                header_len,
                meta,
            });
        }
        Ok(ModelWeights { files, by_name })
    }

    /// Whether the checkpoint has a tensor of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// One tensor's raw bytes.
    pub fn get(&self, name: &str) -> Result<RawTensor<'_>> {
        let &i = self
            .by_name
            .get(name)
            .ok_or_else(|| WeightsError::Missing(name.to_string()))?;
        let f = &self.files[i];
        let info = f
            .meta
            .info(name)
            .ok_or_else(|| WeightsError::Missing(name.to_string()))?;
        let dtype = dtype_of(info.dtype).ok_or_else(|| WeightsError::Dtype {
            name: name.to_string(),
            dtype: format!("{:?}", info.dtype),
        })?;
        let (start, end) = info.data_offsets;
        let base = 8 + f.header_len;
        // read_metadata validated that the offsets tile the data section of the file.
        let bytes = f
            .mmap
            .get(base + start..base + end)
            .ok_or_else(|| WeightsError::Header {
                path: f.path.display().to_string(),
                reason: format!("tensor {name} lies outside the file"),
            })?;
        Ok(RawTensor {
            dtype,
            shape: &info.shape,
            bytes,
        })
    }

    /// A tensor checked against `shape`.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<RawTensor<'_>> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(WeightsError::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: t.shape.to_vec(),
            });
        }
        Ok(t)
    }

    /// Upload one tensor, checked against `shape`, in the backend's dtype.
    pub fn load<B: Backend>(&self, backend: &B, name: &str, shape: &[usize]) -> Result<B::Buf> {
        let t = self.get_shaped(name, shape)?;
        Ok(backend.upload_raw(backend.dtype(), t.dtype, t.bytes)?)
    }

    /// Upload several `[rows_i, cols]` tensors stacked along the rows into one buffer (fused
    /// projections such as q/k/v). Each is checked against its shape.
    pub fn load_stacked<B: Backend>(
        &self,
        backend: &B,
        parts: &[(&str, [usize; 2])],
    ) -> Result<B::Buf> {
        let tensors = parts
            .iter()
            .map(|(name, shape)| self.get_shaped(name, shape))
            .collect::<Result<Vec<_>>>()?;
        let first = tensors.first().map(|t| t.dtype).unwrap_or(DType::F32);
        if tensors.iter().all(|t| t.dtype == first) {
            let bytes: Vec<u8> = tensors
                .iter()
                .flat_map(|t| t.bytes.iter().copied())
                .collect();
            return Ok(backend.upload_raw(backend.dtype(), first, &bytes)?);
        }
        let mut values = Vec::new();
        for t in &tensors {
            values.extend(crate::engine::backend::host_to_f32(t.dtype, t.bytes)?);
        }
        Ok(backend.upload(backend.dtype(), &values)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::cpu::CpuBackend;
    use safetensors::tensor::TensorView;

    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn sharded_checkpoints_load_through_the_index_with_mixed_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let bf: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        write(
            &dir.path().join("a.safetensors"),
            &[("x", Dtype::F32, vec![1, 2], f32_bytes(&[3.0, 4.0]))],
        );
        write(
            &dir.path().join("b.safetensors"),
            &[("y", Dtype::BF16, vec![1, 2], bf)],
        );
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}"#,
        )
        .unwrap();
        let w = ModelWeights::open_dir(dir.path()).unwrap();
        let cpu = CpuBackend::new();
        let buf = w
            .load_stacked(&cpu, &[("x", [1, 2]), ("y", [1, 2])])
            .unwrap();
        assert_eq!(cpu.download(&buf).unwrap(), vec![3.0, 4.0, 1.5, -2.0]);
        let err = w.load(&cpu, "x", &[2, 1]).unwrap_err();
        assert!(
            err.to_string()
                .contains("shape [1, 2], the config implies [2, 1]"),
            "{err}"
        );
        assert!(matches!(w.load(&cpu, "z", &[1]), Err(WeightsError::Missing(n)) if n == "z"));
    }

    #[test]
    fn a_folder_without_weights_and_a_corrupt_file_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ModelWeights::open_dir(dir.path()),
            Err(WeightsError::NoWeights(_))
        ));
        std::fs::write(
            dir.path().join("model.safetensors"),
            b"\x10\0\0\0\0\0\0\0{}",
        )
        .unwrap();
        assert!(matches!(
            ModelWeights::open_dir(dir.path()),
            Err(WeightsError::Header { .. })
        ));
    }

    #[test]
    fn integer_tensors_are_rejected_with_their_dtype() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("model.safetensors"),
            &[("i", Dtype::I32, vec![1], vec![0, 0, 0, 0])],
        );
        let w = ModelWeights::open_dir(dir.path()).unwrap();
        let err = w.get("i").unwrap_err();
        assert!(err.to_string().contains("dtype I32"), "{err}");
    }
}
