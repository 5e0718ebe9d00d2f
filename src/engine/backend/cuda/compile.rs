//! Kernel sources -> CUBIN for the device's architecture through NVRTC, with an on-disk cache
//! keyed by source hash + arch + options. The sources are embedded by build.rs; every module is
//! `common.cuh` followed by one `.cu` file.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::engine::backend::{BackendError, Result};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));
}

/// The header prepended to every module.
const COMMON_HEADER: &str = "common.cuh";

/// Embedded kernel files: (file name, source).
pub fn kernel_files() -> &'static [(&'static str, &'static str)] {
    embedded::KERNEL_SOURCES
}

/// The full source of one module (`sgmv.cu`, `ops.cu`): the common header, then the file.
pub fn module_source(file: &str) -> Result<String> {
    let find = |name: &str| {
        kernel_files()
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
            .ok_or_else(|| BackendError::Compile(format!("kernel file {name} is not embedded")))
    };
    let header = find(COMMON_HEADER)?;
    let body = find(file)?;
    Ok(format!("{header}\n#line 1 \"{file}\"\n{body}"))
}

/// The module file that defines a kernel, from its name.
pub fn module_of(kernel: &str) -> &'static str {
    if kernel.starts_with("sgmv_") {
        "sgmv.cu"
    } else {
        "ops.cu"
    }
}

/// NVRTC target for a compute capability: the arch-specific `sm_90a` on Hopper (so wgmma and
/// setmaxnreg are available), plain `sm_XY` elsewhere.
pub fn arch_for(major: i32, minor: i32) -> String {
    if major == 9 && minor == 0 {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// NVRTC options for `arch`, with the toolkit include dir when one exists.
pub fn compile_options(arch: &str, include_dir: Option<&Path>) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-lineinfo".to_string(),
    ];
    if let Some(dir) = include_dir {
        opts.push(format!("-I{}", dir.display()));
    }
    opts
}

/// Cache key: SHA-256 over source, arch and options (hex).
pub fn cache_key(source: &str, arch: &str, options: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update([0u8]);
    h.update(arch.as_bytes());
    for o in options {
        h.update([0u8]);
        h.update(o.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The CUDA toolkit include dir: `$CUDA_HOME/include`, else `/usr/local/cuda/include`, if present.
pub fn toolkit_include_dir() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include")),
        std::env::var_os("CUDA_PATH").map(|h| PathBuf::from(h).join("include")),
        Some(PathBuf::from("/usr/local/cuda/include")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_dir())
}

/// Default cubin cache dir: `$PUNICA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/punica/kernels`, else
/// `~/.cache/punica/kernels`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PUNICA_KERNEL_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(p).join("punica").join("kernels"));
    }
    std::env::var_os("HOME").map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("punica")
            .join("kernels")
    })
}

/// Compiles modules for one architecture, reading and filling the on-disk cache.
#[derive(Clone, Debug)]
pub struct KernelCompiler {
    pub arch: String,
    pub include_dir: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
}

impl KernelCompiler {
    /// The cubin of `file` (`sgmv.cu`, `ops.cu`), from the cache or freshly compiled.
    pub fn cubin(&self, file: &str) -> Result<Vec<u8>> {
        let source = module_source(file)?;
        let options = compile_options(&self.arch, self.include_dir.as_deref());
        let key = cache_key(&source, &self.arch, &options);
        let cached = self.cache_dir.as_ref().map(|d| {
            d.join(format!(
                "{}-{}-{key}.cubin",
                file.trim_end_matches(".cu"),
                self.arch
            ))
        });
        if let Some(path) = &cached
            && let Ok(bytes) = std::fs::read(path)
            && !bytes.is_empty()
        {
            tracing::debug!(file, path = %path.display(), "cubin cache hit");
            return Ok(bytes);
        }
        let started = std::time::Instant::now();
        let cubin = nvrtc_cubin(&source, file, &options)?;
        tracing::info!(
            file,
            arch = %self.arch,
            ms = started.elapsed().as_millis() as u64,
            bytes = cubin.len(),
            "compiled kernels with NVRTC"
        );
        if let Some(path) = &cached {
            // The cache is an optimisation: failing to write it only costs a recompile later.
            let write = path
                .parent()
                .map(std::fs::create_dir_all)
                .unwrap_or(Ok(()))
                .and_then(|_| {
                    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                    std::fs::write(&tmp, &cubin)?;
                    std::fs::rename(&tmp, path)
                });
            if let Err(e) = write {
                tracing::warn!(path = %path.display(), error = %e, "could not write cubin cache");
            }
        }
        Ok(cubin)
    }
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its known names; no symbol is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compile one source to CUBIN. Errors carry NVRTC's log.
pub fn nvrtc_cubin(source: &str, name: &str, options: &[String]) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result, sys};
    if !nvrtc_present() {
        return Err(BackendError::Unavailable(
            "NVRTC (libnvrtc.so) not found on the library path".into(),
        ));
    }
    let c_src = CString::new(source)
        .map_err(|_| BackendError::Compile(format!("{name}: source contains a NUL byte")))?;
    let c_name = CString::new(name)
        .map_err(|_| BackendError::Compile(format!("{name}: name contains a NUL byte")))?;
    let prog = result::create_program(&c_src, Some(&c_name))
        .map_err(|e| BackendError::Compile(format!("{name}: nvrtcCreateProgram: {e}")))?;
    // SAFETY: `prog` was created above and is destroyed exactly once, below, on every path.
    let outcome = unsafe {
        let compiled = result::compile_program(prog, options);
        let log = result::get_program_log(prog)
            .map(|raw| {
                let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
                CStr::from_bytes_until_nul(&bytes)
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        match compiled {
            Err(e) => Err(BackendError::Compile(format!(
                "{name}: NVRTC {e} with options {options:?}\n{log}"
            ))),
            Ok(()) => {
                if !log.trim().is_empty() {
                    tracing::debug!(name, log = %log, "NVRTC log");
                }
                let mut size = 0usize;
                let r = sys::nvrtcGetCUBINSize(prog, &mut size);
                if r != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
                    Err(BackendError::Compile(format!(
                        "{name}: no CUBIN ({r:?}); is {options:?} a real sm_ target?"
                    )))
                } else {
                    let mut cubin = vec![0u8; size];
                    let r = sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast());
                    if r == sys::nvrtcResult::NVRTC_SUCCESS {
                        Ok(cubin)
                    } else {
                        Err(BackendError::Compile(format!(
                            "{name}: nvrtcGetCUBIN: {r:?}"
                        )))
                    }
                }
            }
        }
    };
    // SAFETY: `prog` is live and not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_is_embedded_with_the_common_header_first() {
        for file in ["sgmv.cu", "ops.cu"] {
            let src = module_source(file).unwrap();
            assert!(src.starts_with("// Shared device helpers"), "{file}");
            assert!(src.contains("extern \"C\" __global__"), "{file}");
        }
        assert!(module_source("missing.cu").is_err());
    }

    #[test]
    fn kernels_map_to_their_module_by_name() {
        assert_eq!(module_of("sgmv_shrink_bf16_n2"), "sgmv.cu");
        assert_eq!(module_of("rms_norm_bf16"), "ops.cu");
    }

    #[test]
    fn the_launch_plans_constants_are_the_kernels_defines() {
        use super::super::plan;
        let src = module_source("sgmv.cu").unwrap();
        for (name, value) in [
            ("ROWS_WARPS", plan::ROWS_WARPS),
            ("ROWS_KU", plan::ROWS_KU),
            ("EXPAND_ROWS_WARPS", plan::EXPAND_ROWS_WARPS),
            ("EXPAND_ROWS_KU", plan::EXPAND_ROWS_KU),
            ("EXPAND_ROWS_GS_BLOCKS", plan::EXPAND_ROWS_GS_BLOCKS),
            ("EXPAND_SILU_WARPS", plan::EXPAND_SILU_WARPS),
            ("EXPAND_SILU_BLOCKS", plan::EXPAND_SILU_BLOCKS),
            ("EXPAND_SILU_GAP_COLS", plan::EXPAND_SILU_GAP_COLS),
            ("EXPAND_ROPE_GAP_PAIRS", plan::EXPAND_ROPE_GAP_PAIRS),
            ("STREAM_CONSUMERS", plan::STREAM_CONSUMERS),
            ("STREAM_MAX_STAGES", plan::STREAM_MAX_STAGES),
            ("STREAM_MAX_RANK", plan::STREAM_MAX_RANK),
            ("EXPAND_LONG_CHUNKS", plan::EXPAND_LONG_CHUNKS),
            ("EXPAND_LONG_NTW", plan::EXPAND_LONG_NTW),
        ] {
            let line = format!("\n#define {name} {value}\n");
            assert!(
                src.contains(&line),
                "kernels/sgmv.cu lacks `{}`",
                line.trim()
            );
        }
    }

    #[test]
    fn hopper_gets_the_arch_specific_target() {
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(8, 0), "sm_80");
        assert_eq!(arch_for(8, 9), "sm_89");
    }

    #[test]
    fn cache_key_changes_with_source_arch_and_options() {
        let o = compile_options("sm_90a", None);
        let k = cache_key("a", "sm_90a", &o);
        assert_eq!(k.len(), 64);
        assert_eq!(k, cache_key("a", "sm_90a", &o));
        assert_ne!(k, cache_key("b", "sm_90a", &o));
        assert_ne!(k, cache_key("a", "sm_80", &o));
        let o2 = compile_options("sm_90a", Some(Path::new("/usr/local/cuda/include")));
        assert_ne!(k, cache_key("a", "sm_90a", &o2));
    }

    #[test]
    fn every_kernel_the_backend_names_is_defined_in_its_module() {
        for name in super::super::kernel_names() {
            let src = module_source(module_of(&name)).unwrap();
            let defined = if let Some(t) = name.strip_prefix("sgmv_shrink_rows_") {
                src.contains(&format!("DEFINE_SHRINK_ROWS({t}, {t})"))
            } else if let Some(rest) = name.strip_prefix("sgmv_shrink_") {
                let (t, n) = rest.split_once("_n").unwrap();
                src.contains(&format!("DEFINE_SHRINK({t}, {t}, {n},"))
            } else if let Some(rest) = name.strip_prefix("sgmv_expand_rows_") {
                // Each instantiation defines the f32-v kernel and the `_vh` one, plain and
                // grid-stride.
                let (gs, rest) = match rest.strip_prefix("gs_") {
                    Some(rest) => (true, rest),
                    None => (false, rest),
                };
                let (t, l) = rest.split_once("_l").unwrap();
                let t = t.strip_suffix("_vh").unwrap_or(t);
                src.contains(&format!("DEFINE_EXPAND_ROWS({t}, {t}, {l})"))
                    && src.contains("DEFINE_EXPAND_ROWS_V(TNAME, TYPE, _vh, TYPE, RL)")
                    && (!gs || src.contains(" sgmv_expand_rows_gs_##TNAME##VNAME##_l##RL("))
            } else if let Some((op, rest)) = ["silu", "rope"].iter().find_map(|op| {
                name.strip_prefix(&format!("sgmv_expand_{op}_rows_"))
                    .map(|rest| (op.to_uppercase(), rest))
            }) {
                // Instantiated beside the row expands, with an f32 v and a `_vh` one.
                let (t, l) = rest.split_once("_l").unwrap();
                let t = t.strip_suffix("_vh").unwrap_or(t);
                let lower = op.to_lowercase();
                src.contains(&format!("DEFINE_EXPAND_ROWS({t}, {t}, {l})"))
                    && src.contains(&format!("DEFINE_EXPAND_{op}_V(TNAME, TYPE, _vh, TYPE, RL)"))
                    && src.contains(&format!(
                        " sgmv_expand_{lower}_rows_##TNAME##VNAME##_l##RL("
                    ))
            } else if let Some(rest) = name.strip_prefix("sgmv_expand_long_") {
                let (t, k) = rest.split_once("_k").unwrap();
                let t = t.strip_suffix("_vh").unwrap_or(t);
                src.contains(&format!("DEFINE_EXPAND_LONG({t}, {t}, {k})"))
                    && src.contains("DEFINE_EXPAND_LONG_V(TNAME, TYPE, _vh, TYPE, KT)")
            } else if let Some(rest) = name.strip_prefix("sgmv_expand_") {
                let (t, kw) = rest.split_once("_k").unwrap();
                let t = t.strip_suffix("_vh").unwrap_or(t);
                let (k, w) = kw.split_once("_w").unwrap();
                src.contains(&format!("DEFINE_EXPAND({t}, {t}, {k}, {w})"))
                    && src.contains("DEFINE_EXPAND_V(TNAME, TYPE, _vh, TYPE, KT, NTW)")
            } else if let Some(rest) = name.strip_prefix("sgmv_lora_stream_") {
                // Each instantiation defines the plain kernel and the `_mma` one.
                let (t, c) = rest.split_once("_c").unwrap();
                let t = t.strip_prefix("mma_").unwrap_or(t);
                src.contains(&format!("DEFINE_LORA_STREAM({t}, {t}, {c})"))
                    && src.contains("DEFINE_LORA_STREAM_X(TNAME, TYPE, C, _mma, true)")
            } else if let Some(rest) = name.strip_prefix("attention_d") {
                let (hd, t) = rest.split_once('_').unwrap();
                src.contains(" attention_d##HD##_##TNAME(")
                    && src.contains(&format!("DEFINE_ATTN_VEC(TNAME, T, {hd},"))
                    && src.contains(&format!("DEFINE_HALF_OPS({t}, "))
            } else {
                // A kernel of the per-type macro, or one written out for a single type.
                let (op, _) = name.rsplit_once('_').unwrap();
                src.contains(&format!(" {op}_##TNAME(")) || src.contains(&format!(" {name}("))
            };
            assert!(defined, "{name} is not defined");
        }
    }
}
