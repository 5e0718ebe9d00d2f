//! Launch planning for the CUDA kernels: segment tables -> row tiles, grid shapes, kernel variants
//! and the packed per-step metadata. Pure functions, unit-tested without a GPU.

use crate::engine::backend::{
    BLOCK_SIZE, BackendError, MAX_GROUP_PARTS, Result, RowSampling, StepMeta,
};

/// Rows per SGMV tile: the M of one `mma.sync.m16n8k16`.
pub const TILE_ROWS: usize = 16;
/// Warps per SGMV shrink block (kernels/sgmv.cu `SHRINK_WARPS`).
pub const SHRINK_WARPS: usize = 4;
/// Warps per SGMV expand block (kernels/sgmv.cu `EXPAND_WARPS`); each covers `8 * ntw` output
/// columns, `ntw` (4 or 8) being the kernel variant's 8-column tiles per warp.
pub const EXPAND_WARPS: usize = 4;
/// Largest LoRA rank of one projection the kernels support.
pub const MAX_RANK: usize = 128;
/// Largest total rank of a LoRA group (its parts' A stacked): what one shrink computes.
pub const MAX_GROUP_RANK: usize = MAX_GROUP_PARTS * MAX_RANK;
/// Most 8-wide rank tiles one shrink block keeps in registers (kernels/sgmv.cu `DEFINE_SHRINK`);
/// wider ranks go to more blocks.
pub const SHRINK_MAX_TILES: usize = 16;

/// Warps per block of the row kernels (kernels/sgmv.cu `ROWS_WARPS`).
pub const ROWS_WARPS: usize = 4;
/// 16-byte loads of A each lane of the row shrink keeps in flight (`ROWS_KU`).
pub const ROWS_KU: usize = 4;
/// Warps per block of the row expand (kernels/sgmv.cu `EXPAND_ROWS_WARPS`).
pub const EXPAND_ROWS_WARPS: usize = 8;
/// Column steps of B (16-byte loads) each lane of the row expand holds (`EXPAND_ROWS_KU`).
pub const EXPAND_ROWS_KU: usize = 1;
/// Blocks an SM of the grid-stride row expand (its launch bounds, `EXPAND_ROWS_GS_BLOCKS`).
pub const EXPAND_ROWS_GS_BLOCKS: usize = 6;
/// Warps per block of the fused gate|up expand + SiLU-mul (kernels/sgmv.cu `EXPAND_SILU_WARPS`).
pub const EXPAND_SILU_WARPS: usize = 8;
/// Its blocks an SM (launch bounds, `EXPAND_SILU_BLOCKS`).
pub const EXPAND_SILU_BLOCKS: usize = 4;
/// Columns of one row a block of it covers for a row without adapter (`EXPAND_SILU_GAP_COLS`).
pub const EXPAND_SILU_GAP_COLS: usize = 2048;
/// Column pairs of one row a block of the fused q|k|v expand + RoPE covers for a row without
/// adapter (`EXPAND_ROPE_GAP_PAIRS`).
pub const EXPAND_ROPE_GAP_PAIRS: usize = 256;
/// When the CUDA-core row kernels serve a batch instead of the tensor-core tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowLimits {
    /// Longest segment (0: never).
    pub max_seg: usize,
    /// Largest group rank (the stacked A's) of the row shrink: one warp per rank.
    pub shrink_rank: usize,
    /// Largest part rank of the row expand.
    pub expand_rank: usize,
    /// Largest part rank of the row expand for launches of at most [`ROWS_FEW_TILES`] tiles.
    pub expand_rank_few: usize,
}

/// Tiles (one-row segments) up to which [`RowLimits::expand_rank_few`] applies.
pub const ROWS_FEW_TILES: usize = 64;

impl RowLimits {
    /// Measured on the H200: decode batches of many adapters, one row each
    /// (bench/results/*-s4*). The row shrink serves every rank since session 10 (with 256-vector
    /// splits: `*-knob-*-s10e*`). The row expand serves r=64 up to 64 rows since session 14
    /// (`bench-kernels-*-s14i-rows64.txt`: one row 5.6 -> 4.8 us, 8 rows 8.4 -> 6.6, 32 and 64
    /// rows level or better); at 512 rows the tile expand wins (198 against 213 us).
    pub const DEFAULT: RowLimits = RowLimits {
        max_seg: 1,
        shrink_rank: MAX_GROUP_RANK,
        expand_rank: 32,
        expand_rank_few: 64,
    };
    /// Everything the row kernels can take (the selftest).
    pub const ALL: RowLimits = RowLimits {
        max_seg: TILE_ROWS,
        shrink_rank: MAX_GROUP_RANK,
        expand_rank: MAX_RANK,
        expand_rank_few: MAX_RANK,
    };
    /// Never.
    pub const NONE: RowLimits = RowLimits {
        max_seg: 0,
        shrink_rank: 0,
        expand_rank: 0,
        expand_rank_few: 0,
    };

    /// Whether the row shrink serves a batch whose longest segment has `max_seg_rows` rows,
    /// for a table of largest group rank `rank`.
    pub fn shrink(&self, max_seg_rows: usize, rank: usize) -> bool {
        self.rows(max_seg_rows) && rank <= self.shrink_rank
    }

    /// Whether the row expand serves it, for a table of largest part rank `part_rank`, over
    /// `tiles` tiles.
    pub fn expand(&self, max_seg_rows: usize, part_rank: usize, tiles: usize) -> bool {
        let rank = if tiles <= ROWS_FEW_TILES {
            self.expand_rank.max(self.expand_rank_few)
        } else {
            self.expand_rank
        };
        self.rows(max_seg_rows) && part_rank <= rank
    }

    fn rows(&self, max_seg_rows: usize) -> bool {
        max_seg_rows > 0 && max_seg_rows <= self.max_seg.min(TILE_ROWS)
    }
}

// The shrink's launch rules, measured on the H200 (bench/results/*-knob-*-s10*).

/// Default 8-element vectors of h_in per split of the row shrink (one pass of a warp).
pub const SHRINK_ROWS_VECS: usize = 256;
/// Split-K target of the row shrink in blocks per SM: one full wave of its blocks (kernels/sgmv.cu
/// launch bound of `sgmv_shrink_rows_*`).
pub const SHRINK_ROWS_BLOCKS_PER_SM: usize = 8;
/// Default target of the tile shrink in blocks per SM: for spreading ranks over blocks, and for
/// the split-K of tiles of a few rows.
pub const SHRINK_BLOCKS_PER_SM: usize = 4;
/// Default cap on the split-K of tiles of many rows.
pub const SHRINK_MAX_SPLITS_FULL: usize = 16;

/// The row shrink's grid: `(h_in splits, rank blocks)`. A split reads at most `vecs` 8-element
/// vectors of each rank's row of A; batches that leave SMs idle get more splits, to about
/// `target_blocks` blocks in all (rounded to the nearest split count), as long as every lane
/// keeps a vector of its own.
pub fn shrink_rows_plan(
    h_in: usize,
    max_rank: usize,
    num_tiles: usize,
    vecs: usize,
    target_blocks: usize,
) -> (usize, usize) {
    let nvec = h_in.div_ceil(8);
    let rank_blocks = max_rank.div_ceil(ROWS_WARPS).max(1);
    let base = nvec.div_ceil(vecs.max(1));
    let per_split = num_tiles.max(1) * rank_blocks;
    let fill = (target_blocks + per_split / 2) / per_split;
    let most = (nvec / 32).max(1);
    (base.max(fill).clamp(1, most), rank_blocks)
}

/// How the row expand covers `h_out` columns of every row tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowExpandPlan {
    /// Lanes per column, each holding 8 of its ranks (1 to 16).
    pub lanes: usize,
    /// Column blocks a tile: `EXPAND_ROWS_WARPS` warps of `32 / lanes` columns, times
    /// `EXPAND_ROWS_KU` for the plain kernel.
    pub col_blocks: usize,
    /// The grid-stride kernel's blocks a tile (each takes every `per_tile`-th column block), or
    /// `None` for the plain kernel (a block a column block).
    pub per_tile: Option<usize>,
}

impl RowExpandPlan {
    /// The launch grid over `num_tiles` tiles.
    pub fn grid(&self, num_tiles: usize) -> (u32, u32) {
        match self.per_tile {
            Some(per_tile) => ((per_tile * num_tiles) as u32, 1),
            None => (self.col_blocks as u32, num_tiles as u32),
        }
    }
}

/// The row expand for a table whose largest part rank is `max_part_rank`, `h_out` columns and
/// `num_tiles` row tiles on `sm_count` SMs. Where a tile has at least twice as many column
/// blocks as one wave of the grid-stride kernel gives it, that kernel runs with one wave (its
/// blocks load the next column block's B while applying the current one: 7B batch 32 at r=16,
/// q|k|v 8.8 -> 7.7 us and gate|up 14.6 -> 12.4 us on the H200); narrower outputs keep the
/// plain kernel, whose 32 registers fit more blocks (o and down: 3.4-3.6 us against 3.5-3.7).
/// So do tiles too many to fill three quarters of a wave with whole blocks a tile.
pub fn expand_rows_plan(
    max_part_rank: usize,
    h_out: usize,
    num_tiles: usize,
    sm_count: usize,
) -> Result<RowExpandPlan> {
    check_rank(max_part_rank)?;
    let lanes = max_part_rank.div_ceil(8).next_power_of_two();
    let full = EXPAND_ROWS_GS_BLOCKS * sm_count;
    let wave = (full / num_tiles.max(1)).max(1);
    let gs_blocks = h_out.div_ceil(EXPAND_ROWS_WARPS * (32 / lanes));
    Ok(
        if gs_blocks >= 2 * wave && 4 * wave * num_tiles >= 3 * full {
            RowExpandPlan {
                lanes,
                col_blocks: gs_blocks,
                per_tile: Some(wave),
            }
        } else {
            let cols = EXPAND_ROWS_WARPS * EXPAND_ROWS_KU * (32 / lanes);
            RowExpandPlan {
                lanes,
                col_blocks: h_out.div_ceil(cols),
                per_tile: None,
            }
        },
    )
}

/// The launch of an expand fused into the op after it (kernels/sgmv.cu
/// `sgmv_expand_silu_rows_*`, `sgmv_expand_rope_rows_*`): the grid-stride row expand's blocks
/// over the tiles, then the blocks of the rows that no segment covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FusedExpandPlan {
    /// Lanes a column (8 ranks each).
    pub lanes: usize,
    /// Column blocks of a row: `EXPAND_SILU_WARPS * 32 / lanes` units (columns, or column
    /// pairs) each.
    pub col_blocks: usize,
    /// Blocks a tile; each takes every `per_tile`-th column block.
    pub per_tile: usize,
    /// Blocks after the tiles': none when the segments cover every row, else a row's worth
    /// for every row of the step.
    pub gap_blocks: usize,
}

impl FusedExpandPlan {
    /// The launch grid over `num_tiles` tiles.
    pub fn grid(&self, num_tiles: usize) -> u32 {
        (self.per_tile * num_tiles + self.gap_blocks) as u32
    }
}

/// A fused expand for a table whose largest part rank is `max_part_rank` over `units` a row
/// (the gate|up expand + SiLU-mul: the `n` columns of a part; the q|k|v expand + RoPE: the
/// column pairs of all heads), `gap_units` of which a block covers in a row without adapter;
/// `num_tiles` row tiles of a step of `rows` rows, `lora_rows` of which are in a segment, on
/// `sm_count` SMs: one wave of blocks over the tiles, as the grid-stride expand.
pub fn fused_expand_plan(
    max_part_rank: usize,
    (units, gap_units): (usize, usize),
    num_tiles: usize,
    (rows, lora_rows): (usize, usize),
    sm_count: usize,
) -> Result<FusedExpandPlan> {
    check_rank(max_part_rank)?;
    let lanes = max_part_rank.div_ceil(8).next_power_of_two();
    let col_blocks = units.div_ceil(EXPAND_SILU_WARPS * (32 / lanes));
    let wave = (EXPAND_SILU_BLOCKS * sm_count / num_tiles.max(1)).max(1);
    let gap_rows = if lora_rows < rows { rows } else { 0 };
    Ok(FusedExpandPlan {
        lanes,
        col_blocks,
        per_tile: col_blocks.clamp(1, wave),
        gap_blocks: gap_rows * units.div_ceil(gap_units.max(1)),
    })
}

/// Bytes of one slot of a LoRA group table (kernels/sgmv.cu `LoraSlot`).
pub const LORA_SLOT_BYTES: usize = 64;

/// One slot of a LoRA group table as the kernels read it: the stacked A and its total rank,
/// and per part `(B, rank, first column in v)` (a null B: the slot lacks that part).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoraSlotEntry {
    pub a: u64,
    pub rank: u32,
    pub parts: [(u64, u32, u32); MAX_GROUP_PARTS],
}

impl LoraSlotEntry {
    /// Append its [`LORA_SLOT_BYTES`] little-endian bytes in the kernels' field order.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.a.to_le_bytes());
        out.extend_from_slice(&self.rank.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for (b, _, _) in &self.parts {
            out.extend_from_slice(&b.to_le_bytes());
        }
        for (_, rank, _) in &self.parts {
            out.extend_from_slice(&rank.to_le_bytes());
        }
        for (_, _, voff) in &self.parts {
            out.extend_from_slice(&voff.to_le_bytes());
        }
    }
}
/// Largest attention head dimension the attention kernel supports.
pub const MAX_HEAD_DIM: usize = 256;

/// Cut every segment into tiles of at most [`TILE_ROWS`] rows: `(segment index, first row)`.
pub fn row_tiles<'a>(starts: &'a [u32], ends: &'a [u32]) -> impl Iterator<Item = [u32; 2]> + 'a {
    starts
        .iter()
        .zip(ends)
        .enumerate()
        .flat_map(|(seg, (&s, &e))| (s..e).step_by(TILE_ROWS).map(move |row| [seg as u32, row]))
}

/// The 8-wide rank tiles a shrink covers for a table whose largest total rank is `max_rank`
/// (a power of two: 1 to 64; beyond [`SHRINK_MAX_TILES`] they are spread over blocks).
pub fn shrink_rank_tiles(max_rank: usize) -> Result<usize> {
    if max_rank == 0 || max_rank > MAX_GROUP_RANK {
        return Err(BackendError::Shape(format!(
            "LoRA group rank {max_rank} is outside 1..={MAX_GROUP_RANK}"
        )));
    }
    Ok(max_rank.div_ceil(8).next_power_of_two())
}

/// The expand kernel variant for `max_rank`: the number of 32-wide rank chunks (1, 2 or 4).
pub fn expand_rank_chunks(max_rank: usize) -> Result<usize> {
    check_rank(max_rank)?;
    Ok(max_rank.div_ceil(32).next_power_of_two())
}

fn check_rank(max_rank: usize) -> Result<()> {
    if max_rank == 0 || max_rank > MAX_RANK {
        return Err(BackendError::Shape(format!(
            "LoRA rank {max_rank} is outside 1..={MAX_RANK}"
        )));
    }
    Ok(())
}

/// How many blocks split the h_in reduction of one row tile, aiming at `target_blocks` in all.
/// Small batches need many splits to put enough loads in flight on every SM; large ones have
/// enough tiles already. Each warp keeps at least one 32-wide k step.
/// `cap` bounds the split (each split adds a round of f32 atomics per row and rank).
pub fn shrink_splits(num_tiles: usize, h_in: usize, target_blocks: usize, cap: usize) -> usize {
    let steps = h_in.div_ceil(32);
    let max_split = (steps / SHRINK_WARPS).clamp(1, cap.max(1));
    let target_blocks = target_blocks.max(1);
    target_blocks.div_ceil(num_tiles.max(1)).clamp(1, max_split)
}

/// Blocks an SM that the split-K of tiles of many rows aims at, at most (see
/// [`shrink_splits_full`]).
pub const SHRINK_FULL_BLOCKS_PER_SM: usize = 3;

/// Split-K of tiles of many rows (at least two rows a tile on average): as many splits as keep
/// every block resident at once (`resident` blocks on the device, at most
/// [`SHRINK_FULL_BLOCKS_PER_SM`] an SM of `sms`: a second wave costs more than the splits
/// save), each warp keeping at least one 32-wide k step, at most `cap`. On the H200 at 512 rows
/// and r=64 (bench/results/sgmv-tile-probe-*-s17*.txt, 3 blocks an SM resident): 32 tiles took
/// 8.7 us at 12 splits (384 blocks) against 9.6 at 9 and 12.5 at 16; 46 tiles 11.8 us at 8
/// against 12.9 at 6 and 16.7 at 12. Kernels of 5 blocks an SM at 16 splits (512 blocks) were
/// slower than at 8-9 (bench-kernels-*-s17e.txt against -s17b: 128 rows r=64 9.7 us against 8.0).
pub fn shrink_splits_full(
    num_tiles: usize,
    h_in: usize,
    resident: usize,
    sms: usize,
    cap: usize,
) -> usize {
    let max_split = (h_in.div_ceil(32) / SHRINK_WARPS).clamp(1, cap.max(1));
    let blocks = resident.min(SHRINK_FULL_BLOCKS_PER_SM * sms);
    (blocks / num_tiles.max(1)).clamp(1, max_split)
}

/// Rank split of the shrink: `(rank tiles per block, rank groups)`. When even the widest split-K
/// leaves fewer than `target_blocks` blocks, ranks are spread over blocks too, down to two 8-wide
/// rank tiles (16 ranks) per block.
pub fn shrink_rank_split(
    num_tiles: usize,
    h_in: usize,
    target_blocks: usize,
    rank_tiles: usize,
) -> (usize, usize) {
    let max_split = (h_in.div_ceil(32) / SHRINK_WARPS).max(1);
    let blocks = num_tiles.max(1) * max_split;
    if rank_tiles <= 2 || blocks >= target_blocks {
        return (rank_tiles, 1);
    }
    let groups = target_blocks
        .div_ceil(blocks)
        .next_power_of_two()
        .min(rank_tiles / 2);
    (rank_tiles / groups, groups)
}

/// One expand launch over some of a group's parts: the first part, the first column (from the
/// group's first), and the parts' ends relative to that column (unused ends repeat the last).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpandLaunch {
    pub part0: usize,
    pub col: usize,
    pub ends: [usize; MAX_GROUP_PARTS],
}

impl ExpandLaunch {
    /// Columns it covers.
    pub fn width(&self) -> usize {
        self.ends[MAX_GROUP_PARTS - 1]
    }
}

/// Where each part of a group whose parts have `outs` columns ends, counted from the group's
/// first column (parts it lacks end where the last one does).
pub fn group_ends(outs: &[usize]) -> [usize; MAX_GROUP_PARTS] {
    let mut ends = [0; MAX_GROUP_PARTS];
    let mut end = 0;
    for (j, e) in ends.iter_mut().enumerate() {
        end += outs.get(j).copied().unwrap_or(0);
        *e = end;
    }
    ends
}

/// The expand launches of a group whose parts have `outs` columns: one for the whole group
/// when every part boundary falls between two warps' columns (`8 * ntw` each), else one per
/// part, since a warp reads one part's B.
pub fn expand_launches(outs: &[usize], ntw: usize) -> ExpandLaunches {
    let warp_cols = 8 * ntw.max(1);
    let inner = &outs[..outs.len().saturating_sub(1)];
    let mut out = ExpandLaunches {
        len: 0,
        launches: [ExpandLaunch {
            part0: 0,
            col: 0,
            ends: [0; MAX_GROUP_PARTS],
        }; MAX_GROUP_PARTS],
    };
    if inner.iter().all(|w| w.is_multiple_of(warp_cols)) {
        out.launches[0].ends = group_ends(outs);
        out.len = 1;
        return out;
    }
    let mut col = 0;
    for (j, (&w, launch)) in outs.iter().zip(out.launches.iter_mut()).enumerate() {
        *launch = ExpandLaunch {
            part0: j,
            col,
            ends: [w; MAX_GROUP_PARTS],
        };
        col += w;
        out.len = j + 1;
    }
    out
}

/// The launches of [`expand_launches`] (one per part at most), held inline.
#[derive(Clone, Copy, Debug)]
pub struct ExpandLaunches {
    len: usize,
    launches: [ExpandLaunch; MAX_GROUP_PARTS],
}

impl std::ops::Deref for ExpandLaunches {
    type Target = [ExpandLaunch];
    fn deref(&self) -> &[ExpandLaunch] {
        &self.launches[..self.len]
    }
}

/// Head dimensions the vector attention kernel (`attention_d{64,128,256}`, bf16/f16) serves:
/// a lane holds `head_dim / 32` elements, read as one 4-, 8- or 16-byte load.
pub const ATTN_VEC_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// The vector attention kernel's name for `head_dim` and a dtype suffix, when there is one.
pub fn attention_vec_kernel(head_dim: usize, suffix: &str) -> Option<KernelName> {
    (suffix != "f32" && ATTN_VEC_HEAD_DIMS.contains(&head_dim))
        .then(|| KernelName::of(format_args!("attention_d{head_dim}_{suffix}")))
        .flatten()
}

/// Longest kernel name (bytes).
pub const MAX_KERNEL_NAME: usize = 48;

/// A kernel's name formatted on the stack: a step names hundreds of launches (per dtype and
/// variant) and allocates nothing for them.
#[derive(Clone, Copy)]
pub struct KernelName {
    len: usize,
    buf: [u8; MAX_KERNEL_NAME],
}

impl KernelName {
    /// The formatted name, or `None` when it is longer than [`MAX_KERNEL_NAME`].
    pub fn of(args: std::fmt::Arguments<'_>) -> Option<Self> {
        let mut name = KernelName {
            len: 0,
            buf: [0; MAX_KERNEL_NAME],
        };
        std::fmt::Write::write_fmt(&mut name, args).ok()?;
        Some(name)
    }

    pub fn as_str(&self) -> &str {
        // Only whole `&str`s are ever written: always UTF-8.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl std::fmt::Write for KernelName {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        let dst = self.buf.get_mut(self.len..end).ok_or(std::fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl std::ops::Deref for KernelName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for KernelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for KernelName {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for KernelName {}

/// The expand for long segments (kernels/sgmv.cu `sgmv_expand_long_*`): a block's warps take
/// consecutive tiles and walk `EXPAND_LONG_CHUNKS` chunks of `8 * EXPAND_LONG_NTW` columns.
pub const EXPAND_LONG_CHUNKS: usize = 4;
pub const EXPAND_LONG_NTW: usize = 4;
/// Columns a block of the long-segment expand covers.
pub const EXPAND_LONG_COLS: usize = EXPAND_LONG_CHUNKS * EXPAND_LONG_NTW * 8;
/// Tiles from which the long-segment expand takes a batch whose segments average at least two
/// tiles' worth of rows: below it the tile expand's one block per tile and column block keeps
/// more of the GPU busy (H200, bench/results/sgmv-tile-probe-*-s17*.txt: 128 rows in 12 tiles
/// took 8.0 us against 5.6; 512 rows in 32-46 tiles 10.4-11.4 us against 10.9-16.4).
pub const EXPAND_LONG_MIN_TILES: usize = 32;

/// Whether the expand of `rows` rows in `tiles` row tiles goes to the long-segment kernel.
pub fn expand_long(rows: usize, tiles: usize) -> bool {
    tiles >= EXPAND_LONG_MIN_TILES && rows >= 2 * tiles
}

/// The long-segment expand's grid: (column blocks, blocks of `EXPAND_WARPS` tiles).
pub fn expand_long_grid(h_out: usize, num_tiles: usize) -> (u32, u32) {
    (
        h_out.div_ceil(EXPAND_LONG_COLS) as u32,
        num_tiles.div_ceil(EXPAND_WARPS) as u32,
    )
}

/// Expand grid: (column blocks, row tiles) for `ntw` 8-column tiles per warp.
pub fn expand_grid(h_out: usize, num_tiles: usize, ntw: usize) -> (u32, u32) {
    let cols = EXPAND_WARPS * 8 * ntw.max(1);
    (h_out.div_ceil(cols) as u32, num_tiles as u32)
}

/// Where each array of a packed [`StepMeta`] starts in the one u32 buffer the device gets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MetaLayout {
    pub rows: usize,
    pub token_ids: usize,
    pub positions: usize,
    pub slot_mapping: usize,
    /// Sequence index per row.
    pub row_seq: usize,
    /// Per row: 1 when a segment covers it (it has an adapter), else 0.
    pub row_lora: usize,
    /// Rows that a segment covers.
    pub lora_rows: usize,
    /// 5 words per sequence: row_start, num_rows, context_len, block_table_start, num_blocks.
    pub seqs: usize,
    pub num_seqs: usize,
    pub block_tables: usize,
    /// 3 words per tile: its segment's start, end and slot (a segment's words once for each
    /// of its tiles); zeros pad it to `tile_cap`.
    pub segs: usize,
    pub num_segs: usize,
    /// 2 words per tile: segment, first row; [`TILE_NONE`] entries pad it to `tile_cap`.
    pub tiles: usize,
    pub num_tiles: usize,
    /// Tile entries the section holds (at least `rows`): kernels may be launched over any
    /// number of tiles up to it (see [`MetaLayout::tile_grid`]).
    pub tile_cap: usize,
    pub logit_rows: usize,
    pub num_logit_rows: usize,
    /// Largest adapter slot any segment uses (tables must be longer).
    pub max_slot: Option<u32>,
    /// Rows of the longest segment (0 without segments).
    pub max_seg_rows: usize,
    /// The step's segment when it has exactly one: start, end, slot.
    pub single_seg: Option<[u32; 3]>,
    /// Largest KV-cache slot written this step (caches must hold more).
    pub max_kv_slot: Option<u32>,
    /// Largest block id in any block table.
    pub max_block: Option<u32>,
    pub total: usize,
}

/// The segment index of a tile entry that stands for no rows (kernels/sgmv.cu `TILE_NONE`):
/// the blocks of such a tile do nothing.
pub const TILE_NONE: u32 = u32::MAX;

impl MetaLayout {
    /// Tiles an SGMV launch covers: the step's tiles rounded up to a power of two (at most
    /// [`Self::tile_cap`]), the rest being [`TILE_NONE`] entries. So steps whose tile counts
    /// differ a little launch the same grids and a CUDA graph of one serves the others.
    pub fn tile_grid(&self) -> usize {
        if self.num_tiles == 0 {
            return 0;
        }
        self.num_tiles.next_power_of_two().min(self.tile_cap)
    }
}

/// Validate a step's metadata and pack it into one u32 array so it reaches the device in one
/// copy. Everything a kernel indexes with is checked here, so kernels never read out of bounds.
///
/// Every section but the block tables has room for as many entries as the step has rows
/// (sequences, segments and tiles each cover at least one row), so two steps of the same row
/// count put every section at the same offset, whatever their sequences and segments: the
/// kernels' arguments, and so a CUDA graph of one, serve the other. The block tables come last.
///
/// `words` is cleared and filled (a buffer reused from step to step allocates nothing).
pub fn pack_meta(meta: &StepMeta, words: &mut Vec<u32>) -> Result<MetaLayout> {
    let rows = meta.token_ids.len();
    let bad = |what: String| Err(BackendError::Shape(what));
    if meta.positions.len() != rows || meta.slot_mapping.len() != rows {
        return bad(format!(
            "step metadata: {rows} token ids but {} positions and {} KV slots",
            meta.positions.len(),
            meta.slot_mapping.len()
        ));
    }
    // The per-row sections first; the sequence of each row is filled in while checking.
    words.clear();
    words.extend_from_slice(&meta.token_ids);
    words.extend_from_slice(&meta.positions);
    words.extend_from_slice(&meta.slot_mapping);
    words.resize(4 * rows, u32::MAX);
    let row_seq = &mut words[3 * rows..];
    for (i, s) in meta.seqs.iter().enumerate() {
        let end = s.row_start as usize + s.num_rows as usize;
        if end > rows || s.num_rows == 0 {
            return bad(format!(
                "sequence {i}: rows {}..{end} outside the batch of {rows}",
                s.row_start
            ));
        }
        if s.num_rows > s.context_len {
            return bad(format!(
                "sequence {i}: {} new rows but a context of {}",
                s.num_rows, s.context_len
            ));
        }
        let bt_end = s.block_table_start as usize + s.num_blocks as usize;
        if bt_end > meta.block_tables.len()
            || (s.num_blocks as usize) * BLOCK_SIZE < s.context_len as usize
        {
            return bad(format!(
                "sequence {i}: block table {}..{bt_end} of {} blocks cannot hold {} tokens",
                s.block_table_start,
                meta.block_tables.len(),
                s.context_len
            ));
        }
        for (r, owner) in row_seq
            .iter_mut()
            .enumerate()
            .take(end)
            .skip(s.row_start as usize)
        {
            if *owner != u32::MAX {
                return bad(format!("row {r} belongs to two sequences"));
            }
            *owner = i as u32;
        }
    }
    if !meta.seqs.is_empty() {
        if let Some(r) = row_seq.iter().position(|&s| s == u32::MAX) {
            return bad(format!("row {r} belongs to no sequence"));
        }
    } else {
        row_seq.iter_mut().for_each(|s| *s = 0);
    }
    let seg = &meta.segments;
    if seg.starts.len() != seg.ends.len() || seg.starts.len() != seg.slots.len() {
        return bad("segment table arrays differ in length".into());
    }
    for (i, (&s, &e)) in seg.starts.iter().zip(&seg.ends).enumerate() {
        if s >= e || e as usize > rows {
            return bad(format!(
                "segment {i}: rows {s}..{e} outside the batch of {rows}"
            ));
        }
    }
    if let Some(&r) = meta.logit_rows.iter().find(|&&r| r as usize >= rows) {
        return bad(format!("logit row {r} outside the batch of {rows}"));
    }
    // Which rows have an adapter (segments are disjoint: `StepMeta::validate`).
    let at = words.len();
    words.resize(at + rows, 0);
    for (&s, &e) in seg.starts.iter().zip(&seg.ends) {
        words[at + s as usize..at + e as usize].fill(1);
    }
    let lora_rows = seg
        .starts
        .iter()
        .zip(&seg.ends)
        .map(|(&s, &e)| (e - s) as usize)
        .sum();
    let num_tiles = row_tiles(&seg.starts, &seg.ends).count();

    let mut layout = MetaLayout {
        rows,
        num_seqs: meta.seqs.len(),
        num_segs: seg.len(),
        num_tiles,
        lora_rows,
        tile_cap: num_tiles.max(rows),
        num_logit_rows: meta.logit_rows.len(),
        max_slot: seg.slots.iter().copied().max(),
        max_seg_rows: seg
            .starts
            .iter()
            .zip(&seg.ends)
            .map(|(&s, &e)| (e - s) as usize)
            .max()
            .unwrap_or(0),
        single_seg: (seg.len() == 1).then(|| [seg.starts[0], seg.ends[0], seg.slots[0]]),
        max_kv_slot: meta.slot_mapping.iter().copied().max(),
        max_block: meta.block_tables.iter().copied().max(),
        ..MetaLayout::default()
    };
    layout.token_ids = 0;
    layout.positions = rows;
    layout.slot_mapping = 2 * rows;
    layout.row_seq = 3 * rows;
    layout.row_lora = 4 * rows;
    // Each section padded to its capacity (at least one entry per row).
    let pad = |words: &mut Vec<u32>, start: usize, len: usize, fill: &[u32]| {
        while words.len() < start + len {
            words.extend_from_slice(fill);
        }
    };
    layout.seqs = words.len();
    for s in &meta.seqs {
        words.extend_from_slice(&[
            s.row_start,
            s.num_rows,
            s.context_len,
            s.block_table_start,
            s.num_blocks,
        ]);
    }
    pad(words, layout.seqs, 5 * meta.seqs.len().max(rows), &[0]);
    // Each tile's segment at the tile's index: a kernel reads it alongside the tile's entry,
    // not after it (one dependent load fewer before its first weights).
    layout.segs = words.len();
    for [s, _] in row_tiles(&seg.starts, &seg.ends) {
        let s = s as usize;
        words.extend_from_slice(&[seg.starts[s], seg.ends[s], seg.slots[s]]);
    }
    pad(words, layout.segs, 3 * layout.tile_cap, &[0]);
    layout.tiles = words.len();
    for t in row_tiles(&seg.starts, &seg.ends) {
        words.extend_from_slice(&t);
    }
    pad(words, layout.tiles, 2 * layout.tile_cap, &[TILE_NONE, 0]);
    layout.logit_rows = words.len();
    words.extend_from_slice(&meta.logit_rows);
    pad(
        words,
        layout.logit_rows,
        meta.logit_rows.len().max(rows),
        &[0],
    );
    // Last, as the only section whose length changes from one decode step to the next: every
    // other offset stays put while a batch decodes, and so do the kernels' arguments (a
    // repeated step is replayed from a CUDA graph, see `graph`).
    layout.block_tables = words.len();
    words.extend_from_slice(&meta.block_tables);
    // Keep every offset addressable even when arrays are empty.
    words.push(0);
    layout.total = words.len();
    Ok(layout)
}

/// Threads per block for a row-wise op over `cols` columns.
pub fn row_block(cols: usize) -> u32 {
    match cols {
        0..=256 => 128,
        257..=2048 => 256,
        _ => 512,
    }
}

/// Threads per block of the register-resident norm (kernels/ops.cu `NORM_VEC_THREADS`).
pub const NORM_VEC_THREADS: usize = 512;
/// Widest row the register-resident norm holds: two 16-byte vectors of 8 values per thread.
pub const NORM_VEC_MAX_HIDDEN: usize = 2 * 8 * NORM_VEC_THREADS;

/// The register-resident `rms_norm_vec{vpt}` kernel for rows of `hidden` bf16/f16 values:
/// `(vectors per thread, threads per block)`, or `None` when the general kernel must run (a
/// width of zero, not a multiple of 8 or above [`NORM_VEC_MAX_HIDDEN`]). One vector per thread
/// while the row fits one block, so a decode step's few rows spread over the most threads.
pub fn norm_vec_plan(hidden: usize) -> Option<(usize, u32)> {
    if hidden == 0 || !hidden.is_multiple_of(8) || hidden > NORM_VEC_MAX_HIDDEN {
        return None;
    }
    let nvec = hidden / 8;
    let vpt = nvec.div_ceil(NORM_VEC_THREADS);
    Some((vpt, nvec.div_ceil(vpt).next_multiple_of(32) as u32))
}

/// Largest block of the sampling kernel (kernels/ops.cu `SAMPLE_MAX_THREADS`).
pub const SAMPLE_MAX_THREADS: usize = 1024;

/// Threads per block of `sample_f32` (one block per row): a multiple of 32 (the kernel scans by
/// whole warps), about 64 logits per thread, between 128 and [`SAMPLE_MAX_THREADS`]. The
/// top-p search reads the row 32 times, so large vocabularies get the largest block.
pub fn sample_block(vocab: usize) -> u32 {
    (vocab.div_ceil(64).next_power_of_two()).clamp(128, SAMPLE_MAX_THREADS) as u32
}

/// Bytes per row of [`pack_sampling`].
pub const SAMPLING_BYTES: usize = 16;

/// The per-row sampling parameters as kernels/ops.cu `RowSamplingDev` reads them: temperature
/// (f32), top_k (u32), top_p (f32), u (f32), little-endian, [`SAMPLING_BYTES`] per row.
/// `bytes` is cleared first.
pub fn pack_sampling(rows: &[RowSampling], bytes: &mut Vec<u8>) {
    bytes.clear();
    for r in rows {
        bytes.extend_from_slice(&r.temperature.to_le_bytes());
        bytes.extend_from_slice(&r.top_k.to_le_bytes());
        bytes.extend_from_slice(&r.top_p.to_le_bytes());
        bytes.extend_from_slice(&r.u.to_le_bytes());
    }
}

/// Grid for a grid-stride elementwise op over `n` elements with 256-thread blocks.
pub fn elementwise_grid(n: usize, sm_count: usize) -> u32 {
    n.div_ceil(256).clamp(1, 32 * sm_count.max(1)) as u32
}

/// Rows of one adapter from which the whole LoRA operator of a launch whose rows are all one
/// segment runs as two dense GEMMs (cuBLAS: x · Aᵀ into an intermediate of the activations'
/// bf16, then y += it · Bᵀ), at a total rank of [`DENSE_MIN_RANK`] or more. There the two
/// GEMMs beat the tile kernels: 512 rows of 7B r=64 in 13.5 us against 17.4; at r=16 the
/// kernels win, 12.0 against 13.4 (H200, bench/results/sgmv-tile-probe-h200-2026-11-30-s19a.txt,
/// bench-kernels-h200-2026-11-30-s19a*.txt). Only bf16: f16's range could overflow where the
/// kernels' f32 intermediate does not.
pub const DENSE_MIN_ROWS: usize = 256;
pub const DENSE_MIN_RANK: usize = 64;

/// Whether a launch of one segment of `rows` rows whose slot has total rank `rank` runs as the
/// two dense GEMMs (see [`DENSE_MIN_ROWS`]).
pub fn dense_lora(rows: usize, rank: usize) -> bool {
    rows >= DENSE_MIN_ROWS && rank >= DENSE_MIN_RANK
}

/// The streamed LoRA kernel (`sgmv_lora_stream_*`, kernels/sgmv.cu, sm_90 and later): shrink
/// and expand of one-row segments in one kernel, the weights fed by bulk copies into a ring of
/// shared-memory stages. Consumer warps a block (one producer warp more).
pub const STREAM_CONSUMERS: usize = 16;
/// Ring stages at most (the kernel's barriers).
pub const STREAM_MAX_STAGES: usize = 16;
/// Largest total rank of a slot the kernel's copies of v hold.
pub const STREAM_MAX_RANK: usize = 384;
/// Shared memory before the x row: barriers (512 bytes), the shrink's sums and two copies of v.
pub const STREAM_HDR: usize = 512 + 4 * STREAM_MAX_RANK * 3;
/// Bytes of a ring stage: six of 32 KiB beat twelve of 16 KiB on the H200
/// (bench/results/sgmv-lora-stream-probe-h200-2026-11-30-s16*.txt).
pub const STREAM_STAGE_BYTES: usize = 32768;
/// Dynamic shared memory a block may have on sm_90 (227 KiB).
pub const STREAM_MAX_SMEM: usize = 232_448;
/// Cluster sizes the kernel is instantiated for (what [`stream_plan`] picks).
pub const STREAM_CLUSTERS: [usize; 4] = [1, 2, 3, 4];

/// One launch of the streamed LoRA kernel: `cluster` blocks a row (a cluster), the ring's
/// stages, the columns of y a block's copy of the old y holds, and the dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamPlan {
    pub cluster: usize,
    pub stages: usize,
    pub y_cap: usize,
    pub smem: usize,
    /// The `_mma` kernel: shrink and expand on tensor cores.
    pub mma: bool,
}

/// Rows whose A and B take at most this many bytes go to clusters of one block from
/// [`STREAM_SMALL_ROW_MIN_TILES`] rows: their halves are too small to pay for the exchange of v
/// between a pair (H200, 7B r=16, bench/results/bench-kernels-*-s17d-all-c*.txt: 64 rows took
/// 8.0 us in clusters of 1 against 9.3 in pairs; 32 rows 7.2 against 5.5, and 64 rows of 512 or
/// 1024 KiB 15.9 and 26.8 against 14.8 and 24.3).
pub const STREAM_SMALL_ROW_BYTES: usize = 256 * 1024;
pub const STREAM_SMALL_ROW_MIN_TILES: usize = 48;

/// Measurement knobs of [`stream_plan`]: stream even what the few-blocks rule leaves to the two
/// kernels (`all`), a cluster size in place of the plan's, and never the `_mma` kernel
/// (`no_mma`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamKnobs {
    pub all: bool,
    pub cluster: Option<usize>,
    pub no_mma: bool,
}

/// A block's share of the weights up to which the streamed kernel serves a launch of fewer
/// blocks than half the SMs: beyond it the shrink and expand kernels, spread over every SM,
/// win (r=64 at 8 and 32 rows: bench/results/bench-kernels-h200-2026-11-30-s16g*.txt).
/// The `_mma` kernel serves launches of a quarter of the SMs or more whatever a block reads
/// (r=64 at 32 rows in pairs: 15.3 us against 16.7 for the two kernels,
/// bench/results/bench-kernels-h200-2026-11-30-s18a*.txt), and leaves fewer to the two kernels
/// (8 rows in the probe: 8.6 against 7.3).
pub const STREAM_FEW_BLOCK_BYTES: usize = 128 * 1024;

/// The `_mma` kernel (shrink and expand on tensor cores) serves rows of more than
/// [`STREAM_SMALL_ROW_BYTES`] of one part whose rank is this, in clusters of one or two: there
/// it was faster, elsewhere slower (H200, bench/results/sgmv-lora-stream-probe-mma-h200-2026-11-30-s18a.txt:
/// 7B r=64 at 32, 64 and 128 rows 16.2, 25.4 and 38.3 us against 16.8, 26.5 and 41.3; 8192
/// and 5120 wide level; r=32, r=128, q|k|v at r=64 and clusters of four 7-15% slower).
pub const STREAM_MMA_RANK: usize = 64;

/// The streamed kernel's plan for `tiles` one-row segments of a group with `h_in` inputs and
/// parts of `outs` columns on `sms` SMs, `row_bytes` of weights a row and parts of
/// `max_part_rank` at most, or `None` when
/// the shrink and expand kernels serve it better (few blocks, each with much to read) or its
/// shared memory cannot hold two stages besides x and the old y. A row gets a cluster of
/// blocks when the rows alone leave SMs idle (measured: one block a row from 100 rows on 132
/// SMs, two from 17, four below; eight were never faster).
pub fn stream_plan(
    tiles: usize,
    h_in: usize,
    outs: &[usize],
    sms: usize,
    (row_bytes, max_part_rank): (usize, usize),
    knobs: StreamKnobs,
) -> Option<StreamPlan> {
    let small = tiles >= STREAM_SMALL_ROW_MIN_TILES && row_bytes <= STREAM_SMALL_ROW_BYTES;
    let cluster = if let Some(c) = knobs.cluster.filter(|c| STREAM_CLUSTERS.contains(c)) {
        c
    } else if tiles * 4 > sms * 3 || small {
        1
    } else if tiles * 3 > sms {
        2
    } else if tiles > 16 {
        3
    } else {
        4
    };
    let mma = row_bytes > STREAM_SMALL_ROW_BYTES
        && outs.len() == 1
        && max_part_rank == STREAM_MMA_RANK
        && cluster <= 2
        && !knobs.no_mma;
    // Small rows in clusters of one were measured against the two kernels too (10.6 us at 64
    // rows, bench/results/bench-kernels-h200-2026-11-30-s16g-nostream.txt).
    // Blocks fewer than this share of the SMs are few: half for the plain kernel in pairs or
    // fours, a quarter for the `_mma` one and for clusters of three (17 rows of 7B r=64: 10.8
    // us in clusters of three against 13.2 for the two kernels, bench/results/
    // sgmv-lora-stream-probe-c3-h200-2026-11-30-s19a.txt).
    let share = if mma || cluster == 3 { 4 } else { 2 };
    let few = share * tiles * cluster < sms && row_bytes.div_ceil(cluster) > STREAM_FEW_BLOCK_BYTES;
    if few && !small && !knobs.all {
        return None;
    }
    let y_cap: usize = outs.iter().map(|&n| 8 * (n / 8).div_ceil(cluster)).sum();
    let round = |b: usize| b.div_ceil(128) * 128;
    let fixed = STREAM_HDR + round(2 * h_in) + 2 * round(2 * y_cap);
    let stages = (STREAM_MAX_SMEM.checked_sub(fixed)? / STREAM_STAGE_BYTES).min(STREAM_MAX_STAGES);
    (stages >= 2).then_some(StreamPlan {
        cluster,
        stages,
        y_cap,
        smem: fixed + stages * STREAM_STAGE_BYTES,
        mma,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::SeqMeta;
    use crate::engine::lora::segments::SegmentTable;

    #[test]
    fn row_kernels_serve_batches_of_short_segments_only() {
        let d = RowLimits::DEFAULT;
        assert!(d.shrink(1, 48) && d.shrink(1, MAX_GROUP_RANK) && d.expand(1, 32, 512));
        assert!(!d.shrink(2, 16) && !d.expand(2, 16, 1));
        // r=64 takes the row expand up to 64 tiles, the tile expand beyond; r=128 never.
        assert!(d.expand(1, 64, 64) && !d.expand(1, 64, 128) && !d.expand(1, 128, 1));
        assert!(!d.shrink(0, 16));
        assert!(
            RowLimits::ALL.shrink(16, MAX_GROUP_RANK) && RowLimits::ALL.expand(16, MAX_RANK, 512)
        );
        assert!(!RowLimits::ALL.shrink(17, 1));
        assert!(!RowLimits::NONE.shrink(1, 1) && !RowLimits::NONE.expand(1, 1, 1));
        // Decode of 7B: one row per segment, q|k|v stacked to 48 ranks: two splits of 256
        // vectors fill 768 blocks already; a lone row gets up to 16 (32 vectors each).
        assert_eq!(shrink_rows_plan(4096, 48, 32, 256, 264), (2, 12));
        assert_eq!(shrink_rows_plan(4096, 16, 32, 128, 264), (4, 4));
        assert_eq!(shrink_rows_plan(4096, 16, 1, 128, 264), (16, 4));
        assert_eq!(shrink_rows_plan(11008, 16, 32, 128, 264), (11, 4));
        assert_eq!(shrink_rows_plan(576, 1, 1, 128, 264), (2, 1));
        assert_eq!(shrink_rows_plan(100, 3, 2, 128, 264), (1, 1));
        // 8 warps of one column step: 128 columns a block at r=16, 256 at r<=8, 16 at r=128.
        let plain = |lanes, col_blocks| RowExpandPlan {
            lanes,
            col_blocks,
            per_tile: None,
        };
        assert_eq!(expand_rows_plan(16, 4096, 32, 132).unwrap(), plain(2, 32));
        assert_eq!(expand_rows_plan(8, 12288, 1, 132).unwrap(), plain(1, 48));
        assert_eq!(
            expand_rows_plan(128, 11008, 1, 132).unwrap(),
            plain(16, 688)
        );
        // Three tiles of r=128 over 11008 columns: 688 column blocks, a wave of 264 a tile.
        let wide = expand_rows_plan(128, 11008, 3, 132).unwrap();
        assert_eq!((wide.col_blocks, wide.per_tile), (688, Some(264)));
        assert_eq!(expand_rows_plan(33, 100, 1, 132).unwrap().lanes, 8);
        assert!(
            expand_rows_plan(0, 1, 1, 132).is_err() && expand_rows_plan(129, 1, 1, 132).is_err()
        );
        // A 7B decode step at batch 32 on 132 SMs: q|k|v (96 column blocks) and gate|up (172)
        // stride over them with 24 blocks a tile; o and down (32) take a block each.
        let q = expand_rows_plan(16, 12288, 32, 132).unwrap();
        assert_eq!(
            (q.col_blocks, q.per_tile, q.grid(32)),
            (96, Some(24), (768, 1))
        );
        let gu = expand_rows_plan(16, 22016, 32, 132).unwrap();
        assert_eq!((gu.col_blocks, gu.per_tile), (172, Some(24)));
        assert_eq!(
            expand_rows_plan(16, 4096, 32, 132).unwrap().grid(32),
            (32, 32)
        );
        // Eight rows: a wave is 99 blocks a tile, more than q|k|v's 96 column blocks.
        assert_eq!(expand_rows_plan(16, 12288, 8, 132).unwrap().per_tile, None);
        // 512 rows would fill only 512 of a wave's 792 blocks.
        assert_eq!(expand_rows_plan(16, 4096, 512, 132).unwrap().per_tile, None);
        assert_eq!(
            expand_rows_plan(16, 4096, 256, 132).unwrap().per_tile,
            Some(3)
        );
    }

    #[test]
    fn row_expand_grid_covers_every_column_once() {
        for rank in 1..=MAX_RANK {
            for h_out in [1, 7, 100, 576, 4096, 4608, 11008, 12288, 22016] {
                for tiles in [1, 3, 64, 512] {
                    for sms in [1, 132] {
                        let p = expand_rows_plan(rank, h_out, tiles, sms).unwrap();
                        let lanes = p.lanes;
                        // Each lane holds 8 ranks; lanes come in powers of two up to half a warp.
                        assert!(lanes.is_power_of_two() && lanes * 8 >= rank && lanes <= 16);
                        assert!(
                            lanes == 1 || (lanes / 2) * 8 < rank,
                            "rank {rank}: {lanes} lanes"
                        );
                        let ku = if p.per_tile.is_some() {
                            1
                        } else {
                            EXPAND_ROWS_KU
                        };
                        let cols = EXPAND_ROWS_WARPS * ku * (32 / lanes);
                        let cb = p.col_blocks;
                        assert!(
                            cb * cols >= h_out && (cb - 1) * cols < h_out,
                            "{rank} {h_out}"
                        );
                        let (gx, gy) = p.grid(tiles);
                        let mut seen = vec![0u32; tiles * cb];
                        match p.per_tile {
                            // The kernel: block b serves tile b % tiles, column blocks
                            // b / tiles + k * per_tile below col_blocks.
                            Some(per_tile) => {
                                assert_eq!(gy, 1);
                                assert!(per_tile >= 1 && 2 * per_tile <= cb);
                                for b in 0..gx as usize {
                                    let tile = b % tiles;
                                    for c in (b / tiles..cb).step_by(per_tile) {
                                        seen[tile * cb + c] += 1;
                                    }
                                }
                            }
                            None => {
                                assert_eq!((gx as usize, gy as usize), (cb, tiles));
                                seen.iter_mut().for_each(|s| *s += 1);
                            }
                        }
                        assert!(seen.iter().all(|&s| s == 1), "{rank} {h_out} {tiles} {sms}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_register_resident_norm_covers_rows_of_whole_vectors_up_to_8192() {
        assert_eq!(norm_vec_plan(4096), Some((1, 512)));
        assert_eq!(norm_vec_plan(8192), Some((2, 512)));
        assert_eq!(norm_vec_plan(576), Some((1, 96)));
        assert_eq!(norm_vec_plan(5120), Some((2, 320)));
        assert_eq!(norm_vec_plan(8), Some((1, 32)));
        for hidden in [0, 100, 4100, 8200, 16384] {
            assert_eq!(norm_vec_plan(hidden), None, "hidden {hidden}");
        }
        for hidden in (8..=NORM_VEC_MAX_HIDDEN).step_by(8) {
            let (vpt, threads) = norm_vec_plan(hidden).unwrap();
            assert!(vpt <= 2 && threads as usize <= NORM_VEC_THREADS && threads % 32 == 0);
            assert!(
                vpt * threads as usize * 8 >= hidden,
                "hidden {hidden} not covered"
            );
        }
    }

    #[test]
    fn segments_are_cut_into_sixteen_row_tiles_that_never_cross_a_segment() {
        let tiles: Vec<[u32; 2]> = row_tiles(&[0, 3, 40], &[3, 40, 41]).collect();
        assert_eq!(tiles, vec![[0, 0], [1, 3], [1, 19], [1, 35], [2, 40]]);
    }

    #[test]
    fn empty_segment_tables_give_no_tiles() {
        assert_eq!(row_tiles(&[], &[]).count(), 0);
    }

    #[test]
    fn rank_variants_round_up_to_the_supported_register_tiles() {
        assert_eq!(shrink_rank_tiles(1).unwrap(), 1);
        assert_eq!(shrink_rank_tiles(8).unwrap(), 1);
        assert_eq!(shrink_rank_tiles(9).unwrap(), 2);
        assert_eq!(shrink_rank_tiles(16).unwrap(), 2);
        assert_eq!(shrink_rank_tiles(24).unwrap(), 4);
        assert_eq!(shrink_rank_tiles(64).unwrap(), 8);
        assert_eq!(shrink_rank_tiles(128).unwrap(), 16);
        // A q|k|v group of rank 64 each: 24 tiles round up to 32, two blocks of 16.
        assert_eq!(shrink_rank_tiles(192).unwrap(), 32);
        assert_eq!(shrink_rank_tiles(384).unwrap(), 64);
        assert_eq!(expand_rank_chunks(1).unwrap(), 1);
        assert_eq!(expand_rank_chunks(32).unwrap(), 1);
        assert_eq!(expand_rank_chunks(33).unwrap(), 2);
        assert_eq!(expand_rank_chunks(96).unwrap(), 4);
        assert_eq!(expand_rank_chunks(128).unwrap(), 4);
    }

    #[test]
    fn ranks_beyond_the_kernel_limit_are_shape_errors() {
        assert!(matches!(
            shrink_rank_tiles(385),
            Err(BackendError::Shape(_))
        ));
        assert!(matches!(shrink_rank_tiles(0), Err(BackendError::Shape(_))));
        assert!(matches!(
            expand_rank_chunks(129),
            Err(BackendError::Shape(_))
        ));
        assert!(matches!(expand_rank_chunks(0), Err(BackendError::Shape(_))));
    }

    #[test]
    fn one_row_splits_h_in_widely_and_big_batches_do_not_split() {
        assert_eq!(shrink_splits(1, 4096, 528, 64), 32);
        assert_eq!(shrink_splits(8, 4096, 528, 64), 32);
        assert_eq!(shrink_splits(64, 4096, 528, 64), 9);
        assert_eq!(shrink_splits(600, 4096, 528, 64), 1);
        assert_eq!(shrink_splits(1, 4096, 528, 8), 8);
        // Tiny inner dimensions never split below one step per warp.
        assert_eq!(shrink_splits(1, 64, 528, 64), 1);
        assert_eq!(shrink_splits(1, 576, 528, 64), 4);
    }

    #[test]
    fn tiles_of_many_rows_split_as_far_as_one_wave_of_blocks_allows() {
        // 396 resident blocks (3 an SM on 132 SMs): Punica's 512-row workloads at r=64.
        assert_eq!(shrink_splits_full(32, 4096, 396, 132, 16), 12);
        assert_eq!(shrink_splits_full(46, 4096, 396, 132, 16), 8);
        assert_eq!(shrink_splits_full(42, 4096, 396, 132, 16), 9);
        // A kernel of 5 blocks an SM still aims at 3.
        assert_eq!(shrink_splits_full(32, 4096, 660, 132, 16), 12);
        assert_eq!(shrink_splits_full(32, 4096, 264, 132, 16), 8);
        // Few tiles stop at the cap, or at one k step a warp; more tiles than blocks: no split.
        assert_eq!(shrink_splits_full(11, 8192, 396, 132, 16), 16);
        assert_eq!(shrink_splits_full(2, 576, 396, 132, 16), 4);
        assert_eq!(shrink_splits_full(500, 4096, 396, 132, 16), 1);
        assert_eq!(shrink_splits_full(0, 4096, 0, 0, 0), 1);
    }

    #[test]
    fn few_tiles_of_high_rank_spread_ranks_over_blocks() {
        // One tile at r=64 (8 rank tiles): 32 splits are too few blocks for 264.
        assert_eq!(shrink_rank_split(1, 4096, 264, 8), (2, 4));
        assert_eq!(shrink_rank_split(1, 4096, 264, 16), (2, 8));
        assert_eq!(shrink_rank_split(4, 4096, 264, 8), (2, 4));
        assert_eq!(shrink_rank_split(8, 4096, 264, 8), (4, 2));
        // Enough tiles, or ranks already small: no split.
        assert_eq!(shrink_rank_split(64, 4096, 264, 8), (8, 1));
        assert_eq!(shrink_rank_split(1, 4096, 264, 2), (2, 1));
    }

    #[test]
    fn long_segments_take_the_long_expand_from_32_tiles() {
        // Punica's 512-row workloads: identical (32 tiles), uniform (46), skewed (42).
        assert!(expand_long(512, 32));
        assert!(expand_long(512, 46));
        assert!(expand_long(512, 42));
        // 128 rows uniform (12 tiles), and tiles of one row each.
        assert!(!expand_long(128, 12));
        assert!(!expand_long(40, 40));
        assert!(!expand_long(63, 32));
        assert_eq!(expand_long_grid(4096, 32), (32, 8));
        assert_eq!(expand_long_grid(4097, 33), (33, 9));
        assert_eq!(expand_long_grid(576, 46), (5, 12));
        // A block's columns stay in one part: a launch per part unless the boundaries fall
        // between blocks.
        assert_eq!(
            expand_launches(&[4096, 1024, 1024], EXPAND_LONG_COLS / 8).len(),
            1
        );
        assert_eq!(
            expand_launches(&[576, 192, 192], EXPAND_LONG_COLS / 8).len(),
            3
        );
    }

    #[test]
    fn expand_grid_covers_every_output_column() {
        assert_eq!(expand_grid(4096, 3, 4), (32, 3));
        assert_eq!(expand_grid(11008, 1, 4), (86, 1));
        assert_eq!(expand_grid(576, 2, 4), (5, 2));
        assert_eq!(expand_grid(4096, 1, 8), (16, 1));
        assert_eq!(expand_grid(11008, 1, 8), (43, 1));
    }

    #[test]
    fn a_group_expands_in_one_launch_when_its_parts_fall_on_warp_boundaries() {
        // Llama 7B q|k|v and SmolLM2's (576 | 192 | 192) with 64-column warps.
        let one = expand_launches(&[4096, 4096, 4096], 8);
        assert_eq!(
            one.to_vec(),
            vec![ExpandLaunch {
                part0: 0,
                col: 0,
                ends: [4096, 8192, 12288]
            }]
        );
        assert_eq!(
            expand_launches(&[576, 192, 192], 8)[0].ends,
            [576, 768, 960]
        );
        // One part: any width, ends padded with the last.
        let single = expand_launches(&[11000], 8);
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].ends, [11000; 3]);
        assert_eq!(single[0].width(), 11000);
        // gate | up of 11008 = 172 * 64: one launch.
        assert_eq!(
            expand_launches(&[11008, 11008], 8)[0].ends,
            [11008, 22016, 22016]
        );
        // The row expand takes any boundaries in one launch.
        assert_eq!(group_ends(&[100, 36, 36]), [100, 136, 172]);
    }

    #[test]
    fn kernel_names_are_formatted_in_place_up_to_the_limit() {
        let n = KernelName::of(format_args!("sgmv_expand_rows_{}_l{}", "bf16", 2)).unwrap();
        assert_eq!(&*n, "sgmv_expand_rows_bf16_l2");
        let longest = "k".repeat(MAX_KERNEL_NAME);
        assert_eq!(
            KernelName::of(format_args!("{longest}")).as_deref(),
            Some(longest.as_str())
        );
        assert!(KernelName::of(format_args!("{longest}x")).is_none());
        // Every kernel the backend has fits.
        for name in super::super::kernel_names() {
            assert!(name.len() <= MAX_KERNEL_NAME, "{name}");
        }
    }

    #[test]
    fn the_vector_attention_serves_half_precision_heads_of_64_128_and_256() {
        assert_eq!(
            attention_vec_kernel(128, "bf16").as_deref(),
            Some("attention_d128_bf16")
        );
        assert_eq!(
            attention_vec_kernel(64, "f16").as_deref(),
            Some("attention_d64_f16")
        );
        assert_eq!(attention_vec_kernel(128, "f32"), None);
        assert_eq!(attention_vec_kernel(96, "bf16"), None);
    }

    #[test]
    fn a_part_boundary_inside_a_warp_splits_the_expand_per_part() {
        let launches = expand_launches(&[100, 36, 36], 4);
        assert_eq!(
            launches.to_vec(),
            vec![
                ExpandLaunch {
                    part0: 0,
                    col: 0,
                    ends: [100; 3]
                },
                ExpandLaunch {
                    part0: 1,
                    col: 100,
                    ends: [36; 3]
                },
                ExpandLaunch {
                    part0: 2,
                    col: 136,
                    ends: [36; 3]
                },
            ]
        );
        // The last part's width never matters.
        assert_eq!(expand_launches(&[64, 36], 8).len(), 1);
    }

    #[test]
    fn a_lora_slot_entry_is_sixty_four_bytes_in_the_kernels_field_order() {
        let entry = LoraSlotEntry {
            a: 0x1000,
            rank: 48,
            parts: [(0x2000, 16, 64), (0, 0, 0), (0x3000, 32, 80)],
        };
        let mut bytes = Vec::new();
        entry.write(&mut bytes);
        assert_eq!(bytes.len(), LORA_SLOT_BYTES);
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        assert_eq!((u64_at(0), u32_at(8), u32_at(12)), (0x1000, 48, 0));
        assert_eq!((u64_at(16), u64_at(24), u64_at(32)), (0x2000, 0, 0x3000));
        assert_eq!((u32_at(40), u32_at(44), u32_at(48)), (16, 0, 32));
        assert_eq!((u32_at(52), u32_at(56), u32_at(60)), (64, 0, 80));
    }

    /// [`pack_meta`] into a fresh buffer.
    fn pack(meta: &StepMeta) -> Result<(Vec<u32>, MetaLayout)> {
        let mut words = Vec::new();
        let layout = pack_meta(meta, &mut words)?;
        Ok((words, layout))
    }

    #[test]
    fn packing_into_a_reused_buffer_gives_the_same_words_without_growing_it() {
        let mut words = Vec::new();
        let big = pack_meta(&step(40), &mut words).unwrap();
        let (ptr, cap) = (words.as_ptr(), words.capacity());
        for rows in [40u32, 7, 40, 1] {
            let l = pack_meta(&step(rows), &mut words).unwrap();
            let (fresh, fl) = pack(&step(rows)).unwrap();
            assert_eq!((&words, &l), (&fresh, &fl));
            assert_eq!((words.as_ptr(), words.capacity()), (ptr, cap));
        }
        assert_eq!(big.total, pack(&step(40)).unwrap().1.total);
    }

    fn step(rows: u32) -> StepMeta {
        StepMeta {
            token_ids: (0..rows).collect(),
            positions: (0..rows).collect(),
            slot_mapping: (0..rows).collect(),
            seqs: vec![SeqMeta {
                row_start: 0,
                num_rows: rows,
                context_len: rows,
                block_table_start: 0,
                num_blocks: rows.div_ceil(16),
            }],
            block_tables: (0..rows.div_ceil(16)).collect(),
            segments: SegmentTable::from_row_slots(
                &(0..rows).map(|r| Some(r / 20)).collect::<Vec<_>>(),
            ),
            logit_rows: vec![rows - 1],
        }
    }

    #[test]
    fn packed_meta_places_every_array_at_its_offset() {
        let m = step(40);
        let (w, l) = pack(&m).unwrap();
        assert_eq!(l.rows, 40);
        assert_eq!(&w[l.positions..l.positions + 40], &m.positions[..]);
        assert_eq!(w[l.row_seq + 39], 0);
        assert_eq!(&w[l.seqs..l.seqs + 5], &[0, 40, 40, 0, 3]);
        assert_eq!((l.num_segs, l.single_seg), (2, None));
        // A tile's segment at the tile's index: two tiles each.
        assert_eq!(
            &w[l.segs..l.segs + 12],
            &[0, 20, 0, 0, 20, 0, 20, 40, 1, 20, 40, 1]
        );
        assert_eq!(l.num_tiles, 4);
        assert_eq!(&w[l.tiles..l.tiles + 8], &[0, 0, 0, 16, 1, 20, 1, 36]);
        assert_eq!(w[l.logit_rows], 39);
        assert_eq!(l.max_slot, Some(1));
        assert_eq!(l.total, w.len());
    }

    #[test]
    fn a_decode_step_keeps_every_offset_but_the_block_tables_length_as_contexts_grow() {
        // Two sequences decoding: the second step's contexts cross a block boundary.
        let decode = |ctx: u32| {
            let m = decode_rows(&[Some(0), Some(1)], ctx);
            m.validate().unwrap();
            pack(&m).unwrap().1
        };
        let (a, b) = (decode(16), decode(17));
        assert_ne!(a.total, b.total);
        assert_eq!(
            MetaLayout {
                total: 0,
                max_kv_slot: None,
                max_block: None,
                ..a
            },
            MetaLayout {
                total: 0,
                max_kv_slot: None,
                max_block: None,
                ..b
            }
        );
    }

    /// One sequence decoding per entry of `slots` (its adapter), at context `ctx`.
    fn decode_rows(slots: &[Option<u32>], ctx: u32) -> StepMeta {
        let rows = slots.len() as u32;
        let blocks = ctx.div_ceil(16);
        StepMeta {
            token_ids: vec![7; rows as usize],
            positions: vec![ctx - 1; rows as usize],
            slot_mapping: (0..rows).map(|i| i * blocks * 16 + ctx - 1).collect(),
            seqs: (0..rows)
                .map(|i| SeqMeta {
                    row_start: i,
                    num_rows: 1,
                    context_len: ctx,
                    block_table_start: i * blocks,
                    num_blocks: blocks,
                })
                .collect(),
            block_tables: (0..rows * blocks).collect(),
            segments: SegmentTable::from_row_slots(slots),
            logit_rows: (0..rows).collect(),
        }
    }

    #[test]
    fn steps_of_one_row_count_share_every_offset_whatever_their_segments() {
        // 8 distinct adapters, one shared by all, a mix with rows of no adapter, none at all.
        let layouts: [Vec<Option<u32>>; 4] = [
            (0..8).map(Some).collect(),
            vec![Some(3); 8],
            vec![
                Some(1),
                Some(1),
                None,
                Some(4),
                None,
                None,
                Some(2),
                Some(2),
            ],
            vec![None; 8],
        ];
        let packed: Vec<(Vec<u32>, MetaLayout)> = layouts
            .iter()
            .map(|l| {
                let m = decode_rows(l, 40);
                m.validate().unwrap();
                pack(&m).unwrap()
            })
            .collect();
        let offsets = |l: &MetaLayout| {
            (
                l.token_ids,
                l.positions,
                l.slot_mapping,
                l.row_seq,
                l.row_lora,
                l.seqs,
                l.segs,
                l.tiles,
                l.tile_cap,
                l.logit_rows,
                l.block_tables,
                l.total,
            )
        };
        for (_, l) in &packed[1..] {
            assert_eq!(offsets(l), offsets(&packed[0].1));
        }
        // Unused tile entries stand for no rows; each row is flagged when it has an adapter.
        let (w, l) = &packed[2];
        assert_eq!(&w[l.row_lora..l.row_lora + 8], &[1, 1, 0, 1, 0, 0, 1, 1]);
        assert_eq!(l.lora_rows, 5);
        assert_eq!(packed[0].1.lora_rows, 8);
        assert_eq!(packed[3].1.lora_rows, 0);
        assert_eq!(l.num_tiles, 3);
        assert_eq!(&w[l.tiles..l.tiles + 8], &[0, 0, 1, 3, 2, 6, TILE_NONE, 0]);
        assert!(
            w[l.tiles + 6..l.tiles + 2 * l.tile_cap]
                .chunks(2)
                .all(|t| t == [TILE_NONE, 0])
        );
    }

    #[test]
    fn fused_expands_take_one_wave_over_the_tiles_and_cover_rows_without_adapter() {
        let silu = |rank, n, tiles, rows| {
            fused_expand_plan(rank, (n, EXPAND_SILU_GAP_COLS), tiles, rows, 132)
        };
        // 7B gate|up at batch 32, r=16, one adapter a row, on 132 SMs: 2 lanes a column, 128
        // columns a block, 16 blocks a tile (4 an SM); no gap blocks with every row covered.
        let p = silu(16, 11008, 32, (32, 32)).unwrap();
        assert_eq!(
            p,
            FusedExpandPlan {
                lanes: 2,
                col_blocks: 86,
                per_tile: 16,
                gap_blocks: 0,
            }
        );
        assert_eq!(p.grid(32), 512);
        // One row without adapter: every row gets its 6 blocks of 2048 columns.
        let p = silu(16, 11008, 32, (33, 32)).unwrap();
        assert_eq!((p.gap_blocks, p.grid(32)), (33 * 6, 512 + 33 * 6));
        // A single tile: as many blocks as column blocks up to the wave; r=128 takes 16 lanes.
        let p = silu(128, 1536, 1, (1, 1)).unwrap();
        assert_eq!((p.lanes, p.col_blocks, p.per_tile), (16, 96, 96));
        assert!(silu(0, 1536, 1, (1, 1)).is_err());
        assert!(silu(129, 1536, 1, (1, 1)).is_err());
        // 7B q|k|v + RoPE: 96 heads of 64 pairs; a gap block covers 256 pairs of a row.
        let p = fused_expand_plan(16, (96 * 64, EXPAND_ROPE_GAP_PAIRS), 8, (9, 8), 132).unwrap();
        assert_eq!((p.col_blocks, p.per_tile, p.gap_blocks), (48, 48, 9 * 24));
    }

    #[test]
    fn launches_cover_the_tiles_rounded_up_to_a_power_of_two_within_the_table() {
        let grid = |num_tiles, tile_cap| {
            MetaLayout {
                num_tiles,
                tile_cap,
                ..MetaLayout::default()
            }
            .tile_grid()
        };
        assert_eq!(grid(0, 8), 0);
        assert_eq!(grid(1, 8), 1);
        assert_eq!(grid(3, 8), 4);
        assert_eq!(grid(5, 8), 8);
        assert_eq!(grid(17, 24), 24);
        assert_eq!(grid(32, 32), 32);
        for rows in 1..=64 {
            let slots: Vec<Option<u32>> = (0..rows).map(|i| Some(i as u32 % 5)).collect();
            let (_, l) = pack(&decode_rows(&slots, 3)).unwrap();
            assert!(l.tile_grid() >= l.num_tiles && l.tile_grid() <= l.tile_cap);
        }
    }

    #[test]
    fn meta_with_rows_outside_the_batch_is_rejected() {
        let mut m = step(8);
        m.segments.ends[0] = 9;
        assert!(pack(&m).is_err());
        let mut m = step(8);
        m.logit_rows = vec![8];
        assert!(pack(&m).is_err());
        let mut m = step(8);
        m.seqs[0].num_blocks = 0;
        assert!(pack(&m).is_err());
        let mut m = step(8);
        m.positions.pop();
        assert!(pack(&m).is_err());
    }
    #[test]
    fn the_sampling_block_is_whole_warps_within_the_kernel_limit() {
        for vocab in [
            1usize,
            31,
            100,
            2048,
            8191,
            32000,
            49152,
            128_256,
            262_144,
            1 << 22,
        ] {
            let b = sample_block(vocab) as usize;
            assert_eq!(b % 32, 0, "vocab {vocab}");
            assert!(
                (128..=SAMPLE_MAX_THREADS).contains(&b),
                "vocab {vocab}: {b}"
            );
        }
        assert_eq!(sample_block(49152), 1024);
        assert_eq!(sample_block(100), 128);
        assert_eq!(sample_block(16384), 256);
    }

    #[test]
    fn sampling_parameters_pack_as_sixteen_little_endian_bytes_per_row() {
        let rows = [
            RowSampling::GREEDY,
            RowSampling {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.9,
                u: 0.25,
            },
        ];
        let mut bytes = vec![7u8; 3];
        pack_sampling(&rows, &mut bytes);
        assert_eq!(bytes.len(), 2 * SAMPLING_BYTES);
        let word = |i: usize| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(
            (0..4).map(word).collect::<Vec<_>>(),
            vec![0, 0, 1f32.to_bits(), 0]
        );
        assert_eq!(
            (4..8).map(word).collect::<Vec<_>>(),
            vec![0.7f32.to_bits(), 40, 0.9f32.to_bits(), 0.25f32.to_bits()]
        );
        pack_sampling(&[], &mut bytes);
        assert!(bytes.is_empty());
    }
    #[test]
    fn long_segments_of_high_rank_take_the_dense_gemms() {
        assert!(dense_lora(512, 64) && dense_lora(256, 128));
        assert!(!dense_lora(255, 64) && !dense_lora(512, 32) && !dense_lora(512, 16));
    }

    #[test]
    fn stream_plan_gives_rows_clusters_when_rows_leave_sms_idle() {
        // Rows of 1 MiB (7B r=64), the few-blocks rule lifted.
        let all = StreamKnobs {
            all: true,
            ..StreamKnobs::default()
        };
        let p = |tiles| stream_plan(tiles, 4096, &[4096], 132, (1 << 20, 64), all).unwrap();
        assert_eq!(p(512).cluster, 1);
        assert_eq!(p(100).cluster, 1);
        assert_eq!(p(99).cluster, 2);
        assert_eq!(p(45).cluster, 2);
        assert_eq!(p(44).cluster, 3);
        assert_eq!(p(17).cluster, 3);
        assert_eq!(p(16).cluster, 4);
        assert_eq!(p(1).cluster, 4);
        assert!(STREAM_CLUSTERS.contains(&p(1).cluster));
    }

    #[test]
    fn stream_plan_fits_shared_memory_and_covers_each_blocks_columns() {
        for (h_in, outs) in [
            (4096, vec![4096]),
            (4096, vec![4096, 1024, 1024]),
            (4096, vec![11008, 11008]),
            (11008, vec![4096]),
            (576, vec![576, 192, 192]),
            (8192, vec![8192]),
        ] {
            for tiles in [1, 8, 32, 64, 128, 512] {
                let p =
                    stream_plan(tiles, h_in, &outs, 132, (0, 16), StreamKnobs::default()).unwrap();
                assert!(p.smem <= STREAM_MAX_SMEM, "{h_in} {outs:?} {tiles}");
                assert!((2..=STREAM_MAX_STAGES).contains(&p.stages));
                // The kernel gives block j of a cluster columns [8 * (n8 * j / c), 8 * (n8 *
                // (j + 1) / c)) of each part: its copy of the old y holds them all.
                for j in 0..p.cluster {
                    let cols: usize = outs
                        .iter()
                        .map(|&n| {
                            let n8 = n / 8;
                            8 * (n8 * (j + 1) / p.cluster) - 8 * (n8 * j / p.cluster)
                        })
                        .sum();
                    assert!(cols <= p.y_cap);
                }
            }
        }
        // x and the old y alone too large for two stages.
        assert_eq!(
            stream_plan(1, 100_000, &[4096], 132, (0, 16), StreamKnobs::default()),
            None
        );
    }

    #[test]
    fn stream_plan_leaves_few_blocks_with_much_to_read_to_the_two_kernels() {
        // 7B shapes: a row's A and B of rank 16 and 64.
        let (r16, r64) = (4 * 16 * 4096, 4 * 64 * 4096);
        let p = |tiles, bytes| {
            stream_plan(
                tiles,
                4096,
                &[4096],
                132,
                (bytes, 64),
                StreamKnobs::default(),
            )
        };
        assert!(p(1, r16).is_some() && p(8, r16).is_some() && p(32, r16).is_some());
        assert!(p(1, r64).is_none() && p(8, r64).is_none() && p(16, r64).is_none());
        // Clusters of three (17 to 44 rows) take the plain kernel, from a quarter of the SMs.
        assert!(p(17, r64).is_some_and(|p| !p.mma && p.cluster == 3));
        // Rows of other ranks, of several parts, and clusters of three or four take the plain
        // kernel.
        let knobs = StreamKnobs::default();
        let r32 = stream_plan(64, 4096, &[4096], 132, (r64 / 2, 32), knobs).unwrap();
        let qkv = stream_plan(64, 4096, &[4096, 1024, 1024], 132, (r64, 64), knobs).unwrap();
        let c4 = StreamKnobs {
            cluster: Some(4),
            ..knobs
        };
        let four = stream_plan(64, 4096, &[4096], 132, (r64, 64), c4).unwrap();
        assert!(!r32.mma && !qkv.mma && !four.mma);
        assert!(p(32, r64).is_some() && p(64, r64).is_some() && p(512, r64).is_some());
        // The `_mma` kernel (pairs, r=64) from a quarter of the SMs; the plain one from half.
        let pairs = StreamKnobs {
            cluster: Some(2),
            ..StreamKnobs::default()
        };
        let c2 = |tiles, knobs| stream_plan(tiles, 4096, &[4096], 132, (r64, 64), knobs);
        assert!(c2(17, pairs).is_some_and(|p| p.mma) && c2(16, pairs).is_none());
        let plain_pairs = StreamKnobs {
            no_mma: true,
            ..pairs
        };
        assert!(c2(32, plain_pairs).is_none());
        assert!(c2(33, plain_pairs).is_some_and(|p| !p.mma));
    }

    #[test]
    fn rows_over_256_kib_take_the_mma_kernel() {
        let p = |tiles, h: usize, r: usize, no_mma| {
            let knobs = StreamKnobs {
                no_mma,
                ..StreamKnobs::default()
            };
            stream_plan(tiles, h, &[h], 132, (4 * r * h, r), knobs).unwrap()
        };
        // 7B r=64: 6 stages either way; 8192 wide: 5.
        let (a, b) = (p(128, 4096, 64, false), p(128, 4096, 64, true));
        assert!(a.mma && !b.mma);
        assert_eq!((a.stages, b.stages), (6, 6));
        assert!(a.smem <= STREAM_MAX_SMEM);
        let c = p(64, 8192, 64, false);
        assert!(c.mma && c.stages == 5 && c.cluster == 2);
        // r=16 rows (256 KiB) keep the plain kernel.
        assert!(!p(64, 4096, 16, false).mma);
        assert!(!p(64, 8192, 8, false).mma);
    }

    #[test]
    fn a_forced_cluster_size_is_taken_when_the_kernel_has_it() {
        let c = |tiles, cluster| {
            let knobs = StreamKnobs {
                cluster,
                ..StreamKnobs::default()
            };
            stream_plan(tiles, 4096, &[4096], 132, (0, 16), knobs).map(|p: StreamPlan| p.cluster)
        };
        assert_eq!(c(64, Some(1)), Some(1));
        assert_eq!(c(8, Some(2)), Some(2));
        assert_eq!(c(512, Some(4)), Some(4));
        assert_eq!(c(32, Some(3)), Some(3));
        assert_eq!(c(32, Some(8)), Some(3));
        assert_eq!(c(32, None), Some(3));
    }

    #[test]
    fn small_rows_take_clusters_of_one_from_48_rows() {
        // 7B shapes: a row's A and B at r=16 (256 KiB), at 8192 (512 KiB), at r=64 (1 MiB).
        let c = |tiles, h: usize, r: usize| {
            let bytes = 4 * r * h;
            stream_plan(tiles, h, &[h], 132, (bytes, r), StreamKnobs::default()).map(|p| p.cluster)
        };
        assert_eq!(c(64, 4096, 16), Some(1));
        assert_eq!(c(48, 4096, 16), Some(1));
        assert_eq!(c(47, 4096, 16), Some(2));
        assert_eq!(c(32, 4096, 16), Some(3));
        assert_eq!(c(64, 8192, 16), Some(2));
        assert_eq!(c(64, 4096, 64), Some(2));
        assert_eq!(c(128, 4096, 64), Some(1));
        // The few-blocks rule, and `all` lifting it.
        assert_eq!(c(8, 4096, 64), None);
        let all = StreamKnobs {
            all: true,
            ..StreamKnobs::default()
        };
        let p = stream_plan(8, 4096, &[4096], 132, (4 * 64 * 4096, 64), all);
        assert_eq!(p.map(|p| p.cluster), Some(4));
    }
}
