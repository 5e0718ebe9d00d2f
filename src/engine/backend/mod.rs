//! The device abstraction. The forward pass (`engine::model::llama`) is written once over the
//! [`Backend`] trait; `cpu` is the f32 oracle, `cuda` the fast path. Every op here has a CPU twin
//! and a parity test.
//!
//! Conventions (all backends):
//! - Buffers are flat, row-major. `x: [rows, cols]` means `x[r * cols + c]`.
//! - Linear layers follow PyTorch: a weight `w: [n, k]` computes `y = x · wᵀ`.
//! - Per-step metadata (token ids, positions, KV slots, block tables, LoRA segments) is built on
//!   the host as a [`StepMeta`] and handed to the backend once per step ([`Backend::upload_meta`]);
//!   ops read it from there, so the CUDA backend copies it to the device once per step.
//! - LoRA: for each targeted projection `y += (x · Aᵀ) · Bᵀ`, with the adapter's scale already
//!   folded into `B` at load time. The intermediate `v = x · Aᵀ` is kept in f32.

pub mod cpu;
pub mod cuda;

use std::sync::Arc;

use crate::engine::lora::segments::SegmentTable;

/// Tokens per KV-cache block.
pub const BLOCK_SIZE: usize = 16;

/// Element type of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// Which kind of device a backend drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// Errors a backend reports. Never a panic: a missing library or device is one of these.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("device unavailable: {0}")]
    Unavailable(String),
    #[error("out of device memory: wanted {wanted} bytes")]
    OutOfMemory { wanted: usize },
    #[error("kernel compilation failed: {0}")]
    Compile(String),
    #[error("device error: {0}")]
    Device(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// One sequence's slice of a step: its new rows and where its KV lives.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqMeta {
    /// First row of this sequence's new tokens in the batch.
    pub row_start: u32,
    /// Number of new tokens (1 for decode, the chunk length for prefill).
    pub num_rows: u32,
    /// Tokens in the KV cache after this step, the new ones included.
    pub context_len: u32,
    /// Offset of this sequence's block table in [`StepMeta::block_tables`].
    pub block_table_start: u32,
    /// Number of blocks in its table (`ceil(context_len / BLOCK_SIZE)`).
    pub num_blocks: u32,
}

/// Everything the device needs to know about one step's batch, built on the host.
///
/// Rows are ordered so that rows sharing an adapter are contiguous (see [`SegmentTable`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepMeta {
    /// Input token id per row.
    pub token_ids: Vec<u32>,
    /// Absolute position per row (for RoPE).
    pub positions: Vec<u32>,
    /// KV-cache slot per row: `block_id * BLOCK_SIZE + offset_in_block`.
    pub slot_mapping: Vec<u32>,
    /// Sequences in batch order; their row ranges tile `0..rows`.
    pub seqs: Vec<SeqMeta>,
    /// All block tables, concatenated.
    pub block_tables: Vec<u32>,
    /// LoRA segments over the rows (rows with no adapter are in no segment).
    pub segments: SegmentTable,
    /// Rows whose logits are wanted (the last row of each sequence that samples this step).
    pub logit_rows: Vec<u32>,
}

/// One sequence's part of a step, the input of [`StepMeta::build`].
#[derive(Clone, Copy, Debug)]
pub struct SeqStep<'a> {
    /// The new tokens: a prefill chunk, or the one token being decoded.
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in the KV cache before this step.
    pub cached: usize,
    /// The sequence's block table; it must cover `cached + tokens.len()` tokens.
    pub block_table: &'a [u32],
    /// Adapter slot of the sequence, `None` for the base model.
    pub adapter_slot: Option<u32>,
    /// Whether this step computes logits for the sequence's last new token.
    pub sample: bool,
}

impl StepMeta {
    /// Lay out a step from its sequences, in the given order (put sequences that share an
    /// adapter next to each other to get one LoRA segment per adapter).
    pub fn build(seqs: &[SeqStep<'_>]) -> Result<StepMeta> {
        let mut meta = StepMeta::default();
        let mut row_slots = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            let context = s.cached + s.tokens.len();
            if s.tokens.is_empty() || s.block_table.len() * BLOCK_SIZE < context {
                return Err(BackendError::Shape(format!(
                    "sequence {i}: {} new tokens after {} cached, {} blocks",
                    s.tokens.len(),
                    s.cached,
                    s.block_table.len()
                )));
            }
            let row_start = meta.token_ids.len();
            for (j, &t) in s.tokens.iter().enumerate() {
                let pos = s.cached + j;
                meta.token_ids.push(t);
                meta.positions.push(pos as u32);
                meta.slot_mapping.push(
                    s.block_table[pos / BLOCK_SIZE] * BLOCK_SIZE as u32 + (pos % BLOCK_SIZE) as u32,
                );
                row_slots.push(s.adapter_slot);
            }
            let num_blocks = context.div_ceil(BLOCK_SIZE);
            meta.seqs.push(SeqMeta {
                row_start: row_start as u32,
                num_rows: s.tokens.len() as u32,
                context_len: context as u32,
                block_table_start: meta.block_tables.len() as u32,
                num_blocks: num_blocks as u32,
            });
            meta.block_tables
                .extend_from_slice(&s.block_table[..num_blocks]);
            if s.sample {
                meta.logit_rows.push((meta.token_ids.len() - 1) as u32);
            }
        }
        meta.segments = SegmentTable::from_row_slots(&row_slots);
        meta.validate()?;
        Ok(meta)
    }

    /// One sequence's prefill of `rows` tokens (id 0) over blocks `0..`, no adapters, no logits:
    /// the base of op-level tests and benches that set their own segments or ids.
    pub fn one_sequence(rows: usize) -> StepMeta {
        let blocks = rows.div_ceil(BLOCK_SIZE);
        StepMeta {
            token_ids: vec![0; rows],
            positions: (0..rows as u32).collect(),
            slot_mapping: (0..rows as u32).collect(),
            seqs: vec![SeqMeta {
                row_start: 0,
                num_rows: rows as u32,
                context_len: rows as u32,
                block_table_start: 0,
                num_blocks: blocks as u32,
            }],
            block_tables: (0..blocks as u32).collect(),
            ..StepMeta::default()
        }
    }

    /// Write into `out` this decode step padded to `bucket` rows, and return `true`; return
    /// `false` (leaving `out` alone) when it is not a decode step (some sequence feeds more than
    /// one row), has no rows, or has `bucket` rows already. `out`'s buffers are reused, so a
    /// step padded into the same `out` each time allocates nothing.
    ///
    /// Each padding row is a sequence of its own: token 0 at position 0, context 1, in the
    /// one block `pad_block` (a block no sequence owns: padding rows all write the same K/V
    /// there and attend to it), no adapter. When every real row samples, so does every padding
    /// row, after the real ones: the logits of the real rows come first, in order. The real
    /// rows' results do not depend on the padding (rows never mix in a forward pass).
    pub fn pad_decode(&self, bucket: usize, pad_block: u32, out: &mut StepMeta) -> bool {
        let rows = self.rows();
        if rows == 0 || bucket <= rows || self.seqs.iter().any(|s| s.num_rows != 1) {
            return false;
        }
        out.token_ids.clone_from(&self.token_ids);
        out.positions.clone_from(&self.positions);
        out.slot_mapping.clone_from(&self.slot_mapping);
        out.seqs.clone_from(&self.seqs);
        out.block_tables.clone_from(&self.block_tables);
        out.segments.starts.clone_from(&self.segments.starts);
        out.segments.ends.clone_from(&self.segments.ends);
        out.segments.slots.clone_from(&self.segments.slots);
        out.logit_rows.clone_from(&self.logit_rows);
        let all_sample = self.logit_rows.len() == rows
            && self
                .logit_rows
                .iter()
                .enumerate()
                .all(|(i, &r)| r as usize == i);
        for row in rows..bucket {
            out.token_ids.push(0);
            out.positions.push(0);
            out.slot_mapping.push(pad_block * BLOCK_SIZE as u32);
            out.seqs.push(SeqMeta {
                row_start: row as u32,
                num_rows: 1,
                context_len: 1,
                block_table_start: out.block_tables.len() as u32,
                num_blocks: 1,
            });
            out.block_tables.push(pad_block);
            if all_sample {
                out.logit_rows.push(row as u32);
            }
        }
        true
    }

    /// Rows (tokens) in the batch.
    pub fn rows(&self) -> usize {
        self.token_ids.len()
    }

    /// Check that the metadata is self-consistent, so that no op can index out of bounds:
    /// per-row vectors have one entry per row, sequences tile the rows in order, every block
    /// table covers its context, segments and logit rows lie inside the batch.
    /// Backends call this in [`Backend::upload_meta`].
    pub fn validate(&self) -> Result<()> {
        let rows = self.rows();
        let bad = |msg: String| Err(BackendError::Shape(msg));
        if self.positions.len() != rows || self.slot_mapping.len() != rows {
            return bad(format!(
                "{rows} token ids but {} positions and {} KV slots",
                self.positions.len(),
                self.slot_mapping.len()
            ));
        }
        let mut next_row = 0usize;
        for (i, seq) in self.seqs.iter().enumerate() {
            let (start, n, ctx) = (
                seq.row_start as usize,
                seq.num_rows as usize,
                seq.context_len as usize,
            );
            if start != next_row || n == 0 || ctx < n {
                return bad(format!(
                    "sequence {i}: rows {start}..{} after row {next_row}, context {ctx}",
                    start + n
                ));
            }
            next_row = start + n;
            let table_end = seq.block_table_start as usize + seq.num_blocks as usize;
            if (seq.num_blocks as usize) * BLOCK_SIZE < ctx || table_end > self.block_tables.len() {
                return bad(format!(
                    "sequence {i}: {} blocks (table end {table_end} of {}) for context {ctx}",
                    seq.num_blocks,
                    self.block_tables.len()
                ));
            }
        }
        if next_row != rows {
            return bad(format!("sequences cover {next_row} of {rows} rows"));
        }
        if let Some(&r) = self.logit_rows.iter().find(|&&r| r as usize >= rows) {
            return bad(format!("logit row {r} outside a batch of {rows} rows"));
        }
        let seg = &self.segments;
        if seg.starts.len() != seg.slots.len() || seg.ends.len() != seg.slots.len() {
            return bad("segment table columns differ in length".to_string());
        }
        // Segments must be ordered and disjoint: backends write each segment's rows in parallel.
        let mut prev_end = 0usize;
        for (s, e, _) in seg.iter() {
            if s < prev_end || s >= e || e > rows {
                return bad(format!(
                    "segment rows {s}..{e} after row {prev_end} in a batch of {rows} rows"
                ));
            }
            prev_end = e;
        }
        Ok(())
    }
}

/// `f` over `items` on up to 8 threads (contiguous runs of about equal `cost`), results in
/// order. For host-side conversions of many tensors (an adapter load); one item, a zero cost
/// or a single core runs them on the calling thread.
pub fn par_map<T: Send, R: Send>(
    items: Vec<T>,
    cost: impl Fn(&T) -> usize,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8)
        .min(items.len());
    let total: usize = items.iter().map(&cost).sum();
    if threads <= 1 || total == 0 {
        return items.into_iter().map(f).collect();
    }
    let share = total.div_ceil(threads);
    let mut runs: Vec<Vec<T>> = vec![Vec::new()];
    let mut acc = 0;
    for item in items {
        let c = cost(&item);
        if acc >= share && runs.len() < threads {
            runs.push(Vec::new());
            acc = 0;
        }
        acc += c;
        if let Some(run) = runs.last_mut() {
            run.push(item);
        }
    }
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .into_iter()
            .map(|run| scope.spawn(move || run.into_iter().map(f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(results) => results,
                // A panic in `f` is a bug: surface it on the calling thread.
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

/// Widen raw little-endian `f32`/`f16`/`bf16` bytes to f32 values.
pub fn host_to_f32(src: DType, bytes: &[u8]) -> Result<Vec<f32>> {
    let size = src.size();
    if !bytes.len().is_multiple_of(size) {
        return Err(BackendError::Shape(format!(
            "{} bytes is not a whole number of {src:?} values",
            bytes.len()
        )));
    }
    // Little-endian f32 at a 4-byte aligned address is already what we want: one copy.
    #[cfg(target_endian = "little")]
    if src == DType::F32
        && let Ok(values) = bytemuck::try_cast_slice::<u8, f32>(bytes)
    {
        return Ok(values.to_vec());
    }
    let chunks = bytes.chunks_exact(size);
    Ok(match src {
        DType::F32 => chunks
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => chunks
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => chunks
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    })
}

/// Values in host memory as stored: little-endian `dtype` elements, each times `scale` once
/// converted. An adapter's matrices stay in this form (views of the uploaded file) until they
/// are staged, so a load converts each value once, straight into the staging buffer.
#[derive(Clone, Copy, Debug)]
pub struct HostTensor<'a> {
    bytes: &'a [u8],
    dtype: DType,
    scale: f32,
}

impl<'a> HostTensor<'a> {
    /// The whole `dtype` values of `bytes` (a trailing partial one is not a value), times
    /// `scale`.
    pub fn new(bytes: &'a [u8], dtype: DType, scale: f32) -> Self {
        HostTensor {
            bytes: &bytes[..bytes.len() - bytes.len() % dtype.size()],
            dtype,
            scale,
        }
    }

    /// f32 values as they are.
    pub fn f32(values: &'a [f32]) -> Self {
        HostTensor {
            bytes: bytemuck::cast_slice(values),
            dtype: DType::F32,
            scale: 1.0,
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The values widened to f32, scaled.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut values = host_to_f32(self.dtype, self.bytes).unwrap_or_default();
        if self.scale != 1.0 {
            for v in &mut values {
                *v *= self.scale;
            }
        }
        values
    }

    /// The first value that is not finite as stored (before scaling), with its index: one
    /// branch-free pass over the bits, the index searched only in a tensor that has one.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        let bad = |bits: u32| match self.dtype {
            DType::F32 => bits & 0x7f80_0000 == 0x7f80_0000,
            DType::BF16 => bits & 0x7f80 == 0x7f80,
            DType::F16 => bits & 0x7c00 == 0x7c00,
        };
        let size = self.dtype.size();
        let word = |c: &[u8]| match size {
            4 => u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            _ => u32::from(u16::from_le_bytes([c[0], c[1]])),
        };
        let chunks = self.bytes.chunks_exact(size);
        if !chunks.clone().fold(false, |any, c| any | bad(word(c))) {
            return None;
        }
        let index = chunks.clone().position(|c| bad(word(c)))?;
        let value = host_to_f32(self.dtype, &self.bytes[index * size..(index + 1) * size])
            .ok()?
            .first()
            .copied()?;
        Some((index, value))
    }

    /// Convert into `dst` (exactly `len() * dtype.size()` bytes) as little-endian `dtype`
    /// values: a plain copy when nothing changes, else each value through f32 (times `scale`,
    /// rounded to nearest even). Tight loops over slices, so that they vectorize: an aligned
    /// f32 source directly, any other a block at a time through a small f32 buffer.
    pub fn write(&self, dtype: DType, dst: &mut [u8]) {
        if dtype == self.dtype && self.scale == 1.0 {
            dst.copy_from_slice(self.bytes);
            return;
        }
        #[cfg(target_endian = "little")]
        if self.dtype == DType::F32
            && let Ok(src) = bytemuck::try_cast_slice::<u8, f32>(self.bytes)
        {
            write_f32s(src, self.scale, dtype, dst);
            return;
        }
        const BLOCK: usize = 2048;
        let mut buf = [0f32; BLOCK];
        let (size, out) = (self.dtype.size(), dtype.size());
        for (src, dst) in self
            .bytes
            .chunks(BLOCK * size)
            .zip(dst.chunks_mut(BLOCK * out))
        {
            let widened = &mut buf[..src.len() / size];
            widen_into(self.dtype, src, widened);
            write_f32s(widened, self.scale, dtype, dst);
        }
    }
}

/// Little-endian `dtype` values of `src` into `out` as f32.
fn widen_into(dtype: DType, src: &[u8], out: &mut [f32]) {
    let chunks = src.chunks_exact(dtype.size());
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(chunks) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(chunks) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(chunks) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
    }
}

/// `src` times `scale` into `dst` as little-endian `dtype` values.
fn write_f32s(src: &[f32], scale: f32, dtype: DType, dst: &mut [u8]) {
    match dtype {
        DType::F32 => match bytemuck::try_cast_slice_mut::<u8, f32>(dst) {
            Ok(out) if cfg!(target_endian = "little") => {
                for (d, &v) in out.iter_mut().zip(src) {
                    *d = v * scale;
                }
            }
            _ => {
                for (d, &v) in dst.chunks_exact_mut(4).zip(src) {
                    d.copy_from_slice(&(v * scale).to_le_bytes());
                }
            }
        },
        DType::BF16 => store_halves(dst, src, scale, |v| half::bf16::from_f32(v).to_bits()),
        DType::F16 => store_halves(dst, src, scale, |v| half::f16::from_f32(v).to_bits()),
    }
}

/// `src` times `scale`, converted by `half`, into `dst` as little-endian 16-bit elements: u16
/// stores when `dst` is 2-byte aligned (a staged tensor starts 16-byte aligned and its pieces
/// are whole elements), byte pairs otherwise.
fn store_halves(dst: &mut [u8], src: &[f32], scale: f32, half: impl Fn(f32) -> u16) {
    match bytemuck::try_cast_slice_mut::<u8, u16>(dst) {
        Ok(out) => {
            for (d, &v) in out.iter_mut().zip(src) {
                *d = half(v * scale).to_le();
            }
        }
        Err(_) => {
            for (d, &v) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&half(v * scale).to_le_bytes());
            }
        }
    }
}

/// The `i`-th value of the deterministic stream `seed`, uniform in `[-1, 1)` (a 32-bit integer
/// hash of `(seed, i)`; the CUDA kernel `fill_random_*` computes the same bits).
pub fn random_uniform(seed: u32, i: usize) -> f32 {
    let mut h = (i as u32).wrapping_mul(0x9E37_79B1)
        ^ ((i as u64 >> 32) as u32).wrapping_mul(0x85EB_CA77)
        ^ seed.wrapping_mul(0xC2B2_AE3D);
    h ^= h >> 16;
    h = h.wrapping_mul(0x7FEB_352D);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846C_A68B);
    h ^= h >> 16;
    let u = (h >> 8) as f32 * (1.0 / 16_777_216.0);
    2.0 * u - 1.0
}

/// Static shapes of the attention op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// How to pick the token of one logit row (see `engine::sampling` for the procedure, which
/// every backend follows exactly).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSampling {
    /// 0 means greedy (the first largest logit).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: u32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// The request's uniform draw in `[0, 1)` for this token (unused when greedy).
    pub u: f32,
}

impl RowSampling {
    /// Greedy decoding.
    pub const GREEDY: RowSampling = RowSampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        u: 0.0,
    };
}

/// A picked token and its log-probability under the raw logits (before temperature, top-k and
/// top-p).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pick {
    pub token: u32,
    pub logprob: f32,
}

/// The row counts decode steps are padded to for CUDA graphs: powers of two up to 8, then
/// multiples of 8 up to 64 and of 32 up to 256 (a decode GEMM streams the weights whatever the
/// row count, so a few padding rows cost little). `None` beyond 256 rows: such steps run as
/// they are.
pub fn decode_bucket(rows: usize) -> Option<usize> {
    match rows {
        0 => None,
        1..=8 => Some(rows.next_power_of_two()),
        9..=64 => Some(rows.next_multiple_of(8)),
        65..=256 => Some(rows.next_multiple_of(32)),
        _ => None,
    }
}

/// How the device ran a step's ops (see [`Backend::begin_step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepPath {
    /// Issued op by op.
    Issued,
    /// Captured into a graph (the step's layout repeated), then launched.
    Recorded,
    /// Replayed from a graph recorded by an earlier step of the same layout.
    Replayed,
}

impl StepPath {
    /// Label for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            StepPath::Issued => "issued",
            StepPath::Recorded => "recorded",
            StepPath::Replayed => "replayed",
        }
    }
}

/// Most projections one LoRA group holds (q, k and v).
pub const MAX_GROUP_PARTS: usize = 3;

/// One projection of a LoRA group: `b: [out, rank]` (scale folded in).
pub struct LoraPart<'a, B: Backend + ?Sized> {
    pub b: &'a B::Buf,
    pub rank: usize,
}

/// One adapter's LoRA for a group of projections that read the same input (q|k|v, o, gate|up,
/// down), resident on the device: the A matrices of the parts it has, stacked in part order
/// (`a: [Σ rank, in]`), and each part's B (`None`: the adapter does not target that part).
/// The shrink of the whole group is one product with `a`, its result in the LoRA intermediate
/// `v` from column `voff`; part `j`'s columns start after the ranks of the parts before it.
pub struct LoraGroupSlot<'a, B: Backend + ?Sized> {
    pub a: &'a B::Buf,
    pub parts: [Option<LoraPart<'a, B>>; MAX_GROUP_PARTS],
    /// First column of the slot's intermediate in `v`: 0 where a shrink writes it, or past the
    /// group's outputs at the adapter's arena rows when the base GEMM computes it as extra
    /// output columns (see `engine::model::llama`'s LoRA arena; such tables serve expands only).
    pub voff: usize,
}

impl<B: Backend + ?Sized> LoraGroupSlot<'_, B> {
    /// Rows of `a`: the ranks of the parts present, summed.
    pub fn rank(&self) -> usize {
        self.parts.iter().flatten().map(|p| p.rank).sum()
    }
}

/// The device operations a Llama forward pass needs.
///
/// Shapes are passed explicitly; implementations check them and return [`BackendError::Shape`]
/// rather than reading out of bounds.
pub trait Backend: Send + Sync + 'static {
    /// A device buffer (weights, activations, KV cache). Carries its dtype and length.
    type Buf: Send + Sync;
    /// A step's [`StepMeta`] as the device sees it.
    type Meta: Send + Sync;
    /// Slot -> adapter table of one (layer, LoRA group).
    type LoraTable: Send + Sync;
    /// Tensors staged in host memory for one copy to the device (page-locked on CUDA).
    type Staged: Send + Sync;

    fn kind(&self) -> DeviceKind;
    /// dtype used for weights, activations and the KV cache.
    fn dtype(&self) -> DType;

    /// A buffer of `len` elements. Contents are unspecified (debug builds may poison them).
    fn alloc(&self, dtype: DType, len: usize) -> Result<Self::Buf>;
    /// Copy host f32 values to a new buffer of `dtype` (converting).
    fn upload(&self, dtype: DType, data: &[f32]) -> Result<Self::Buf>;
    /// Copy raw little-endian host values of type `src` (e.g. a memory-mapped safetensors
    /// tensor) to a new buffer of `dtype`, converting. The default widens to f32 on the host and
    /// calls [`Backend::upload`]; a backend may override it to skip that intermediate copy.
    fn upload_raw(&self, dtype: DType, src: DType, bytes: &[u8]) -> Result<Self::Buf> {
        let values = host_to_f32(src, bytes)?;
        self.upload(dtype, &values)
    }
    /// Fill `buf` with deterministic pseudo-random values uniform in `[-scale, scale)`: element
    /// `i` is [`random_uniform`]`(seed, i) * scale`, rounded to the buffer's dtype, on every
    /// backend (synthetic weights are generated where they live).
    fn fill_random(&self, buf: &mut Self::Buf, seed: u32, scale: f32) -> Result<()>;
    /// Convert `tensors` to `dtype` and pack them in host memory for [`Backend::upload_staged`];
    /// a tensor is the concatenation of its pieces (a LoRA group's A matrices stacked, without
    /// a copy of them first). Runs on any thread (the adapter loaders stage adapters off the
    /// engine thread).
    fn stage(&self, dtype: DType, tensors: &[&[HostTensor<'_>]]) -> Result<Self::Staged>;
    /// Copy staged tensors to the device, one transfer per part: part `i` is the next
    /// `parts[i]` tensors (the counts sum to the tensors; no counts: one part of them all), and
    /// the parts are copied in order. One buffer per tensor, in order. Asynchronous where the
    /// device allows (the buffers keep `staged` alive): the copies may still run when this
    /// returns, see [`Backend::upload_done`] and [`Backend::wait_upload`], which answer for
    /// the part of the buffer they are given.
    fn upload_staged(&self, staged: &Arc<Self::Staged>, parts: &[usize]) -> Result<Vec<Self::Buf>>;
    /// Copy a buffer back to the host as f32.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>>;
    /// Number of elements in `buf`.
    fn len(&self, buf: &Self::Buf) -> usize;

    /// Hand this step's metadata to the device.
    fn upload_meta(&self, meta: &StepMeta) -> Result<Self::Meta>;
    /// Build the slot table of one (layer, LoRA group); `None` marks an empty slot. Slot `i` is
    /// what [`SegmentTable::slots`] values index.
    ///
    /// The table refers to the slots' buffers (shared handles on the CPU, device pointers on
    /// CUDA): the caller keeps those buffers alive and unmodified while the table is in use, and
    /// rebuilds the table when a slot changes (`engine::model::llama::LoraState` does both).
    fn lora_table(&self, slots: &[Option<LoraGroupSlot<'_, Self>>]) -> Result<Self::LoraTable>;
    /// Make `table` (from [`Backend::lora_table`]) the table of `slots`, under the same
    /// contract. The CUDA backend rewrites a table of as many slots where it is, in stream
    /// order after the steps issued before, so its address (which graphs recorded over it
    /// hold) stays valid and nothing is allocated; the default builds a new one.
    fn update_lora_table(
        &self,
        table: &mut Self::LoraTable,
        slots: &[Option<LoraGroupSlot<'_, Self>>],
    ) -> Result<()> {
        *table = self.lora_table(slots)?;
        Ok(())
    }

    /// `out[row] = table[token_ids[row]]`; `table: [vocab, hidden]`, `out: [rows, hidden]`.
    fn embedding(
        &self,
        table: &Self::Buf,
        meta: &Self::Meta,
        hidden: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// `out = rms_norm(x) * weight` per row; `x, out: [rows, hidden]`.
    fn rms_norm(
        &self,
        x: &Self::Buf,
        weight: &Self::Buf,
        eps: f32,
        rows: usize,
        hidden: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// Fused residual add + norm: `residual += x; out = rms_norm(residual) * weight`. `x` has
    /// rows of width `x_stride` (at least `hidden`: a GEMM output with extra columns).
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm(
        &self,
        residual: &mut Self::Buf,
        x: &Self::Buf,
        x_stride: usize,
        weight: &Self::Buf,
        eps: f32,
        rows: usize,
        hidden: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// `out[rows, n] = x[rows, k] · w[n, k]ᵀ`. `out` has the dtype of `x` and `w`, or f32
    /// (the logits).
    fn matmul(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        k: usize,
        n: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// `y += x` elementwise.
    fn add_assign(&self, y: &mut Self::Buf, x: &Self::Buf) -> Result<()>;

    /// A second handle to `buf`'s elements, for an op that reads some columns of a buffer and
    /// writes others (the expand of an arena step reads the LoRA intermediate from the extra
    /// columns of the GEMM output it adds into). Ops see through it what ops issued before
    /// wrote into `buf`; it must not outlive `buf`, nor be read where `buf` is being written.
    fn alias(&self, buf: &Self::Buf) -> Self::Buf;

    /// Copy all of `src` into `dst` from element `offset` (same dtype). Ordered after the work
    /// issued before it, before the work issued after; call between steps.
    fn copy_into(&self, dst: &mut Self::Buf, offset: usize, src: &Self::Buf) -> Result<()>;

    /// RoPE and this step's KV-cache write, fused. `qkv` rows (width `row_stride`) hold the
    /// `n_heads` q heads, then the `n_kv_heads` k heads, then the v heads, from column 0. The q
    /// and k heads are rotated in place (rotate-half RoPE with `inv_freq: [head_dim / 2]`, f32,
    /// llama3 scaling already applied, at the rows' positions); then each row's rotated K and
    /// its V go into the paged caches at `meta.slot_mapping`. Caches:
    /// `[num_blocks, BLOCK_SIZE, n_kv_heads, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn rope_write_kv(
        &self,
        qkv: &mut Self::Buf,
        row_stride: usize,
        inv_freq: &Self::Buf,
        meta: &Self::Meta,
        shape: AttnShape,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
    ) -> Result<()>;

    /// Causal paged attention for every row: each sequence's new rows attend to its cached
    /// context (positions `< context_len - num_rows + i + 1`). `q` rows at column `q_offset` of
    /// width `row_stride`; `out: [rows, n_heads * head_dim]`. Softmax in f32, GQA by head groups.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Buf,
        row_stride: usize,
        q_offset: usize,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        meta: &Self::Meta,
        shape: AttnShape,
        scale: f32,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// `out[rows, n] = silu(gate_up[:, :n]) * gate_up[:, n..2n]`; `gate_up` has rows of width
    /// `stride >= 2n`.
    fn silu_mul(
        &self,
        gate_up: &Self::Buf,
        stride: usize,
        rows: usize,
        n: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// SGMV shrink of a LoRA group: for each segment s, rows in s: `v[row, :rank_s] = x[row, :]
    /// · A_sᵀ`, `A_s` being the slot's stacked A and `rank_s` its total rank. A table with a
    /// slot whose [`LoraGroupSlot::voff`] is not 0 serves expands only (an error here).
    /// `x: [rows, h_in]`, `v: [rows, v_stride]` f32. Rows in no segment are left untouched.
    #[allow(clippy::too_many_arguments)]
    fn sgmv_shrink(
        &self,
        x: &Self::Buf,
        table: &Self::LoraTable,
        meta: &Self::Meta,
        h_in: usize,
        v_stride: usize,
        v: &mut Self::Buf,
    ) -> Result<()>;

    /// SGMV expand of a LoRA group whose parts have `outs[j]` output columns, laid side by side
    /// in `y` from `col_offset`: for each segment s, rows in s and part j the slot has,
    /// `y[row, col_offset + Σ_{i<j} outs[i] ..][..outs[j]] += v[row, voff_j..][..rank_j] · B_jᵀ`
    /// (`voff_j`: the slot's [`LoraGroupSlot::voff`] plus the ranks of its parts before j).
    /// `v` is f32 (a shrink's output) or of `y`'s dtype (the base GEMM's extra columns). `y`
    /// has rows of width `y_stride`; the table's slots have no part at or past `outs.len()`.
    #[allow(clippy::too_many_arguments)]
    fn sgmv_expand(
        &self,
        v: &Self::Buf,
        table: &Self::LoraTable,
        meta: &Self::Meta,
        v_stride: usize,
        outs: &[usize],
        y_stride: usize,
        col_offset: usize,
        y: &mut Self::Buf,
    ) -> Result<()>;

    /// The whole LoRA operator of a group: [`Self::sgmv_shrink`] of `x` into `v`, then
    /// [`Self::sgmv_expand`] from it into `y` (same arguments). `v` is the intermediate's
    /// workspace: afterwards its contents are unspecified (a backend may keep the intermediate
    /// on chip, or hold it in v's memory in another form). This composition is the reference.
    #[allow(clippy::too_many_arguments)]
    fn sgmv_lora(
        &self,
        x: &Self::Buf,
        table: &Self::LoraTable,
        meta: &Self::Meta,
        h_in: usize,
        (v, v_stride): (&mut Self::Buf, usize),
        outs: &[usize],
        y_stride: usize,
        col_offset: usize,
        y: &mut Self::Buf,
    ) -> Result<()> {
        self.sgmv_shrink(x, table, meta, h_in, v_stride, v)?;
        self.sgmv_expand(v, table, meta, v_stride, outs, y_stride, col_offset, y)
    }

    /// The expand of a q|k|v group (parts of `n_heads`, `n_kv_heads` and `n_kv_heads` heads)
    /// followed by [`Self::rope_write_kv`]: `sgmv_expand(v, table, meta, v_stride, &[q, kv,
    /// kv], row_stride, 0, qkv)` then RoPE and the cache write. Afterwards `qkv` holds the
    /// rotated q as `rope_write_kv` leaves it; its k and v columns are either rope_write_kv's
    /// or as before (a backend may fuse the two): read them from the caches. This composition
    /// is the reference.
    #[allow(clippy::too_many_arguments)]
    fn expand_rope_write_kv(
        &self,
        v: &Self::Buf,
        table: &Self::LoraTable,
        meta: &Self::Meta,
        v_stride: usize,
        qkv: &mut Self::Buf,
        row_stride: usize,
        inv_freq: &Self::Buf,
        shape: AttnShape,
        (k_cache, v_cache): (&mut Self::Buf, &mut Self::Buf),
    ) -> Result<()> {
        let (q, kv) = (
            shape.n_heads * shape.head_dim,
            shape.n_kv_heads * shape.head_dim,
        );
        self.sgmv_expand(v, table, meta, v_stride, &[q, kv, kv], row_stride, 0, qkv)?;
        self.rope_write_kv(qkv, row_stride, inv_freq, meta, shape, k_cache, v_cache)
    }

    /// The expand of a two-part group `n` columns a part (gate, up) followed by SiLU-mul:
    /// `out[rows, n] = silu(g) * u` (`rows`: the step's), `g` and `u` being `y`'s columns `..n`
    /// and `n..2n` after
    /// `sgmv_expand(v, table, meta, v_stride, &[n, n], y_stride, 0, y)`. Afterwards `y` holds
    /// either the expanded values or its values before (a backend may fuse the two and never
    /// write y back): read only `out`. This composition is the reference.
    #[allow(clippy::too_many_arguments)]
    fn expand_silu_mul(
        &self,
        v: &Self::Buf,
        table: &Self::LoraTable,
        meta: &Self::Meta,
        v_stride: usize,
        y: &mut Self::Buf,
        y_stride: usize,
        rows: usize,
        n: usize,
        out: &mut Self::Buf,
    ) -> Result<()> {
        self.sgmv_expand(v, table, meta, v_stride, &[n, n], y_stride, 0, y)?;
        self.silu_mul(y, y_stride, rows, n, out)
    }

    /// Gather `meta.logit_rows` of `x: [rows, hidden]` into `out: [logit_rows, hidden]`.
    fn gather_rows(
        &self,
        x: &Self::Buf,
        meta: &Self::Meta,
        hidden: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;

    /// Pick one token per row of `logits: [rows.len(), vocab]` (f32) as `rows[i]` says, into
    /// `picks` on the host (cleared first; a buffer reused from step to step allocates
    /// nothing). This is the step's one synchronisation point.
    fn sample(
        &self,
        logits: &Self::Buf,
        vocab: usize,
        rows: &[RowSampling],
        picks: &mut Vec<Pick>,
    ) -> Result<()>;

    /// The ops of the step issued so far may start on the device now, while the host issues
    /// the rest: the CUDA backend runs them as a part of the step of their own (replayed from
    /// or captured into a graph of that part, see `cuda::graph`). Call at points where the side
    /// queue is joined.
    fn checkpoint(&self) -> Result<()> {
        Ok(())
    }

    /// Ops issued from here until [`Backend::end_side`] run on a side queue: after everything
    /// issued before, concurrently with what is issued on the main queue after `end_side`
    /// (the LoRA shrink beside the base GEMM that reads the same input). The CPU runs them in
    /// order, which is one valid schedule.
    fn begin_side(&self) -> Result<()> {
        Ok(())
    }
    /// Ops issued from here go to the main queue again (without waiting for the side queue).
    fn end_side(&self) -> Result<()> {
        Ok(())
    }
    /// Ops issued from here run after everything issued on the side queue.
    fn join_side(&self) -> Result<()> {
        Ok(())
    }

    /// A forward step starts: the ops issued until [`Backend::end_step`] form one unit the
    /// backend may record and replay, and buffers allocated until then are step temporaries,
    /// valid until the next `begin_step` (the CUDA backend takes them from a fixed arena and
    /// replays repeated steps from CUDA graphs). The CPU runs ops as they come.
    fn begin_step(&self) -> Result<()> {
        Ok(())
    }
    /// The step's ops are all issued: run them (a copy back to the host ends a step too).
    fn end_step(&self) -> Result<()> {
        Ok(())
    }
    /// Whether the work of the last ended step is done on the device, without waiting (yes
    /// for a backend that runs ops as they are issued).
    fn step_done(&self) -> bool {
        true
    }
    /// Whether the copy that fills `buf` (an adapter's buffer from
    /// [`Backend::upload_staged`]: the copy of its part) has completed, so that a step may
    /// read it without waiting. The CUDA backend copies adapters on a stream of its own,
    /// beside the steps.
    fn upload_done(&self, buf: &Self::Buf) -> bool {
        let _ = buf;
        true
    }
    /// Ops issued from here on, on the queue in use (the side queue between
    /// [`Backend::begin_side`] and [`Backend::end_side`], else the main one), run after the
    /// copy that fills `buf` (nothing when it is done); the other queue waits only through a
    /// later join. Inside a step the wait is one of the step's ops: the CUDA backend then
    /// issues that part of the step op by op, never from a graph.
    fn wait_upload(&self, buf: &Self::Buf) -> Result<()> {
        let _ = buf;
        Ok(())
    }
    /// The row count a decode step of `rows` rows should be padded to (see
    /// [`StepMeta::pad_decode`]), or `None` to run it as it is. The CUDA backend pads to
    /// [`decode_bucket`] while CUDA graphs are on, so one graph serves every decode batch of
    /// a bucket; the CPU gains nothing from padding.
    fn decode_bucket(&self, rows: usize) -> Option<usize> {
        let _ = rows;
        None
    }
    /// How the latest step ran.
    fn last_step_path(&self) -> StepPath {
        StepPath::Issued
    }

    /// Wait until queued work is done (no-op on the CPU).
    fn synchronize(&self) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
        values
            .iter()
            .flat_map(|&v| match dtype {
                DType::F32 => v.to_le_bytes().to_vec(),
                DType::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                DType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
            })
            .collect()
    }

    #[test]
    fn a_host_tensor_converts_each_value_once_with_its_scale() {
        // More than one block of the conversion buffer.
        let values: Vec<f32> = (0..5000).map(|i| (i as f32 - 2500.5) * 0.37).collect();
        for src in [DType::F32, DType::BF16, DType::F16] {
            let stored = le_bytes(&values, src);
            // The values as stored, widened: what every conversion starts from.
            let widened = host_to_f32(src, &stored).unwrap();
            // The same bytes one past an aligned start (f32 goes through the block buffer).
            let mut shifted_buf = vec![0u8; stored.len() + 8];
            let at = 1 + shifted_buf.as_ptr().align_offset(8);
            shifted_buf[at..at + stored.len()].copy_from_slice(&stored);
            let shifted = &shifted_buf[at..at + stored.len()];
            for (scale, dst) in [
                (1.0f32, src),
                (2.0, DType::BF16),
                (0.5, DType::F16),
                (3.0, DType::F32),
            ] {
                let scaled: Vec<f32> = widened.iter().map(|v| v * scale).collect();
                for bytes in [&stored[..], shifted] {
                    let t = HostTensor::new(bytes, src, scale);
                    assert_eq!(t.len(), values.len());
                    assert_eq!(t.to_f32(), scaled);
                    // Into an odd offset too (byte pairs instead of u16 stores).
                    let mut buf = vec![0u8; values.len() * dst.size() + 1];
                    for start in [0usize, 1] {
                        let out = &mut buf[start..start + values.len() * dst.size()];
                        t.write(dst, out);
                        let want = le_bytes(&scaled, dst);
                        assert_eq!(out, &want[..], "{src:?} -> {dst:?} x{scale}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_host_tensor_finds_its_first_value_that_is_not_finite() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let fine = le_bytes(&[1.0, -2.0, 65504.0], dtype);
            assert_eq!(HostTensor::new(&fine, dtype, 1e30).first_non_finite(), None);
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let stored = le_bytes(&[1.0, bad, 2.0, bad], dtype);
                let (index, value) = HostTensor::new(&stored, dtype, 1.0)
                    .first_non_finite()
                    .unwrap();
                assert_eq!(index, 1, "{dtype:?}");
                assert!(value.to_bits() == bad.to_bits() || value.is_nan() && bad.is_nan());
            }
        }
        // A trailing partial value is not a value.
        let t = HostTensor::new(&[0u8, 0, 0x80, 0x3f, 0xff], DType::F32, 1.0);
        assert_eq!(t.to_f32(), vec![1.0]);
        assert!(!t.is_empty());
    }

    #[test]
    fn one_sequence_is_a_valid_step_of_fresh_blocks() {
        for rows in [1, 15, 16, 17, 512] {
            let meta = StepMeta::one_sequence(rows);
            meta.validate().unwrap();
            assert_eq!(meta.rows(), rows);
            assert_eq!(meta.block_tables.len(), rows.div_ceil(BLOCK_SIZE));
        }
    }

    #[test]
    fn decode_buckets_cover_every_row_count_up_to_256_with_little_padding() {
        let mut seen = std::collections::BTreeSet::new();
        for rows in 1..=256 {
            let b = decode_bucket(rows).unwrap();
            assert!(b >= rows && b - rows < 32, "{rows} -> {b}");
            assert_eq!(decode_bucket(b), Some(b), "a bucket is its own bucket");
            seen.insert(b);
        }
        assert_eq!(seen.len(), 4 + 7 + 6);
        assert_eq!(decode_bucket(0), None);
        assert_eq!(decode_bucket(257), None);
        assert_eq!(
            [3, 5, 9, 31, 33, 65, 200].map(|r| decode_bucket(r).unwrap()),
            [4, 8, 16, 32, 40, 96, 224]
        );
    }

    /// Three sequences decoding, the middle one without an adapter.
    fn decode_step() -> StepMeta {
        let tables = [vec![0u32, 1], vec![2], vec![3, 4, 5]];
        let tokens = [[5u32], [6], [7]];
        let seqs: Vec<SeqStep<'_>> = (0..3)
            .map(|i| SeqStep {
                tokens: &tokens[i],
                cached: [20, 3, 40][i],
                block_table: &tables[i],
                adapter_slot: [Some(2), None, Some(0)][i],
                sample: true,
            })
            .collect();
        StepMeta::build(&seqs).unwrap()
    }

    #[test]
    fn a_decode_step_pads_to_its_bucket_with_sequences_of_one_row_in_the_pad_block() {
        let meta = decode_step();
        let pad = padded(&meta, 8).unwrap();
        pad.validate().unwrap();
        assert_eq!(pad.rows(), 8);
        // The real rows are untouched and first.
        assert_eq!(pad.token_ids[..3], meta.token_ids[..]);
        assert_eq!(pad.positions[..3], meta.positions[..]);
        assert_eq!(pad.slot_mapping[..3], meta.slot_mapping[..]);
        assert_eq!(pad.seqs[..3], meta.seqs[..]);
        assert_eq!(pad.segments, meta.segments);
        // Padding: token 0 at position 0 in block 99, context 1, sampled after the real rows.
        assert_eq!(pad.token_ids[3..], [0; 5]);
        assert_eq!(pad.positions[3..], [0; 5]);
        assert_eq!(pad.slot_mapping[3..], [99 * BLOCK_SIZE as u32; 5]);
        assert!(
            pad.seqs[3..]
                .iter()
                .all(|s| s.num_rows == 1 && s.context_len == 1)
        );
        assert_eq!(pad.block_tables[meta.block_tables.len()..], [99; 5]);
        assert_eq!(pad.logit_rows, (0..8).collect::<Vec<u32>>());
        // A full bucket, an empty step or a prefill chunk is not padded.
        assert_eq!(padded(&meta, 3), None);
        assert_eq!(padded(&StepMeta::default(), 8), None);
        assert_eq!(padded(&StepMeta::one_sequence(2), 8), None);
        // Rows that do not all sample keep their logit rows; padding adds none.
        let mut some = meta.clone();
        some.logit_rows = vec![0, 2];
        assert_eq!(padded(&some, 4).unwrap().logit_rows, vec![0, 2]);
        // Padding into the same output again reuses its buffers.
        let mut out = StepMeta::default();
        assert!(meta.pad_decode(8, 99, &mut out));
        let ptr = out.token_ids.as_ptr();
        assert!(some.pad_decode(8, 99, &mut out));
        assert_eq!(out.token_ids.as_ptr(), ptr);
        assert_eq!(out.logit_rows, vec![0, 2]);
        assert_eq!(out.rows(), 8);
    }

    /// `meta` padded to `bucket` with pad block 99, if it pads.
    fn padded(meta: &StepMeta, bucket: usize) -> Option<StepMeta> {
        let mut out = StepMeta::default();
        meta.pad_decode(bucket, 99, &mut out).then_some(out)
    }

    #[test]
    fn par_map_keeps_the_order_of_its_items_whatever_their_costs() {
        for n in [0usize, 1, 2, 7, 100] {
            let items: Vec<usize> = (0..n).collect();
            let out = par_map(items, |&i| 1 + (i * 37) % 11, |i| i * 3 + 1);
            assert_eq!(out, (0..n).map(|i| i * 3 + 1).collect::<Vec<_>>());
        }
        // Disjoint mutable slices, as an adapter's staging buffer is split.
        let mut buf = [0u32; 50];
        let jobs: Vec<(usize, &mut [u32])> = buf.chunks_mut(7).enumerate().collect();
        let lens = par_map(
            jobs,
            |(_, c)| c.len(),
            |(i, c)| {
                c.fill(i as u32);
                c.len()
            },
        );
        assert_eq!(lens.iter().sum::<usize>(), 50);
        assert!(buf.iter().enumerate().all(|(j, &v)| v == (j / 7) as u32));
        // Zero cost: the calling thread.
        assert_eq!(par_map(vec![1, 2, 3], |_| 0, |i| i), vec![1, 2, 3]);
    }

    #[test]
    fn random_uniform_is_deterministic_and_in_range() {
        let a: Vec<f32> = (0..10_000).map(|i| random_uniform(7, i)).collect();
        assert!(a.iter().all(|v| (-1.0..1.0).contains(v)));
        assert_eq!(a[123], random_uniform(7, 123));
        assert_ne!(a[123], random_uniform(8, 123));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.03, "mean {mean}");
    }
}
