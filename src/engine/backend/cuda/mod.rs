//! The CUDA backend: cudarc with dynamically loaded libraries (a machine without CUDA builds and
//! runs everything else), kernels from kernels/ compiled at run time by NVRTC to CUBIN for the
//! device (cached on disk, modules loaded lazily), cuBLAS for the base GEMMs (bf16/f16 in, f32
//! accumulate), one stream. Launch planning lives in [`plan`], compilation in [`compile`], the
//! GPU self-test and kernel benchmark in [`selftest`] and [`bench`].

pub mod bench;
pub mod compile;
pub mod graph;
mod graph_check;
pub mod parity;
mod pinned;
pub mod plan;
mod profile;
pub mod reference;
pub mod selftest;

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::{result as blas_result, sys as blas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice,
};
use cudarc::driver::{DriverError, result as drv, sys as drv_sys};
use half::{bf16, f16};

use self::pinned::{HostMem, PinnedPool};
use crate::engine::backend::{
    AttnShape, Backend, BackendError, DType, DeviceKind, HostTensor, LoraGroupSlot,
    MAX_GROUP_PARTS, Pick, Result, RowSampling, StepMeta, StepPath, par_map,
};
use compile::KernelCompiler;
use graph::{GemmOp, LaunchOp, Op};
use plan::MetaLayout;

/// Check that the CUDA driver, NVRTC and cuBLAS libraries load and that a GPU is visible.
/// The service calls this for `--device auto` and falls back to the CPU on an error.
pub fn cuda_available() -> Result<()> {
    // SAFETY: each call only tries to dlopen the library by its known names.
    let (driver, nvrtc, cublas) = unsafe {
        (
            drv_sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
            blas_sys::is_culib_present(),
        )
    };
    let mut missing = Vec::new();
    if !driver {
        missing.push("libcuda.so (the NVIDIA driver)");
    }
    if !nvrtc {
        missing.push("libnvrtc.so (NVRTC)");
    }
    if !cublas {
        missing.push("libcublas.so (cuBLAS)");
    }
    if !missing.is_empty() {
        return Err(BackendError::Unavailable(format!(
            "CUDA libraries not found: {}",
            missing.join(", ")
        )));
    }
    let count = CudaContext::device_count().map_err(|e| {
        BackendError::Unavailable(format!("CUDA driver present but not usable: {e}"))
    })?;
    if count < 1 {
        return Err(BackendError::Unavailable("no CUDA GPU visible".into()));
    }
    Ok(())
}

fn dev_err(what: &str, e: DriverError) -> BackendError {
    if e.0 == drv_sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
        return BackendError::OutOfMemory { wanted: 0 };
    }
    BackendError::Device(format!("{what}: {e:?}"))
}

/// A kernel's name formatted on the stack ([`plan::KernelName`]); a name too long for it is a
/// shape error of the launch.
macro_rules! kernel {
    ($($t:tt)*) => {
        plan::KernelName::of(format_args!($($t)*))
            .ok_or_else(|| shape(format!("kernel name {} is too long", format_args!($($t)*))))?
    };
}

fn shape(msg: String) -> BackendError {
    BackendError::Shape(msg)
}

/// What keeps a buffer's device memory (and the host memory a copy reads from) alive; only
/// dropped, never read.
#[allow(dead_code)]
enum Memory {
    Own(CudaSlice<u8>),
    /// A view into one allocation shared by several buffers, filled from `staged` by copies
    /// on the copy stream; this buffer by the copy of part `part` (see [`Uploaded`]).
    Shared {
        up: Arc<Uploaded>,
        _staged: Arc<CudaStaged>,
        part: usize,
    },
    /// A step temporary in the backend's arena (valid until the next step starts).
    Arena,
}

/// Device memory an adapter's copies on the copy stream fill, one part (a layer) after the
/// other (see [`Backend::upload_staged`]): part `i < parts.len()` is ready for kernels once
/// `parts[i]` completed, the last part and so the whole once `done` did; freed
/// (stream-ordered, on the main stream) only after `done`, so an adapter dropped while its
/// copy runs never frees memory the copy still writes.
struct Uploaded {
    parts: Vec<cudarc::driver::CudaEvent>,
    done: cudarc::driver::CudaEvent,
    main: Arc<CudaStream>,
    /// Dropped after [`Drop::drop`] ordered the free behind `done`.
    _mem: CudaSlice<u8>,
}

impl Uploaded {
    /// The event recorded after part `part`'s copy (`done` for the last part).
    fn copied(&self, part: usize) -> &cudarc::driver::CudaEvent {
        self.parts.get(part).unwrap_or(&self.done)
    }
}

/// The byte ranges and tensor ranges of the consecutive parts of a staged buffer of `used`
/// bytes whose tensors start at `starts` (in order), part `i` taking the next `counts[i]`
/// tensors: each part runs from its first tensor's start to the next part's (the last one to
/// `used`), so the parts cover the buffer, padding included. Parts without tensors are left
/// out; no counts is one part of everything.
fn copy_parts(
    starts: &[usize],
    counts: &[usize],
    used: usize,
) -> Result<Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>> {
    if counts.is_empty() {
        return Ok(vec![(0..used, 0..starts.len())]);
    }
    if counts.iter().sum::<usize>() != starts.len() {
        return Err(shape(format!(
            "copy parts of {} tensors in all for {} staged tensors",
            counts.iter().sum::<usize>(),
            starts.len()
        )));
    }
    let mut parts = Vec::with_capacity(counts.len());
    let mut first = 0;
    for &n in counts.iter().filter(|&&n| n > 0) {
        let end = first + n;
        let from = if parts.is_empty() {
            0
        } else {
            starts.get(first).copied().unwrap_or(used)
        };
        let to = starts.get(end).copied().unwrap_or(used);
        parts.push((from..to, first..end));
        first = end;
    }
    Ok(parts)
}

/// What a slot table's entries add up to: the checks and launch choices of the kernels that
/// read it.
struct TableSummary {
    /// Largest total rank of a slot.
    max_rank: usize,
    /// Largest end column of a slot's intermediate in v (its voff plus its total rank): the
    /// narrowest v the table fits.
    max_vend: usize,
    /// Every slot's intermediate starts at column 0 (what a shrink writes).
    shrinkable: bool,
    /// Largest rank of one part: what the expand reads per part.
    max_part_rank: usize,
    /// Smallest `a.len / rank` over filled slots: the largest h_in every slot can serve.
    min_in: usize,
    /// Per part, smallest `b.len / rank` over the slots that have it (`usize::MAX` when none
    /// does): the widest output that part can serve.
    min_out: [usize; MAX_GROUP_PARTS],
    /// Every part's rank is a power of two from 8 to 128 and every total rank fits the
    /// streamed kernel's copies of v (`sgmv_lora_stream_*`).
    streamable: bool,
}

/// The device bytes of a slot table over `slots` (checked: ranks, shapes, alignment), and
/// what its entries add up to.
fn encode_lora_table(slots: &[Option<RawLoraSlot>]) -> Result<(Vec<u8>, TableSummary)> {
    let mut bytes = Vec::with_capacity(slots.len().max(1) * plan::LORA_SLOT_BYTES);
    let (mut max_rank, mut max_part_rank, mut min_in) = (0usize, 0usize, usize::MAX);
    let mut max_vend = 0usize;
    let mut shrinkable = true;
    let mut streamable = true;
    let mut min_out = [usize::MAX; MAX_GROUP_PARTS];
    let aligned = |p: u64| p.is_multiple_of(16);
    for (i, s) in slots.iter().enumerate() {
        let mut entry = plan::LoraSlotEntry::default();
        if let Some(s) = s {
            let mut voff = s.voff;
            for (j, part) in s.parts.iter().enumerate() {
                let Some(p) = part else { continue };
                if p.rank == 0 || p.rank > plan::MAX_RANK {
                    return Err(shape(format!(
                        "slot {i} part {j}: rank {} outside 1..={}",
                        p.rank,
                        plan::MAX_RANK
                    )));
                }
                if p.b_len == 0 || !p.b_len.is_multiple_of(p.rank) || !aligned(p.b) {
                    return Err(shape(format!(
                        "slot {i} part {j}: B of {} elements at 0x{:x} is not a 16-byte \
                         aligned [n, rank={}] matrix",
                        p.b_len, p.b, p.rank
                    )));
                }
                min_out[j] = min_out[j].min(p.b_len / p.rank);
                max_part_rank = max_part_rank.max(p.rank);
                streamable &= p.rank.is_power_of_two() && (8..=128).contains(&p.rank);
                entry.parts[j] = (p.b, p.rank as u32, voff as u32);
                voff += p.rank;
            }
            let rank = voff - s.voff;
            if rank == 0 || s.a_len == 0 || !s.a_len.is_multiple_of(rank) || !aligned(s.a) {
                return Err(shape(format!(
                    "slot {i}: A of {} elements at 0x{:x} is not a 16-byte aligned \
                     [rank={rank}, n] matrix",
                    s.a_len, s.a
                )));
            }
            max_rank = max_rank.max(rank);
            max_vend = max_vend.max(voff);
            min_in = min_in.min(s.a_len / rank);
            entry.a = s.a;
            entry.rank = rank as u32;
            if u32::try_from(voff).is_err() {
                return Err(shape(format!("slot {i}: v column {voff} too large")));
            }
            shrinkable &= s.voff == 0;
            streamable &= rank <= plan::STREAM_MAX_RANK;
        }
        entry.write(&mut bytes);
    }
    Ok((
        bytes,
        TableSummary {
            max_rank,
            max_vend,
            shrinkable,
            max_part_rank,
            min_in,
            min_out,
            streamable,
        },
    ))
}

impl Drop for Uploaded {
    fn drop(&mut self) {
        if !self.done.is_complete()
            && let Err(e) = self.main.wait(&self.done)
        {
            // The context is failing; the free below is then moot.
            tracing::error!(error = ?e, "cannot order an adapter's free after its copy");
        }
    }
}

/// Tensors converted and packed in page-locked host memory, for one asynchronous copy. Its
/// buffer goes back to the backend's pool when it is dropped.
pub struct CudaStaged {
    /// `Some` until dropped; may be longer than `used`.
    host: Option<HostMem>,
    used: usize,
    /// Recorded after the latest copy from `host`: the buffer is reused only once it completed.
    copied: Mutex<Option<cudarc::driver::CudaEvent>>,
    pool: Arc<PinnedPool>,
    dtype: DType,
    /// Byte offset and element count of each tensor.
    tensors: Vec<(usize, usize)>,
}

impl CudaStaged {
    /// Whether its bytes are a range of the page-locked region reserved at startup.
    pub fn in_region(&self) -> bool {
        matches!(self.host, Some(HostMem::Range { .. }))
    }
}

impl Drop for CudaStaged {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            let copied = lock(&self.copied).take();
            self.pool.put(host, copied);
        }
    }
}

/// A device buffer: raw bytes plus dtype and element count.
pub struct CudaBuf {
    // Keeps the allocation alive; freed (stream-ordered) on drop.
    _mem: Memory,
    ptr: u64,
    dtype: DType,
    len: usize,
}

impl CudaBuf {
    /// Device address of element `i`.
    pub fn ptr_at(&self, i: usize) -> u64 {
        self.ptr + (i * self.dtype.size()) as u64
    }
    /// Device address of the first element.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A step's metadata on the device: one u32 array, sections at [`MetaLayout`] offsets.
pub struct CudaMeta {
    /// Its own allocation, or `None` in the backend's fixed step buffer (valid until the next
    /// step starts).
    _words: Option<CudaSlice<u8>>,
    base: u64,
    layout: MetaLayout,
}

impl CudaMeta {
    fn at(&self, offset: usize) -> u64 {
        self.base + 4 * offset as u64
    }
    /// Rows in the step.
    pub fn rows(&self) -> usize {
        self.layout.rows
    }
    /// The packing (counts and offsets).
    pub fn layout(&self) -> &MetaLayout {
        &self.layout
    }
}

/// One (layer, projection)'s adapter table on the device: per slot `{a, b, rank}`.
///
/// It holds raw device addresses: the adapter buffers it was built from must outlive it (the
/// adapter cache rebuilds tables whenever a slot changes).
pub struct CudaLoraTable {
    _mem: CudaSlice<u8>,
    ptr: u64,
    slots: usize,
    dtype: Option<DType>,
    sum: TableSummary,
    /// The entries as the host built them (the dense path's GEMMs take their addresses).
    raw: Vec<Option<RawLoraSlot>>,
}

impl CudaLoraTable {
    /// Largest total rank of any filled slot (0 when all are empty).
    pub fn max_rank(&self) -> usize {
        self.sum.max_rank
    }
}

/// One part of a [`RawLoraSlot`]: the device address and length of its B, and its rank.
#[derive(Clone, Copy, Debug)]
pub struct RawLoraPart {
    pub b: u64,
    pub b_len: usize,
    pub rank: usize,
}

/// One slot of a group table as raw parts: the device address and length of the stacked A,
/// and the parts.
#[derive(Clone, Copy, Debug)]
pub struct RawLoraSlot {
    pub a: u64,
    pub a_len: usize,
    pub parts: [Option<RawLoraPart>; MAX_GROUP_PARTS],
    /// First column of the slot's intermediate in v ([`LoraGroupSlot::voff`]).
    pub voff: usize,
}

impl RawLoraSlot {
    /// Total rank: the rows of the stacked A, the columns of the intermediate.
    fn rank(&self) -> usize {
        self.parts.iter().flatten().map(|p| p.rank).sum()
    }
}

/// Kernel argument, widened to an 8-byte slot (the driver reads the parameter's size from it;
/// the lower bytes come first on little-endian hosts).
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    F32(f32),
    Usize(usize),
}

impl Arg {
    fn slot(self) -> u64 {
        match self {
            Arg::Ptr(p) => p,
            Arg::I32(v) => v as u32 as u64,
            Arg::U32(v) => v as u64,
            Arg::F32(v) => v.to_bits() as u64,
            Arg::Usize(v) => v as u64,
        }
    }
}

/// `args` as a launch's inline slots (at most [`graph::MAX_ARGS`]).
fn arg_slots<'a>(args: impl IntoIterator<Item = &'a Arg>) -> Result<graph::ArgSlots> {
    graph::ArgSlots::new(args.into_iter().map(|a| a.slot())).ok_or_else(|| {
        shape(format!(
            "a launch of more than {} arguments",
            graph::MAX_ARGS
        ))
    })
}

/// A cuBLAS dimension or stride of `op` (its API takes 32-bit ints).
fn cublas_dim(op: &str, v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| shape(format!("{op} {what} = {v} too large for cuBLAS")))
}

fn i32_arg(v: usize, what: &str) -> Result<Arg> {
    i32::try_from(v).map(Arg::I32).map_err(|_| {
        shape(format!(
            "{what} = {v} does not fit the kernels' 32-bit indices"
        ))
    })
}

/// Zeroed scratch for the split-K shrink: per-tile counters, then f32 accumulators. Kernels
/// leave it zeroed again after every launch.
struct Workspace {
    _mem: CudaSlice<u8>,
    ptr: u64,
    bytes: usize,
}

/// What the previous launch on the stream was. Every forward kernel may overlap its predecessor
/// (programmatic dependent launch), but the expand reads its B and old y before waiting, so it
/// may overlap only a shrink: a shrink writes neither and triggers its dependents only after its
/// own wait, when the kernel that wrote y (a GEMM or the previous expand) has completed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Last {
    Shrink,
    Other,
}

/// The CUDA backend on one GPU.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// The side stream of [`Backend::begin_side`], with the events that order it against
    /// `stream`, and whether launches currently go to it.
    side: Arc<CudaStream>,
    /// Adapter uploads: copies that run beside the steps (see [`Backend::upload_staged`]).
    copy: Arc<CudaStream>,
    fork_event: drv_sys::CUevent,
    join_event: drv_sys::CUevent,
    on_side: std::sync::atomic::AtomicBool,
    blas: blas_sys::cublasHandle_t,
    dtype: DType,
    name: String,
    compute_capability: (i32, i32),
    sm_count: usize,
    compiler: KernelCompiler,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    workspace: Mutex<Option<Workspace>>,
    /// Page-locked staging buffers for adapter loads.
    pinned: Arc<PinnedPool>,
    last: Mutex<Last>,
    pdl: bool,
    /// Target of the tile shrink in blocks per SM (tuning knob, `PUNICA_SHRINK_BLOCKS_PER_SM`;
    /// see [`plan::SHRINK_BLOCKS_PER_SM`]).
    shrink_blocks_per_sm: usize,
    /// Expand: 8-column tiles per warp, 4 or 8 (tuning knob, `PUNICA_EXPAND_NTW`).
    expand_ntw: usize,
    /// Expand batches of long segments with the long-segment kernel ([`plan::expand_long`];
    /// `PUNICA_EXPAND_LONG=0`: the tile expand).
    expand_long: bool,
    /// Blocks of a kernel (by name, at its launch's block size and no dynamic shared memory)
    /// that the device holds at once.
    resident: Mutex<HashMap<String, usize>>,
    /// Largest split-K of the shrink for tiles of many rows (`PUNICA_SHRINK_MAX_SPLITS_FULL`).
    shrink_max_splits_full: usize,
    /// Spread ranks over blocks when a batch has few tiles (`PUNICA_SHRINK_RANK_SPLIT=0` disables).
    shrink_rank_split: bool,
    /// Run [`Backend::begin_side`] work on the side stream (`PUNICA_SIDE_STREAM=0`: on the main
    /// stream, in issue order).
    side_stream: bool,
    /// Fuse the gate|up expand into SiLU-mul where the row kernels serve the step
    /// (`PUNICA_FUSED_SILU=0`: the expand and SiLU-mul as two kernels).
    fused_silu: bool,
    /// Fuse the q|k|v expand into RoPE and the KV-cache write where the row kernels serve the
    /// step (`PUNICA_FUSED_ROPE=0`: two kernels).
    fused_rope: bool,
    /// Run [`Backend::sgmv_lora`] on one-row segments as the streamed kernel, on sm_90 and
    /// later (`PUNICA_LORA_STREAM=0`: shrink and expand).
    lora_stream: bool,
    /// Stream even the launches [`plan::stream_plan`] leaves to the two kernels
    /// (`PUNICA_LORA_STREAM=all`, for measurement).
    lora_stream_all: bool,
    /// The streamed kernel's cluster size, 1, 2, 3 or 4, in place of [`plan::stream_plan`]'s
    /// choice (`PUNICA_LORA_STREAM_CLUSTER`, for measurement).
    stream_cluster: Option<usize>,
    /// Never the streamed kernel on tensor cores (`PUNICA_LORA_STREAM_MMA=0`).
    stream_no_mma: bool,
    /// Run [`Backend::sgmv_lora`] of one long bf16 segment of high rank as two cuBLAS GEMMs
    /// (see [`plan::DENSE_MIN_ROWS`]; `PUNICA_LORA_DENSE=0`: the kernels).
    lora_dense: bool,
    /// Clusters of the streamed kernel that fit the device at once, per (dtype, cluster size,
    /// shared memory); the kernel's shared-memory limit is raised when its entry is made.
    stream_clusters: Mutex<HashMap<(DType, usize, usize, bool), usize>>,
    /// Per-kernel timing of real steps (`PUNICA_PROFILE_OPS=1`, see `profile`).
    profile: Option<Mutex<profile::OpProfile>>,
    /// When the CUDA-core row kernels serve a batch (`PUNICA_SGMV_ROWS_MAX`: longest segment,
    /// 0: never; `PUNICA_SHRINK_ROWS_MAX_RANK`, `PUNICA_EXPAND_ROWS_MAX_RANK`,
    /// `PUNICA_EXPAND_ROWS_MAX_RANK_FEW`).
    row_limits: Mutex<plan::RowLimits>,
    /// 8-element vectors of h_in per split of the row shrink (`PUNICA_SHRINK_ROWS_VECS`).
    shrink_rows_vecs: usize,
    /// The step recorder and graph cache (`graph`; `PUNICA_CUDA_GRAPHS=0` turns graphs off).
    recorder: Mutex<graph::Recorder>,
    /// Step temporaries: the arena, its allocation, and whether a step is open.
    step: Mutex<StepMemory>,
    /// cuBLAS's workspace, set once so that GEMMs never allocate (they may be captured).
    _blas_workspace: CudaSlice<u8>,
    /// Recorded on the main stream after each step's ops ([`Backend::step_done`]).
    step_event: cudarc::driver::CudaEvent,
}

/// Device memory kept from step to step: the activation arena, the metadata and sampling
/// buffers.
#[derive(Default)]
struct StepMemory {
    arena: graph::Arena,
    arena_mem: Option<CudaSlice<u8>>,
    /// The fixed metadata buffer and its capacity in bytes.
    meta_mem: Option<(CudaSlice<u8>, u64, usize)>,
    /// The sampling buffer and its capacity in bytes.
    sample_mem: Option<(CudaSlice<u8>, u64, usize)>,
    /// Allocations of the open step the arena could not hold (kept until the next step, as
    /// the recorded ops that use them are issued after the buffers are dropped).
    overflow: Vec<CudaSlice<u8>>,
    /// A step is open: `alloc` takes from the arena.
    open: bool,
    /// The open step's metadata is in `meta_mem` already (a second upload gets its own).
    meta_taken: bool,
    /// Host buffer the metadata is packed in, reused from step to step.
    meta_words: Vec<u32>,
    /// Host buffers of sampling: the rows' parameters and the picks copied back.
    sample_params: Vec<u8>,
    sample_words: Vec<u32>,
}

/// cuBLAS workspace (what NVIDIA recommends for Hopper).
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

// SAFETY: the cuBLAS handle is only used under the backend's own calls, which bind the context
// and enqueue on the one stream; cuBLAS handles may be used from any thread that way.
unsafe impl Send for CudaBackend {}
// SAFETY: as above; mutable state sits behind mutexes.
unsafe impl Sync for CudaBackend {}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // SAFETY: the handle and events were created in `new` and are destroyed once here, after
        // both streams have drained.
        let _ = self.side.synchronize();
        let _ = self.stream.synchronize();
        unsafe {
            let _ = blas_result::destroy_handle(self.blas);
            let _ = drv::event::destroy(self.fork_event);
            let _ = drv::event::destroy(self.join_event);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked mid-call; the state it guards (caches,
    // a workspace pointer) is still consistent, so keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Options for [`CudaBackend::new`].
#[derive(Clone, Debug)]
pub struct CudaOptions {
    pub ordinal: usize,
    pub dtype: DType,
    /// Where compiled cubins are cached; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Launch the forward's kernels with programmatic dependent launch (sm_90+): each one's
    /// launch overlaps the previous kernel's tail, and the SGMV expand overlaps the shrink.
    pub pdl: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            ordinal: 0,
            dtype: DType::BF16,
            cache_dir: compile::default_cache_dir(),
            pdl: true,
        }
    }
}

impl CudaBackend {
    /// Open GPU `ordinal`. Fails with [`BackendError::Unavailable`] when CUDA is missing.
    pub fn new(opts: CudaOptions) -> Result<Self> {
        cuda_available()?;
        if opts.dtype == DType::F32 {
            tracing::warn!("CUDA backend with f32 weights: SGMV kernels need bf16 or f16");
        }
        let ctx = CudaContext::new(opts.ordinal).map_err(|e| {
            BackendError::Unavailable(format!("cannot open CUDA device {}: {e:?}", opts.ordinal))
        })?;
        // One stream, ordered: cudarc's per-buffer event tracking is pure overhead here.
        // SAFETY: called before any buffer exists; all work goes to one stream.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own: the legacy default stream cannot be captured into a graph.
        let stream = ctx.new_stream().map_err(|e| {
            BackendError::Unavailable(format!("cannot create a CUDA stream: {e:?}"))
        })?;
        let side = ctx.new_stream().map_err(|e| {
            BackendError::Unavailable(format!("cannot create a CUDA stream: {e:?}"))
        })?;
        let copy = ctx.new_stream().map_err(|e| {
            BackendError::Unavailable(format!("cannot create a CUDA stream: {e:?}"))
        })?;
        let event = || {
            drv::event::create(drv_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(|e| dev_err("event", e))
        };
        let (fork_event, join_event) = (event()?, event()?);
        let step_event = stream
            .record_event(Some(drv_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| dev_err("create the step event", e))?;
        let name = ctx.name().map_err(|e| dev_err("device name", e))?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| dev_err("compute capability", e))?;
        let sm_count = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| dev_err("SM count", e))? as usize;
        let blas = blas_result::create_handle()
            .map_err(|e| BackendError::Unavailable(format!("cuBLAS: {e:?}")))?;
        // SAFETY: handle just created; the stream lives as long as the backend.
        unsafe { blas_result::set_stream(blas, stream.cu_stream() as _) }
            .map_err(|e| BackendError::Device(format!("cublasSetStream: {e:?}")))?;
        // SAFETY: uninitialised scratch is what cuBLAS expects of a workspace.
        let blas_workspace = unsafe { stream.alloc::<u8>(BLAS_WORKSPACE_BYTES) }
            .map_err(|e| dev_err("cuBLAS workspace", e))?;
        // SAFETY: the workspace lives as long as the handle (both in the backend), and only
        // this handle on this stream uses it; set after the stream (setting a stream resets it).
        unsafe {
            blas_sys::cublasSetWorkspace_v2(
                blas,
                blas_workspace.device_ptr(&stream).0 as *mut c_void,
                BLAS_WORKSPACE_BYTES,
            )
        }
        .result()
        .map_err(|e| BackendError::Device(format!("cublasSetWorkspace: {e:?}")))?;
        let compiler = KernelCompiler {
            arch: compile::arch_for(cc.0, cc.1),
            include_dir: compile::toolkit_include_dir(),
            cache_dir: opts.cache_dir.clone(),
        };
        tracing::info!(
            device = %name, cc = ?cc, sm_count, arch = %compiler.arch,
            "CUDA backend ready"
        );
        Ok(CudaBackend {
            ctx,
            stream,
            side,
            copy,
            fork_event,
            join_event,
            on_side: std::sync::atomic::AtomicBool::new(false),
            blas,
            dtype: opts.dtype,
            name,
            compute_capability: cc,
            sm_count,
            compiler,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            workspace: Mutex::new(None),
            pinned: Arc::new(PinnedPool::new()),
            last: Mutex::new(Last::Other),
            pdl: opts.pdl && cc.0 >= 9,
            shrink_blocks_per_sm: std::env::var("PUNICA_SHRINK_BLOCKS_PER_SM")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&v: &usize| (1..=64).contains(&v))
                .unwrap_or(plan::SHRINK_BLOCKS_PER_SM),
            resident: Mutex::new(HashMap::new()),
            shrink_max_splits_full: std::env::var("PUNICA_SHRINK_MAX_SPLITS_FULL")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&v: &usize| (1..=64).contains(&v))
                .unwrap_or(plan::SHRINK_MAX_SPLITS_FULL),
            shrink_rank_split: std::env::var("PUNICA_SHRINK_RANK_SPLIT").as_deref() != Ok("0"),
            profile: (std::env::var("PUNICA_PROFILE_OPS").as_deref() == Ok("1"))
                .then(|| Mutex::new(profile::OpProfile::new())),
            side_stream: std::env::var("PUNICA_SIDE_STREAM").as_deref() != Ok("0"),
            fused_silu: std::env::var("PUNICA_FUSED_SILU").as_deref() != Ok("0"),
            fused_rope: std::env::var("PUNICA_FUSED_ROPE").as_deref() != Ok("0"),
            lora_stream: cc.0 >= 9 && std::env::var("PUNICA_LORA_STREAM").as_deref() != Ok("0"),
            lora_stream_all: std::env::var("PUNICA_LORA_STREAM").as_deref() == Ok("all"),
            stream_cluster: std::env::var("PUNICA_LORA_STREAM_CLUSTER")
                .ok()
                .and_then(|v| v.parse().ok()),
            stream_no_mma: std::env::var("PUNICA_LORA_STREAM_MMA").as_deref() == Ok("0"),
            lora_dense: std::env::var("PUNICA_LORA_DENSE").as_deref() != Ok("0"),
            stream_clusters: Mutex::new(HashMap::new()),
            expand_long: std::env::var("PUNICA_EXPAND_LONG").as_deref() != Ok("0"),
            expand_ntw: match std::env::var("PUNICA_EXPAND_NTW").as_deref() {
                Ok("8") => 8,
                _ => 4,
            },
            row_limits: Mutex::new({
                let knob = |name: &str, default: usize| {
                    std::env::var(name)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(default)
                };
                let d = plan::RowLimits::DEFAULT;
                plan::RowLimits {
                    max_seg: knob("PUNICA_SGMV_ROWS_MAX", d.max_seg),
                    shrink_rank: knob("PUNICA_SHRINK_ROWS_MAX_RANK", d.shrink_rank),
                    expand_rank: knob("PUNICA_EXPAND_ROWS_MAX_RANK", d.expand_rank),
                    expand_rank_few: knob("PUNICA_EXPAND_ROWS_MAX_RANK_FEW", d.expand_rank_few),
                }
            }),
            shrink_rows_vecs: std::env::var("PUNICA_SHRINK_ROWS_VECS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&v: &usize| (32..=4096).contains(&v))
                .unwrap_or(plan::SHRINK_ROWS_VECS),
            recorder: Mutex::new(graph::Recorder::new(
                std::env::var("PUNICA_CUDA_GRAPHS").as_deref() != Ok("0"),
            )),
            step: Mutex::new(StepMemory::default()),
            _blas_workspace: blas_workspace,
            step_event,
        })
    }

    /// Page-locked host memory of `bytes` (uninitialised: callers write what they read).
    fn alloc_pinned(&self, bytes: usize) -> Result<PinnedHostSlice<u8>> {
        // SAFETY: the buffer's users write every byte they read (`stage` fills each tensor's
        // range; the copy to the device reads only those, plus alignment gaps nobody reads).
        unsafe {
            self.ctx
                .alloc_pinned_with_flags::<u8>(bytes, drv_sys::CU_MEMHOSTALLOC_PORTABLE)
        }
        .map_err(|e| dev_err("page-locked host allocation", e))
    }

    /// Pin `bytes` of host memory now (at startup) for staged adapters (the host tier), so
    /// adapter loads while the engine runs take ranges of it instead of pinning fresh memory
    /// (see `pinned`).
    pub fn reserve_staging(&self, bytes: usize) -> Result<()> {
        let started = std::time::Instant::now();
        self.pinned.set_region(self.alloc_pinned(bytes.max(16))?)?;
        tracing::info!(
            mib = bytes >> 20,
            ms = started.elapsed().as_millis() as u64,
            "page-locked memory reserved for staged adapters"
        );
        Ok(())
    }

    /// Free and total device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| dev_err("bind context", e))?;
        drv::mem_get_info().map_err(|e| dev_err("memory info", e))
    }

    /// The GPU's name, e.g. "NVIDIA H200".
    pub fn device_name(&self) -> &str {
        &self.name
    }
    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }
    /// Streaming multiprocessors.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }
    /// NVRTC target in use.
    pub fn arch(&self) -> &str {
        &self.compiler.arch
    }
    /// Whether kernels are launched with programmatic dependent launch.
    pub fn pdl(&self) -> bool {
        self.pdl
    }
    /// When the CUDA-core SGMV row kernels serve a batch instead of the tensor-core tiles.
    pub fn row_limits(&self) -> plan::RowLimits {
        *lock(&self.row_limits)
    }

    /// Set [`Self::row_limits`] (the selftest runs both kernel families on one batch).
    pub fn set_row_limits(&self, limits: plan::RowLimits) {
        *lock(&self.row_limits) = limits;
    }

    /// Switch programmatic dependent launch on or off (for measurement).
    pub fn set_pdl(&mut self, on: bool) {
        self.pdl = on && self.compute_capability.0 >= 9;
    }
    /// Whether [`Backend::sgmv_lora`] may run the streamed kernel (sm_90 and later, not turned
    /// off by `PUNICA_LORA_STREAM=0`).
    pub fn lora_stream(&self) -> bool {
        self.lora_stream
    }
    /// Whether [`Backend::sgmv_lora`] may run as two dense GEMMs (not turned off by
    /// `PUNICA_LORA_DENSE=0`).
    pub fn lora_dense_on(&self) -> bool {
        self.lora_dense
    }
    /// The stream all work goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Compile (or load from the cache) every module now, so the first step does not pay for it.
    pub fn warm_up(&self) -> Result<()> {
        for name in kernel_names() {
            // The streamed LoRA kernel exists for sm_90 and later only.
            if name.starts_with("sgmv_lora_stream_") && self.compute_capability.0 < 9 {
                continue;
            }
            self.function(&name)?;
        }
        Ok(())
    }

    fn module(&self, file: &'static str) -> Result<Arc<CudaModule>> {
        if let Some(m) = lock(&self.modules).get(file) {
            return Ok(m.clone());
        }
        let cubin = self.compiler.cubin(file)?;
        let module = self
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(|e| BackendError::Compile(format!("loading {file} cubin: {e:?}")))?;
        lock(&self.modules).insert(file, module.clone());
        Ok(module)
    }

    /// The name of a loaded kernel (`CUfunction` as in a [`LaunchOp`]), for errors.
    fn kernel_name(&self, func: usize) -> String {
        lock(&self.functions)
            .iter()
            .find(|(_, f)| f.cu_function() as usize == func)
            .map_or_else(|| format!("kernel 0x{func:x}"), |(name, _)| name.clone())
    }

    fn function(&self, name: &str) -> Result<CudaFunction> {
        if let Some(f) = lock(&self.functions).get(name) {
            return Ok(f.clone());
        }
        let module = self.module(compile::module_of(name))?;
        let f = module
            .load_function(name)
            .map_err(|e| BackendError::Compile(format!("kernel {name} not in module: {e:?}")))?;
        lock(&self.functions).insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Launch kernel `name`. `pdl` lets it start while the previous kernel finishes; the
    /// kernel must then follow `pdl_enter`'s rules (kernels/common.cuh): wait before reading
    /// that kernel's outputs, before any write, and before exiting. The wait covers the full
    /// completion of the previous kernel, so this is safe after a cuBLAS GEMM as well.
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: &[Arg],
        pdl: bool,
    ) -> Result<()> {
        self.launch_slots(name, grid, block, arg_slots(args)?, pdl)
    }

    /// [`Self::launch`] with the arguments already in their slots.
    fn launch_slots(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: graph::ArgSlots,
        pdl: bool,
    ) -> Result<()> {
        self.launch_smem(name, grid, block, args, pdl, 0)
    }

    /// [`Self::launch_slots`] with `smem` bytes of dynamic shared memory (the kernel's limit
    /// set by [`Self::allow_smem`]).
    fn launch_smem(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: graph::ArgSlots,
        pdl: bool,
        smem: u32,
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        if grid.1 > 65535 || grid.2 > 65535 {
            return Err(shape(format!("grid {grid:?} of {name} is too large")));
        }
        let func = self.function(name)?;
        self.submit(Op::Launch(LaunchOp {
            func: func.cu_function() as usize,
            grid,
            block,
            args,
            pdl,
            side: self.on_side.load(std::sync::atomic::Ordering::Relaxed),
            smem,
        }))?;
        self.profile_mark(name)?;
        *lock(&self.last) = if name.starts_with("sgmv_shrink") {
            Last::Shrink
        } else {
            Last::Other
        };
        Ok(())
    }

    /// Record `op` in the open step's trace, or issue it now outside one.
    fn submit(&self, op: Op) -> Result<()> {
        let op = lock(&self.recorder).record(op);
        match op {
            Some(op) => self.execute(&op),
            None => Ok(()),
        }
    }

    /// Issue one op on its stream (also under stream capture, which records it).
    fn execute(&self, op: &Op) -> Result<()> {
        let (main, side) = (self.stream.cu_stream(), self.side.cu_stream());
        match op {
            Op::Launch(l) => self.execute_launch(l, if l.side { side } else { main }),
            Op::Gemm(g) => self.execute_gemm(g),
            // SAFETY (the three event ops): both events and streams live as long as the backend.
            // (`WaitEvent`'s event lives as long as its adapter, past the step's end.)
            Op::Fork => unsafe {
                drv::event::record(self.fork_event, main)
                    .map_err(|e| dev_err("record event", e))?;
                drv::stream::wait_event(
                    side,
                    self.fork_event,
                    drv_sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
                .map_err(|e| dev_err("wait event", e))
            },
            Op::EndSide => unsafe { drv::event::record(self.join_event, side) }
                .map_err(|e| dev_err("record event", e)),
            // Waiting on a never-recorded event is a no-op.
            Op::Join => unsafe {
                drv::stream::wait_event(
                    main,
                    self.join_event,
                    drv_sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
            }
            .map_err(|e| dev_err("wait event", e)),
            // SAFETY: see `Op::WaitEvent`: the adapter holding the event is only replaced
            // between steps, and the step's trace is issued before it ends.
            Op::WaitEvent { event, side: on } => unsafe {
                drv::stream::wait_event(
                    if *on { side } else { main },
                    *event as drv_sys::CUevent,
                    drv_sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
            }
            .map_err(|e| dev_err("wait for an adapter's copy", e)),
        }
    }

    fn execute_launch(&self, l: &LaunchOp, stream: drv_sys::CUstream) -> Result<()> {
        let mut slots = [0u64; graph::MAX_ARGS];
        let used = l.args.as_slice();
        slots[..used.len()].copy_from_slice(used);
        let mut params: [*mut c_void; graph::MAX_ARGS] = [std::ptr::null_mut(); graph::MAX_ARGS];
        for (p, s) in params.iter_mut().zip(slots.iter_mut()) {
            *p = s as *mut u64 as *mut c_void;
        }
        // SAFETY: the attribute union is plain data; zero is a valid bit pattern for it.
        let mut attr: drv_sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id =
            drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = drv_sys::CUlaunchConfig {
            gridDimX: l.grid.0,
            gridDimY: l.grid.1,
            gridDimZ: l.grid.2,
            blockDimX: l.block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: l.smem,
            hStream: stream,
            attrs: if l.pdl {
                &mut attr
            } else {
                std::ptr::null_mut()
            },
            numAttrs: if l.pdl { 1 } else { 0 },
        };
        self.ctx
            .bind_to_thread()
            .map_err(|e| dev_err("bind context", e))?;
        // SAFETY: `params` points at one 8-byte slot per kernel parameter, in order, matching
        // the kernel's signature (each launch site passes exactly the kernel's parameters);
        // pointers in them are live device allocations checked against the shapes by the caller
        // (a recorded op is issued within the step that recorded it, or replayed only when a
        // step records the identical op). `func` is a function of a module the backend keeps.
        unsafe {
            drv_sys::cuLaunchKernelEx(
                &config,
                l.func as drv_sys::CUfunction,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(|e| dev_err(&format!("launch {}", self.kernel_name(l.func)), e))
    }

    fn execute_gemm(&self, g: &GemmOp) -> Result<()> {
        let cuda_type = |d: DType| match d {
            DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
            DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            DType::BF16 => blas_sys::cudaDataType::CUDA_R_16BF,
        };
        let (dt, out_dt) = (cuda_type(g.dtype), cuda_type(g.out_dtype));
        let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0 });
        self.ctx
            .bind_to_thread()
            .map_err(|e| dev_err("bind context", e))?;
        // Row-major out[rows, n] = x[rows, k] . w[n, k]^T is column-major
        // out^T[n, rows] = (w as [k, n] col-major)^T . (x as [k, rows] col-major).
        // SAFETY: pointers are live buffers whose lengths the caller checked; alpha/beta are
        // host f32 scalars matching CUBLAS_COMPUTE_32F.
        unsafe {
            blas_result::gemm_ex(
                self.blas,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                g.n,
                g.rows,
                g.k,
                (&alpha as *const f32).cast(),
                g.w as *const c_void,
                dt,
                g.k,
                g.x as *const c_void,
                dt,
                g.x_stride,
                (&beta as *const f32).cast(),
                g.out as *mut c_void,
                out_dt,
                g.out_stride,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            BackendError::Device(format!("cublasGemmEx {}x{}x{}: {e:?}", g.rows, g.k, g.n))
        })
    }

    /// Issue the ops recorded so far: replay the graph of an equal trace, capture a trace that
    /// repeated often enough (the recorder's plan, see `graph`), issue any other op by op.
    /// Recording goes on.
    fn flush(&self) -> Result<()> {
        let mut rec = lock(&self.recorder);
        if rec.ops.is_empty() {
            return Ok(());
        }
        let ops = rec.take_ops();
        let hash = graph::trace_hash(&ops);
        match rec.plan(hash, &ops) {
            graph::Plan::Replay(i) => {
                let launched = rec
                    .graph(i)
                    .launch()
                    .map_err(|e| dev_err("graph launch", e));
                rec.recycle(ops);
                rec.next_part();
                return launched;
            }
            graph::Plan::Record => {
                let started = std::time::Instant::now();
                match self.capture(&ops) {
                    Ok(g) => {
                        g.launch().map_err(|e| dev_err("graph launch", e))?;
                        let record_us = started.elapsed().as_micros() as u64;
                        tracing::debug!(
                            ops = ops.len(),
                            record_us,
                            cached = rec.cached() + 1,
                            "step recorded as a CUDA graph"
                        );
                        rec.insert(hash, ops, g, record_us);
                        rec.next_part();
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(
                            error = %e,
                            "capturing a step into a CUDA graph failed: steps are issued op by \
                             op from now on"
                        );
                        rec.enabled = false;
                        rec.note_issued();
                    }
                }
            }
            graph::Plan::Issue => {}
        }
        for op in &ops {
            self.execute(op)?;
        }
        rec.remember(hash, ops);
        rec.next_part();
        Ok(())
    }

    /// Capture `ops` into a graph (nothing runs), with the side stream forked into the capture
    /// by the trace's own fork and joined back by its join.
    fn capture(&self, ops: &[Op]) -> Result<cudarc::driver::CudaGraph> {
        self.stream
            .begin_capture(drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| dev_err("begin capture", e))?;
        let issued = ops.iter().try_for_each(|op| self.execute(op));
        let graph = self
            .stream
            .end_capture(drv_sys::CUgraphInstantiate_flags(0));
        // Events recorded under capture are graph edges, not events: record both again on the
        // main stream so later waits outside a step see ordinary (complete-in-order) events.
        // SAFETY: both events and the stream live as long as the backend.
        unsafe {
            drv::event::record(self.fork_event, self.stream.cu_stream())
                .map_err(|e| dev_err("record event", e))?;
            drv::event::record(self.join_event, self.stream.cu_stream())
                .map_err(|e| dev_err("record event", e))?;
        }
        issued?;
        graph
            .map_err(|e| dev_err("end capture", e))?
            .ok_or_else(|| BackendError::Device("stream capture gave no graph".into()))
    }

    /// End the open step: issue what it recorded, stop recording, allocate outside the arena
    /// again (the step's buffers stay valid until the next step starts).
    fn finish_step(&self) -> Result<()> {
        self.flush()?;
        lock(&self.recorder).end();
        lock(&self.step).open = false;
        Ok(())
    }

    /// The sampling buffer (parameters in, picks out) of at least `bytes`, kept from step to
    /// step: each use is stream-ordered after the previous one, which was read back.
    fn sample_buffer(&self, bytes: usize) -> Result<u64> {
        let mut step = lock(&self.step);
        if let Some((_, ptr, cap)) = &step.sample_mem
            && *cap >= bytes
        {
            return Ok(*ptr);
        }
        step.sample_mem = None;
        let cap = bytes.next_power_of_two().max(4096);
        let (mem, ptr) = self.alloc_bytes(cap)?;
        step.sample_mem = Some((mem, ptr, cap));
        Ok(ptr)
    }

    /// Whether steps may be replayed from CUDA graphs (`PUNICA_CUDA_GRAPHS`, [`Self::set_graphs`],
    /// or off after a failed capture).
    pub fn graphs_enabled(&self) -> bool {
        lock(&self.recorder).enabled
    }

    /// How steps ran so far (graph replays, recordings, op-by-op).
    pub fn graph_stats(&self) -> graph::GraphStats {
        lock(&self.recorder).stats
    }

    /// Turn CUDA graphs on or off for the steps that follow (the selftest compares both).
    pub fn set_graphs(&self, on: bool) -> Result<()> {
        self.finish_step()?;
        let mut rec = lock(&self.recorder);
        rec.enabled = on;
        rec.clear();
        Ok(())
    }

    /// With profiling on, mark the end of `name` on the main stream (side-stream kernels are
    /// not marked).
    fn profile_mark(&self, name: &str) -> Result<()> {
        match &self.profile {
            Some(p) if !self.on_side.load(std::sync::atomic::Ordering::Relaxed) => {
                lock(p).mark(self.stream.cu_stream(), name)
            }
            _ => Ok(()),
        }
    }

    /// rms_norm, or add_rms_norm when `residual` is not null: the register-resident kernel
    /// for bf16/f16 rows of whole 16-byte vectors (see [`plan::norm_vec_plan`]), the general
    /// loop otherwise. Shapes were checked by the caller.
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::too_many_arguments)]
    fn launch_norm(
        &self,
        residual: u64,
        x: &CudaBuf,
        x_stride: usize,
        weight: &CudaBuf,
        eps: f32,
        rows: usize,
        hidden: usize,
        out: &CudaBuf,
    ) -> Result<()> {
        let aligned = [residual, x.ptr, weight.ptr, out.ptr]
            .iter()
            .all(|p| p % 16 == 0)
            && (x_stride * x.dtype.size()).is_multiple_of(16);
        let vec = match x.dtype {
            DType::F32 => None,
            DType::F16 | DType::BF16 if aligned => plan::norm_vec_plan(hidden),
            DType::F16 | DType::BF16 => None,
        };
        let (name, block) = match vec {
            Some((vpt, threads)) => (
                kernel!("rms_norm_vec{vpt}_{}", Self::suffix(x.dtype)),
                threads,
            ),
            None => (
                kernel!("rms_norm_{}", Self::suffix(x.dtype)),
                plan::row_block(hidden),
            ),
        };
        self.launch(
            &name,
            (rows as u32, 1, 1),
            block,
            &[
                Arg::Ptr(residual),
                Arg::Ptr(x.ptr),
                i32_arg(x_stride, "x_stride")?,
                Arg::Ptr(weight.ptr),
                Arg::F32(eps),
                i32_arg(hidden, "hidden")?,
                Arg::Ptr(out.ptr),
            ],
            self.pdl,
        )
    }

    /// Back to the main stream, with everything issued on the side stream finished first
    /// (after an error left a step half-issued).
    fn rejoin(&self) -> Result<()> {
        if self.on_side.load(std::sync::atomic::Ordering::Relaxed) {
            self.end_side()?;
        }
        self.join_side()
    }

    fn mark_other(&self) {
        *lock(&self.last) = Last::Other;
    }

    fn suffix(dtype: DType) -> &'static str {
        match dtype {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    fn alloc_bytes(&self, bytes: usize) -> Result<(CudaSlice<u8>, u64)> {
        // SAFETY: uninitialised device memory is fine: every op writes before it reads, and the
        // self-test poisons outputs to catch any that does not.
        let mem = unsafe { self.stream.alloc::<u8>(bytes.max(16)) }.map_err(|e| {
            if e.0 == drv_sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
                BackendError::OutOfMemory { wanted: bytes }
            } else {
                dev_err("alloc", e)
            }
        })?;
        let ptr = mem.device_ptr(&self.stream).0;
        Ok((mem, ptr))
    }

    fn htod<T>(&self, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        // After the ops recorded so far, in stream order.
        self.flush()?;
        self.mark_other();
        // SAFETY: callers pass a destination with room for `src` (checked lengths). `src` is
        // pageable memory: the driver stages it before returning, so the caller may drop it
        // at once (CUDA's documented behaviour for async copies from pageable memory).
        unsafe { drv::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| dev_err("copy to device", e))
    }

    fn dtoh<T>(&self, dst: &mut [T], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        // A copy back to the host ends the step.
        self.finish_step()?;
        self.mark_other();
        // SAFETY: `src` holds at least `dst.len()` elements (checked by callers); synchronised
        // before `dst` is read.
        unsafe { drv::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| dev_err("copy to host", e))?;
        self.stream
            .synchronize()
            .map_err(|e| dev_err("synchronize", e))
    }

    /// Copy `buf`'s raw contents (elements `0..len`) from the host as bytes.
    pub fn upload_raw(&self, dtype: DType, bytes: &[u8]) -> Result<CudaBuf> {
        if !bytes.len().is_multiple_of(dtype.size()) {
            return Err(shape(format!(
                "{} bytes is not a whole number of {dtype:?} elements",
                bytes.len()
            )));
        }
        let buf = self.alloc(dtype, bytes.len() / dtype.size())?;
        self.htod(buf.ptr, bytes)?;
        Ok(buf)
    }

    /// Fill `buf` with `value` (NaN poisons outputs in tests).
    pub fn fill(&self, buf: &mut CudaBuf, value: f32) -> Result<()> {
        let n = buf.len;
        self.launch(
            &kernel!("fill_{}", Self::suffix(buf.dtype)),
            (plan::elementwise_grid(n, self.sm_count), 1, 1),
            256,
            &[Arg::Ptr(buf.ptr), Arg::F32(value), Arg::Usize(n)],
            false,
        )
    }

    fn fill_random_raw(
        &self,
        ptr: u64,
        dtype: DType,
        n: usize,
        seed: u32,
        scale: f32,
    ) -> Result<()> {
        self.launch(
            &kernel!("fill_random_{}", Self::suffix(dtype)),
            (plan::elementwise_grid(n, self.sm_count), 1, 1),
            256,
            &[
                Arg::Ptr(ptr),
                Arg::U32(seed),
                Arg::F32(scale),
                Arg::Usize(n),
            ],
            false,
        )
    }

    /// Build a slot table from raw device addresses (see [`RawLoraSlot`]); `dtype` is the
    /// adapters' element type.
    pub fn lora_table_raw(
        &self,
        dtype: DType,
        slots: &[Option<RawLoraSlot>],
    ) -> Result<CudaLoraTable> {
        let (bytes, sum) = encode_lora_table(slots)?;
        let (mem, ptr) = self.alloc_bytes(bytes.len())?;
        self.htod(ptr, &bytes)?;
        Ok(CudaLoraTable {
            _mem: mem,
            ptr,
            slots: slots.len(),
            dtype: Some(dtype),
            sum,
            raw: slots.to_vec(),
        })
    }

    /// The raw addresses of `slots`' buffers and the dtype they share.
    fn raw_lora_slots(
        &self,
        slots: &[Option<LoraGroupSlot<'_, Self>>],
    ) -> Result<(DType, Vec<Option<RawLoraSlot>>)> {
        let mut dtype = None;
        for g in slots.iter().flatten() {
            let parts = g.parts.iter().flatten();
            for d in std::iter::once(g.a.dtype).chain(parts.map(|p| p.b.dtype)) {
                if *dtype.get_or_insert(d) != d {
                    return Err(shape("adapters in one table must share one dtype".into()));
                }
            }
        }
        let raw = slots
            .iter()
            .map(|s| {
                s.as_ref().map(|g| RawLoraSlot {
                    a: g.a.ptr,
                    a_len: g.a.len,
                    voff: g.voff,
                    parts: std::array::from_fn(|j| {
                        g.parts[j].as_ref().map(|p| RawLoraPart {
                            b: p.b.ptr,
                            b_len: p.b.len,
                            rank: p.rank,
                        })
                    }),
                })
            })
            .collect();
        Ok((dtype.unwrap_or(self.dtype), raw))
    }

    fn workspace(&self, bytes: usize) -> Result<u64> {
        let mut ws = lock(&self.workspace);
        if let Some(w) = ws.as_ref()
            && w.bytes >= bytes
        {
            return Ok(w.ptr);
        }
        let size = bytes.next_power_of_two().max(1 << 20);
        // Recorded ops may use the old workspace: issue them before it goes.
        self.flush()?;
        self.mark_other();
        // The old workspace may be in use by either stream: let both finish before replacing
        // it (growth is rare: the first steps of a bigger batch).
        if ws.is_some() || self.on_side.load(std::sync::atomic::Ordering::Relaxed) {
            self.side
                .synchronize()
                .map_err(|e| dev_err("synchronize", e))?;
            self.stream
                .synchronize()
                .map_err(|e| dev_err("synchronize", e))?;
        }
        let mem = self
            .stream
            .alloc_zeros::<u8>(size)
            .map_err(|e| dev_err("workspace alloc", e))?;
        let ptr = mem.device_ptr(&self.stream).0;
        if self.on_side.load(std::sync::atomic::Ordering::Relaxed) {
            // The zeroing ran on the main stream; the side stream's next launch reads it.
            self.stream
                .synchronize()
                .map_err(|e| dev_err("synchronize", e))?;
        }
        *ws = Some(Workspace {
            _mem: mem,
            ptr,
            bytes: size,
        });
        Ok(ptr)
    }

    /// Pack `meta` into `words` and copy it to the device: into the step's fixed buffer for a
    /// step's first upload, into an allocation of its own otherwise.
    fn upload_packed(&self, meta: &StepMeta, words: &mut Vec<u32>) -> Result<CudaMeta> {
        let layout = plan::pack_meta(meta, words)?;
        let bytes = words.len() * 4;
        let mut step = lock(&self.step);
        let (mem, base) = if step.open && !step.meta_taken {
            // The step's metadata at a fixed address, so that repeated layouts repeat traces.
            step.meta_taken = true;
            if step.meta_mem.as_ref().is_none_or(|m| m.2 < bytes) {
                step.meta_mem = None;
                let cap = bytes.next_power_of_two().max(4096);
                let (mem, ptr) = self.alloc_bytes(cap)?;
                step.meta_mem = Some((mem, ptr, cap));
            }
            (None, step.meta_mem.as_ref().map_or(0, |m| m.1))
        } else {
            let (mem, ptr) = self.alloc_bytes(bytes)?;
            if step.open {
                // Kept until the next step: the ops that read it are issued later.
                step.overflow.push(mem);
                (None, ptr)
            } else {
                (Some(mem), ptr)
            }
        };
        drop(step);
        self.htod(base, words)?;
        self.profile_mark("step metadata")?;
        Ok(CudaMeta {
            _words: mem,
            base,
            layout,
        })
    }

    /// The sampling kernel over `n` rows with `params` packed, its picks copied into `words`
    /// (tokens, then log-probabilities).
    fn sample_rows(
        &self,
        logits: &CudaBuf,
        vocab: usize,
        n: usize,
        params: &[u8],
        words: &mut [u32],
    ) -> Result<()> {
        let ptr = self.sample_buffer(params.len() + 8 * n)?;
        self.htod(ptr, params)?;
        let out = ptr + params.len() as u64;
        self.launch(
            "sample_f32",
            (n as u32, 1, 1),
            plan::sample_block(vocab),
            &[
                Arg::Ptr(logits.ptr),
                i32_arg(vocab, "vocab")?,
                Arg::Ptr(ptr),
                Arg::Ptr(out),
                Arg::Ptr(out + 4 * n as u64),
            ],
            self.pdl,
        )?;
        self.dtoh(words, out)?;
        if let Some(p) = &self.profile {
            lock(p).finish_step()?;
        }
        Ok(())
    }

    /// The split-K workspace of a shrink: `(accumulator, counters)`, `counters` u32 counters
    /// then `acc_floats` f32 accumulators, both zero (null pointers with a single split).
    fn shrink_workspace(
        &self,
        splits: usize,
        counters: usize,
        acc_floats: usize,
    ) -> Result<(u64, u64)> {
        if splits <= 1 {
            return Ok((0, 0));
        }
        let counters_bytes = (counters * 4).div_ceil(256) * 256;
        let ws = self.workspace(counters_bytes + acc_floats * 4)?;
        Ok((ws + counters_bytes as u64, ws))
    }

    /// The arguments both shrink kernels start with.
    fn shrink_args(
        x: &CudaBuf,
        h_in: usize,
        v: &CudaBuf,
        v_stride: usize,
        table: &CudaLoraTable,
        meta: &CudaMeta,
        splits: usize,
    ) -> Result<[Arg; 8]> {
        Ok([
            Arg::Ptr(x.ptr),
            i32_arg(h_in, "h_in")?,
            Arg::Ptr(v.ptr),
            i32_arg(v_stride, "v_stride")?,
            Arg::Ptr(table.ptr),
            Arg::Ptr(meta.at(meta.layout.tiles)),
            Arg::Ptr(meta.at(meta.layout.segs)),
            i32_arg(splits, "splits")?,
        ])
    }

    /// The launch of a fused expand (`plan::fused_expand_plan` over `units`) with its kernel's
    /// v suffix, when it is `enabled`, the expand has work (`v_name`, from [`Self::check_expand`])
    /// and the row kernels serve the step; `None`: the caller runs the two ops.
    fn fused_plan(
        &self,
        enabled: bool,
        v_name: Option<&'static str>,
        table: &CudaLoraTable,
        meta: &CudaMeta,
        units: (usize, usize),
    ) -> Result<Option<(&'static str, plan::FusedExpandPlan)>> {
        let (lay, tiles) = (&meta.layout, meta.layout.tile_grid());
        let rank = table.sum.max_part_rank;
        match v_name {
            Some(v_name) if enabled && self.row_limits().expand(lay.max_seg_rows, rank, tiles) => {
                let rows = (lay.rows, lay.lora_rows);
                let p = plan::fused_expand_plan(rank, units, tiles, rows, self.sm_count)?;
                Ok(Some((v_name, p)))
            }
            _ => Ok(None),
        }
    }

    /// Validate the arguments of [`Backend::rope_write_kv`].
    #[allow(clippy::too_many_arguments)]
    fn check_rope(
        &self,
        qkv: &CudaBuf,
        row_stride: usize,
        inv_freq: &CudaBuf,
        meta: &CudaMeta,
        shape_: AttnShape,
        k_cache: &CudaBuf,
        v_cache: &CudaBuf,
    ) -> Result<()> {
        let rows = meta.layout.rows;
        let AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
        } = shape_;
        let kv_width = n_kv_heads * head_dim;
        same_dtype(qkv, k_cache, "rope_write_kv")?;
        same_dtype(qkv, v_cache, "rope_write_kv")?;
        if inv_freq.dtype != DType::F32
            || inv_freq.len < head_dim / 2
            || !head_dim.is_multiple_of(2)
        {
            return Err(shape(format!(
                "rope_write_kv: inv_freq must be f32 with head_dim/2 = {} values (got {:?} x {})",
                head_dim / 2,
                inv_freq.dtype,
                inv_freq.len
            )));
        }
        if (n_heads + 2 * n_kv_heads) * head_dim > row_stride {
            return Err(shape(format!(
                "rope_write_kv: {n_heads} q, {n_kv_heads} k and {n_kv_heads} v heads of {head_dim} exceed the row of {row_stride}"
            )));
        }
        need(qkv, rows * row_stride, "rope_write_kv qkv")?;
        if let Some(s) = meta.layout.max_kv_slot {
            let want = (s as usize + 1) * kv_width;
            need(k_cache, want, "rope_write_kv k_cache")?;
            need(v_cache, want, "rope_write_kv v_cache")?;
        }
        if n_heads + n_kv_heads > 65535 {
            return Err(shape(format!(
                "rope_write_kv: {n_heads} + {n_kv_heads} heads"
            )));
        }
        Ok(())
    }

    /// Whether [`Backend::sgmv_lora`] with these arguments runs the streamed kernel (for the
    /// selftest's report); `col_offset` and `y` as in the call, its other checks assumed.
    pub fn streams_lora(
        &self,
        x: &CudaBuf,
        table: &CudaLoraTable,
        meta: &CudaMeta,
        h_in: usize,
        outs: &[usize],
        (col_offset, y): (usize, &CudaBuf),
    ) -> Result<bool> {
        let y_stride = outs.iter().sum::<usize>() + 2 * col_offset;
        Ok(self
            .stream_plan(x, table, meta, h_in, outs, y_stride, col_offset, y)?
            .is_some())
    }

    /// Whether [`Backend::sgmv_lora`] of these arguments runs as two dense GEMMs (for the
    /// selftest's report); its other checks assumed.
    pub fn dense_lora(&self, x: &CudaBuf, table: &CudaLoraTable, meta: &CudaMeta) -> bool {
        self.dense_slot(x, table, meta).is_some()
    }

    /// The rows and slot of a launch [`Backend::sgmv_lora`] runs as two dense GEMMs: one
    /// segment, long enough and of rank high enough ([`plan::dense_lora`]), bf16.
    fn dense_slot(
        &self,
        x: &CudaBuf,
        table: &CudaLoraTable,
        meta: &CudaMeta,
    ) -> Option<(usize, usize, RawLoraSlot)> {
        if !self.lora_dense || x.dtype != DType::BF16 {
            return None;
        }
        let [start, end, slot] = meta.layout.single_seg?;
        let s = (*table.raw.get(slot as usize)?)?;
        let (start, end) = (start as usize, end as usize);
        plan::dense_lora(end - start, s.rank()).then_some((start, end, s))
    }

    /// The LoRA operator of one segment's rows `start..end` as two GEMMs: x · Aᵀ into v's
    /// memory (the intermediate as [rows, rank] of x's dtype), then each part's
    /// y += intermediate · Bᵀ. The arguments were checked as for the kernels.
    #[allow(clippy::too_many_arguments)]
    fn lora_dense(
        &self,
        x: &CudaBuf,
        (start, end, s): (usize, usize, &RawLoraSlot),
        h_in: usize,
        v: &CudaBuf,
        outs: &[usize],
        (y_stride, col_offset): (usize, usize),
        y: &CudaBuf,
    ) -> Result<()> {
        let dim = |v: usize, what: &str| cublas_dim("sgmv_lora", v, what);
        let rank = s.rank();
        let (rows, el) = (dim(end - start, "rows")?, x.dtype.size() as u64);
        // The intermediate takes rows x rank halves of v, whose f32 rows are at least rank
        // wide (the table's check): it fits.
        self.mark_other();
        self.submit(Op::Gemm(GemmOp {
            x: x.ptr + el * (start * h_in) as u64,
            w: s.a,
            out: v.ptr,
            rows,
            k: dim(h_in, "h_in")?,
            n: dim(rank, "rank")?,
            x_stride: dim(h_in, "h_in")?,
            out_stride: dim(rank, "rank")?,
            accumulate: false,
            dtype: x.dtype,
            out_dtype: x.dtype,
        }))?;
        let (mut col, mut voff) = (col_offset, 0usize);
        for (part, &n) in s.parts.iter().zip(outs) {
            if let Some(p) = part {
                self.submit(Op::Gemm(GemmOp {
                    x: v.ptr + el * voff as u64,
                    w: p.b,
                    out: y.ptr + el * (start * y_stride + col) as u64,
                    rows,
                    k: dim(p.rank, "rank")?,
                    n: dim(n, "part width")?,
                    x_stride: dim(rank, "rank")?,
                    out_stride: dim(y_stride, "y_stride")?,
                    accumulate: true,
                    dtype: x.dtype,
                    out_dtype: y.dtype,
                }))?;
                voff += p.rank;
            }
            col += n;
        }
        self.profile_mark("sgmv_lora dense")
    }

    /// The checks of [`Backend::sgmv_shrink`]; `false` when there is nothing to do.
    fn check_shrink(
        &self,
        x: &CudaBuf,
        table: &CudaLoraTable,
        meta: &CudaMeta,
        h_in: usize,
        v_stride: usize,
        v: &CudaBuf,
    ) -> Result<bool> {
        let rows = meta.layout.rows;
        if v.dtype != DType::F32 {
            return Err(shape(format!(
                "sgmv_shrink: v must be f32, got {:?}",
                v.dtype
            )));
        }
        need(x, rows * h_in, "sgmv_shrink x")?;
        need(v, rows * v_stride, "sgmv_shrink v")?;
        if !self.check_lora(x.dtype, table, meta)? {
            return Ok(false);
        }
        if !table.sum.shrinkable {
            return Err(shape(
                "sgmv_shrink: a table whose slots start past column 0 of v serves expands only"
                    .into(),
            ));
        }
        if table.sum.max_vend > v_stride {
            return Err(shape(format!(
                "sgmv_shrink: the table's intermediates end at column {}, past v's width \
                 {v_stride}",
                table.sum.max_vend
            )));
        }
        if h_in > table.sum.min_in {
            return Err(shape(format!(
                "sgmv_shrink: h_in {h_in} exceeds an adapter's A width {}",
                table.sum.min_in
            )));
        }
        Ok(true)
    }

    /// The streamed kernel of a plan: its cluster size, on tensor cores or not.
    fn stream_kernel(dtype: DType, p: &plan::StreamPlan) -> Result<plan::KernelName> {
        let mma = if p.mma { "_mma" } else { "" };
        Ok(kernel!(
            "sgmv_lora_stream{mma}_{}_c{}",
            Self::suffix(dtype),
            p.cluster
        ))
    }

    /// Blocks of `name`, launched `block` threads wide without dynamic shared memory, that the
    /// device runs at once (occupancy from the driver, cached per kernel).
    fn resident_blocks(&self, name: &plan::KernelName, block: u32) -> Result<usize> {
        if let Some(&n) = lock(&self.resident).get(name.as_str()) {
            return Ok(n);
        }
        let per_sm = self
            .function(name)?
            .occupancy_max_active_blocks_per_multiprocessor(block, 0, None)
            .map_err(|e| dev_err("occupancy of a kernel", e))? as usize;
        let n = per_sm.max(1) * self.sm_count;
        tracing::debug!(kernel = name.as_str(), per_sm, "resident blocks");
        lock(&self.resident).insert(name.to_string(), n);
        Ok(n)
    }

    /// The streamed kernel's plan for [`Backend::sgmv_lora`] and its clusters, when it serves
    /// the call: segments of one row, a table it can read (see `TableSummary::streamable`),
    /// whole 16-byte vectors everywhere, and a device it fits.
    #[allow(clippy::too_many_arguments)]
    fn stream_plan(
        &self,
        x: &CudaBuf,
        table: &CudaLoraTable,
        meta: &CudaMeta,
        h_in: usize,
        outs: &[usize],
        y_stride: usize,
        col_offset: usize,
        y: &CudaBuf,
    ) -> Result<Option<(plan::StreamPlan, usize)>> {
        let vectors = [h_in, y_stride, col_offset]
            .iter()
            .chain(outs)
            .all(|n| n.is_multiple_of(8))
            && x.ptr.is_multiple_of(16)
            && y.ptr.is_multiple_of(16);
        if !self.lora_stream || meta.layout.max_seg_rows != 1 || !table.sum.streamable || !vectors {
            return Ok(None);
        }
        let tiles = meta.layout.tile_grid();
        let row_bytes = 2 * table.sum.max_rank * h_in
            + 2 * table.sum.max_part_rank * outs.iter().sum::<usize>();
        let knobs = plan::StreamKnobs {
            all: self.lora_stream_all,
            cluster: self.stream_cluster,
            no_mma: self.stream_no_mma,
        };
        let rows = (row_bytes, table.sum.max_part_rank);
        let Some(mut p) = plan::stream_plan(tiles, h_in, outs, self.sm_count, rows, knobs) else {
            return Ok(None);
        };
        let mut fit = self.stream_fit(x.dtype, &p)?;
        // Clusters of three fit a GPC's SMs less well than pairs: where fewer fit at once than
        // there are rows, pairs take the rows (a second round of clusters would cost more).
        if p.cluster == 3 && fit < tiles && knobs.cluster.is_none() {
            let pairs = plan::StreamKnobs {
                cluster: Some(2),
                ..knobs
            };
            let Some(q) = plan::stream_plan(tiles, h_in, outs, self.sm_count, rows, pairs) else {
                return Ok(None);
            };
            p = q;
            fit = self.stream_fit(x.dtype, &p)?;
        }
        Ok((fit > 0).then_some((p, fit.min(tiles))))
    }

    /// Clusters of the streamed kernel of plan `p` that the device runs at once (cached).
    fn stream_fit(&self, dtype: DType, p: &plan::StreamPlan) -> Result<usize> {
        let key = (dtype, p.cluster, p.smem, p.mma);
        let fit = lock(&self.stream_clusters).get(&key).copied();
        Ok(match fit {
            Some(n) => n,
            None => {
                // Clusters of blocks this large that the device runs at once (a cluster
                // needs its blocks' SMs free in one GPC).
                let f = self.function(&Self::stream_kernel(dtype, p)?)?;
                let attr =
                    drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                f.set_attribute(attr, plan::STREAM_MAX_SMEM as i32)
                    .map_err(|e| dev_err("allow the streamed kernel's shared memory", e))?;
                let config = cudarc::driver::LaunchConfig {
                    grid_dim: ((p.cluster * self.sm_count) as u32, 1, 1),
                    block_dim: (((plan::STREAM_CONSUMERS + 1) * 32) as u32, 1, 1),
                    shared_mem_bytes: p.smem as u32,
                };
                let n = f
                    .occupancy_max_active_clusters(config, &self.stream)
                    .map_err(|e| dev_err("clusters of the streamed kernel", e))?
                    as usize;
                tracing::debug!(
                    cluster = p.cluster,
                    smem = p.smem,
                    clusters = n,
                    "streamed LoRA kernel fits"
                );
                lock(&self.stream_clusters).insert(key, n);
                n
            }
        })
    }

    /// Validate an expand's arguments ([`Backend::sgmv_expand`]): the kernel name's suffix for
    /// v's dtype, or `None` when no segment has an adapter of the table.
    #[allow(clippy::too_many_arguments)]
    fn check_expand(
        &self,
        v: &CudaBuf,
        table: &CudaLoraTable,
        meta: &CudaMeta,
        v_stride: usize,
        outs: &[usize],
        y_stride: usize,
        col_offset: usize,
        y: &CudaBuf,
    ) -> Result<Option<&'static str>> {
        let rows = meta.layout.rows;
        // f32 from a shrink, or y's dtype from the base GEMM's extra columns.
        let v_name = if v.dtype == DType::F32 {
            ""
        } else if v.dtype == y.dtype {
            "_vh"
        } else {
            return Err(shape(format!(
                "sgmv_expand: v must be f32 or {:?} like y, got {:?}",
                y.dtype, v.dtype
            )));
        };
        let h_out: usize = outs.iter().sum();
        if outs.is_empty() || outs.len() > MAX_GROUP_PARTS {
            return Err(shape(format!(
                "sgmv_expand: a group has 1..={MAX_GROUP_PARTS} parts, got {}",
                outs.len()
            )));
        }
        need(v, rows * v_stride, "sgmv_expand v")?;
        need(y, rows * y_stride, "sgmv_expand y")?;
        if col_offset + h_out > y_stride {
            return Err(shape(format!(
                "sgmv_expand: columns {col_offset}+{h_out} exceed the row of {y_stride}"
            )));
        }
        if !self.check_lora(y.dtype, table, meta)? {
            return Ok(None);
        }
        if table.sum.max_vend > v_stride {
            return Err(shape(format!(
                "sgmv_expand: the table's intermediates end at column {}, past v's width \
                 {v_stride}",
                table.sum.max_vend
            )));
        }
        for (j, &min_out) in table.sum.min_out.iter().enumerate() {
            match outs.get(j) {
                Some(&out) if out > min_out => {
                    return Err(shape(format!(
                        "sgmv_expand: part {j} of {out} columns exceeds an adapter's B height \
                         {min_out}"
                    )));
                }
                None if min_out != usize::MAX => {
                    return Err(shape(format!(
                        "sgmv_expand: an adapter has part {j}, the group has {}",
                        outs.len()
                    )));
                }
                _ => {}
            }
        }
        Ok(Some(v_name))
    }

    fn check_lora(&self, x_dtype: DType, table: &CudaLoraTable, meta: &CudaMeta) -> Result<bool> {
        if meta.layout.num_tiles == 0 || table.sum.max_rank == 0 {
            return Ok(false);
        }
        if table.dtype != Some(x_dtype) || x_dtype == DType::F32 {
            return Err(shape(format!(
                "SGMV on {x_dtype:?} activations with {:?} adapters (bf16 or f16 only)",
                table.dtype
            )));
        }
        if let Some(s) = meta.layout.max_slot
            && s as usize >= table.slots
        {
            return Err(shape(format!(
                "segment uses adapter slot {s} but the table has {} slots",
                table.slots
            )));
        }
        Ok(true)
    }
}

/// Every kernel the backend can launch (for warm-up and the embedding test).
pub fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for t in ["bf16", "f16"] {
        for nt in [1, 2, 4, 8, 16] {
            names.push(format!("sgmv_shrink_{t}_n{nt}"));
        }
        for v in ["", "_vh"] {
            for kt in [1, 2, 4] {
                for w in [4, 8] {
                    names.push(format!("sgmv_expand_{t}{v}_k{kt}_w{w}"));
                }
                names.push(format!("sgmv_expand_long_{t}{v}_k{kt}"));
            }
            for l in [1, 2, 4, 8, 16] {
                names.push(format!("sgmv_expand_rows_{t}{v}_l{l}"));
                names.push(format!("sgmv_expand_rows_gs_{t}{v}_l{l}"));
                names.push(format!("sgmv_expand_silu_rows_{t}{v}_l{l}"));
                names.push(format!("sgmv_expand_rope_rows_{t}{v}_l{l}"));
            }
        }
        names.push(format!("sgmv_shrink_rows_{t}"));
        for c in plan::STREAM_CLUSTERS {
            names.push(format!("sgmv_lora_stream_{t}_c{c}"));
            names.push(format!("sgmv_lora_stream_mma_{t}_c{c}"));
        }
    }
    for t in ["bf16", "f16"] {
        for vpt in 1..=plan::NORM_VEC_MAX_HIDDEN / (8 * plan::NORM_VEC_THREADS) {
            names.push(format!("rms_norm_vec{vpt}_{t}"));
        }
        for hd in plan::ATTN_VEC_HEAD_DIMS {
            names.extend(plan::attention_vec_kernel(hd, t).map(|n| n.to_string()));
        }
    }
    names.push("sample_f32".to_string());
    for t in ["f32", "f16", "bf16"] {
        for op in [
            "embedding",
            "rms_norm",
            "add_assign",
            "rope_write_kv",
            "attention",
            "silu_mul",
            "gather_rows",
            "fill",
            "fill_random",
        ] {
            names.push(format!("{op}_{t}"));
        }
    }
    names
}

fn need(buf: &CudaBuf, len: usize, what: &str) -> Result<()> {
    if buf.len < len {
        return Err(shape(format!(
            "{what}: buffer of {} elements, need {len}",
            buf.len
        )));
    }
    Ok(())
}

fn same_dtype(a: &CudaBuf, b: &CudaBuf, what: &str) -> Result<()> {
    if a.dtype != b.dtype {
        return Err(shape(format!(
            "{what}: {:?} and {:?} buffers",
            a.dtype, b.dtype
        )));
    }
    Ok(())
}

fn to_bytes(dtype: DType, data: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => data
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        DType::F16 => data
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
    }
}

fn from_bytes(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Meta = CudaMeta;
    type LoraTable = CudaLoraTable;
    type Staged = CudaStaged;

    fn kind(&self) -> DeviceKind {
        DeviceKind::Cuda
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn alloc(&self, dtype: DType, len: usize) -> Result<CudaBuf> {
        let mut step = lock(&self.step);
        if step.open {
            // A step temporary: the arena gives the same addresses to the same step layout.
            let bytes = len * dtype.size();
            let ptr = match step.arena.take(bytes) {
                Some(ptr) => ptr,
                None => {
                    let (mem, ptr) = self.alloc_bytes(bytes)?;
                    step.overflow.push(mem);
                    ptr
                }
            };
            return Ok(CudaBuf {
                _mem: Memory::Arena,
                ptr,
                dtype,
                len,
            });
        }
        drop(step);
        let (mem, ptr) = self.alloc_bytes(len * dtype.size())?;
        Ok(CudaBuf {
            _mem: Memory::Own(mem),
            ptr,
            dtype,
            len,
        })
    }

    fn stage(&self, dtype: DType, tensors: &[&[HostTensor<'_>]]) -> Result<CudaStaged> {
        let mut layout = Vec::with_capacity(tensors.len());
        let mut bytes = 0usize;
        for t in tensors {
            let len: usize = t.iter().map(|p| p.len()).sum();
            layout.push((bytes, len));
            // 16-byte aligned starts: the SGMV kernels load A and B rows in 16-byte vectors.
            bytes += (len * dtype.size()).next_multiple_of(16);
        }
        let bytes = bytes.max(16);
        let started = std::time::Instant::now();
        let (mut host, reused) = match self.pinned.take(bytes)? {
            Some(host) => (host, true),
            None => (HostMem::Own(self.alloc_pinned(bytes)?), false),
        };
        let pinned_at = started.elapsed();
        let out = &mut host.bytes_mut()?[..bytes];
        // Each piece's bytes of the buffer, then the conversions on several threads.
        let mut jobs = Vec::with_capacity(tensors.len());
        let mut rest: &mut [u8] = out;
        let mut at = 0;
        for (t, &(off, len)) in tensors.iter().zip(&layout) {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(off - at);
            let (mut dst, tail) = tail.split_at_mut(len * dtype.size());
            for piece in t.iter() {
                let (d, more) = std::mem::take(&mut dst).split_at_mut(piece.len() * dtype.size());
                jobs.push((piece, d));
                dst = more;
            }
            rest = tail;
            at = off + len * dtype.size();
        }
        par_map(jobs, |(t, _)| t.len(), |(t, dst)| t.write(dtype, dst));
        tracing::debug!(
            mib = bytes >> 20,
            reused,
            pin_ms = pinned_at.as_secs_f64() * 1e3,
            convert_ms = (started.elapsed() - pinned_at).as_secs_f64() * 1e3,
            "adapter staged in page-locked memory"
        );
        Ok(CudaStaged {
            host: Some(host),
            used: bytes,
            copied: Mutex::new(None),
            pool: Arc::clone(&self.pinned),
            dtype,
            tensors: layout,
        })
    }

    fn upload_staged(&self, staged: &Arc<CudaStaged>, parts: &[usize]) -> Result<Vec<CudaBuf>> {
        let host = staged
            .host
            .as_ref()
            .ok_or_else(|| BackendError::Device("a staged adapter without its buffer".into()))?;
        let src = &host.bytes()?[..staged.used];
        let starts: Vec<usize> = staged.tensors.iter().map(|&(off, _)| off).collect();
        let parts = copy_parts(&starts, parts, src.len())?;
        let (mem, base) = self.alloc_bytes(src.len())?;
        self.flush()?;
        self.mark_other();
        let no_timing = Some(drv_sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        let event = |stream: &CudaStream| {
            stream
                .record_event(no_timing)
                .map_err(|e| dev_err("record event", e))
        };
        // The allocation is ordered on the main stream: the copy starts once the main stream
        // got there (the step in flight, if any, is done), then runs beside the next steps.
        // One copy and one event per part: a step that uses the adapter before its copy is
        // complete waits, part by part, for the parts it reads (`Backend::wait_upload`).
        self.copy
            .wait(&event(&self.stream)?)
            .map_err(|e| dev_err("order the copy after the allocation", e))?;
        type Event = cudarc::driver::CudaEvent;
        let issue = || -> Result<(Vec<Event>, Event)> {
            let mut events = Vec::with_capacity(parts.len());
            for (bytes, _) in &parts {
                let part = src.get(bytes.clone()).ok_or_else(|| {
                    shape(format!("copy part {bytes:?} of {} staged bytes", src.len()))
                })?;
                // SAFETY: the destination range lies in the allocation of `src.len()` bytes;
                // `src` is page-locked, so the copy is asynchronous: the staging buffer is reused
                // only after `copied` completed, and the device memory is freed only after
                // `done` (see `Uploaded`), or after the copy stream on an error below.
                unsafe {
                    drv::memcpy_htod_async(base + bytes.start as u64, part, self.copy.cu_stream())
                }
                .map_err(|e| dev_err("copy to device", e))?;
                events.push(event(&self.copy)?);
            }
            *lock(&staged.copied) = Some(event(&self.copy)?);
            let done = match events.pop() {
                Some(last) => last,
                None => event(&self.copy)?,
            };
            Ok((events, done))
        };
        let (events, done) = match issue() {
            Ok(issued) => issued,
            Err(e) => {
                // Parts copied before the error may still run: the allocation is freed (on the
                // main stream, when `mem` drops) only after them.
                let ordered = event(&self.copy).and_then(|ev| {
                    self.stream
                        .wait(&ev)
                        .map_err(|e| dev_err("order the free after the copies", e))
                });
                if ordered.is_err() {
                    let _ = self.copy.synchronize();
                }
                return Err(e);
            }
        };
        let mem = Arc::new(Uploaded {
            parts: events,
            done,
            main: Arc::clone(&self.stream),
            _mem: mem,
        });
        let mut bufs = Vec::with_capacity(staged.tensors.len());
        for (part, (_, tensors)) in parts.into_iter().enumerate() {
            let tensors = staged.tensors.get(tensors).unwrap_or_default();
            bufs.extend(tensors.iter().map(|&(off, len)| CudaBuf {
                _mem: Memory::Shared {
                    up: Arc::clone(&mem),
                    _staged: Arc::clone(staged),
                    part,
                },
                ptr: base + off as u64,
                dtype: staged.dtype,
                len,
            }));
        }
        Ok(bufs)
    }

    fn upload(&self, dtype: DType, data: &[f32]) -> Result<CudaBuf> {
        self.upload_raw(dtype, &to_bytes(dtype, data))
    }

    fn download(&self, buf: &CudaBuf) -> Result<Vec<f32>> {
        let mut bytes = vec![0u8; buf.len * buf.dtype.size()];
        self.dtoh(&mut bytes, buf.ptr)?;
        Ok(from_bytes(buf.dtype, &bytes))
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len
    }

    fn upload_meta(&self, meta: &StepMeta) -> Result<CudaMeta> {
        meta.validate()?;
        self.rejoin()?;
        // The packing buffer is reused from step to step.
        let mut words = std::mem::take(&mut lock(&self.step).meta_words);
        let out = self.upload_packed(meta, &mut words);
        lock(&self.step).meta_words = words;
        out
    }

    fn lora_table(&self, slots: &[Option<LoraGroupSlot<'_, Self>>]) -> Result<CudaLoraTable> {
        let (dtype, raw) = self.raw_lora_slots(slots)?;
        self.lora_table_raw(dtype, &raw)
    }

    fn update_lora_table(
        &self,
        table: &mut CudaLoraTable,
        slots: &[Option<LoraGroupSlot<'_, Self>>],
    ) -> Result<()> {
        let (dtype, raw) = self.raw_lora_slots(slots)?;
        if raw.len() != table.slots {
            *table = self.lora_table_raw(dtype, &raw)?;
            return Ok(());
        }
        let (bytes, sum) = encode_lora_table(&raw)?;
        // On the main stream: after the steps issued before, which may still read the old
        // entries (their side-stream work is joined into it), and before the next ones.
        self.htod(table.ptr, &bytes)?;
        table.dtype = Some(dtype);
        table.sum = sum;
        table.raw = raw;
        Ok(())
    }

    fn embedding(
        &self,
        table: &CudaBuf,
        meta: &CudaMeta,
        hidden: usize,
        out: &mut CudaBuf,
    ) -> Result<()> {
        let rows = meta.layout.rows;
        same_dtype(table, out, "embedding")?;
        need(out, rows * hidden, "embedding out")?;
        if hidden == 0 || !table.len.is_multiple_of(hidden) {
            return Err(shape(format!(
                "embedding table of {} is not [vocab, {hidden}]",
                table.len
            )));
        }
        let vocab = table.len / hidden;
        self.launch(
            &kernel!("embedding_{}", Self::suffix(table.dtype)),
            (rows as u32, 1, 1),
            plan::row_block(hidden),
            &[
                Arg::Ptr(table.ptr),
                Arg::Ptr(meta.at(meta.layout.token_ids)),
                i32_arg(vocab, "vocab")?,
                i32_arg(hidden, "hidden")?,
                Arg::Ptr(out.ptr),
            ],
            self.pdl,
        )
    }

    fn rms_norm(
        &self,
        x: &CudaBuf,
        weight: &CudaBuf,
        eps: f32,
        rows: usize,
        hidden: usize,
        out: &mut CudaBuf,
    ) -> Result<()> {
        same_dtype(x, out, "rms_norm")?;
        same_dtype(x, weight, "rms_norm weight")?;
        need(x, rows * hidden, "rms_norm x")?;
        need(out, rows * hidden, "rms_norm out")?;
        need(weight, hidden, "rms_norm weight")?;
        self.launch_norm(0, x, hidden, weight, eps, rows, hidden, out)
    }

    fn add_rms_norm(
        &self,
        residual: &mut CudaBuf,
        x: &CudaBuf,
        x_stride: usize,
        weight: &CudaBuf,
        eps: f32,
        rows: usize,
        hidden: usize,
        out: &mut CudaBuf,
    ) -> Result<()> {
        same_dtype(x, out, "add_rms_norm")?;
        same_dtype(x, residual, "add_rms_norm residual")?;
        same_dtype(x, weight, "add_rms_norm weight")?;
        if x_stride < hidden {
            return Err(shape(format!(
                "add_rms_norm: rows of {x_stride} hold no {hidden} columns"
            )));
        }
        need(x, rows * x_stride, "add_rms_norm x")?;
        need(residual, rows * hidden, "add_rms_norm residual")?;
        need(out, rows * hidden, "add_rms_norm out")?;
        need(weight, hidden, "add_rms_norm weight")?;
        self.launch_norm(residual.ptr, x, x_stride, weight, eps, rows, hidden, out)
    }

    fn matmul(
        &self,
        x: &CudaBuf,
        w: &CudaBuf,
        rows: usize,
        k: usize,
        n: usize,
        out: &mut CudaBuf,
    ) -> Result<()> {
        same_dtype(x, w, "matmul")?;
        if out.dtype != DType::F32 {
            same_dtype(x, out, "matmul out")?;
        }
        need(x, rows * k, "matmul x")?;
        need(w, n * k, "matmul w")?;
        need(out, rows * n, "matmul out")?;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let dim = |v: usize, what: &str| cublas_dim("matmul", v, what);
        let op = GemmOp {
            x: x.ptr,
            w: w.ptr,
            out: out.ptr,
            rows: dim(rows, "rows")?,
            k: dim(k, "k")?,
            n: dim(n, "n")?,
            x_stride: dim(k, "k")?,
            out_stride: dim(n, "n")?,
            accumulate: false,
            dtype: x.dtype,
            out_dtype: out.dtype,
        };
        self.mark_other();
        self.submit(Op::Gemm(op))?;
        self.profile_mark(&format!("gemm n={n} k={k}"))
    }

    fn alias(&self, buf: &CudaBuf) -> CudaBuf {
        // Owns nothing: `buf` keeps the memory alive for the alias's lifetime (the contract).
        CudaBuf {
            _mem: Memory::Arena,
            ptr: buf.ptr,
            dtype: buf.dtype,
            len: buf.len,
        }
    }

    fn copy_into(&self, dst: &mut CudaBuf, offset: usize, src: &CudaBuf) -> Result<()> {
        same_dtype(dst, src, "copy_into")?;
        if offset.checked_add(src.len).is_none_or(|end| end > dst.len) {
            return Err(shape(format!(
                "copy_into: {} elements at {offset} of a buffer of {}",
                src.len, dst.len
            )));
        }
        if src.len == 0 {
            return Ok(());
        }
        // In stream order after the ops recorded so far.
        self.flush()?;
        self.mark_other();
        // SAFETY: both ranges lie inside live allocations (checked above).
        unsafe {
            drv::memcpy_dtod_async(
                dst.ptr_at(offset),
                src.ptr,
                src.len * src.dtype.size(),
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| dev_err("copy on the device", e))
    }

    fn add_assign(&self, y: &mut CudaBuf, x: &CudaBuf) -> Result<()> {
        same_dtype(y, x, "add_assign")?;
        if y.len != x.len {
            return Err(shape(format!(
                "add_assign: {} += {} elements",
                y.len, x.len
            )));
        }
        self.launch(
            &kernel!("add_assign_{}", Self::suffix(y.dtype)),
            (plan::elementwise_grid(y.len, self.sm_count), 1, 1),
            256,
            &[Arg::Ptr(y.ptr), Arg::Ptr(x.ptr), Arg::Usize(y.len)],
            self.pdl,
        )
    }

    fn rope_write_kv(
        &self,
        qkv: &mut CudaBuf,
        row_stride: usize,
        inv_freq: &CudaBuf,
        meta: &CudaMeta,
        shape_: AttnShape,
        k_cache: &mut CudaBuf,
        v_cache: &mut CudaBuf,
    ) -> Result<()> {
        self.check_rope(qkv, row_stride, inv_freq, meta, shape_, k_cache, v_cache)?;
        let rows = meta.layout.rows;
        let AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
        } = shape_;
        self.launch(
            &kernel!("rope_write_kv_{}", Self::suffix(qkv.dtype)),
            (rows as u32, (n_heads + n_kv_heads) as u32, 1),
            (head_dim / 2).clamp(32, 256) as u32,
            &[
                Arg::Ptr(qkv.ptr),
                i32_arg(row_stride, "row_stride")?,
                Arg::Ptr(inv_freq.ptr),
                Arg::Ptr(meta.at(meta.layout.positions)),
                Arg::Ptr(meta.at(meta.layout.slot_mapping)),
                i32_arg(n_heads, "n_heads")?,
                i32_arg(n_kv_heads, "n_kv_heads")?,
                i32_arg(head_dim, "head_dim")?,
                Arg::Ptr(k_cache.ptr),
                Arg::Ptr(v_cache.ptr),
            ],
            self.pdl,
        )
    }

    fn attention(
        &self,
        q: &CudaBuf,
        row_stride: usize,
        q_offset: usize,
        k_cache: &CudaBuf,
        v_cache: &CudaBuf,
        meta: &CudaMeta,
        shape_: AttnShape,
        scale: f32,
        out: &mut CudaBuf,
    ) -> Result<()> {
        let rows = meta.layout.rows;
        let AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
        } = shape_;
        same_dtype(q, out, "attention")?;
        same_dtype(q, k_cache, "attention")?;
        same_dtype(q, v_cache, "attention")?;
        if head_dim == 0
            || head_dim > plan::MAX_HEAD_DIM
            || n_kv_heads == 0
            || n_heads % n_kv_heads != 0
        {
            return Err(shape(format!(
                "attention: {n_heads} heads over {n_kv_heads} KV heads of dim {head_dim} (max {})",
                plan::MAX_HEAD_DIM
            )));
        }
        if q_offset + n_heads * head_dim > row_stride {
            return Err(shape(format!(
                "attention: q columns {q_offset}+{n_heads}x{head_dim} exceed the row of {row_stride}"
            )));
        }
        if rows > 0 && meta.layout.num_seqs == 0 {
            return Err(shape("attention: step metadata has no sequences".into()));
        }
        need(q, rows * row_stride, "attention q")?;
        need(out, rows * n_heads * head_dim, "attention out")?;
        if let Some(b) = meta.layout.max_block {
            let want =
                (b as usize + 1) * crate::engine::backend::BLOCK_SIZE * n_kv_heads * head_dim;
            need(k_cache, want, "attention k_cache")?;
            need(v_cache, want, "attention v_cache")?;
        }
        if n_heads > 65535 {
            return Err(shape(format!("attention: {n_heads} heads")));
        }
        let head = [
            Arg::Ptr(q.ptr),
            i32_arg(row_stride, "row_stride")?,
            i32_arg(q_offset, "q_offset")?,
            Arg::Ptr(k_cache.ptr),
            Arg::Ptr(v_cache.ptr),
            Arg::Ptr(meta.at(meta.layout.row_seq)),
            Arg::Ptr(meta.at(meta.layout.seqs)),
            Arg::Ptr(meta.at(meta.layout.block_tables)),
            i32_arg(n_heads, "n_heads")?,
            i32_arg(n_kv_heads, "n_kv_heads")?,
        ];
        // The vector kernel reads each lane's share of a K/V row in one aligned load.
        let vec = plan::attention_vec_kernel(head_dim, Self::suffix(q.dtype))
            .filter(|_| k_cache.ptr.is_multiple_of(16) && v_cache.ptr.is_multiple_of(16));
        // The generic kernel takes the head dimension as an argument.
        let (name, dim) = match vec {
            Some(name) => (name, None),
            None => (
                kernel!("attention_{}", Self::suffix(q.dtype)),
                Some(i32_arg(head_dim, "head_dim")?),
            ),
        };
        let tail = [Arg::F32(scale), Arg::Ptr(out.ptr)];
        self.launch_slots(
            &name,
            (rows as u32, n_heads as u32, 1),
            128,
            arg_slots(head.iter().chain(&dim).chain(&tail))?,
            self.pdl,
        )
    }

    fn silu_mul(
        &self,
        gate_up: &CudaBuf,
        stride: usize,
        rows: usize,
        n: usize,
        out: &mut CudaBuf,
    ) -> Result<()> {
        same_dtype(gate_up, out, "silu_mul")?;
        if stride < 2 * n {
            return Err(shape(format!(
                "silu_mul: rows of {stride} hold no gate and up of {n}"
            )));
        }
        need(gate_up, rows * stride, "silu_mul gate_up")?;
        need(out, rows * n, "silu_mul out")?;
        let total = rows * n;
        if total == 0 {
            return Ok(());
        }
        self.launch(
            &kernel!("silu_mul_{}", Self::suffix(out.dtype)),
            (plan::elementwise_grid(total, self.sm_count), 1, 1),
            256,
            &[
                Arg::Ptr(gate_up.ptr),
                i32_arg(stride, "stride")?,
                i32_arg(n, "n")?,
                Arg::Usize(total),
                Arg::Ptr(out.ptr),
            ],
            self.pdl,
        )
    }

    fn sgmv_shrink(
        &self,
        x: &CudaBuf,
        table: &CudaLoraTable,
        meta: &CudaMeta,
        h_in: usize,
        v_stride: usize,
        v: &mut CudaBuf,
    ) -> Result<()> {
        if !self.check_shrink(x, table, meta, h_in, v_stride, v)? {
            return Ok(());
        }
        // Launched over the padded tile count (see `MetaLayout::tile_grid`).
        let tiles = meta.layout.tile_grid();
        if self
            .row_limits()
            .shrink(meta.layout.max_seg_rows, table.sum.max_rank)
        {
            let (splits, rank_blocks) = plan::shrink_rows_plan(
                h_in,
                table.sum.max_rank,
                tiles,
                self.shrink_rows_vecs,
                self.sm_count * plan::SHRINK_ROWS_BLOCKS_PER_SM,
            );
            let (acc, counters) =
                self.shrink_workspace(splits, tiles, tiles * plan::TILE_ROWS * table.sum.max_rank)?;
            let args = Self::shrink_args(x, h_in, v, v_stride, table, meta, splits)?;
            let tail = [
                i32_arg(table.sum.max_rank, "acc_rank")?,
                Arg::Ptr(acc),
                Arg::Ptr(counters),
            ];
            return self.launch_slots(
                &kernel!("sgmv_shrink_rows_{}", Self::suffix(x.dtype)),
                (splits as u32, rank_blocks as u32, tiles as u32),
                (plan::ROWS_WARPS * 32) as u32,
                arg_slots(args.iter().chain(&tail))?,
                self.pdl,
            );
        }
        // Tiles holding many rows pay a round of reductions per row and rank for every split:
        // they split only as far as one wave of blocks allows.
        let full = meta.layout.rows >= 2 * tiles;
        let target = self.sm_count * self.shrink_blocks_per_sm;
        // Ranks beyond one block's register tiles always go to more blocks (rank groups).
        let all = plan::shrink_rank_tiles(table.sum.max_rank)?;
        let (nt0, g0) = (
            all.min(plan::SHRINK_MAX_TILES),
            all.div_ceil(plan::SHRINK_MAX_TILES),
        );
        let (nt, g1) = if self.shrink_rank_split {
            plan::shrink_rank_split(tiles * g0, h_in, target, nt0)
        } else {
            (nt0, 1)
        };
        let groups = g0 * g1;
        let name = kernel!("sgmv_shrink_{}_n{nt}", Self::suffix(x.dtype));
        let block = (plan::SHRINK_WARPS * 32) as u32;
        let splits = if full {
            let resident = self.resident_blocks(&name, block)?;
            plan::shrink_splits_full(
                tiles * groups,
                h_in,
                resident,
                self.sm_count,
                self.shrink_max_splits_full,
            )
        } else {
            plan::shrink_splits(tiles * groups, h_in, target, 64)
        };
        let (acc, counters) = self.shrink_workspace(
            splits,
            tiles * groups,
            tiles * groups * plan::TILE_ROWS * nt * 8,
        )?;
        let args = Self::shrink_args(x, h_in, v, v_stride, table, meta, splits)?;
        self.launch_slots(
            &name,
            (tiles as u32, splits as u32, groups as u32),
            block,
            arg_slots(args.iter().chain(&[Arg::Ptr(acc), Arg::Ptr(counters)]))?,
            self.pdl,
        )
    }

    fn sgmv_expand(
        &self,
        v: &CudaBuf,
        table: &CudaLoraTable,
        meta: &CudaMeta,
        v_stride: usize,
        outs: &[usize],
        y_stride: usize,
        col_offset: usize,
        y: &mut CudaBuf,
    ) -> Result<()> {
        let Some(v_name) =
            self.check_expand(v, table, meta, v_stride, outs, y_stride, col_offset, y)?
        else {
            return Ok(());
        };
        if self.row_limits().expand(
            meta.layout.max_seg_rows,
            table.sum.max_part_rank,
            meta.layout.tile_grid(),
        ) {
            let h_out: usize = outs.iter().sum();
            let tiles = meta.layout.tile_grid();
            let rp = plan::expand_rows_plan(table.sum.max_part_rank, h_out, tiles, self.sm_count)?;
            let (gx, gy) = rp.grid(tiles);
            let ends = plan::group_ends(outs);
            // The row kernels read only the tiles, the table and B (host copies) before their
            // wait, and y after it, so they may overlap any kernel: in a decode step whose
            // adapters sit in the arena that is the GEMM that wrote v and y.
            let overlap = self.pdl;
            let args = [
                Arg::Ptr(v.ptr),
                i32_arg(v_stride, "v_stride")?,
                Arg::Ptr(y.ptr),
                i32_arg(y_stride, "y_stride")?,
                i32_arg(col_offset, "col_offset")?,
                i32_arg(ends[0], "end0")?,
                i32_arg(ends[1], "end1")?,
                i32_arg(ends[2], "end2")?,
                Arg::Ptr(table.ptr),
                Arg::Ptr(meta.at(meta.layout.tiles)),
                Arg::Ptr(meta.at(meta.layout.segs)),
                // The grid-stride kernel's two more: tiles and column blocks.
                i32_arg(tiles, "tiles")?,
                i32_arg(rp.col_blocks, "col_blocks")?,
            ];
            let (gs, args) = match rp.per_tile {
                Some(_) => ("_gs", &args[..]),
                None => ("", &args[..args.len() - 2]),
            };
            return self.launch(
                &kernel!(
                    "sgmv_expand_rows{gs}_{}{v_name}_l{}",
                    Self::suffix(y.dtype),
                    rp.lanes
                ),
                (gx, gy, 1),
                (plan::EXPAND_ROWS_WARPS * 32) as u32,
                args,
                overlap,
            );
        }
        let kt = plan::expand_rank_chunks(table.sum.max_part_rank)?;
        let tiles = meta.layout.tile_grid();
        let long = self.expand_long && plan::expand_long(meta.layout.rows, meta.layout.num_tiles);
        let (ntw, name) = if long {
            (
                plan::EXPAND_LONG_COLS / 8,
                kernel!("sgmv_expand_long_{}{v_name}_k{kt}", Self::suffix(y.dtype)),
            )
        } else {
            let ntw = self.expand_ntw;
            (
                ntw,
                kernel!("sgmv_expand_{}{v_name}_k{kt}_w{ntw}", Self::suffix(y.dtype)),
            )
        };
        for launch in plan::expand_launches(outs, ntw).iter() {
            let (gx, gy) = if long {
                plan::expand_long_grid(launch.width(), tiles)
            } else {
                plan::expand_grid(launch.width(), tiles, ntw)
            };
            // Always overlapping the kernel before; the old y is loaded before the wait only
            // after a shrink (which does not write it), after the wait otherwise (the GEMM of
            // an arena step wrote y, or an earlier launch of this expand other columns).
            let y_early = *lock(&self.last) == Last::Shrink;
            let args = [
                Arg::Ptr(v.ptr),
                i32_arg(v_stride, "v_stride")?,
                Arg::Ptr(y.ptr),
                i32_arg(y_stride, "y_stride")?,
                i32_arg(col_offset + launch.col, "col_offset")?,
                i32_arg(launch.part0, "part0")?,
                i32_arg(launch.ends[0], "end0")?,
                i32_arg(launch.ends[1], "end1")?,
                i32_arg(launch.ends[2], "end2")?,
                Arg::Ptr(table.ptr),
                Arg::Ptr(meta.at(meta.layout.tiles)),
                Arg::Ptr(meta.at(meta.layout.segs)),
                Arg::I32(i32::from(y_early)),
                // The long expand's tile count (the tile expand's is its grid).
                i32_arg(tiles, "tiles")?,
            ];
            let args = if long {
                &args[..]
            } else {
                &args[..args.len() - 1]
            };
            self.launch(
                &name,
                (gx, gy, 1),
                (plan::EXPAND_WARPS * 32) as u32,
                args,
                self.pdl,
            )?;
        }
        Ok(())
    }

    fn sgmv_lora(
        &self,
        x: &CudaBuf,
        table: &CudaLoraTable,
        meta: &CudaMeta,
        h_in: usize,
        (v, v_stride): (&mut CudaBuf, usize),
        outs: &[usize],
        y_stride: usize,
        col_offset: usize,
        y: &mut CudaBuf,
    ) -> Result<()> {
        if !self.check_shrink(x, table, meta, h_in, v_stride, v)?
            || self
                .check_expand(v, table, meta, v_stride, outs, y_stride, col_offset, y)?
                .is_none()
        {
            return Ok(());
        }
        if let Some((start, end, s)) = self.dense_slot(x, table, meta) {
            let rows = (start, end, &s);
            return self.lora_dense(x, rows, h_in, v, outs, (y_stride, col_offset), y);
        }
        let Some((p, clusters)) =
            self.stream_plan(x, table, meta, h_in, outs, y_stride, col_offset, y)?
        else {
            self.sgmv_shrink(x, table, meta, h_in, v_stride, v)?;
            return self.sgmv_expand(v, table, meta, v_stride, outs, y_stride, col_offset, y);
        };
        let ends = plan::group_ends(outs);
        let tiles = meta.layout.tile_grid();
        let args = [
            Arg::Ptr(x.ptr),
            i32_arg(h_in, "h_in")?,
            Arg::Ptr(y.ptr),
            i32_arg(y_stride, "y_stride")?,
            i32_arg(col_offset, "col_offset")?,
            i32_arg(ends[0], "end0")?,
            i32_arg(ends[1], "end1")?,
            i32_arg(ends[2], "end2")?,
            Arg::Ptr(table.ptr),
            Arg::Ptr(meta.at(meta.layout.tiles)),
            Arg::Ptr(meta.at(meta.layout.segs)),
            i32_arg(tiles, "tiles")?,
            i32_arg(p.stages, "stages")?,
            i32_arg(plan::STREAM_STAGE_BYTES, "stage_bytes")?,
            i32_arg(p.y_cap, "y_cap")?,
        ];
        self.launch_smem(
            &Self::stream_kernel(x.dtype, &p)?,
            ((clusters * p.cluster) as u32, 1, 1),
            ((plan::STREAM_CONSUMERS + 1) * 32) as u32,
            arg_slots(&args)?,
            self.pdl,
            p.smem as u32,
        )
    }

    fn expand_rope_write_kv(
        &self,
        v: &CudaBuf,
        table: &CudaLoraTable,
        meta: &CudaMeta,
        v_stride: usize,
        qkv: &mut CudaBuf,
        row_stride: usize,
        inv_freq: &CudaBuf,
        shape_: AttnShape,
        (k_cache, v_cache): (&mut CudaBuf, &mut CudaBuf),
    ) -> Result<()> {
        let AttnShape {
            n_heads,
            n_kv_heads,
            head_dim,
        } = shape_;
        let outs = [
            n_heads * head_dim,
            n_kv_heads * head_dim,
            n_kv_heads * head_dim,
        ];
        let v_name = self.check_expand(v, table, meta, v_stride, &outs, row_stride, 0, qkv)?;
        self.check_rope(qkv, row_stride, inv_freq, meta, shape_, k_cache, v_cache)?;
        let (lay, tiles) = (&meta.layout, meta.layout.tile_grid());
        let pairs = (n_heads + 2 * n_kv_heads) * (head_dim / 2);
        let units = (pairs, plan::EXPAND_ROPE_GAP_PAIRS);
        let fused =
            self.fused_plan(self.fused_rope && head_dim >= 2, v_name, table, meta, units)?;
        let Some((v_name, p)) = fused else {
            self.sgmv_expand(v, table, meta, v_stride, &outs, row_stride, 0, qkv)?;
            return self.rope_write_kv(qkv, row_stride, inv_freq, meta, shape_, k_cache, v_cache);
        };
        // The kernel finds the KV slots and the row flags at fixed distances from the
        // positions (one argument for three: launches take at most 16).
        if lay.slot_mapping != lay.positions + lay.rows
            || lay.row_lora != lay.positions + 3 * lay.rows
        {
            return Err(shape(format!(
                "expand_rope_write_kv: step metadata sections at {}/{}/{} for {} rows",
                lay.positions, lay.slot_mapping, lay.row_lora, lay.rows
            )));
        }
        // As the row expands: only host copies are read before the wait, so it overlaps the
        // GEMM that wrote v and qkv.
        self.launch(
            &kernel!(
                "sgmv_expand_rope_rows_{}{v_name}_l{}",
                Self::suffix(qkv.dtype),
                p.lanes
            ),
            (p.grid(tiles), 1, 1),
            (plan::EXPAND_SILU_WARPS * 32) as u32,
            &[
                Arg::Ptr(v.ptr),
                i32_arg(v_stride, "v_stride")?,
                Arg::Ptr(qkv.ptr),
                i32_arg(row_stride, "row_stride")?,
                Arg::Ptr(inv_freq.ptr),
                Arg::Ptr(meta.at(lay.positions)),
                i32_arg(lay.rows, "rows")?,
                Arg::Ptr(table.ptr),
                Arg::Ptr(meta.at(lay.tiles)),
                Arg::Ptr(meta.at(lay.segs)),
                Arg::Ptr(k_cache.ptr),
                Arg::Ptr(v_cache.ptr),
                Arg::U32((n_heads | n_kv_heads << 16) as u32),
                i32_arg(head_dim, "head_dim")?,
                i32_arg(tiles, "tiles")?,
                i32_arg(p.per_tile, "per_tile")?,
            ],
            self.pdl,
        )
    }

    fn expand_silu_mul(
        &self,
        v: &CudaBuf,
        table: &CudaLoraTable,
        meta: &CudaMeta,
        v_stride: usize,
        y: &mut CudaBuf,
        y_stride: usize,
        rows: usize,
        n: usize,
        out: &mut CudaBuf,
    ) -> Result<()> {
        let outs = [n, n];
        let v_name = self.check_expand(v, table, meta, v_stride, &outs, y_stride, 0, y)?;
        let (lay, tiles) = (&meta.layout, meta.layout.tile_grid());
        let enabled = self.fused_silu && rows == lay.rows;
        let units = (n, plan::EXPAND_SILU_GAP_COLS);
        let Some((v_name, p)) = self.fused_plan(enabled, v_name, table, meta, units)? else {
            self.sgmv_expand(v, table, meta, v_stride, &outs, y_stride, 0, y)?;
            return self.silu_mul(y, y_stride, rows, n, out);
        };
        same_dtype(y, out, "expand_silu_mul")?;
        need(out, rows * n, "expand_silu_mul out")?;
        // As the row expands: only host copies are read before the wait (B, the table and
        // the step's tiles and row flags), so it overlaps the GEMM that wrote v and y.
        self.launch(
            &kernel!(
                "sgmv_expand_silu_rows_{}{v_name}_l{}",
                Self::suffix(y.dtype),
                p.lanes
            ),
            (p.grid(tiles), 1, 1),
            (plan::EXPAND_SILU_WARPS * 32) as u32,
            &[
                Arg::Ptr(v.ptr),
                i32_arg(v_stride, "v_stride")?,
                Arg::Ptr(y.ptr),
                i32_arg(y_stride, "y_stride")?,
                i32_arg(n, "n")?,
                Arg::Ptr(out.ptr),
                Arg::Ptr(table.ptr),
                Arg::Ptr(meta.at(lay.tiles)),
                Arg::Ptr(meta.at(lay.segs)),
                Arg::Ptr(meta.at(lay.row_lora)),
                i32_arg(tiles, "tiles")?,
                i32_arg(p.per_tile, "per_tile")?,
                i32_arg(p.col_blocks, "col_blocks")?,
            ],
            self.pdl,
        )
    }

    fn gather_rows(
        &self,
        x: &CudaBuf,
        meta: &CudaMeta,
        hidden: usize,
        out: &mut CudaBuf,
    ) -> Result<()> {
        let n = meta.layout.num_logit_rows;
        same_dtype(x, out, "gather_rows")?;
        need(x, meta.layout.rows * hidden, "gather_rows x")?;
        need(out, n * hidden, "gather_rows out")?;
        self.launch(
            &kernel!("gather_rows_{}", Self::suffix(x.dtype)),
            (n as u32, 1, 1),
            plan::row_block(hidden),
            &[
                Arg::Ptr(x.ptr),
                Arg::Ptr(meta.at(meta.layout.logit_rows)),
                i32_arg(hidden, "hidden")?,
                Arg::Ptr(out.ptr),
            ],
            self.pdl,
        )
    }

    fn fill_random(&self, buf: &mut CudaBuf, seed: u32, scale: f32) -> Result<()> {
        self.fill_random_raw(buf.ptr, buf.dtype, buf.len, seed, scale)
    }

    fn sample(
        &self,
        logits: &CudaBuf,
        vocab: usize,
        rows: &[RowSampling],
        picks: &mut Vec<Pick>,
    ) -> Result<()> {
        let n = rows.len();
        if logits.dtype != DType::F32 || vocab == 0 || logits.len < n * vocab {
            return Err(shape(format!(
                "sample: {} {:?} logits for {n} rows of {vocab}",
                logits.len, logits.dtype
            )));
        }
        // Sampling ends the step: its ops are issued (or replayed) first.
        self.finish_step()?;
        picks.clear();
        if n == 0 {
            return Ok(());
        }
        // One buffer: the rows' parameters in, then tokens and log-probabilities out, so the
        // picks come back in one copy. The host side reuses its buffers from step to step.
        let (mut params, mut words) = {
            let mut step = lock(&self.step);
            (
                std::mem::take(&mut step.sample_params),
                std::mem::take(&mut step.sample_words),
            )
        };
        plan::pack_sampling(rows, &mut params);
        words.clear();
        words.resize(2 * n, 0);
        let copied = self.sample_rows(logits, vocab, n, &params, &mut words);
        if copied.is_ok() {
            picks.extend((0..n).map(|i| Pick {
                token: words[i],
                logprob: f32::from_bits(words[n + i]),
            }));
        }
        let mut step = lock(&self.step);
        step.sample_params = params;
        step.sample_words = words;
        copied
    }

    fn begin_side(&self) -> Result<()> {
        if !self.side_stream {
            return Ok(());
        }
        self.mark_other();
        self.submit(Op::Fork)?;
        self.on_side
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn end_side(&self) -> Result<()> {
        if !self.side_stream {
            return Ok(());
        }
        self.mark_other();
        self.submit(Op::EndSide)?;
        self.on_side
            .store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn join_side(&self) -> Result<()> {
        if !self.side_stream {
            return Ok(());
        }
        self.mark_other();
        self.submit(Op::Join)
    }

    fn begin_step(&self) -> Result<()> {
        self.finish_step()?;
        self.rejoin()?;
        let mut step = lock(&self.step);
        // The previous step's extra allocations: their frees are ordered after its work.
        step.overflow.clear();
        if let Some(cap) = step.arena.wanted() {
            // Ordered after the previous steps' work, like any free; their graphs go with it.
            step.arena_mem = None;
            lock(&self.recorder).clear();
            let (mem, base) = self.alloc_bytes(cap)?;
            step.arena.base = base;
            step.arena.cap = cap;
            step.arena_mem = Some(mem);
            tracing::debug!(mib = cap >> 20, "step arena grown");
        }
        step.arena.reset();
        step.open = true;
        step.meta_taken = false;
        drop(step);
        // Per-kernel profiling times ops as they are issued: no recording then.
        if self.profile.is_none() {
            lock(&self.recorder).begin();
        }
        Ok(())
    }

    fn end_step(&self) -> Result<()> {
        self.finish_step()?;
        self.step_event
            .record(&self.stream)
            .map_err(|e| dev_err("record the step event", e))
    }

    fn step_done(&self) -> bool {
        // An error (a failed step) counts as done: `finish` reports it.
        self.step_event.is_complete()
    }

    fn checkpoint(&self) -> Result<()> {
        self.flush()
    }

    fn upload_done(&self, buf: &CudaBuf) -> bool {
        match &buf._mem {
            Memory::Shared { up, part, .. } => up.copied(*part).is_complete(),
            _ => true,
        }
    }

    fn wait_upload(&self, buf: &CudaBuf) -> Result<()> {
        let Memory::Shared { up, part, .. } = &buf._mem else {
            return Ok(());
        };
        let copied = up.copied(*part);
        if copied.is_complete() {
            return Ok(());
        }
        // In a step, an op of its trace (which is then issued, never replayed: see
        // `graph::capturable`); outside one, issued now.
        self.mark_other();
        self.submit(Op::WaitEvent {
            event: copied.cu_event() as usize,
            side: self.on_side.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    fn decode_bucket(&self, rows: usize) -> Option<usize> {
        // Padding only pays when a graph of the bucket can be replayed.
        self.graphs_enabled()
            .then(|| crate::engine::backend::decode_bucket(rows))
            .flatten()
    }

    fn last_step_path(&self) -> StepPath {
        lock(&self.recorder).last_path
    }

    fn synchronize(&self) -> Result<()> {
        self.finish_step()?;
        self.stream
            .synchronize()
            .map_err(|e| dev_err("synchronize", e))?;
        // Adapter copies too.
        self.copy
            .synchronize()
            .map_err(|e| dev_err("synchronize the copy stream", e))
    }
}

/// A header for reports: device, arch, revision and time, so committed output is traceable.
pub fn report_header(be: &CudaBackend, what: &str) -> String {
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown time".into());
    format!(
        "# punica {what}\n# device: {} (cc {}.{}, {} SMs, NVRTC target {})\n# git revision: {}\n# date: {now}\n# programmatic dependent launch (PDL): {}\n# SGMV: CUDA-core row kernels when {:?}, tensor-core tiles otherwise\n# SGMV shrink+expand of one-row segments in one streamed kernel (sgmv_lora_stream): {}\n# SGMV shrink+expand of one long bf16 segment of rank >= {} as two cuBLAS GEMMs: {}\n# CUDA graphs for repeated steps: {}\n",
        be.device_name(),
        be.compute_capability().0,
        be.compute_capability().1,
        be.sm_count(),
        be.arch(),
        env!("PUNICA_GIT_REV"),
        be.pdl(),
        be.row_limits(),
        if be.lora_stream() { "on" } else { "off" },
        plan::DENSE_MIN_RANK,
        if be.lora_dense_on() { "on" } else { "off" },
        if be.graphs_enabled() { "on" } else { "off" },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_streamable_only_with_ranks_the_streamed_kernel_takes() {
        // Fake 16-byte aligned device addresses: encoding reads none of them.
        let slot = |ranks: &[usize]| {
            let total: usize = ranks.iter().sum();
            Some(RawLoraSlot {
                a: 0x1000,
                a_len: total * 64,
                voff: 0,
                parts: std::array::from_fn(|j| {
                    ranks.get(j).map(|&rank| RawLoraPart {
                        b: 0x2000 + 0x1000 * j as u64,
                        b_len: rank * 32,
                        rank,
                    })
                }),
            })
        };
        let streamable =
            |slots: &[Option<RawLoraSlot>]| encode_lora_table(slots).unwrap().1.streamable;
        assert!(streamable(&[slot(&[8]), None, slot(&[16, 64, 128])]));
        assert!(streamable(&[slot(&[128, 128, 128])]));
        assert!(!streamable(&[slot(&[16]), slot(&[12])]));
        assert!(!streamable(&[slot(&[4])]));
        assert!(!streamable(&[slot(&[16, 48])]));
        // An empty table has nothing the kernel could not take.
        assert!(streamable(&[None, None]));
    }

    #[test]
    fn an_adapter_is_copied_in_parts_that_cover_its_staged_bytes_in_order() {
        // Five tensors (16-byte aligned starts), 96 bytes staged: layers of 2, 0 and 3 tensors.
        let starts = [0, 16, 32, 64, 80];
        let parts = copy_parts(&starts, &[2, 0, 3], 96).unwrap();
        assert_eq!(parts, vec![(0..32, 0..2), (32..96, 2..5)]);
        // No parts asked for: one copy of everything.
        assert_eq!(copy_parts(&starts, &[], 96).unwrap(), vec![(0..96, 0..5)]);
        assert_eq!(
            copy_parts(&starts, &[1, 1, 1, 1, 1], 100).unwrap(),
            vec![
                (0..16, 0..1),
                (16..32, 1..2),
                (32..64, 2..3),
                (64..80, 3..4),
                (80..100, 4..5)
            ]
        );
        assert!(copy_parts(&starts, &[2, 2], 96).is_err());
    }

    #[test]
    fn a_slot_table_has_one_entry_per_slot_whatever_the_slots_hold() {
        // So a table rebuilt for the same slots fits where it is (`update_lora_table`).
        let filled = Some(RawLoraSlot {
            a: 0x1000,
            a_len: 8 * 64,
            parts: std::array::from_fn(|j| {
                (j == 0).then_some(RawLoraPart {
                    b: 0x2000,
                    b_len: 96 * 8,
                    rank: 8,
                })
            }),
            voff: 0,
        });
        let (empty, sum) = encode_lora_table(&[None, None, None]).unwrap();
        assert_eq!(empty.len(), 3 * plan::LORA_SLOT_BYTES);
        assert_eq!(sum.max_rank, 0);
        let (bytes, sum) = encode_lora_table(&[None, filled, None]).unwrap();
        assert_eq!(bytes.len(), empty.len());
        assert_ne!(bytes, empty);
        assert_eq!((sum.max_rank, sum.min_in, sum.min_out[0]), (8, 64, 96));
    }
}
