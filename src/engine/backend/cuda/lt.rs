//! Decode GEMMs through cuBLASLt with the algorithm picked by timing.
//!
//! For a weight stream of a few rows cuBLAS's default choice is not always the fastest: on the
//! H200 it splits k of the 7B o and down projections at 32 rows over two blocks and adds a
//! reduce kernel (`ncu-7b-distinct-decode-h200-2026-11-29-s6.txt`). [`LtGemms::tune`] times
//! the heuristic's candidates for each decode shape on scratch weights (rotated so that L2
//! holds none of them, like a real step's), and a shape whose best candidate beats the default
//! runs through `cublasLtMatmul` with it; every other GEMM goes through `cublasGemmEx` as before.

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::{result as lt_result, sys as lt_sys};

use crate::engine::backend::{BackendError, DType, Result};

/// Most rows a decode step's GEMMs are tuned for.
pub const TUNE_MAX_ROWS: usize = 64;
/// Candidates asked of the heuristic per shape.
const CANDIDATES: usize = 8;
/// Timed runs per candidate (after two untimed ones).
pub const RUNS: usize = 8;
/// Bytes of distinct weights the timing rotates through (beyond the 50 MB of the H200's L2).
pub const ROTATION_BYTES: usize = 256 << 20;
/// A candidate replaces the default only when at least this much faster.
const MIN_GAIN: f64 = 0.03;

/// One GEMM shape: row-major `out[rows, n] = x[rows, k] · w[n, k]ᵀ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub rows: usize,
    pub k: usize,
    pub n: usize,
    pub dtype: DType,
    pub out_dtype: DType,
}

/// A tuned shape: its descriptors and algorithm.
pub struct Plan {
    desc: lt_sys::cublasLtMatmulDesc_t,
    w: lt_sys::cublasLtMatrixLayout_t,
    x: lt_sys::cublasLtMatrixLayout_t,
    out: lt_sys::cublasLtMatrixLayout_t,
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created for this plan and is destroyed once, here.
        unsafe {
            let _ = lt_result::destroy_matrix_layout(self.out);
            let _ = lt_result::destroy_matrix_layout(self.x);
            let _ = lt_result::destroy_matrix_layout(self.w);
            let _ = lt_result::destroy_matmul_desc(self.desc);
        }
    }
}

/// The cuBLASLt handle and the tuned shapes.
pub struct LtGemms {
    handle: lt_sys::cublasLtHandle_t,
    plans: HashMap<GemmShape, Plan>,
}

// SAFETY: the handle and the descriptors are host objects that cuBLASLt only reads after
// creation; the backend serialises every use behind its mutex.
unsafe impl Send for LtGemms {}

fn lt_err(what: &str, e: impl std::fmt::Debug) -> BackendError {
    BackendError::Device(format!("cuBLASLt {what}: {e:?}"))
}

fn data_type(d: DType) -> lt_sys::cudaDataType {
    match d {
        DType::F32 => lt_sys::cudaDataType::CUDA_R_32F,
        DType::F16 => lt_sys::cudaDataType::CUDA_R_16F,
        DType::BF16 => lt_sys::cudaDataType::CUDA_R_16BF,
    }
}

/// The `(rows, k, n)` GEMMs of a decode step of a Llama model: q|k|v, o, gate|up, down.
pub fn decode_shapes(hidden: usize, qkv: usize, q: usize, inter2: usize) -> Vec<(usize, usize)> {
    vec![
        (hidden, qkv),
        (q, hidden),
        (hidden, inter2),
        (inter2 / 2, hidden),
    ]
}

impl LtGemms {
    pub fn new() -> Result<Self> {
        Ok(LtGemms {
            handle: lt_result::create_handle().map_err(|e| lt_err("create", e))?,
            plans: HashMap::new(),
        })
    }

    /// Whether `shape` has a tuned plan.
    pub fn has(&self, shape: &GemmShape) -> bool {
        self.plans.contains_key(shape)
    }

    /// Descriptors for `shape` in the column-major view cuBLAS takes of the row-major GEMM:
    /// `out^T[n, rows] = (w as [k, n])^T · (x as [k, rows])`.
    fn describe(shape: &GemmShape) -> Result<Plan> {
        let (dt, odt) = (data_type(shape.dtype), data_type(shape.out_dtype));
        let (rows, k, n) = (shape.rows as u64, shape.k as u64, shape.n as u64);
        let desc = lt_result::create_matmul_desc(
            lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt_sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| lt_err("matmul desc", e))?;
        let mut plan = Plan {
            desc,
            w: std::ptr::null_mut(),
            x: std::ptr::null_mut(),
            out: std::ptr::null_mut(),
            // SAFETY: plain data, filled in by the heuristic before use.
            algo: unsafe { std::mem::zeroed() },
        };
        // cublasOperation_t, an int32 attribute.
        let trans = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32;
        // SAFETY: the descriptor is live; the attribute is an int32.
        unsafe {
            lt_result::set_matmul_desc_attribute(
                plan.desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&trans as *const i32).cast(),
                std::mem::size_of::<i32>(),
            )
        }
        .map_err(|e| lt_err("transa", e))?;
        plan.w =
            lt_result::create_matrix_layout(dt, k, n, k as i64).map_err(|e| lt_err("layout", e))?;
        plan.x = lt_result::create_matrix_layout(dt, k, rows, k as i64)
            .map_err(|e| lt_err("layout", e))?;
        plan.out = lt_result::create_matrix_layout(odt, n, rows, n as i64)
            .map_err(|e| lt_err("layout", e))?;
        Ok(plan)
    }

    /// Up to [`CANDIDATES`] algorithms the heuristic offers for `plan` within `workspace` bytes.
    fn candidates(
        &self,
        plan: &Plan,
        workspace: usize,
    ) -> Result<Vec<lt_sys::cublasLtMatmulAlgo_t>> {
        let pref = lt_result::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
        let bytes = workspace as u64;
        let mut results: Vec<lt_sys::cublasLtMatmulHeuristicResult_t> =
            // SAFETY: plain data, written by the heuristic.
            (0..CANDIDATES).map(|_| unsafe { std::mem::zeroed() }).collect();
        let mut count = 0i32;
        // SAFETY: every descriptor is live; `results` has room for CANDIDATES entries.
        let status = unsafe {
            lt_result::set_matmul_pref_attribute(
                pref,
                lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&bytes as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
            .and_then(|()| {
                lt_sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    plan.desc,
                    plan.w,
                    plan.x,
                    plan.out,
                    plan.out,
                    pref,
                    CANDIDATES as i32,
                    results.as_mut_ptr(),
                    &mut count,
                )
                .result()
            })
        };
        // SAFETY: created above, destroyed once.
        let _ = unsafe { lt_result::destroy_matmul_pref(pref) };
        status.map_err(|e| lt_err("heuristic", e))?;
        Ok(results
            .into_iter()
            .take(count.max(0) as usize)
            .filter(|r| r.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect())
    }

    /// Issue `out = x · wᵀ` for a tuned `shape` on `stream`; false when it has no plan.
    ///
    /// # Safety
    /// `w`, `x` and `out` hold the shape's matrices; `workspace` holds `workspace_bytes`, used by
    /// nothing else on another stream meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        shape: &GemmShape,
        w: u64,
        x: u64,
        out: u64,
        workspace: u64,
        workspace_bytes: usize,
        stream: *mut c_void,
    ) -> Result<bool> {
        let Some(plan) = self.plans.get(shape) else {
            return Ok(false);
        };
        // SAFETY: as the caller promises.
        unsafe {
            self.run_algo(
                plan,
                &plan.algo,
                w,
                x,
                out,
                workspace,
                workspace_bytes,
                stream,
            )
        }?;
        Ok(true)
    }

    /// # Safety
    /// As [`Self::run`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run_algo(
        &self,
        plan: &Plan,
        algo: &lt_sys::cublasLtMatmulAlgo_t,
        w: u64,
        x: u64,
        out: u64,
        workspace: u64,
        workspace_bytes: usize,
        stream: *mut c_void,
    ) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: as the caller promises; alpha and beta are host f32 scalars of the f32 scale
        // type.
        unsafe {
            lt_result::matmul(
                self.handle,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                w as *const c_void,
                plan.w,
                x as *const c_void,
                plan.x,
                out as *const c_void,
                plan.out,
                out as *mut c_void,
                plan.out,
                algo,
                workspace as *mut c_void,
                workspace_bytes,
                stream as lt_sys::cudaStream_t,
            )
        }
        .map_err(|e| lt_err("matmul", e))
    }

    /// A new plan for `shape` and the algorithms the heuristic offers for it.
    pub fn offer(
        &self,
        shape: &GemmShape,
        workspace: usize,
    ) -> Result<(Plan, Vec<lt_sys::cublasLtMatmulAlgo_t>)> {
        let plan = Self::describe(shape)?;
        let algos = self.candidates(&plan, workspace)?;
        Ok((plan, algos))
    }

    /// Run `shape`'s GEMMs with `algo` from now on.
    pub fn keep(&mut self, shape: GemmShape, mut plan: Plan, algo: lt_sys::cublasLtMatmulAlgo_t) {
        plan.algo = algo;
        self.plans.insert(shape, plan);
    }
}

/// Whether a candidate timed at `best_us` should replace the default timed at `default_us`.
pub fn worth_it(default_us: f64, best_us: f64) -> bool {
    best_us < default_us * (1.0 - MIN_GAIN)
}

impl Drop for LtGemms {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: created in `new`, destroyed once, after its plans.
        let _ = unsafe { lt_result::destroy_handle(self.handle) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candidate_must_beat_the_default_by_three_percent() {
        assert!(worth_it(10.0, 9.6));
        assert!(!worth_it(10.0, 9.8));
        assert!(!worth_it(10.0, f64::INFINITY));
    }

    #[test]
    fn a_llama_decode_step_has_four_gemm_shapes() {
        // Llama-2 7B: hidden 4096, q|k|v 12288, q 4096, gate|up 2 x 11008.
        assert_eq!(
            decode_shapes(4096, 12288, 4096, 22016),
            vec![(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]
        );
    }
}
