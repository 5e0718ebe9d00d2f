//! The f32 CPU backend: the oracle every other backend is tested against, and the default where
//! there is no GPU.
//!
//! Every buffer holds f32 values, whatever dtype it was created with: a buffer uploaded as
//! `BF16`/`F16` is rounded to that precision once and then kept widened, so the CPU can mimic a
//! GPU's weight precision while computing in f32. Weights therefore live in RAM as f32 copies
//! (twice the bytes of a bf16 checkpoint). Matmuls go through the `gemm` crate (runtime-selected
//! SIMD kernels) on all of rayon's threads; the other ops are row-parallel loops.
//!
//! [`reference`] holds plain f64 versions of the ops, used only to test this backend.

use std::sync::Arc;

use gemm::Parallelism;
use rayon::prelude::*;

use crate::engine::sampling::pick_row;

use super::{
    AttnShape, BLOCK_SIZE, Backend, BackendError, DType, DeviceKind, HostTensor, LoraGroupSlot,
    MAX_GROUP_PARTS, Pick, Result, RowSampling, StepMeta, random_uniform,
};

/// The CPU backend. Cheap to create; uses rayon's global pool.
#[derive(Clone, Debug)]
pub struct CpuBackend {
    threads: usize,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// A backend that uses every rayon thread (`rayon::current_num_threads()`).
    pub fn new() -> Self {
        CpuBackend {
            threads: rayon::current_num_threads().max(1),
        }
    }

    /// Threads the matmuls split over.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

/// A CPU buffer: shared f32 storage. Clones share storage; a write through a shared buffer
/// copies it first (copy-on-write), so LoRA tables can hold adapter buffers safely.
#[derive(Clone, Debug)]
pub struct CpuBuf {
    data: Arc<Vec<f32>>,
}

impl CpuBuf {
    /// Wrap host values.
    pub fn from_vec(data: Vec<f32>) -> Self {
        CpuBuf {
            data: Arc::new(data),
        }
    }

    /// The values.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        Arc::make_mut(&mut self.data).as_mut_slice()
    }
}

/// A step's metadata after [`StepMeta::validate`]: only [`Backend::upload_meta`] makes one, so
/// every op can index by it without further bounds checks on the tables themselves.
#[derive(Clone, Debug)]
pub struct CpuMeta(StepMeta);

impl CpuMeta {
    /// The validated metadata.
    pub fn step(&self) -> &StepMeta {
        &self.0
    }
}

/// One adapter's LoRA group in a CPU LoRA table: the stacked A, its total rank, and each part's
/// B and rank.
#[derive(Clone, Debug)]
struct CpuLoraSlot {
    a: CpuBuf,
    rank: usize,
    /// First column of the slot's intermediate in v.
    voff: usize,
    parts: [Option<(CpuBuf, usize)>; MAX_GROUP_PARTS],
}

/// Slot -> adapter group for one (layer, LoRA group).
#[derive(Clone, Debug, Default)]
pub struct CpuLoraTable {
    slots: Vec<Option<CpuLoraSlot>>,
}

fn shape_err(msg: String) -> BackendError {
    BackendError::Shape(msg)
}

fn need(what: &str, have: usize, want: usize) -> Result<()> {
    if have < want {
        return Err(shape_err(format!(
            "{what}: buffer holds {have} values, the op needs {want}"
        )));
    }
    Ok(())
}

fn round_to(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::F32 => v,
        DType::F16 => half::f16::from_f32(v).to_f32(),
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
    }
}

/// A raw pointer that may cross rayon tasks; each task writes a disjoint region.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to hand disjoint output regions to parallel tasks (see each use).
unsafe impl Send for SendPtr {}
// SAFETY: as above; the pointer itself is never used to create overlapping writes.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer. A method, so closures capture the whole `SendPtr` (which is `Send`) rather
    /// than its raw-pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Arguments of one strided `gemm` call: `dst[m, n] (+)= lhs[m, k] · rhs[k, n]`.
struct Gemm {
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: isize,
    /// `rhs` is a PyTorch weight `[n, k]` with row stride `rhs_ws`: `rhs[kk, j] = w[j * ws + kk]`.
    rhs: *const f32,
    rhs_ws: isize,
}

impl Gemm {
    /// # Safety
    /// The pointers must address `m` rows of `dst` (stride `dst_rs`, `n` wide), `m` rows of `lhs`
    /// (stride `lhs_rs`, `k` wide) and `n` rows of `rhs` (stride `rhs_ws`, `k` wide), with no
    /// other thread writing `dst` meanwhile.
    unsafe fn run(self, parallelism: Parallelism) {
        if self.m == 0 || self.n == 0 {
            return;
        }
        // SAFETY: forwarded from the caller's contract; gemm reads/writes only those regions.
        unsafe {
            gemm::gemm(
                self.m,
                self.n,
                self.k,
                self.dst,
                1,
                self.dst_rs,
                self.accumulate,
                self.lhs,
                1,
                self.lhs_rs,
                self.rhs,
                self.rhs_ws,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    }
}

/// `out[rows, n] = x[rows, k] · w[n, k]ᵀ` on `threads` threads.
///
/// gemm's own rayon split does not apply to thin products (its matrix-vector path is
/// single-threaded), so for few rows the output columns are split over the threads here, each
/// task running gemm serially on its own column block; that keeps decode memory-bandwidth bound.
fn matmul_f32(
    x: &[f32],
    w: &[f32],
    rows: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    threads: usize,
) {
    // Callers check the lengths first; a violation here is a bug in this module, not bad input.
    assert!(x.len() >= rows * k && w.len() >= n * k && out.len() >= rows * n);
    if rows == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out[..rows * n].fill(0.0);
        return;
    }
    const THIN_ROWS: usize = 16;
    if rows <= THIN_ROWS && (threads > 1 || thin::available()) {
        // Several column blocks per thread so a busy core does not hold up the step.
        let blocks = threads * 4;
        let chunk = n.div_ceil(blocks).next_multiple_of(16).max(16);
        let dst = SendPtr(out.as_mut_ptr());
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|b| {
            let j0 = b * chunk;
            let width = chunk.min(n - j0);
            if thin::available() {
                // SAFETY: block b writes only columns j0..j0+width of every row of `out`,
                // disjoint from every other block; the assert above bounds x, w and out, and
                // `available()` checked the CPU features the kernel is compiled for.
                unsafe {
                    thin::columns(
                        x.as_ptr(),
                        rows,
                        k,
                        w.as_ptr(),
                        j0,
                        j0 + width,
                        dst.get(),
                        n,
                    )
                };
                return;
            }
            // SAFETY: as above, through gemm.
            unsafe {
                Gemm {
                    m: rows,
                    n: width,
                    k,
                    dst: dst.get().add(j0),
                    dst_rs: n as isize,
                    accumulate: false,
                    lhs: x.as_ptr(),
                    lhs_rs: k as isize,
                    rhs: w.as_ptr().add(j0 * k),
                    rhs_ws: k as isize,
                }
                .run(Parallelism::None)
            }
        });
    } else {
        let parallelism = if threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        // SAFETY: the asserts above bound all three regions; `out` is exclusively borrowed.
        unsafe {
            Gemm {
                m: rows,
                n,
                k,
                dst: out.as_mut_ptr(),
                dst_rs: n as isize,
                accumulate: false,
                lhs: x.as_ptr(),
                lhs_rs: k as isize,
                rhs: w.as_ptr(),
                rhs_ws: k as isize,
            }
            .run(parallelism)
        }
    }
}

/// A matrix-times-few-vectors kernel for decode: every weight row is streamed from memory once
/// and dotted with all (up to 16) input rows, 4 at a time, with AVX2 FMA. gemm's general kernels
/// pack the weight panel for every call, which costs several times the bandwidth floor here.
mod thin {
    /// Whether this CPU has the features [`columns`] needs (checked once).
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            *OK.get_or_init(|| {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// `dst[r * n + j] = x[r, :] · w[j, :]` for `r < rows`, `j0 <= j < j1`.
    ///
    /// # Safety
    /// `x` holds `rows * k` values, `w` at least `j1 * k`, `dst` `rows * n` with `j1 <= n`; no one
    /// else writes those `dst` columns meanwhile; [`available`] returned true.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn columns(
        x: *const f32,
        rows: usize,
        k: usize,
        w: *const f32,
        j0: usize,
        j1: usize,
        dst: *mut f32,
        n: usize,
    ) {
        // Weight row outermost: it is read from memory once and reused from L1 by every tile.
        for j in j0..j1 {
            let wr = w.wrapping_add(j * k);
            let mut r0 = 0;
            while r0 < rows {
                let x = x.wrapping_add(r0 * k);
                let out = dst.wrapping_add(r0 * n + j);
                // SAFETY: forwarded; each call covers rows r0..r0+R and weight row j.
                unsafe {
                    match rows - r0 {
                        1 => dot::<1>(x, k, wr, out, n),
                        2 => dot::<2>(x, k, wr, out, n),
                        3 => dot::<3>(x, k, wr, out, n),
                        _ => dot::<4>(x, k, wr, out, n),
                    }
                }
                r0 += 4;
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn columns(
        _x: *const f32,
        _rows: usize,
        _k: usize,
        _w: *const f32,
        _j0: usize,
        _j1: usize,
        _dst: *mut f32,
        _n: usize,
    ) {
    }

    /// `out[t * n] = x[t, :] · wr` for `t < R`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn dot<const R: usize>(
        x: *const f32,
        k: usize,
        wr: *const f32,
        out: *mut f32,
        n: usize,
    ) {
        use std::arch::x86_64::*;
        let k16 = k / 16 * 16;
        // SAFETY (whole body): every offset stays inside the regions the caller guaranteed:
        // R rows of x (k each), one weight row of k, R outputs n apart.
        unsafe {
            let mut a = [_mm256_setzero_ps(); R];
            let mut b = [_mm256_setzero_ps(); R];
            let mut i = 0;
            while i < k16 {
                let w0 = _mm256_loadu_ps(wr.add(i));
                let w1 = _mm256_loadu_ps(wr.add(i + 8));
                for t in 0..R {
                    let xr = x.add(t * k + i);
                    a[t] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), w0, a[t]);
                    b[t] = _mm256_fmadd_ps(_mm256_loadu_ps(xr.add(8)), w1, b[t]);
                }
                i += 16;
            }
            for t in 0..R {
                let v = _mm256_add_ps(a[t], b[t]);
                let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                let s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
                let mut sum = _mm_cvtss_f32(s1);
                for ii in k16..k {
                    sum += *x.add(t * k + ii) * *wr.add(ii);
                }
                *out.add(t * n) = sum;
            }
        }
    }
}

fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
    // Hugging Face normalises in f32: `x * rsqrt(mean(x²) + eps)`, then multiplies by the weight.
    let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = w * (v * inv);
    }
}

fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// Row -> index of the sequence that owns it.
fn row_owners(meta: &StepMeta) -> Vec<usize> {
    let mut owner = vec![0usize; meta.rows()];
    for (i, seq) in meta.seqs.iter().enumerate() {
        let start = seq.row_start as usize;
        owner[start..start + seq.num_rows as usize].fill(i);
    }
    owner
}

impl Backend for CpuBackend {
    type Buf = CpuBuf;
    type Meta = CpuMeta;
    type LoraTable = CpuLoraTable;
    type Staged = Vec<Arc<Vec<f32>>>;

    fn kind(&self) -> DeviceKind {
        DeviceKind::Cpu
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn alloc(&self, _dtype: DType, len: usize) -> Result<CpuBuf> {
        Ok(CpuBuf::from_vec(vec![0.0; len]))
    }

    fn upload(&self, dtype: DType, data: &[f32]) -> Result<CpuBuf> {
        Ok(CpuBuf::from_vec(
            data.iter().map(|&v| round_to(dtype, v)).collect(),
        ))
    }

    fn upload_raw(&self, dtype: DType, src: DType, bytes: &[u8]) -> Result<CpuBuf> {
        // One widening pass into the buffer that is kept; rounding is only needed when the
        // requested dtype is narrower than the source.
        let mut values = super::host_to_f32(src, bytes)?;
        if dtype != DType::F32 && dtype != src {
            for v in values.iter_mut() {
                *v = round_to(dtype, *v);
            }
        }
        Ok(CpuBuf::from_vec(values))
    }

    fn download(&self, buf: &CpuBuf) -> Result<Vec<f32>> {
        Ok(buf.as_slice().to_vec())
    }

    fn len(&self, buf: &CpuBuf) -> usize {
        buf.data.len()
    }

    fn upload_meta(&self, meta: &StepMeta) -> Result<CpuMeta> {
        meta.validate()?;
        Ok(CpuMeta(meta.clone()))
    }

    fn lora_table(&self, slots: &[Option<LoraGroupSlot<'_, Self>>]) -> Result<CpuLoraTable> {
        Ok(CpuLoraTable {
            slots: slots
                .iter()
                .map(|s| {
                    s.as_ref().map(|g| CpuLoraSlot {
                        a: g.a.clone(),
                        rank: g.rank(),
                        voff: g.voff,
                        parts: std::array::from_fn(|j| {
                            g.parts[j].as_ref().map(|p| (p.b.clone(), p.rank))
                        }),
                    })
                })
                .collect(),
        })
    }

    fn embedding(
        &self,
        table: &CpuBuf,
        meta: &CpuMeta,
        hidden: usize,
        out: &mut CpuBuf,
    ) -> Result<()> {
        let meta = &meta.0;
        let rows = meta.rows();
        need("embedding output", out.data.len(), rows * hidden)?;
        let vocab = table.data.len() / hidden.max(1);
        if let Some(&bad) = meta.token_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(shape_err(format!(
                "token id {bad} outside a vocabulary of {vocab}"
            )));
        }
        let table = table.as_slice();
        out.as_mut_slice()[..rows * hidden]
            .par_chunks_mut(hidden.max(1))
            .zip(&meta.token_ids)
            .for_each(|(o, &t)| {
                let t = t as usize;
                o.copy_from_slice(&table[t * hidden..(t + 1) * hidden]);
            });
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &CpuBuf,
        weight: &CpuBuf,
        eps: f32,
        rows: usize,
        hidden: usize,
        out: &mut CpuBuf,
    ) -> Result<()> {
        need("rms_norm input", x.data.len(), rows * hidden)?;
        need("rms_norm weight", weight.data.len(), hidden)?;
        need("rms_norm output", out.data.len(), rows * hidden)?;
        if hidden == 0 {
            return Ok(());
        }
        let (x, w) = (x.as_slice(), &weight.as_slice()[..hidden]);
        out.as_mut_slice()[..rows * hidden]
            .par_chunks_mut(hidden)
            .zip(x.par_chunks(hidden))
            .for_each(|(o, xr)| rms_norm_row(xr, w, eps, o));
        Ok(())
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuBuf,
        x: &CpuBuf,
        x_stride: usize,
        weight: &CpuBuf,
        eps: f32,
        rows: usize,
        hidden: usize,
        out: &mut CpuBuf,
    ) -> Result<()> {
        if x_stride < hidden {
            return Err(shape_err(format!(
                "add_rms_norm: rows of {x_stride} values hold no {hidden} columns"
            )));
        }
        need("add_rms_norm residual", residual.data.len(), rows * hidden)?;
        need("add_rms_norm input", x.data.len(), rows * x_stride)?;
        need("add_rms_norm weight", weight.data.len(), hidden)?;
        need("add_rms_norm output", out.data.len(), rows * hidden)?;
        if hidden == 0 {
            return Ok(());
        }
        let (x, w) = (x.as_slice(), &weight.as_slice()[..hidden]);
        residual.as_mut_slice()[..rows * hidden]
            .par_chunks_mut(hidden)
            .zip(out.as_mut_slice()[..rows * hidden].par_chunks_mut(hidden))
            .zip(x[..rows * x_stride].par_chunks(x_stride))
            .for_each(|((r, o), xr)| {
                for (rv, &xv) in r.iter_mut().zip(&xr[..hidden]) {
                    *rv += xv;
                }
                rms_norm_row(r, w, eps, o);
            });
        Ok(())
    }

    fn matmul(
        &self,
        x: &CpuBuf,
        w: &CpuBuf,
        rows: usize,
        k: usize,
        n: usize,
        out: &mut CpuBuf,
    ) -> Result<()> {
        need("matmul input", x.data.len(), rows * k)?;
        need("matmul weight", w.data.len(), n * k)?;
        need("matmul output", out.data.len(), rows * n)?;
        matmul_f32(
            x.as_slice(),
            w.as_slice(),
            rows,
            k,
            n,
            out.as_mut_slice(),
            self.threads,
        );
        Ok(())
    }

    fn alias(&self, buf: &CpuBuf) -> CpuBuf {
        // Shared until either side is written (then that side copies): the same values for
        // as long as the contract lets the alias be read.
        buf.clone()
    }

    fn copy_into(&self, dst: &mut CpuBuf, offset: usize, src: &CpuBuf) -> Result<()> {
        let end = offset.checked_add(src.data.len());
        match end {
            Some(end) if end <= dst.data.len() => {
                dst.as_mut_slice()[offset..end].copy_from_slice(src.as_slice());
                Ok(())
            }
            _ => Err(shape_err(format!(
                "copy_into: {} values at {offset} of a buffer of {}",
                src.data.len(),
                dst.data.len()
            ))),
        }
    }

    fn add_assign(&self, y: &mut CpuBuf, x: &CpuBuf) -> Result<()> {
        if y.data.len() != x.data.len() {
            return Err(shape_err(format!(
                "add_assign: {} values += {} values",
                y.data.len(),
                x.data.len()
            )));
        }
        let x = x.as_slice();
        y.as_mut_slice()
            .par_chunks_mut(4096)
            .zip(x.par_chunks(4096))
            .for_each(|(y, x)| {
                for (a, &b) in y.iter_mut().zip(x) {
                    *a += b;
                }
            });
        Ok(())
    }

    fn rope_write_kv(
        &self,
        qkv: &mut CpuBuf,
        row_stride: usize,
        inv_freq: &CpuBuf,
        meta: &CpuMeta,
        shape: AttnShape,
        k_cache: &mut CpuBuf,
        v_cache: &mut CpuBuf,
    ) -> Result<()> {
        let meta = &meta.0;
        let rows = meta.rows();
        let AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
        } = shape;
        let half = head_dim / 2;
        let kv_dim = n_kv_heads * head_dim;
        let (k_offset, v_offset) = (n_heads * head_dim, n_heads * head_dim + kv_dim);
        if !head_dim.is_multiple_of(2) || v_offset + kv_dim > row_stride {
            return Err(shape_err(format!(
                "rope_write_kv: {n_heads} q, {n_kv_heads} k and {n_kv_heads} v heads of {head_dim} in rows of {row_stride}"
            )));
        }
        need("rope_write_kv qkv", qkv.data.len(), rows * row_stride)?;
        need("rope_write_kv inv_freq", inv_freq.data.len(), half)?;
        let slots = k_cache.data.len().min(v_cache.data.len()) / kv_dim.max(1);
        if let Some(&bad) = meta.slot_mapping.iter().find(|&&s| s as usize >= slots) {
            return Err(shape_err(format!(
                "KV slot {bad} outside a cache of {slots} slots"
            )));
        }
        if rows == 0 || half == 0 {
            return Ok(());
        }
        let inv_freq = &inv_freq.as_slice()[..half];
        qkv.as_mut_slice()[..rows * row_stride]
            .par_chunks_mut(row_stride)
            .zip(&meta.positions)
            .for_each(|(row, &pos)| {
                // Hugging Face computes `pos * inv_freq` and its cos/sin in f32.
                let (sin, cos): (Vec<f32>, Vec<f32>) =
                    inv_freq.iter().map(|&f| (pos as f32 * f).sin_cos()).unzip();
                // The k heads follow the q heads: one run of rotated heads.
                for head in row[..v_offset].chunks_exact_mut(head_dim) {
                    let (x1, x2) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (x1[i], x2[i]);
                        x1[i] = a * cos[i] - b * sin[i];
                        x2[i] = b * cos[i] + a * sin[i];
                    }
                }
            });
        let src = qkv.as_slice();
        let (kc, vc) = (k_cache.as_mut_slice(), v_cache.as_mut_slice());
        for (row, &slot) in meta.slot_mapping.iter().enumerate() {
            let (s, d) = (row * row_stride, slot as usize * kv_dim);
            kc[d..d + kv_dim].copy_from_slice(&src[s + k_offset..s + k_offset + kv_dim]);
            vc[d..d + kv_dim].copy_from_slice(&src[s + v_offset..s + v_offset + kv_dim]);
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuBuf,
        row_stride: usize,
        q_offset: usize,
        k_cache: &CpuBuf,
        v_cache: &CpuBuf,
        meta: &CpuMeta,
        shape: AttnShape,
        scale: f32,
        out: &mut CpuBuf,
    ) -> Result<()> {
        let meta = &meta.0;
        let AttnShape {
            n_heads,
            n_kv_heads,
            head_dim: hd,
        } = shape;
        let rows = meta.rows();
        if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) || hd == 0 {
            return Err(shape_err(format!(
                "attention: {n_heads} query heads over {n_kv_heads} KV heads of {hd}"
            )));
        }
        if q_offset + n_heads * hd > row_stride {
            return Err(shape_err(format!(
                "attention: {n_heads} heads of {hd} at column {q_offset} in rows of {row_stride}"
            )));
        }
        need("attention query", q.data.len(), rows * row_stride)?;
        need("attention output", out.data.len(), rows * n_heads * hd)?;
        let kv_dim = n_kv_heads * hd;
        let cache_slots = k_cache.data.len().min(v_cache.data.len()) / kv_dim;
        let cache_blocks = cache_slots / BLOCK_SIZE;
        if let Some(&bad) = meta
            .block_tables
            .iter()
            .find(|&&b| b as usize >= cache_blocks)
        {
            return Err(shape_err(format!(
                "block {bad} outside a cache of {cache_blocks} blocks"
            )));
        }
        let owner = row_owners(meta);
        let group = n_heads / n_kv_heads;
        let (q, kc, vc) = (q.as_slice(), k_cache.as_slice(), v_cache.as_slice());
        out.as_mut_slice()[..rows * n_heads * hd]
            .par_chunks_mut(hd)
            .enumerate()
            .for_each(|(idx, o)| {
                let (row, head) = (idx / n_heads, idx % n_heads);
                let seq = &meta.seqs[owner[row]];
                let first_new = seq.context_len as usize - seq.num_rows as usize;
                let visible = first_new + (row - seq.row_start as usize) + 1;
                let table =
                    &meta.block_tables[seq.block_table_start as usize..][..seq.num_blocks as usize];
                let qv = &q[row * row_stride + q_offset + head * hd..][..hd];
                let kvh = head / group;
                let slot_of = |t: usize| {
                    (table[t / BLOCK_SIZE] as usize * BLOCK_SIZE + t % BLOCK_SIZE) * kv_dim
                        + kvh * hd
                };
                let mut scores: Vec<f32> = (0..visible)
                    .map(|t| {
                        let kv = &kc[slot_of(t)..][..hd];
                        qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut denom = 0.0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    denom += *s;
                }
                o.fill(0.0);
                for (t, &p) in scores.iter().enumerate() {
                    let w = p / denom;
                    for (ov, &vv) in o.iter_mut().zip(&vc[slot_of(t)..][..hd]) {
                        *ov += w * vv;
                    }
                }
            });
        Ok(())
    }

    fn silu_mul(
        &self,
        gate_up: &CpuBuf,
        stride: usize,
        rows: usize,
        n: usize,
        out: &mut CpuBuf,
    ) -> Result<()> {
        if stride < 2 * n {
            return Err(shape_err(format!(
                "silu_mul: rows of {stride} values hold no gate and up of {n}"
            )));
        }
        need("silu_mul input", gate_up.data.len(), rows * stride)?;
        need("silu_mul output", out.data.len(), rows * n)?;
        if n == 0 {
            return Ok(());
        }
        let gu = gate_up.as_slice();
        out.as_mut_slice()[..rows * n]
            .par_chunks_mut(n)
            .zip(gu[..rows * stride].par_chunks(stride))
            .for_each(|(o, row)| {
                let (g, u) = row[..2 * n].split_at(n);
                for ((ov, &gv), &uv) in o.iter_mut().zip(g).zip(u) {
                    *ov = silu(gv) * uv;
                }
            });
        Ok(())
    }

    fn sgmv_shrink(
        &self,
        x: &CpuBuf,
        table: &CpuLoraTable,
        meta: &CpuMeta,
        h_in: usize,
        v_stride: usize,
        v: &mut CpuBuf,
    ) -> Result<()> {
        let meta = &meta.0;
        let rows = meta.rows();
        need("sgmv_shrink input", x.data.len(), rows * h_in)?;
        need("sgmv_shrink output", v.data.len(), rows * v_stride)?;
        if table.slots.iter().flatten().any(|s| s.voff != 0) {
            return Err(shape_err(
                "sgmv_shrink: a table whose slots start past column 0 of v serves expands only"
                    .into(),
            ));
        }
        let work = lora_work(table, meta, v_stride)?;
        for &(_, _, slot) in &work {
            need("sgmv_shrink A", slot.a.data.len(), slot.rank * h_in)?;
        }
        let (x, dst) = (x.as_slice(), SendPtr(v.as_mut_slice().as_mut_ptr()));
        work.par_iter().for_each(|&(s, e, slot)| {
            // SAFETY: segments are disjoint row ranges (StepMeta::validate), so each task writes
            // only its own rows of `v`; the bounds were checked above.
            unsafe {
                Gemm {
                    m: e - s,
                    n: slot.rank,
                    k: h_in,
                    dst: dst.get().add(s * v_stride),
                    dst_rs: v_stride as isize,
                    accumulate: false,
                    lhs: x.as_ptr().add(s * h_in),
                    lhs_rs: h_in as isize,
                    rhs: slot.a.as_slice().as_ptr(),
                    rhs_ws: h_in as isize,
                }
                .run(Parallelism::None)
            }
        });
        Ok(())
    }

    fn sgmv_expand(
        &self,
        v: &CpuBuf,
        table: &CpuLoraTable,
        meta: &CpuMeta,
        v_stride: usize,
        outs: &[usize],
        y_stride: usize,
        col_offset: usize,
        y: &mut CpuBuf,
    ) -> Result<()> {
        let meta = &meta.0;
        let rows = meta.rows();
        let h_out: usize = outs.iter().sum();
        if outs.len() > MAX_GROUP_PARTS || col_offset + h_out > y_stride {
            return Err(shape_err(format!(
                "sgmv_expand: parts of {outs:?} columns at {col_offset} in rows of {y_stride}"
            )));
        }
        need("sgmv_expand input", v.data.len(), rows * v_stride)?;
        need("sgmv_expand output", y.data.len(), rows * y_stride)?;
        let work = lora_work(table, meta, v_stride)?;
        for &(_, _, slot) in &work {
            for (j, part) in slot.parts.iter().enumerate() {
                if let Some((b, rank)) = part {
                    let out = outs.get(j).ok_or_else(|| {
                        shape_err(format!(
                            "sgmv_expand: an adapter has part {j}, the group has {}",
                            outs.len()
                        ))
                    })?;
                    need("sgmv_expand B", b.data.len(), out * rank)?;
                }
            }
        }
        let (v, dst) = (v.as_slice(), SendPtr(y.as_mut_slice().as_mut_ptr()));
        work.par_iter().for_each(|&(s, e, slot)| {
            let (mut voff, mut col) = (slot.voff, col_offset);
            for (part, &out) in slot.parts.iter().zip(outs) {
                if let Some((b, rank)) = part {
                    // SAFETY: segments are disjoint row ranges (StepMeta::validate), so each
                    // task accumulates only into its own rows of `y`; the bounds were checked
                    // above.
                    unsafe {
                        Gemm {
                            m: e - s,
                            n: out,
                            k: *rank,
                            dst: dst.get().add(s * y_stride + col),
                            dst_rs: y_stride as isize,
                            accumulate: true,
                            lhs: v.as_ptr().add(s * v_stride + voff),
                            lhs_rs: v_stride as isize,
                            rhs: b.as_slice().as_ptr(),
                            rhs_ws: *rank as isize,
                        }
                        .run(Parallelism::None)
                    }
                    voff += rank;
                }
                col += out;
            }
        });
        Ok(())
    }

    fn gather_rows(
        &self,
        x: &CpuBuf,
        meta: &CpuMeta,
        hidden: usize,
        out: &mut CpuBuf,
    ) -> Result<()> {
        let meta = &meta.0;
        need("gather_rows input", x.data.len(), meta.rows() * hidden)?;
        need(
            "gather_rows output",
            out.data.len(),
            meta.logit_rows.len() * hidden,
        )?;
        let x = x.as_slice();
        let out = out.as_mut_slice();
        for (i, &r) in meta.logit_rows.iter().enumerate() {
            let r = r as usize;
            out[i * hidden..(i + 1) * hidden].copy_from_slice(&x[r * hidden..(r + 1) * hidden]);
        }
        Ok(())
    }

    fn stage(&self, _dtype: DType, tensors: &[&[HostTensor<'_>]]) -> Result<Self::Staged> {
        Ok(tensors
            .iter()
            .map(|t| Arc::new(t.iter().flat_map(|p| p.to_f32()).collect()))
            .collect())
    }

    fn upload_staged(&self, staged: &Arc<Self::Staged>, _parts: &[usize]) -> Result<Vec<CpuBuf>> {
        Ok(staged
            .iter()
            .map(|t| CpuBuf {
                data: Arc::clone(t),
            })
            .collect())
    }

    fn fill_random(&self, buf: &mut CpuBuf, seed: u32, scale: f32) -> Result<()> {
        let data = Arc::make_mut(&mut buf.data);
        for (i, v) in data.iter_mut().enumerate() {
            *v = random_uniform(seed, i) * scale;
        }
        Ok(())
    }

    fn sample(
        &self,
        logits: &CpuBuf,
        vocab: usize,
        rows: &[RowSampling],
        picks: &mut Vec<Pick>,
    ) -> Result<()> {
        let data = logits.as_slice();
        if vocab == 0 || data.len() < rows.len() * vocab {
            return Err(BackendError::Shape(format!(
                "sample: {} logits for {} rows of {vocab}",
                data.len(),
                rows.len()
            )));
        }
        picks.clear();
        picks.extend(
            rows.iter()
                .zip(data.chunks_exact(vocab))
                .map(|(rs, row)| pick_row(row, rs)),
        );
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// The segments that have an adapter projection in `table`: `(start, end, slot)`. Segments whose
/// slot is empty in this table (the adapter does not target this projection) are skipped.
fn lora_work<'t>(
    table: &'t CpuLoraTable,
    meta: &StepMeta,
    v_stride: usize,
) -> Result<Vec<(usize, usize, &'t CpuLoraSlot)>> {
    let mut work = Vec::with_capacity(meta.segments.len());
    for (s, e, slot) in meta.segments.iter() {
        let entry = table.slots.get(slot as usize).ok_or_else(|| {
            shape_err(format!(
                "segment uses adapter slot {slot}, the table has {} slots",
                table.slots.len()
            ))
        })?;
        if let Some(p) = entry {
            if p.voff + p.rank > v_stride {
                return Err(shape_err(format!(
                    "adapter slot {slot} has rank {} from column {} past the step's LoRA width \
                     {v_stride}",
                    p.rank, p.voff
                )));
            }
            work.push((s, e, p));
        }
    }
    Ok(work)
}

/// Plain f64 versions of the ops, written for clarity; used only to check the backends.
pub mod reference {
    /// `out[rows, n] = x[rows, k] · w[n, k]ᵀ`.
    pub fn matmul(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let mut acc = 0.0f64;
                for kk in 0..k {
                    acc += x[r * k + kk] as f64 * w[j * k + kk] as f64;
                }
                out[r * n + j] = acc as f32;
            }
        }
        out
    }

    /// RMSNorm of each row of `x: [rows, hidden]`, times `weight`.
    pub fn rms_norm(x: &[f32], weight: &[f32], eps: f64, hidden: usize) -> Vec<f32> {
        x.chunks(hidden)
            .flat_map(|row| {
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / hidden as f64;
                let inv = 1.0 / (ms + eps).sqrt();
                row.iter()
                    .zip(weight)
                    .map(move |(&v, &w)| (v as f64 * inv * w as f64) as f32)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Rotate-half RoPE of one head vector at position `pos`.
    pub fn rope_head(x: &[f32], pos: u32, inv_freq: &[f32]) -> Vec<f32> {
        let half = x.len() / 2;
        let mut out = x.to_vec();
        for i in 0..half {
            let angle = pos as f64 * inv_freq[i] as f64;
            let (s, c) = angle.sin_cos();
            let (a, b) = (x[i] as f64, x[i + half] as f64);
            out[i] = (a * c - b * s) as f32;
            out[i + half] = (b * c + a * s) as f32;
        }
        out
    }

    /// Causal attention of one query head against dense `keys`/`values` (`[t, head_dim]` each),
    /// all of which are visible.
    pub fn attend(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f64) -> Vec<f32> {
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| {
                q.iter()
                    .zip(k)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let denom: f64 = exps.iter().sum();
        let mut out = vec![0.0f64; q.len()];
        for (p, v) in exps.iter().zip(values) {
            for (o, &vv) in out.iter_mut().zip(v) {
                *o += p / denom * vv as f64;
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    /// `silu(gate) * up` per row of `gate_up: [rows, 2n]`.
    pub fn silu_mul(gate_up: &[f32], n: usize) -> Vec<f32> {
        gate_up
            .chunks(2 * n)
            .flat_map(|row| {
                (0..n).map(move |j| {
                    let g = row[j] as f64;
                    (g / (1.0 + (-g).exp()) * row[n + j] as f64) as f32
                })
            })
            .collect()
    }

    /// The LoRA delta of one row: `(x · Aᵀ) · Bᵀ` with `a: [rank, h_in]`, `b: [h_out, rank]`.
    pub fn lora_delta(x: &[f32], a: &[f32], b: &[f32], rank: usize, h_out: usize) -> Vec<f32> {
        let h_in = x.len();
        let v: Vec<f64> = (0..rank)
            .map(|r| {
                (0..h_in)
                    .map(|i| x[i] as f64 * a[r * h_in + i] as f64)
                    .sum()
            })
            .collect();
        (0..h_out)
            .map(|o| {
                (0..rank)
                    .map(|r| v[r] * b[o * rank + r] as f64)
                    .sum::<f64>() as f32
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::{LoraPart, SeqMeta};
    use crate::engine::lora::segments::SegmentTable;

    /// Deterministic pseudo-random values in [-1, 1).
    fn values(seed: u64, len: usize) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "index {i}: got {g}, want {w}"
            );
        }
    }

    #[test]
    fn matmul_matches_reference_for_thin_and_tall_inputs() {
        let cpu = CpuBackend::new();
        for (rows, k, n) in [
            (1, 64, 100),
            (3, 33, 47),
            (16, 70, 130),
            (40, 64, 96),
            (1, 5, 1),
        ] {
            let x = values(1, rows * k);
            let w = values(2, n * k);
            let mut out = cpu.alloc(DType::F32, rows * n).unwrap();
            cpu.matmul(
                &CpuBuf::from_vec(x.clone()),
                &CpuBuf::from_vec(w.clone()),
                rows,
                k,
                n,
                &mut out,
            )
            .unwrap();
            assert_close(out.as_slice(), &reference::matmul(&x, &w, rows, k, n), 1e-5);
        }
    }

    #[test]
    fn matmul_on_a_single_thread_matches_the_parallel_split() {
        let (rows, k, n) = (2, 48, 200);
        let (x, w) = (values(3, rows * k), values(4, n * k));
        let mut a = vec![0.0; rows * n];
        let mut b = vec![0.0; rows * n];
        matmul_f32(&x, &w, rows, k, n, &mut a, 1);
        matmul_f32(&x, &w, rows, k, n, &mut b, 4);
        assert_close(&a, &b, 1e-6);
    }

    #[test]
    fn matmul_rejects_a_short_weight_buffer() {
        let cpu = CpuBackend::new();
        let mut out = cpu.alloc(DType::F32, 4).unwrap();
        let err = cpu
            .matmul(
                &CpuBuf::from_vec(vec![0.0; 8]),
                &CpuBuf::from_vec(vec![0.0; 7]),
                2,
                4,
                2,
                &mut out,
            )
            .unwrap_err();
        assert!(err.to_string().contains("holds 7 values"), "{err}");
    }

    #[test]
    fn rms_norm_and_fused_residual_norm_match_reference() {
        let cpu = CpuBackend::new();
        let (rows, hidden) = (3, 40);
        let x = values(5, rows * hidden);
        let r0 = values(6, rows * hidden);
        let w = values(7, hidden);
        let mut out = cpu.alloc(DType::F32, rows * hidden).unwrap();
        let (xb, wb) = (CpuBuf::from_vec(x.clone()), CpuBuf::from_vec(w.clone()));
        cpu.rms_norm(&xb, &wb, 1e-5, rows, hidden, &mut out)
            .unwrap();
        assert_close(
            out.as_slice(),
            &reference::rms_norm(&x, &w, 1e-5, hidden),
            1e-5,
        );

        let mut residual = CpuBuf::from_vec(r0.clone());
        cpu.add_rms_norm(
            &mut residual,
            &xb,
            hidden,
            &wb,
            1e-5,
            rows,
            hidden,
            &mut out,
        )
        .unwrap();
        let sum: Vec<f32> = r0.iter().zip(&x).map(|(a, b)| a + b).collect();
        assert_close(residual.as_slice(), &sum, 1e-6);
        // The same x as the first columns of wider rows.
        let stride = hidden + 3;
        let wide: Vec<f32> = x
            .chunks(hidden)
            .flat_map(|r| r.iter().copied().chain([f32::NAN; 3]))
            .collect();
        let (mut residual2, mut out2) = (CpuBuf::from_vec(r0.clone()), out.clone());
        let wide = CpuBuf::from_vec(wide);
        cpu.add_rms_norm(
            &mut residual2,
            &wide,
            stride,
            &wb,
            1e-5,
            rows,
            hidden,
            &mut out2,
        )
        .unwrap();
        assert_eq!(residual2.as_slice(), residual.as_slice());
        assert_eq!(out2.as_slice(), out.as_slice());
        let err = cpu
            .add_rms_norm(
                &mut residual2,
                &wide,
                hidden - 1,
                &wb,
                1e-5,
                rows,
                hidden,
                &mut out2,
            )
            .unwrap_err();
        assert!(err.to_string().contains("hold no"), "{err}");
        assert_close(
            out.as_slice(),
            &reference::rms_norm(&sum, &w, 1e-5, hidden),
            1e-5,
        );
    }

    #[test]
    fn upload_as_bf16_rounds_to_bf16_precision() {
        let cpu = CpuBackend::new();
        let buf = cpu.upload(DType::BF16, &[1.0 + 1.0 / 1024.0, 3.0]).unwrap();
        assert_eq!(cpu.download(&buf).unwrap(), vec![1.0, 3.0]);
        let raw: Vec<u8> = [half::bf16::from_f32(2.5), half::bf16::from_f32(-0.75)]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let buf = cpu.upload_raw(DType::F32, DType::BF16, &raw).unwrap();
        assert_eq!(cpu.download(&buf).unwrap(), vec![2.5, -0.75]);
        assert!(cpu.upload_raw(DType::F32, DType::F16, &[0; 3]).is_err());
    }

    /// A step with one prefill sequence of `prefill` rows (blocks 2, 0) and one decode row
    /// whose context is `decode_ctx` (blocks 1, 3).
    fn mixed_meta(prefill: usize, decode_ctx: usize) -> StepMeta {
        let mut meta = StepMeta::default();
        let tables = [vec![2u32, 0], vec![1u32, 3]];
        let slot = |table: &[u32], t: usize| {
            table[t / BLOCK_SIZE] * BLOCK_SIZE as u32 + (t % BLOCK_SIZE) as u32
        };
        for t in 0..prefill {
            meta.token_ids.push(t as u32);
            meta.positions.push(t as u32);
            meta.slot_mapping.push(slot(&tables[0], t));
        }
        meta.token_ids.push(7);
        meta.positions.push(decode_ctx as u32 - 1);
        meta.slot_mapping.push(slot(&tables[1], decode_ctx - 1));
        meta.seqs = vec![
            SeqMeta {
                row_start: 0,
                num_rows: prefill as u32,
                context_len: prefill as u32,
                block_table_start: 0,
                num_blocks: prefill.div_ceil(BLOCK_SIZE) as u32,
            },
            SeqMeta {
                row_start: prefill as u32,
                num_rows: 1,
                context_len: decode_ctx as u32,
                block_table_start: 2,
                num_blocks: decode_ctx.div_ceil(BLOCK_SIZE) as u32,
            },
        ];
        meta.block_tables = tables.concat();
        meta.logit_rows = vec![prefill as u32 - 1, prefill as u32];
        meta
    }

    #[test]
    fn paged_attention_over_a_mixed_prefill_and_decode_batch_matches_dense_reference() {
        let cpu = CpuBackend::new();
        let shape = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
        };
        let (prefill, decode_ctx) = (20, 23);
        let meta = mixed_meta(prefill, decode_ctx);
        let rows = meta.rows();
        let kv_dim = shape.n_kv_heads * shape.head_dim;
        let q_dim = shape.n_heads * shape.head_dim;
        let stride = q_dim + 2 * kv_dim;
        let mut k_cache = cpu.alloc(DType::F32, 4 * BLOCK_SIZE * kv_dim).unwrap();
        let mut v_cache = cpu.alloc(DType::F32, 4 * BLOCK_SIZE * kv_dim).unwrap();
        // The decode sequence's earlier context, written as a previous step would have. Zero
        // inverse frequencies make RoPE the identity, so the caches get the rows' K and V as is.
        let history = values(8, (decode_ctx - 1) * stride);
        let no_rotation = CpuBuf::from_vec(vec![0.0; shape.head_dim / 2]);
        let mut hist_meta = StepMeta::default();
        for t in 0..decode_ctx - 1 {
            hist_meta.token_ids.push(0);
            hist_meta.positions.push(t as u32);
            hist_meta
                .slot_mapping
                .push([1u32, 3][t / BLOCK_SIZE] * BLOCK_SIZE as u32 + (t % BLOCK_SIZE) as u32);
        }
        let mut hist = CpuBuf::from_vec(history.clone());
        hist_meta.seqs = vec![SeqMeta {
            row_start: 0,
            num_rows: decode_ctx as u32 - 1,
            context_len: decode_ctx as u32 - 1,
            block_table_start: 0,
            num_blocks: 2,
        }];
        hist_meta.block_tables = vec![1, 3];
        let hist_meta = cpu.upload_meta(&hist_meta).unwrap();
        cpu.rope_write_kv(
            &mut hist,
            stride,
            &no_rotation,
            &hist_meta,
            shape,
            &mut k_cache,
            &mut v_cache,
        )
        .unwrap();

        let qkv = values(9, rows * stride);
        let mut qkv_buf = CpuBuf::from_vec(qkv.clone());
        let meta = cpu.upload_meta(&meta).unwrap();
        cpu.rope_write_kv(
            &mut qkv_buf,
            stride,
            &no_rotation,
            &meta,
            shape,
            &mut k_cache,
            &mut v_cache,
        )
        .unwrap();
        let mut out = cpu.alloc(DType::F32, rows * q_dim).unwrap();
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        cpu.attention(
            &qkv_buf, stride, 0, &k_cache, &v_cache, &meta, shape, scale, &mut out,
        )
        .unwrap();

        let hd = shape.head_dim;
        let kv_of = |src: &[f32], width: usize, off: usize, t: usize, h: usize| {
            src[t * width + off + h * hd..][..hd].to_vec()
        };
        for row in 0..rows {
            for head in 0..shape.n_heads {
                let kvh = head / 2;
                let (keys, vals): (Vec<_>, Vec<_>) = if row < prefill {
                    (0..=row)
                        .map(|t| {
                            (
                                kv_of(&qkv, stride, q_dim, t, kvh),
                                kv_of(&qkv, stride, q_dim + kv_dim, t, kvh),
                            )
                        })
                        .unzip()
                } else {
                    (0..decode_ctx)
                        .map(|t| {
                            if t < decode_ctx - 1 {
                                (
                                    kv_of(&history, stride, q_dim, t, kvh),
                                    kv_of(&history, stride, q_dim + kv_dim, t, kvh),
                                )
                            } else {
                                (
                                    kv_of(&qkv, stride, q_dim, row, kvh),
                                    kv_of(&qkv, stride, q_dim + kv_dim, row, kvh),
                                )
                            }
                        })
                        .unzip()
                };
                let qv = &qkv[row * stride + head * hd..][..hd];
                let want = reference::attend(qv, &keys, &vals, scale as f64);
                assert_close(
                    &out.as_slice()[row * q_dim + head * hd..][..hd],
                    &want,
                    1e-5,
                );
            }
        }
    }

    #[test]
    fn attention_rejects_a_block_outside_the_cache() {
        let cpu = CpuBackend::new();
        let shape = AttnShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
        };
        let mut meta = mixed_meta(3, 5);
        meta.block_tables[2] = 9;
        let meta = cpu.upload_meta(&meta).unwrap();
        let k = cpu.alloc(DType::F32, 4 * BLOCK_SIZE * 4).unwrap();
        let q = cpu.alloc(DType::F32, meta.step().rows() * 16).unwrap();
        let mut out = cpu.alloc(DType::F32, meta.step().rows() * 8).unwrap();
        let err = cpu
            .attention(&q, 16, 0, &k, &k, &meta, shape, 1.0, &mut out)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("block 9 outside a cache of 4 blocks"),
            "{err}"
        );
    }

    #[test]
    fn rope_write_kv_rotates_q_and_k_heads_and_caches_the_rotated_k_and_the_v() {
        let cpu = CpuBackend::new();
        let shape = AttnShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 8,
        };
        let hd = shape.head_dim;
        // Four columns of padding after q, k and v: untouched.
        let (rot, stride) = (3 * hd, 4 * hd + 4);
        let mut meta = mixed_meta(2, 1);
        meta.positions = vec![0, 5, 1000];
        meta.slot_mapping = vec![7, 2, 40];
        let meta = cpu.upload_meta(&meta).unwrap();
        let inv_freq: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
            .collect();
        let x = values(10, 3 * stride);
        let mut buf = CpuBuf::from_vec(x.clone());
        let mut k_cache = CpuBuf::from_vec(vec![f32::NAN; 48 * hd]);
        let mut v_cache = CpuBuf::from_vec(vec![f32::NAN; 48 * hd]);
        cpu.rope_write_kv(
            &mut buf,
            stride,
            &CpuBuf::from_vec(inv_freq.clone()),
            &meta,
            shape,
            &mut k_cache,
            &mut v_cache,
        )
        .unwrap();
        for row in 0..3 {
            let base = row * stride;
            for at in (base..base + rot).step_by(hd) {
                let want =
                    reference::rope_head(&x[at..at + hd], meta.step().positions[row], &inv_freq);
                assert_close(&buf.as_slice()[at..at + hd], &want, 1e-4);
            }
            assert_eq!(
                buf.as_slice()[base + rot..base + stride],
                x[base + rot..base + stride]
            );
            let slot = meta.step().slot_mapping[row] as usize * hd;
            let k = base + 2 * hd;
            assert_eq!(
                k_cache.as_slice()[slot..slot + hd],
                buf.as_slice()[k..k + hd]
            );
            assert_eq!(v_cache.as_slice()[slot..slot + hd], x[k + hd..k + 2 * hd]);
        }
        let written = k_cache.as_slice().iter().filter(|v| !v.is_nan()).count();
        assert_eq!(written, 3 * hd, "only the three rows' slots are written");
    }

    #[test]
    fn rope_write_kv_rejects_a_slot_outside_the_cache() {
        let cpu = CpuBackend::new();
        let shape = AttnShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 4,
        };
        let mut meta = mixed_meta(2, 1);
        meta.slot_mapping = vec![0, 16, 1];
        let meta = cpu.upload_meta(&meta).unwrap();
        let mut qkv = cpu.alloc(DType::F32, 3 * 12).unwrap();
        let mut k = cpu.alloc(DType::F32, 16 * 4).unwrap();
        let mut v = cpu.alloc(DType::F32, 16 * 4).unwrap();
        let freq = cpu.alloc(DType::F32, 2).unwrap();
        let err = cpu
            .rope_write_kv(&mut qkv, 12, &freq, &meta, shape, &mut k, &mut v)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("KV slot 16 outside a cache of 16 slots"),
            "{err}"
        );
    }

    #[test]
    fn silu_mul_matches_reference() {
        let cpu = CpuBackend::new();
        let gu = values(11, 3 * 2 * 10);
        let mut out = cpu.alloc(DType::F32, 30).unwrap();
        cpu.silu_mul(&CpuBuf::from_vec(gu.clone()), 20, 3, 10, &mut out)
            .unwrap();
        assert_close(out.as_slice(), &reference::silu_mul(&gu, 10), 1e-6);
        // gate|up as the first columns of wider rows.
        let wide: Vec<f32> = gu
            .chunks(20)
            .flat_map(|r| r.iter().copied().chain([f32::NAN; 5]))
            .collect();
        let mut out2 = cpu.alloc(DType::F32, 30).unwrap();
        cpu.silu_mul(&CpuBuf::from_vec(wide), 25, 3, 10, &mut out2)
            .unwrap();
        assert_eq!(out2.as_slice(), out.as_slice());
    }

    #[test]
    fn sgmv_applies_each_segments_adapter_group_with_its_own_ranks_and_skips_base_rows() {
        let cpu = CpuBackend::new();
        // A group of two parts of 20 and 12 columns, at column 6 of rows of 40.
        let (h_in, outs, stride, off) = (24, [20usize, 12], 40, 6);
        // Per adapter, the rank of each part (None: the adapter lacks it).
        let ranks = [[Some(4usize), Some(3)], [None, Some(8)], [Some(2), None]];
        type Part = (Vec<f32>, Vec<f32>, usize);
        let adapters: Vec<Vec<Option<Part>>> = ranks
            .iter()
            .enumerate()
            .map(|(i, rs)| {
                rs.iter()
                    .enumerate()
                    .map(|(j, r)| {
                        r.map(|r| {
                            let seed = 20 + 2 * (i * 2 + j) as u64;
                            (values(seed, r * h_in), values(seed + 1, outs[j] * r), r)
                        })
                    })
                    .collect()
            })
            .collect();
        let stacked: Vec<CpuBuf> = adapters
            .iter()
            .map(|parts| {
                CpuBuf::from_vec(parts.iter().flatten().flat_map(|p| p.0.clone()).collect())
            })
            .collect();
        let bs: Vec<Vec<Option<CpuBuf>>> = adapters
            .iter()
            .map(|parts| {
                parts
                    .iter()
                    .map(|p| p.as_ref().map(|p| CpuBuf::from_vec(p.1.clone())))
                    .collect()
            })
            .collect();
        let group = |i: usize, voff: usize| {
            Some(LoraGroupSlot {
                a: &stacked[i],
                parts: std::array::from_fn(|j| {
                    let b = bs[i].get(j)?.as_ref()?;
                    Some(LoraPart {
                        b,
                        rank: ranks[i][j]?,
                    })
                }),
                voff,
            })
        };
        // Slot 1 is empty in this table (that adapter does not target the group).
        let slots: Vec<Option<LoraGroupSlot<'_, CpuBackend>>> =
            vec![group(0, 0), None, group(2, 0), group(1, 0)];
        let table = cpu.lora_table(&slots).unwrap();
        let row_slots = [
            Some(3),
            Some(3),
            None,
            Some(0),
            Some(1),
            Some(2),
            Some(2),
            None,
        ];
        let rows = row_slots.len();
        let meta = StepMeta {
            token_ids: vec![0; rows],
            positions: vec![0; rows],
            slot_mapping: vec![0; rows],
            seqs: vec![SeqMeta {
                row_start: 0,
                num_rows: rows as u32,
                context_len: rows as u32,
                block_table_start: 0,
                num_blocks: 1,
            }],
            block_tables: vec![0],
            segments: SegmentTable::from_row_slots(&row_slots),
            logit_rows: vec![],
        };
        let meta = cpu.upload_meta(&meta).unwrap();
        let x = values(40, rows * h_in);
        let y0 = values(41, rows * stride);
        let v_stride = 8;
        let mut v = cpu.alloc(DType::F32, rows * v_stride).unwrap();
        let mut y = CpuBuf::from_vec(y0.clone());
        cpu.sgmv_shrink(
            &CpuBuf::from_vec(x.clone()),
            &table,
            &meta,
            h_in,
            v_stride,
            &mut v,
        )
        .unwrap();
        cpu.sgmv_expand(&v, &table, &meta, v_stride, &outs, stride, off, &mut y)
            .unwrap();
        for (row, slot) in row_slots.iter().enumerate() {
            let mut want = y0[row * stride..(row + 1) * stride].to_vec();
            let adapter = match slot {
                Some(3) => Some(1),
                Some(0) => Some(0),
                Some(2) => Some(2),
                _ => None,
            };
            if let Some(i) = adapter {
                let mut col = off;
                for (j, part) in adapters[i].iter().enumerate() {
                    if let Some((a, b, r)) = part {
                        let xr = &x[row * h_in..(row + 1) * h_in];
                        let d = reference::lora_delta(xr, a, b, *r, outs[j]);
                        for (o, dv) in want[col..col + outs[j]].iter_mut().zip(d) {
                            *o += dv;
                        }
                    }
                    col += outs[j];
                }
            }
            assert_close(&y.as_slice()[row * stride..(row + 1) * stride], &want, 1e-5);
        }

        // The same from each slot's intermediate at its own columns of a wider v (the layout
        // of the base GEMM's extra columns), the other columns NaN: the same y.
        let voffs = [11, 0, 2, 20];
        let slots: Vec<Option<LoraGroupSlot<'_, CpuBackend>>> =
            vec![group(0, 11), None, group(2, 2), group(1, 20)];
        let table = cpu.lora_table(&slots).unwrap();
        let wide_stride = 31;
        let mut wide = vec![f32::NAN; rows * wide_stride];
        for (row, slot) in row_slots.iter().enumerate() {
            let rank = match slot {
                Some(3) => 8,
                Some(0) => 7,
                Some(2) => 2,
                _ => 0,
            };
            if let Some(s) = slot {
                let voff = voffs[*s as usize];
                let src = &v.as_slice()[row * v_stride..row * v_stride + rank];
                wide[row * wide_stride + voff..][..rank].copy_from_slice(src);
            }
        }
        let wide = CpuBuf::from_vec(wide);
        let mut y2 = CpuBuf::from_vec(y0.clone());
        cpu.sgmv_expand(
            &wide,
            &table,
            &meta,
            wide_stride,
            &outs,
            stride,
            off,
            &mut y2,
        )
        .unwrap();
        assert_eq!(y2.as_slice(), y.as_slice());
        // Such a table serves expands only, and a v narrower than its columns is refused.
        let mut scratch = CpuBuf::from_vec(vec![0.0; rows * wide_stride]);
        let x = CpuBuf::from_vec(x);
        let err = cpu
            .sgmv_shrink(&x, &table, &meta, h_in, wide_stride, &mut scratch)
            .unwrap_err();
        assert!(err.to_string().contains("serves expands only"), "{err}");
        let err = cpu
            .sgmv_expand(&wide, &table, &meta, 27, &outs, stride, off, &mut y2)
            .unwrap_err();
        assert!(
            err.to_string().contains("past the step's LoRA width"),
            "{err}"
        );
    }

    #[test]
    fn sgmv_rejects_a_slot_beyond_the_table_and_a_rank_above_the_step_maximum() {
        let cpu = CpuBackend::new();
        let a = CpuBuf::from_vec(vec![0.0; 16]);
        let table = cpu
            .lora_table(&[Some(LoraGroupSlot {
                a: &a,
                parts: [Some(LoraPart { b: &a, rank: 4 }), None, None],
                voff: 0,
            })])
            .unwrap();
        let mut meta = mixed_meta(1, 1);
        meta.segments = SegmentTable::from_row_slots(&[Some(1), None]);
        let x = CpuBuf::from_vec(vec![0.0; 8]);
        let mut v = CpuBuf::from_vec(vec![0.0; 8]);
        let step = cpu.upload_meta(&meta).unwrap();
        let err = cpu
            .sgmv_shrink(&x, &table, &step, 4, 4, &mut v)
            .unwrap_err();
        assert!(
            err.to_string().contains("slot 1, the table has 1 slots"),
            "{err}"
        );
        meta.segments = SegmentTable::from_row_slots(&[Some(0), None]);
        let step = cpu.upload_meta(&meta).unwrap();
        let err = cpu
            .sgmv_shrink(&x, &table, &step, 4, 2, &mut v)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("rank 4 from column 0 past the step's LoRA width 2"),
            "{err}"
        );
    }

    #[test]
    fn step_meta_validation_rejects_overlapping_segments_and_short_block_tables() {
        let mut meta = mixed_meta(4, 3);
        assert!(meta.validate().is_ok());
        meta.segments = SegmentTable {
            starts: vec![0, 1],
            ends: vec![3, 4],
            slots: vec![0, 1],
        };
        assert!(meta.validate().is_err());
        let mut meta = mixed_meta(20, 3);
        meta.seqs[0].num_blocks = 1;
        let err = meta.validate().unwrap_err();
        assert!(err.to_string().contains("for context 20"), "{err}");
    }
}
