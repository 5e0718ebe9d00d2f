//! `punica selftest --device cuda`: every op of the CUDA backend on fresh random inputs against
//! the CPU backend through the [`Backend`] trait (both given the same values, bf16/f16 inputs
//! rounded once on the host), outputs poisoned with NaN before each kernel so unwritten elements
//! show. Tolerances: relative error < 1e-2 for bf16/f16 outputs, < 1e-5 for f32, no NaN.
//!
//! `sample` is compared token by token: greedy rows must pick the same token with the same
//! log-probability (error < 1e-5 relative to `max(1, |logprob|)`); sampled rows the same token,
//! except rows whose host draw lies within 1e-5 of a cumulative boundary (the host pick changes
//! when `u` or `top_p` moves by 1e-5), where f32 and f64 sums may fall either side: those are
//! counted and reported in the case's name, never silently passed.

use std::fmt::Write as _;

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::engine::backend::cpu::{CpuBackend, CpuBuf, CpuLoraTable, CpuMeta};
use crate::engine::backend::{
    AttnShape, BLOCK_SIZE, Backend, DType, HostTensor, LoraGroupSlot, LoraPart, Pick, Result,
    RowSampling, SeqMeta, StepMeta,
};
use crate::engine::lora::segments::SegmentTable;
use crate::engine::sampling::pick_row;

use super::bench::{Workload, row_slots, segment_lens};
use super::{CudaBackend, CudaBuf, CudaLoraTable, CudaMeta};
use super::{plan, reference};

/// One checked case.
#[derive(Clone, Debug)]
pub struct CaseResult {
    pub op: String,
    pub case: String,
    pub err: f64,
    pub tol: f64,
    pub note: String,
}

impl CaseResult {
    pub fn pass(&self) -> bool {
        self.err.is_finite() && self.err < self.tol && self.note.is_empty()
    }
}

fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 | DType::BF16 => 1e-2,
    }
}

/// Round host values to what a buffer of `dtype` holds.
fn round(dtype: DType, v: &mut [f32]) {
    match dtype {
        DType::F32 => {}
        DType::BF16 => v.iter_mut().for_each(|e| *e = bf16::from_f32(*e).to_f32()),
        DType::F16 => v.iter_mut().for_each(|e| *e = f16::from_f32(*e).to_f32()),
    }
}

struct Ctx<'a> {
    be: &'a CudaBackend,
    cpu: CpuBackend,
    rng: StdRng,
    results: Vec<CaseResult>,
}

impl Ctx<'_> {
    fn rand(&mut self, dtype: DType, n: usize, scale: f32) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n)
            .map(|_| self.rng.random_range(-scale..scale))
            .collect();
        round(dtype, &mut v);
        v
    }

    /// The same values on the GPU and on the CPU.
    fn upload(&self, dtype: DType, data: &[f32]) -> Result<(CudaBuf, CpuBuf)> {
        Ok((self.be.upload(dtype, data)?, self.cpu.upload(dtype, data)?))
    }

    /// A NaN-filled output on each backend.
    fn poisoned(&self, dtype: DType, n: usize) -> Result<(CudaBuf, CpuBuf)> {
        let mut b = self.be.alloc(dtype, n)?;
        self.be.fill(&mut b, f32::NAN)?;
        Ok((b, self.cpu.upload(dtype, &vec![f32::NAN; n])?))
    }

    /// Compare the GPU's output with the CPU's.
    fn record(&mut self, op: &str, case: String, out: &[f32], cpu: &[f32], tol: f64) {
        let note = if out.len() != cpu.len() {
            format!("{} outputs, the CPU gave {}", out.len(), cpu.len())
        } else if cpu.iter().any(|v| !v.is_finite()) {
            "the CPU output is not finite".to_string()
        } else {
            String::new()
        };
        let want: Vec<f64> = cpu.iter().map(|&v| v as f64).collect();
        let err = reference::rel_err(out, &want);
        self.results.push(CaseResult {
            op: op.into(),
            case,
            err,
            tol,
            note,
        });
    }

    fn pass_exact(&mut self, op: &str, case: String) {
        self.results.push(CaseResult {
            op: op.into(),
            case,
            err: 0.0,
            tol: 1.0,
            note: String::new(),
        });
    }

    fn fail(&mut self, op: &str, case: String, note: String) {
        self.results.push(CaseResult {
            op: op.into(),
            case,
            err: f64::INFINITY,
            tol: 0.0,
            note,
        });
    }
}

/// One SGMV case over a LoRA group of `outs.len()` parts: per slot, each part's rank (None =
/// the slot's adapter lacks that part; all None = an empty slot), and per row its slot (None =
/// base model row).
#[derive(Clone)]
struct SgmvCase {
    dtype: DType,
    h_in: usize,
    /// Output columns of each part, side by side in y.
    outs: Vec<usize>,
    ranks: Vec<Vec<Option<usize>>>,
    rows: Vec<Option<u32>>,
    /// Extra columns on each side of the expand's output (a fused projection's row).
    pad: usize,
    /// Slots' intermediates at staggered columns of a wider v (as the base GEMM's extra
    /// columns lay them out), and the expand also run from v in the activations' dtype.
    arena: bool,
    label: String,
}

impl SgmvCase {
    /// A one-part group (a single projection) with `rank` in each of `slots` slots.
    fn single(
        dtype: DType,
        (h_in, h_out): (usize, usize),
        ranks: Vec<Option<usize>>,
        rows: Vec<Option<u32>>,
        label: String,
    ) -> SgmvCase {
        SgmvCase {
            dtype,
            h_in,
            outs: vec![h_out],
            ranks: ranks.into_iter().map(|r| vec![r]).collect(),
            rows,
            pad: 0,
            arena: false,
            label,
        }
    }
}

/// One slot's matrices on both backends: the stacked A and each part's B with its rank.
type SlotPair = ((CudaBuf, CpuBuf), Vec<Option<(CudaBuf, CpuBuf, usize)>>);

/// One backend's group table entries for the case's slots (`pick` takes that backend's buffer
/// of a GPU/CPU pair), each slot's intermediate at column 0 or, for an arena table, at `voffs`.
fn group_slots<'a, B: Backend>(
    slots: &'a [Option<SlotPair>],
    voffs: &[usize],
    arena: bool,
    pick: impl Fn(&'a CudaBuf, &'a CpuBuf) -> &'a B::Buf + Copy,
) -> Vec<Option<LoraGroupSlot<'a, B>>> {
    slots
        .iter()
        .zip(voffs)
        .map(|(s, &voff)| {
            s.as_ref().map(|((ga, ca), parts)| LoraGroupSlot {
                a: pick(ga, ca),
                parts: std::array::from_fn(|j| {
                    let (gb, cb, rank) = parts.get(j)?.as_ref()?;
                    Some(LoraPart {
                        b: pick(gb, cb),
                        rank: *rank,
                    })
                }),
                voff: if arena { voff } else { 0 },
            })
        })
        .collect()
}

fn sgmv_case(c: &mut Ctx<'_>, case: &SgmvCase) -> Result<()> {
    let (be, cpu) = (c.be, c.cpu.clone());
    let n_rows = case.rows.len();
    let totals: Vec<usize> = case
        .ranks
        .iter()
        .map(|rs| rs.iter().flatten().sum::<usize>())
        .collect();
    let v_width = totals.iter().copied().max().unwrap_or(0).max(1);
    // Arena layout (expands only): slot i's columns after some leading columns and every
    // earlier slot's, with gaps that no expand may read.
    let mut voffs = vec![0usize; totals.len()];
    let mut next = 40;
    for (voff, &t) in voffs.iter_mut().zip(&totals) {
        *voff = next;
        next += t + 8;
    }
    let arena_width = next;
    let (h_in, outs, dt) = (case.h_in, &case.outs, case.dtype);
    let x = c.rand(dt, n_rows * h_in, 1.0);
    let mut slots: Vec<Option<SlotPair>> = Vec::new();
    for rs in &case.ranks {
        let total: usize = rs.iter().flatten().sum();
        if total == 0 {
            slots.push(None);
            continue;
        }
        let a = c.rand(dt, total * h_in, 1.0 / (h_in as f32).sqrt());
        let stacked = c.upload(dt, &a)?;
        let mut parts = Vec::new();
        for (j, r) in rs.iter().enumerate() {
            match r {
                None => parts.push(None),
                Some(r) => {
                    let b = c.rand(dt, outs[j] * r, 1.0 / (*r as f32).sqrt());
                    let (gb, cb) = c.upload(dt, &b)?;
                    parts.push(Some((gb, cb, *r)));
                }
            }
        }
        slots.push(Some((stacked, parts)));
    }
    // The tables with every slot's intermediate at column 0 (`arena` false) or at `voffs`.
    let gpu_groups = |arena: bool| group_slots::<CudaBackend>(&slots, &voffs, arena, |g, _| g);
    let cpu_groups = |arena: bool| group_slots::<CpuBackend>(&slots, &voffs, arena, |_, c| c);
    // Emptied and refilled where it is (as an adapter install rebuilds the tables): the checks
    // below run on the rewritten table.
    let mut table = be.lora_table(&gpu_groups(false))?;
    let at = table.ptr;
    let empty: Vec<Option<LoraGroupSlot<'_, CudaBackend>>> =
        gpu_groups(false).iter().map(|_| None).collect();
    be.update_lora_table(&mut table, &empty)?;
    be.update_lora_table(&mut table, &gpu_groups(false))?;
    let ctable = cpu.lora_table(&cpu_groups(false))?;
    let segments = SegmentTable::from_row_slots(&case.rows);
    let meta = StepMeta {
        segments,
        ..StepMeta::one_sequence(n_rows)
    };
    let dmeta = be.upload_meta(&meta)?;
    let cmeta = cpu.upload_meta(&meta)?;

    // Shrink into NaN-poisoned v on both: rows with an adapter must be fully written up to
    // their rank, every entry the CPU leaves NaN must stay NaN on the GPU.
    let (dx, cx) = c.upload(dt, &x)?;
    let (mut dv, mut cv) = c.poisoned(DType::F32, n_rows * v_width)?;
    be.sgmv_shrink(&dx, &table, &dmeta, h_in, v_width, &mut dv)?;
    cpu.sgmv_shrink(&cx, &ctable, &cmeta, h_in, v_width, &mut cv)?;
    let v_out = be.download(&dv)?;
    let v_cpu = cpu.download(&cv)?;
    let (mut got, mut want) = (Vec::new(), Vec::new());
    let mut stray = 0usize;
    for (o, r) in v_out.iter().zip(&v_cpu) {
        if r.is_nan() {
            if !o.is_nan() {
                stray += 1;
            }
        } else {
            got.push(*o);
            want.push(*r);
        }
    }
    let label = format!("{:?} {}", dt, case.label);
    if table.ptr != at {
        c.fail(
            "lora_table",
            label.clone(),
            "a table rebuilt in place moved".into(),
        );
    }
    if stray > 0 {
        c.fail(
            "sgmv_shrink",
            label.clone(),
            format!("{stray} entries written outside the adapters' rows/ranks"),
        );
    } else {
        // f32 output of bf16 inputs through tensor cores: held to 1e-3.
        c.record("sgmv_shrink", label.clone(), &got, &want, 1e-3);
    }

    // Expand from the device's v on the GPU (NaN outside each row's rank: must not be read) and
    // from the same values, NaN cleared, on the CPU, so the check covers the expand alone.
    let v_clean: Vec<f32> = v_out
        .iter()
        .map(|&e| if e.is_nan() { 0.0 } else { e })
        .collect();
    let cv_clean = cpu.upload(DType::F32, &v_clean)?;
    let tables = (&table, &ctable, &dmeta, &cmeta);
    expand_check(c, case, tables, (&dv, &cv_clean), v_width, label.clone())?;
    // The whole operator in one call (the streamed kernel where it serves the call) against
    // the CPU's shrink and expand.
    let h_out: usize = outs.iter().sum();
    let y_stride = h_out + 2 * case.pad;
    let y0 = c.rand(dt, n_rows * y_stride, 1.0);
    let (mut dy, mut cy) = c.upload(dt, &y0)?;
    let (mut dv2, mut cv2) = c.poisoned(DType::F32, n_rows * v_width)?;
    let streamed = be.streams_lora(&dx, &table, &dmeta, h_in, outs, (case.pad, &dy))?;
    let (op, pad) = (
        if be.dense_lora(&dx, &table, &dmeta) {
            "sgmv_lora dense"
        } else if streamed {
            "sgmv_lora streamed"
        } else {
            "sgmv_lora"
        },
        case.pad,
    );
    be.sgmv_lora(
        &dx,
        &table,
        &dmeta,
        h_in,
        (&mut dv2, v_width),
        outs,
        y_stride,
        pad,
        &mut dy,
    )?;
    cpu.sgmv_lora(
        &cx,
        &ctable,
        &cmeta,
        h_in,
        (&mut cv2, v_width),
        outs,
        y_stride,
        pad,
        &mut cy,
    )?;
    let (y_out, y_cpu) = (be.download(&dy)?, cpu.download(&cy)?);
    check_y(c, case, op, label.clone(), (&y0, &y_out, &y_cpu), y_stride);
    if case.arena {
        // Each row's intermediate moved to its slot's arena columns, NaN elsewhere (the GPU
        // must not read those), in f32 and in the activations' dtype.
        let mut wide = vec![f32::NAN; n_rows * arena_width];
        for (row, slot) in case.rows.iter().enumerate() {
            let Some(s) = slot.map(|s| s as usize) else {
                continue;
            };
            let (voff, total) = (voffs[s], totals[s]);
            wide[row * arena_width + voff..][..total]
                .copy_from_slice(&v_out[row * v_width..][..total]);
        }
        let mut wide_clean: Vec<f32> = wide
            .iter()
            .map(|&e| if e.is_nan() { 0.0 } else { e })
            .collect();
        let atable = be.lora_table(&gpu_groups(true))?;
        let catable = cpu.lora_table(&cpu_groups(true))?;
        let tables = (&atable, &catable, &dmeta, &cmeta);
        let dv = be.upload(DType::F32, &wide)?;
        let cv = cpu.upload(DType::F32, &wide_clean)?;
        let arena_label = format!("{label}, arena columns");
        expand_check(
            c,
            case,
            tables,
            (&dv, &cv),
            arena_width,
            arena_label.clone(),
        )?;
        let dvh = be.upload(dt, &wide)?;
        round(dt, &mut wide_clean);
        let cvh = cpu.upload(dt, &wide_clean)?;
        let label = format!("{arena_label}, v {dt:?}");
        expand_check(c, case, tables, (&dvh, &cvh), arena_width, label)?;
        // Such a table serves expands only.
        let (mut scratch, _) = c.poisoned(DType::F32, n_rows * arena_width)?;
        if be
            .sgmv_shrink(&dx, &atable, &dmeta, h_in, arena_width, &mut scratch)
            .is_ok()
        {
            c.fail("sgmv_shrink", arena_label, "took an arena table".into());
        }
    }
    Ok(())
}

/// The GPU's expand from `v.0` against the CPU's from `v.1` (see [`sgmv_case`]).
fn expand_check(
    c: &mut Ctx<'_>,
    case: &SgmvCase,
    (table, ctable, dmeta, cmeta): (&CudaLoraTable, &CpuLoraTable, &CudaMeta, &CpuMeta),
    (dv, cv): (&CudaBuf, &CpuBuf),
    v_width: usize,
    label: String,
) -> Result<()> {
    let (be, cpu) = (c.be, c.cpu.clone());
    let (outs, dt, n_rows) = (&case.outs, case.dtype, case.rows.len());
    let h_out: usize = outs.iter().sum();
    let y_stride = h_out + 2 * case.pad;
    let y0 = c.rand(dt, n_rows * y_stride, 1.0);
    if let [gate, up] = outs[..]
        && gate == up
        && case.pad == 0
    {
        // A gate|up group: its expand followed by SiLU-mul, fused on the GPU where the row
        // kernels serve the step, against the CPU's two ops, into poisoned outputs.
        let (mut dy, mut cy) = c.upload(dt, &y0)?;
        let (mut dact, mut cact) = c.poisoned(dt, n_rows * gate)?;
        let (rows, n) = (n_rows, gate);
        be.expand_silu_mul(
            dv, table, dmeta, v_width, &mut dy, y_stride, rows, n, &mut dact,
        )?;
        cpu.expand_silu_mul(
            cv, ctable, cmeta, v_width, &mut cy, y_stride, rows, n, &mut cact,
        )?;
        let (got, want) = (be.download(&dact)?, cpu.download(&cact)?);
        c.record("expand_silu_mul", label.clone(), &got, &want, tol(dt));
    }
    if let [q, k, kv] = outs[..]
        && k == kv
        && case.pad == 0
        && let Some(hd) = [128usize, 64, 32, 16, 8, 4, 2]
            .into_iter()
            .find(|hd| q % hd == 0 && k % hd == 0)
    {
        // A q|k|v group: its expand followed by RoPE and the KV-cache write, fused on the GPU
        // where the row kernels serve the step, against the CPU's two ops: the rotated q and
        // both caches (poisoned) must agree.
        let shape = AttnShape {
            n_heads: q / hd,
            n_kv_heads: k / hd,
            head_dim: hd,
        };
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 10000f32.powf(-((2 * i) as f32) / hd as f32))
            .collect();
        let (dinv, cinv) = c.upload(DType::F32, &inv)?;
        let (mut dy, mut cy) = c.upload(dt, &y0)?;
        let (mut dk, mut ck) = c.poisoned(dt, n_rows * k)?;
        let (mut dvc, mut cvc) = c.poisoned(dt, n_rows * k)?;
        let caches = (&mut dk, &mut dvc);
        be.expand_rope_write_kv(
            dv, table, dmeta, v_width, &mut dy, y_stride, &dinv, shape, caches,
        )?;
        let caches = (&mut ck, &mut cvc);
        cpu.expand_rope_write_kv(
            cv, ctable, cmeta, v_width, &mut cy, y_stride, &cinv, shape, caches,
        )?;
        let q_cols = |all: Vec<f32>| -> Vec<f32> {
            all.chunks(y_stride).flat_map(|r| r[..q].to_vec()).collect()
        };
        let mut got = q_cols(be.download(&dy)?);
        let mut want = q_cols(cpu.download(&cy)?);
        for (d, c_) in [(&dk, &ck), (&dvc, &cvc)] {
            got.extend(be.download(d)?);
            want.extend(cpu.download(c_)?);
        }
        c.record("expand_rope_write_kv", label.clone(), &got, &want, tol(dt));
    }
    let (mut dy, mut cy) = c.upload(dt, &y0)?;
    be.sgmv_expand(dv, table, dmeta, v_width, outs, y_stride, case.pad, &mut dy)?;
    cpu.sgmv_expand(
        cv, ctable, cmeta, v_width, outs, y_stride, case.pad, &mut cy,
    )?;
    let y_out = be.download(&dy)?;
    let y_cpu = cpu.download(&cy)?;
    check_y(
        c,
        case,
        "sgmv_expand",
        label,
        (&y0, &y_out, &y_cpu),
        y_stride,
    );
    Ok(())
}

/// The GPU's `y_out` against the CPU's `y_cpu` after an op that added the LoRA delta to `y0`:
/// elements outside the LoRA rows and parts must be bit-identical; the rest within tolerance,
/// element by element too, so a few skipped columns cannot hide in the norm.
fn check_y(
    c: &mut Ctx<'_>,
    case: &SgmvCase,
    op: &str,
    label: String,
    (y0, y_out, y_cpu): (&[f32], &[f32], &[f32]),
    y_stride: usize,
) {
    let (outs, dt) = (&case.outs, case.dtype);
    let part_at = |col: usize| {
        let mut start = case.pad;
        for (j, &w) in outs.iter().enumerate() {
            if (start..start + w).contains(&col) {
                return Some(j);
            }
            start += w;
        }
        None
    };
    let inside = |row: usize, col: usize| {
        let Some(slot) = case.rows[row] else {
            return false;
        };
        let Some(j) = part_at(col) else { return false };
        case.ranks
            .get(slot as usize)
            .is_some_and(|rs| rs.get(j).is_some_and(|r| r.is_some()))
    };
    let mut touched_outside = 0usize;
    let mut worst = 0.0f64;
    let mean_abs = y_cpu.iter().map(|e| e.abs() as f64).sum::<f64>() / y_cpu.len().max(1) as f64;
    for (i, (&o, &r)) in y_out.iter().zip(y_cpu).enumerate() {
        let (row, col) = (i / y_stride, i % y_stride);
        if !inside(row, col) && o.to_bits() != y0[i].to_bits() {
            touched_outside += 1;
        }
        let e = (o as f64 - r as f64).abs() / (r.abs() as f64 + mean_abs);
        if !e.is_finite() || e > worst {
            worst = if e.is_finite() { e } else { f64::INFINITY };
        }
    }
    if touched_outside > 0 {
        c.fail(
            op,
            label,
            format!("{touched_outside} elements changed outside the LoRA rows and parts"),
        );
    } else if worst > 2e-2 {
        c.fail(op, label, format!("element error {worst:.2e} > 2e-2"));
    } else {
        c.record(op, label, y_out, y_cpu, tol(dt));
    }
}

fn workload_rows(w: Workload, tokens: usize) -> Vec<Option<u32>> {
    row_slots(&segment_lens(w, tokens))
}

fn sgmv_cases() -> Vec<SgmvCase> {
    let mut cases = Vec::new();
    let row_choices = [1usize, 5, 16, 37];
    let mut i = 0usize;
    for h in [576usize, 4096, 5120, 8192] {
        for h_out in [h, 11008, 14336] {
            for r in [1usize, 4, 8, 16, 32, 64, 128] {
                let w = Workload::ALL[i % 4];
                let tokens = row_choices[(i / 4) % row_choices.len()];
                let rows = workload_rows(w, tokens);
                let n = rows.iter().flatten().max().map_or(0, |&m| m as usize + 1);
                cases.push(SgmvCase::single(
                    DType::BF16,
                    (h, h_out),
                    vec![Some(r); n],
                    rows,
                    format!("h {h}->{h_out} r {r} {} x{tokens}", w.name()),
                ));
                i += 1;
            }
        }
    }
    for (w, r) in [
        (Workload::Identical, 16),
        (Workload::Uniform, 64),
        (Workload::Skewed, 16),
        (Workload::Distinct, 8),
    ] {
        let rows = workload_rows(w, 512);
        let n = rows.iter().flatten().max().map_or(0, |&m| m as usize + 1);
        cases.push(SgmvCase::single(
            DType::BF16,
            (4096, 4096),
            vec![Some(r); n],
            rows,
            format!("h 4096 r {r} {} x512", w.name()),
        ));
    }
    // One adapter's long segment of total rank 64 or more: the whole operator as two dense
    // GEMMs (bf16; f16 keeps the kernels), from row 0 and after base rows, three parts into a
    // padded output.
    for dtype in [DType::BF16, DType::F16] {
        cases.push(SgmvCase::single(
            dtype,
            (4096, 4096),
            vec![Some(64)],
            workload_rows(Workload::Identical, 512),
            format!("h 4096 r 64 identical x512 {dtype:?}"),
        ));
    }
    let mut rows = vec![None; 20];
    rows.extend([Some(0u32); 300]);
    rows.extend([None; 12]);
    cases.push(SgmvCase {
        dtype: DType::BF16,
        h_in: 4096,
        outs: vec![4096, 1024, 1024],
        ranks: vec![vec![Some(32), Some(16), Some(16)]],
        rows,
        pad: 1,
        arena: false,
        label: "group q|k|v 4096 r 32/16/16 one segment of 300 after 20 base rows".into(),
    });
    // Mixed ranks in one launch, empty slots, base rows between segments, an offset output.
    let ranks = vec![
        Some(1),
        Some(8),
        None,
        Some(16),
        Some(64),
        Some(128),
        Some(4),
        Some(32),
    ];
    let mut rows = Vec::new();
    for (slot, len) in [
        (0u32, 3usize),
        (1, 17),
        (2, 5),
        (3, 1),
        (4, 33),
        (5, 20),
        (6, 2),
        (7, 9),
    ] {
        rows.extend(std::iter::repeat_n(Some(slot), len));
        rows.extend(std::iter::repeat_n(None, slot as usize % 3));
    }
    for dtype in [DType::BF16, DType::F16] {
        cases.push(SgmvCase {
            pad: 512,
            ..SgmvCase::single(
                dtype,
                (4096, 1024),
                ranks.clone(),
                rows.clone(),
                "mixed ranks 1..128, empty slot, base rows, col offset".into(),
            )
        });
    }
    let rows = workload_rows(Workload::Skewed, 64);
    let n = rows.iter().flatten().max().map_or(0, |&m| m as usize + 1);
    cases.push(SgmvCase::single(
        DType::F16,
        (5120, 14336),
        vec![Some(16); n],
        rows,
        "h 5120->14336 r 16 skewed x64".into(),
    ));
    cases.push(SgmvCase::single(
        DType::BF16,
        (576, 576),
        vec![None, None],
        vec![Some(0), Some(1), None],
        "only empty slots".into(),
    ));
    // Odd widths exercise the scalar tails of the vector loads.
    cases.push(SgmvCase {
        pad: 1,
        ..SgmvCase::single(
            DType::BF16,
            (100, 77),
            vec![Some(3), Some(12)],
            vec![Some(0), Some(0), Some(1)],
            "h 100->77 r 3/12 unaligned".into(),
        )
    });
    // Groups: q|k|v and gate|up in one shrink and one expand.
    // At 512 rows, one adapter: the long-segment expand, in one launch for all parts.
    for (w, tokens) in [
        (Workload::Distinct, 32),
        (Workload::Identical, 32),
        (Workload::Identical, 512),
    ] {
        let rows = workload_rows(w, tokens);
        let n = rows.iter().flatten().max().map_or(0, |&m| m as usize + 1);
        cases.push(SgmvCase {
            dtype: DType::BF16,
            h_in: 4096,
            outs: vec![4096, 4096, 4096],
            ranks: vec![vec![Some(16); 3]; n],
            rows,
            pad: 0,
            arena: true,
            label: format!("group q|k|v 4096 r 16 {} x{tokens}", w.name()),
        });
        let rows = workload_rows(w, tokens);
        cases.push(SgmvCase {
            dtype: DType::BF16,
            h_in: 4096,
            outs: vec![11008, 11008],
            ranks: vec![vec![Some(16); 2]; n],
            rows,
            pad: 0,
            arena: true,
            label: format!("group gate|up 4096->11008 r 16 {} x{tokens}", w.name()),
        });
    }
    // Gate|up groups for the fused expand + SiLU-mul: SmolLM2's with adapters lacking parts,
    // mixed ranks, an empty slot and rows without adapter between one-row segments (and once
    // with longer ones); 7B's, 32 distinct adapters and 5 rows without (a padded decode step);
    // unaligned widths and ranks.
    // With the fourth adapter's up part at rank 32, the one-row case is one the streamed kernel
    // takes (ranks powers of two from 8).
    for (lens, up) in [
        ([1usize, 1, 1, 1, 1, 1], 4),
        ([3, 17, 1, 2, 1, 4], 4),
        ([1, 1, 1, 1, 1, 1], 32),
    ] {
        let mut rows = Vec::new();
        for (slot, len) in lens.iter().enumerate() {
            rows.extend(std::iter::repeat_n(Some(slot as u32), *len));
            rows.extend(std::iter::repeat_n(None, slot % 2));
        }
        for dtype in [DType::BF16, DType::F16] {
            cases.push(SgmvCase {
                dtype,
                h_in: 576,
                outs: vec![1536, 1536],
                ranks: vec![
                    vec![Some(8), None],
                    vec![Some(16), Some(16)],
                    vec![None, None],
                    vec![None, Some(up)],
                    vec![Some(128), Some(128)],
                    vec![Some(64), Some(32)],
                ],
                rows: rows.clone(),
                pad: 0,
                arena: dtype == DType::F16,
                label: format!(
                    "group gate|up 576->1536 missing parts, ranks {}..128, base rows, \
                     segments {lens:?}",
                    up.min(8)
                ),
            });
        }
    }
    let mut rows: Vec<Option<u32>> = (0..32).map(Some).collect();
    rows.extend([None; 5]);
    cases.push(SgmvCase {
        dtype: DType::BF16,
        h_in: 4096,
        outs: vec![11008, 11008],
        ranks: vec![vec![Some(16); 2]; 32],
        rows,
        pad: 0,
        arena: true,
        label: "group gate|up 4096->11008 r 16 distinct x32, 5 rows without adapter".into(),
    });
    cases.push(SgmvCase {
        dtype: DType::BF16,
        h_in: 100,
        outs: vec![77, 77],
        ranks: vec![vec![Some(3), Some(12)], vec![None, Some(5)]],
        rows: vec![Some(0), Some(0), Some(1), None, Some(0)],
        pad: 0,
        arena: true,
        label: "group gate|up 100->77 r 3/12/5 unaligned".into(),
    });
    // SmolLM2's q|k|v (GQA) with adapters lacking parts, mixed ranks, an empty slot, base rows;
    // once with a long segment, once with segments of at most 4 rows (the row kernels), once
    // with segments long enough for the long-segment expand (36 tiles; a launch per part).
    for lens in [
        [3usize, 17, 2, 1, 5],
        [3, 1, 2, 1, 4],
        [40, 200, 30, 96, 180],
    ] {
        let mut rows = Vec::new();
        for (slot, len) in lens.iter().enumerate() {
            rows.extend(std::iter::repeat_n(Some(slot as u32), *len));
            rows.push(None);
        }
        let longest = lens.iter().max().copied().unwrap_or(0);
        for dtype in [DType::BF16, DType::F16] {
            cases.push(SgmvCase {
                dtype,
                h_in: 576,
                outs: vec![576, 192, 192],
                ranks: vec![
                    vec![Some(8), None, Some(8)],
                    vec![Some(16), Some(16), Some(16)],
                    vec![None, None, None],
                    vec![None, Some(4), None],
                    vec![Some(128), Some(128), Some(128)],
                ],
                rows: rows.clone(),
                // bf16 from column 0, so that RoPE follows its expand (see `expand_check`).
                pad: if dtype == DType::F16 { 64 } else { 0 },
                arena: dtype == DType::F16,
                label: format!(
                    "group q|k|v 576|192|192 missing parts, ranks 4..128 (total 384), \
                     segments <= {longest}"
                ),
            });
        }
    }
    // Part boundaries inside a warp's columns: one launch per part.
    for arena in [false, true] {
        cases.push(SgmvCase {
            dtype: DType::BF16,
            h_in: 100,
            outs: vec![100, 36, 36],
            ranks: vec![
                vec![Some(3), Some(12), None],
                vec![Some(5), Some(5), Some(5)],
            ],
            rows: vec![Some(0), Some(1), Some(1), None, Some(0)],
            // Once from column 0: heads of 4 after the expand (see `expand_check`).
            pad: usize::from(arena),
            arena,
            label: "group 100|36|36 unaligned parts".into(),
        });
    }
    // The streamed kernel: rows cut in pieces (an A row longer than a ring stage), clusters
    // taking more than one row (its gate|up group with missing parts is above), shrink and
    // expand on tensor cores (rows of r=64 over 256 KiB: in both dtypes, 8192 wide with two
    // rank rows a stage).
    for (dtype, h_in, h_out, r, tokens) in [
        (DType::BF16, 20480, 1024, 16, 40),
        (DType::BF16, 4096, 4096, 64, 99),
        (DType::F16, 4096, 4096, 64, 99),
        (DType::BF16, 8192, 8192, 64, 40),
    ] {
        let rows = workload_rows(Workload::Distinct, tokens);
        cases.push(SgmvCase::single(
            dtype,
            (h_in, h_out),
            vec![Some(r); tokens],
            rows,
            format!("h {h_in}->{h_out} r {r} distinct x{tokens} {dtype:?}"),
        ));
    }
    // The same with ranks 64, 32, 16 and 8 in turn (the expand on tensor cores at 32 and 64,
    // on CUDA cores below), three rank rows a stage and a part vector a row past whole units.
    let ranks: Vec<_> = (0..40).map(|i| Some(64 >> (i % 4))).collect();
    cases.push(SgmvCase::single(
        DType::F16,
        (4104, 4096),
        ranks,
        workload_rows(Workload::Distinct, 40),
        "h 4104->4096 r 64/32/16/8 distinct x40 F16".into(),
    ));
    cases
}

fn check_elementwise_ops(c: &mut Ctx<'_>, dt: DType) -> Result<()> {
    let (be, cpu) = (c.be, c.cpu.clone());
    let t = tol(dt);
    // bf16/f16 widths of whole 16-byte vectors up to 8192 take the register-resident norm (one
    // or two vectors a thread); 100 and 9000 take the general loop.
    for &(rows, hidden) in &[
        (5usize, 576usize),
        (3, 4096),
        (32, 4096),
        (4, 5120),
        (2, 8192),
        (4, 100),
        (2, 9000),
    ] {
        let label = format!("{dt:?} {rows}x{hidden}");
        let x = c.rand(dt, rows * hidden, 2.0);
        let w = c.rand(dt, hidden, 1.0);
        let res0 = c.rand(dt, rows * hidden, 2.0);
        let (dx, cx) = c.upload(dt, &x)?;
        let (dw, cw) = c.upload(dt, &w)?;
        let eps = 1e-5f32;

        let (mut out, mut cout) = c.poisoned(dt, rows * hidden)?;
        be.rms_norm(&dx, &dw, eps, rows, hidden, &mut out)?;
        cpu.rms_norm(&cx, &cw, eps, rows, hidden, &mut cout)?;
        c.record(
            "rms_norm",
            label.clone(),
            &be.download(&out)?,
            &cpu.download(&cout)?,
            t,
        );

        let (mut dres, mut cres) = c.upload(dt, &res0)?;
        let (mut out, mut cout) = c.poisoned(dt, rows * hidden)?;
        be.add_rms_norm(&mut dres, &dx, hidden, &dw, eps, rows, hidden, &mut out)?;
        cpu.add_rms_norm(&mut cres, &cx, hidden, &cw, eps, rows, hidden, &mut cout)?;
        c.record(
            "add_rms_norm.residual",
            label.clone(),
            &be.download(&dres)?,
            &cpu.download(&cres)?,
            t,
        );
        c.record(
            "add_rms_norm.out",
            label.clone(),
            &be.download(&out)?,
            &cpu.download(&cout)?,
            t,
        );
        // x as a GEMM output with extra columns (the LoRA intermediates): 16-byte rows (the
        // vector norm) and odd ones.
        for pad in [64, 3] {
            let stride = hidden + pad;
            let xs = c.rand(dt, rows * stride, 2.0);
            let (dxs, cxs) = c.upload(dt, &xs)?;
            let (mut dres, mut cres) = c.upload(dt, &res0)?;
            let (mut out, mut cout) = c.poisoned(dt, rows * hidden)?;
            be.add_rms_norm(&mut dres, &dxs, stride, &dw, eps, rows, hidden, &mut out)?;
            cpu.add_rms_norm(&mut cres, &cxs, stride, &cw, eps, rows, hidden, &mut cout)?;
            c.record(
                "add_rms_norm.strided",
                format!("{label} stride {stride}"),
                &be.download(&out)?,
                &cpu.download(&cout)?,
                t,
            );
        }

        let (mut dy, mut cy) = c.upload(dt, &res0)?;
        be.add_assign(&mut dy, &dx)?;
        cpu.add_assign(&mut cy, &cx)?;
        c.record(
            "add_assign",
            label,
            &be.download(&dy)?,
            &cpu.download(&cy)?,
            t,
        );

        // gate|up filling the row, then in a row with extra columns.
        for n in [hidden / 2, hidden / 3] {
            let (mut out, mut cout) = c.poisoned(dt, rows * n)?;
            be.silu_mul(&dx, hidden, rows, n, &mut out)?;
            cpu.silu_mul(&cx, hidden, rows, n, &mut cout)?;
            c.record(
                "silu_mul",
                format!("{dt:?} {rows}x{n} stride {hidden}"),
                &be.download(&out)?,
                &cpu.download(&cout)?,
                t,
            );
        }
    }

    // Embedding and gather through step metadata.
    let (vocab, hidden, rows) = (1000usize, 576usize, 7usize);
    let table = c.rand(dt, vocab * hidden, 1.0);
    let ids: Vec<u32> = (0..rows)
        .map(|_| c.rng.random_range(0..vocab as u32))
        .collect();
    let meta = StepMeta {
        token_ids: ids,
        logit_rows: vec![6, 0, 3],
        ..StepMeta::one_sequence(rows)
    };
    let dmeta = be.upload_meta(&meta)?;
    let cmeta = cpu.upload_meta(&meta)?;
    let (dtable, ctable) = c.upload(dt, &table)?;
    let (mut out, mut cout) = c.poisoned(dt, rows * hidden)?;
    be.embedding(&dtable, &dmeta, hidden, &mut out)?;
    cpu.embedding(&ctable, &cmeta, hidden, &mut cout)?;
    c.record(
        "embedding",
        format!("{dt:?} {rows} of {vocab}x{hidden}"),
        &be.download(&out)?,
        &cpu.download(&cout)?,
        t,
    );
    let (mut g, mut cg) = c.poisoned(dt, 3 * hidden)?;
    be.gather_rows(&out, &dmeta, hidden, &mut g)?;
    cpu.gather_rows(&cout, &cmeta, hidden, &mut cg)?;
    c.record(
        "gather_rows",
        format!("{dt:?} 3 of {rows}x{hidden}"),
        &be.download(&g)?,
        &cpu.download(&cg)?,
        t,
    );
    Ok(())
}

/// Dependent ops back to back with no copy or synchronisation between them, as in the forward,
/// so each kernel's launch overlaps its producer's tail (programmatic dependent launch). The
/// intermediates are read back at the end and each op is checked against the CPU given the
/// GPU's own inputs: a kernel that read its input before the producer finished would differ.
fn check_dependent_chain(c: &mut Ctx<'_>, dt: DType) -> Result<()> {
    let (be, cpu) = (c.be, c.cpu.clone());
    let t = tol(dt);
    let (rows, hidden) = (32usize, 4096usize);
    let half = hidden / 2;
    let label = format!("{dt:?} {rows}x{hidden} chain");
    let x = c.rand(dt, rows * hidden, 2.0);
    let w = c.rand(dt, hidden, 1.0);
    let res0 = c.rand(dt, rows * hidden, 2.0);
    let dx = be.upload(dt, &x)?;
    let dw = be.upload(dt, &w)?;
    let mut dres = be.upload(dt, &res0)?;
    let mut a = be.alloc(dt, rows * hidden)?;
    let mut b = be.alloc(dt, rows * hidden)?;
    let mut g = be.alloc(dt, rows * half)?;
    let mut d = be.alloc(dt, rows * half)?;
    be.synchronize()?;
    let eps = 1e-5f32;
    be.rms_norm(&dx, &dw, eps, rows, hidden, &mut a)?;
    be.add_rms_norm(&mut dres, &a, hidden, &dw, eps, rows, hidden, &mut b)?;
    be.silu_mul(&b, hidden, rows, half, &mut g)?;
    be.rms_norm(&g, &dw, eps, rows, half, &mut d)?;
    be.add_assign(&mut g, &d)?;
    let (a, res, b, d, g) = (
        be.download(&a)?,
        be.download(&dres)?,
        be.download(&b)?,
        be.download(&d)?,
        be.download(&g)?,
    );
    let cw = cpu.upload(dt, &w)?;

    let mut want = cpu.alloc(dt, rows * hidden)?;
    cpu.rms_norm(&cpu.upload(dt, &x)?, &cw, eps, rows, hidden, &mut want)?;
    c.record(
        "chain.rms_norm",
        label.clone(),
        &a,
        &cpu.download(&want)?,
        t,
    );

    let mut cres = cpu.upload(dt, &res0)?;
    cpu.add_rms_norm(
        &mut cres,
        &cpu.upload(dt, &a)?,
        hidden,
        &cw,
        eps,
        rows,
        hidden,
        &mut want,
    )?;
    c.record(
        "chain.add_rms_norm.residual",
        label.clone(),
        &res,
        &cpu.download(&cres)?,
        t,
    );
    c.record(
        "chain.add_rms_norm.out",
        label.clone(),
        &b,
        &cpu.download(&want)?,
        t,
    );

    let mut cg = cpu.alloc(dt, rows * half)?;
    cpu.silu_mul(&cpu.upload(dt, &b)?, hidden, rows, half, &mut cg)?;
    let g_before = cpu.download(&cg)?;
    let mut cd = cpu.alloc(dt, rows * half)?;
    cpu.rms_norm(&cg, &cw, eps, rows, half, &mut cd)?;
    c.record(
        "chain.rms_norm.half",
        label.clone(),
        &d,
        &cpu.download(&cd)?,
        t,
    );

    // g was updated in place by the last op: rebuild it from the CPU's silu_mul and the GPU's d.
    let mut cg = cpu.upload(dt, &g_before)?;
    cpu.add_assign(&mut cg, &cpu.upload(dt, &d)?)?;
    c.record("chain.add_assign", label, &g, &cpu.download(&cg)?, t);
    Ok(())
}

fn check_matmul(c: &mut Ctx<'_>, dt: DType) -> Result<()> {
    let (be, cpu) = (c.be, c.cpu.clone());
    for &(rows, k, n) in &[
        (1usize, 576usize, 1536usize),
        (7, 4096, 4096),
        (64, 576, 576),
        (33, 1536, 11008),
    ] {
        let x = c.rand(dt, rows * k, 1.0);
        let w = c.rand(dt, n * k, 1.0 / (k as f32).sqrt());
        let (dx, cx) = c.upload(dt, &x)?;
        let (dw, cw) = c.upload(dt, &w)?;
        let (mut out, mut cout) = c.poisoned(dt, rows * n)?;
        be.matmul(&dx, &dw, rows, k, n, &mut out)?;
        cpu.matmul(&cx, &cw, rows, k, n, &mut cout)?;
        c.record(
            "matmul",
            format!("{dt:?} {rows}x{k}x{n}"),
            &be.download(&out)?,
            &cpu.download(&cout)?,
            tol(dt),
        );
    }
    if dt != DType::F32 {
        // The logits: half-precision hidden states and LM head, f32 out.
        let (rows, k, n) = (7usize, 576usize, 49152usize);
        let x = c.rand(dt, rows * k, 1.0);
        let w = c.rand(dt, n * k, 1.0 / (k as f32).sqrt());
        let (dx, cx) = c.upload(dt, &x)?;
        let (dw, cw) = c.upload(dt, &w)?;
        let (mut out, mut cout) = c.poisoned(DType::F32, rows * n)?;
        be.matmul(&dx, &dw, rows, k, n, &mut out)?;
        cpu.matmul(&cx, &cw, rows, k, n, &mut cout)?;
        // f32 output of half inputs through tensor cores: held to 1e-3 like the SGMV shrink.
        c.record(
            "matmul.f32_out",
            format!("{dt:?} {rows}x{k}x{n}"),
            &be.download(&out)?,
            &cpu.download(&cout)?,
            1e-3,
        );
    }
    Ok(())
}

/// `fill_random`: the same bits on both backends once the CPU's values are rounded to the
/// buffer's dtype (CPU buffers hold f32 whatever their dtype).
fn check_fill_random(c: &mut Ctx<'_>, dt: DType) -> Result<()> {
    let (be, cpu) = (c.be, c.cpu.clone());
    let n = 100_003usize;
    let seed = c.rng.random_range(0..u32::MAX);
    let (mut out, mut cout) = c.poisoned(dt, n)?;
    be.fill_random(&mut out, seed, 0.5)?;
    cpu.fill_random(&mut cout, seed, 0.5)?;
    let got = be.download(&out)?;
    let mut want = cpu.download(&cout)?;
    round(dt, &mut want);
    let differ = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let label = format!("{dt:?} {n} values, seed {seed}");
    if differ == 0 && got.len() == n {
        c.pass_exact("fill_random", label);
    } else {
        c.fail(
            "fill_random",
            label,
            format!("{differ} values differ from the CPU's"),
        );
    }
    Ok(())
}

/// An adapter's upload on the copy stream: staged tensors reach the device intact, the copy
/// reports done within a second, and an upload dropped while its copy may still run (its
/// memory freed after the copy) leaves the device healthy.
fn check_upload(c: &mut Ctx<'_>, dt: DType) -> Result<()> {
    let be = c.be;
    let lens = [4096 * 16, 11008 * 16, 7, 16 * 4096];
    let tensors: Vec<Vec<f32>> = lens
        .iter()
        .map(|&n| (0..n).map(|_| c.rng.random_range(-1.0f32..1.0)).collect())
        .collect();
    // The last two as the pieces of one tensor (a group's stacked A).
    let pieces: Vec<HostTensor<'_>> = tensors.iter().map(|t| HostTensor::f32(t)).collect();
    let views = [&pieces[0..1], &pieces[1..2], &pieces[2..4]];
    let tensors = [
        tensors[0].clone(),
        tensors[1].clone(),
        tensors[2..4].concat(),
    ];
    let staged = std::sync::Arc::new(be.stage(dt, &views)?);
    // Two parts (the first tensor, then the other two), copied one after the other.
    let bufs = be.upload_staged(&staged, &[1, 2])?;
    let started = std::time::Instant::now();
    while !be.upload_done(&bufs[2]) && started.elapsed() < std::time::Duration::from_secs(1) {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    let done_us = started.elapsed().as_micros();
    if be.upload_done(&bufs[2]) {
        c.pass_exact(
            "upload",
            format!("{dt:?} copy on the copy stream reported done after {done_us} us"),
        );
    } else {
        c.fail(
            "upload",
            format!("{dt:?} copy"),
            "not done after 1 s".into(),
        );
    }
    if be.upload_done(&bufs[2]) && !be.upload_done(&bufs[0]) {
        c.fail(
            "upload",
            format!("{dt:?} copy in two parts"),
            "the last part reported done before the first".into(),
        );
    }
    be.wait_upload(&bufs[0])?;
    be.wait_upload(&bufs[2])?;
    for (i, (buf, want)) in bufs.iter().zip(&tensors).enumerate() {
        let got = be.download(buf)?;
        let mut want = want.clone();
        round(dt, &mut want);
        c.record(
            "upload",
            format!("{dt:?} tensor {i} of {} values", want.len()),
            &got,
            &want,
            1e-6,
        );
    }
    drop(bufs);
    // Dropped at once: the free waits for the copy.
    drop(be.upload_staged(&staged, &[])?);
    be.synchronize()?;
    c.pass_exact("upload", format!("{dt:?} upload dropped in flight"));
    Ok(())
}

/// The page-locked region for staged adapters: a staging takes a range of it, a range given
/// back while its copy may still run is handed out again only after that copy (the next
/// staging, which needs that very range, must still reach the device intact), and what does
/// not fit gets memory of its own. Leaves the backend with the region.
fn check_staging_region(c: &mut Ctx<'_>, dt: DType) -> Result<()> {
    let be = c.be;
    be.reserve_staging(1 << 20)?;
    // 640 KiB staged: two do not fit in the region at once.
    let n = (640 << 10) / dt.size();
    let mut rand =
        |n: usize| -> Vec<f32> { (0..n).map(|_| c.rng.random_range(-1.0f32..1.0)).collect() };
    let (first, second, big) = (rand(n), rand(n), rand(2 * n));
    let staged = std::sync::Arc::new(be.stage(dt, &[&[HostTensor::f32(&first)]])?);
    let in_region = staged.in_region();
    // Dropped while its copy may still run.
    drop(be.upload_staged(&staged, &[])?);
    drop(staged);
    let staged = std::sync::Arc::new(be.stage(dt, &[&[HostTensor::f32(&second)]])?);
    let reused = staged.in_region();
    let bufs = be.upload_staged(&staged, &[])?;
    be.wait_upload(&bufs[0])?;
    let got = be.download(&bufs[0])?;
    let mut want = second;
    round(dt, &mut want);
    let large = be.stage(dt, &[&[HostTensor::f32(&big)]])?;
    let label = format!("{dt:?} 640 KiB stagings in a 1 MiB region");
    if !in_region || !reused || large.in_region() {
        c.fail(
            "staging",
            label,
            format!(
                "in the region: first {in_region}, second {reused}, one too large for it {}",
                large.in_region()
            ),
        );
    } else {
        c.record("staging", label, &got, &want, 1e-6);
    }
    Ok(())
}

/// Paged KV write, RoPE and attention over a batch mixing decode rows, a full prefill and a
/// prefill chunk on top of cached context, with GQA.
fn check_attention(c: &mut Ctx<'_>, dt: DType) -> Result<()> {
    let (be, cpu) = (c.be, c.cpu.clone());
    for &(n_heads, n_kv, hd) in &[(9usize, 3usize, 64usize), (32, 8, 128), (4, 4, 256)] {
        let shape = AttnShape {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
        };
        let kv_width = n_kv * hd;
        // (new rows, context after the step)
        let seqs_spec = [
            (1usize, 37usize),
            (20, 20),
            (5, 40),
            (1, 1),
            (1, 300),
            (3, 129),
        ];
        let total_blocks: usize = seqs_spec
            .iter()
            .map(|&(_, ctx)| ctx.div_ceil(BLOCK_SIZE))
            .sum::<usize>()
            + 3;
        let mut free: Vec<u32> = (0..total_blocks as u32).collect();
        // Shuffle so block tables are not the identity.
        for i in (1..free.len()).rev() {
            let j = c.rng.random_range(0..=i);
            free.swap(i, j);
        }
        let mut meta = StepMeta::default();
        let mut row = 0u32;
        for &(n, ctx) in &seqs_spec {
            let nb = ctx.div_ceil(BLOCK_SIZE);
            let bt_start = meta.block_tables.len() as u32;
            let blocks: Vec<u32> = free.drain(..nb).collect();
            for i in 0..n {
                let pos = ctx - n + i;
                meta.token_ids.push(0);
                meta.positions.push(pos as u32);
                meta.slot_mapping
                    .push(blocks[pos / BLOCK_SIZE] * BLOCK_SIZE as u32 + (pos % BLOCK_SIZE) as u32);
            }
            meta.block_tables.extend_from_slice(&blocks);
            meta.seqs.push(SeqMeta {
                row_start: row,
                num_rows: n as u32,
                context_len: ctx as u32,
                block_table_start: bt_start,
                num_blocks: nb as u32,
            });
            row += n as u32;
        }
        let rows = row as usize;
        let dmeta = be.upload_meta(&meta)?;
        let cmeta = cpu.upload_meta(&meta)?;
        let q_width = n_heads * hd;
        let row_stride = q_width + 2 * kv_width;
        let qkv = c.rand(dt, rows * row_stride, 1.0);
        let cache_len = total_blocks * BLOCK_SIZE * kv_width;
        let kc = c.rand(dt, cache_len, 1.0);
        let vc = c.rand(dt, cache_len, 1.0);
        let (mut dkc, mut ckc) = c.upload(dt, &kc)?;
        let (mut dvc, mut cvc) = c.upload(dt, &vc)?;
        let (mut dqkv, mut cqkv) = c.upload(dt, &qkv)?;
        let label = format!("{dt:?} heads {n_heads}/{n_kv} dim {hd} rows {rows}");

        // RoPE on q and k and the cache write, llama-style inverse frequencies.
        let inv_freq: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
            .collect();
        let (dfreq, cfreq) = c.upload(DType::F32, &inv_freq)?;
        be.rope_write_kv(
            &mut dqkv, row_stride, &dfreq, &dmeta, shape, &mut dkc, &mut dvc,
        )?;
        cpu.rope_write_kv(
            &mut cqkv, row_stride, &cfreq, &cmeta, shape, &mut ckc, &mut cvc,
        )?;
        let got = be.download(&dqkv)?;
        let (got_k, got_v) = (be.download(&dkc)?, be.download(&dvc)?);
        c.record(
            "rope_write_kv.qkv",
            label.clone(),
            &got,
            &cpu.download(&cqkv)?,
            tol(dt),
        );
        c.record(
            "rope_write_kv.k_cache",
            label.clone(),
            &got_k,
            &cpu.download(&ckc)?,
            tol(dt),
        );
        c.record(
            "rope_write_kv.v_cache",
            label.clone(),
            &got_v,
            &cpu.download(&cvc)?,
            tol(dt),
        );
        // The caches hold exactly the rotated K and the V the device left in its rows.
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let copied = meta.slot_mapping.iter().enumerate().all(|(r, &slot)| {
            let (src, dst) = (r * row_stride + q_width, slot as usize * kv_width);
            bits(&got_k[dst..dst + kv_width]) == bits(&got[src..src + kv_width])
                && bits(&got_v[dst..dst + kv_width])
                    == bits(&got[src + kv_width..src + 2 * kv_width])
        });
        if copied {
            c.pass_exact("rope_write_kv.copy", label.clone());
        } else {
            c.fail(
                "rope_write_kv.copy",
                label.clone(),
                "cache slots differ from the device's rotated K or its V".into(),
            );
        }
        // Continue from the device's values on both, so the attention check tests one op.
        let cqkv = cpu.upload(dt, &got)?;
        let ckc = cpu.upload(dt, &got_k)?;
        let cvc = cpu.upload(dt, &got_v)?;

        let scale = 1.0 / (hd as f32).sqrt();
        let (mut out, mut cout) = c.poisoned(dt, rows * q_width)?;
        be.attention(
            &dqkv, row_stride, 0, &dkc, &dvc, &dmeta, shape, scale, &mut out,
        )?;
        cpu.attention(
            &cqkv, row_stride, 0, &ckc, &cvc, &cmeta, shape, scale, &mut cout,
        )?;
        c.record(
            "attention",
            label,
            &be.download(&out)?,
            &cpu.download(&cout)?,
            tol(dt),
        );
    }
    Ok(())
}

/// How close two log-probabilities are: relative to `max(1, |want|)`, so near-certain tokens
/// (logprob near 0) are held to an absolute 1e-5. Equal values (both minus infinity) are 0.
fn logprob_err(got: f32, want: f32) -> f64 {
    if got == want {
        return 0.0;
    }
    let e = (got as f64 - want as f64).abs() / (want.abs() as f64).max(1.0);
    if e.is_nan() { f64::INFINITY } else { e }
}

/// Whether the host's pick for `rs` changes when its draw `u` or its `top_p` moves by 1e-5:
/// the draw then lies on a cumulative boundary that f32 and f64 sums may put either side.
fn near_boundary(logits: &[f32], rs: &RowSampling) -> bool {
    const EPS: f32 = 1e-5;
    let nominal = pick_row(logits, rs).token;
    let mut variants = vec![
        RowSampling {
            u: (rs.u - EPS).max(0.0),
            ..*rs
        },
        RowSampling {
            u: (rs.u + EPS).min(1.0 - f32::EPSILON),
            ..*rs
        },
    ];
    if rs.top_p < 1.0 {
        for top_p in [rs.top_p - EPS, (rs.top_p + EPS).min(1.0)] {
            variants.push(RowSampling { top_p, ..*rs });
        }
    }
    variants
        .iter()
        .any(|v| pick_row(logits, v).token != nominal)
}

/// Random sampling parameters: every fifth row greedy, the others over the edges of each knob
/// (top-k of 1, of vocab - 1 and of the whole vocabulary; top-p off, tight and loose).
fn random_row_sampling(rng: &mut StdRng, vocab: usize, row: usize) -> RowSampling {
    if row.is_multiple_of(5) {
        return RowSampling::GREEDY;
    }
    let temperature = [0.05, 0.5, 1.0, 1.5, rng.random_range(0.1..2.0)][rng.random_range(0..5)];
    let top_k =
        [0, 1, 2, 20, vocab - 1, vocab, rng.random_range(1..vocab)][rng.random_range(0..7)] as u32;
    let top_p = [1.0, 0.95, 0.5, rng.random_range(0.01..1.0)][rng.random_range(0..4)];
    RowSampling {
        temperature,
        top_k,
        top_p,
        u: rng.random_range(0.0..1.0),
    }
}

/// `sample` on f32 logits: smooth random rows, rows on a coarse grid (many exact ties at the
/// top-k and top-p boundaries) and rows with NaN and minus-infinity holes.
fn check_sample(c: &mut Ctx<'_>) -> Result<()> {
    let (be, cpu) = (c.be, c.cpu.clone());
    for &(vocab, rows) in &[
        (1000usize, 37usize),
        (32000, 256),
        (49152, 64),
        (128_256, 16),
        (262_144, 4),
    ] {
        let mut logits = Vec::with_capacity(rows * vocab);
        for r in 0..rows {
            let scale = [2.0f32, 8.0, 20.0][r % 3];
            for _ in 0..vocab {
                let v = c.rng.random_range(-scale..scale);
                logits.push(match r % 4 {
                    1 => (v * 2.0).round() / 2.0,
                    2 if c.rng.random_range(0..16) == 0 => {
                        if c.rng.random_range(0..2) == 0 {
                            f32::NAN
                        } else {
                            f32::NEG_INFINITY
                        }
                    }
                    _ => v,
                });
            }
        }
        let params: Vec<RowSampling> = (0..rows)
            .map(|r| random_row_sampling(&mut c.rng, vocab, r))
            .collect();
        let (dl, cl) = c.upload(DType::F32, &logits)?;
        let (mut got, mut want) = (Vec::new(), Vec::new());
        be.sample(&dl, vocab, &params, &mut got)?;
        cpu.sample(&cl, vocab, &params, &mut want)?;
        let greedy = params.iter().filter(|p| p.temperature == 0.0).count();
        let label = format!("f32 {rows}x{vocab}, {greedy} greedy");
        if got.len() != rows || want.len() != rows {
            c.fail(
                "sample",
                label,
                format!(
                    "{} picks from the GPU, {} from the CPU",
                    got.len(),
                    want.len()
                ),
            );
            continue;
        }
        let (mut worst, mut skipped) = (0.0f64, 0usize);
        let mut bad = Vec::new();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let rs = &params[i];
            if g.token == w.token {
                worst = worst.max(logprob_err(g.logprob, w.logprob));
            } else if rs.temperature > 0.0 && near_boundary(row, rs) {
                skipped += 1;
            } else {
                bad.push(mismatch(i, g, w, rs));
            }
        }
        let label = format!("{label}, {skipped} at a boundary skipped");
        if bad.is_empty() {
            c.results.push(CaseResult {
                op: "sample".into(),
                case: label,
                err: worst,
                tol: 1e-5,
                note: String::new(),
            });
        } else {
            let shown: Vec<String> = bad.iter().take(3).cloned().collect();
            c.fail(
                "sample",
                label,
                format!("{} rows differ: {}", bad.len(), shown.join("; ")),
            );
        }
    }
    Ok(())
}

fn mismatch(row: usize, got: &Pick, want: &Pick, rs: &RowSampling) -> String {
    format!(
        "row {row} (t {} k {} p {} u {}) GPU {} ({}) CPU {} ({})",
        rs.temperature, rs.top_k, rs.top_p, rs.u, got.token, got.logprob, want.token, want.logprob
    )
}

/// Run every check; print a pass/fail table. Returns whether all passed.
pub fn run(be: &CudaBackend, seed: u64) -> Result<bool> {
    let mut c = Ctx {
        be,
        cpu: CpuBackend::new(),
        rng: StdRng::seed_from_u64(seed),
        results: Vec::new(),
    };
    be.warm_up()?;
    // An error inside one check is that check's failure; the others still run.
    // A batch the row kernels can serve (segments of up to 16 rows, whatever the default
    // limit) goes through both kernel families.
    let limits = be.row_limits();
    for case in sgmv_cases() {
        let longest = SegmentTable::from_row_slots(&case.rows)
            .iter()
            .map(|(s, e, _)| e - s)
            .max()
            .unwrap_or(0);
        let both = (1..=plan::TILE_ROWS).contains(&longest);
        for (limit, kind) in [
            (plan::RowLimits::ALL, "rows"),
            (plan::RowLimits::NONE, "tiles"),
        ] {
            if !both && kind == "tiles" {
                continue;
            }
            be.set_row_limits(if both { limit } else { limits });
            let mut case = case.clone();
            if both {
                case.label = format!("{} [{kind}]", case.label);
            }
            if let Err(e) = sgmv_case(&mut c, &case) {
                c.fail(
                    "sgmv",
                    format!("{:?} {}", case.dtype, case.label),
                    e.to_string(),
                );
            }
        }
    }
    be.set_row_limits(limits);
    // A change that made every case fall back to the two kernels would pass them all.
    if be.lora_stream() && !c.results.iter().any(|r| r.op == "sgmv_lora streamed") {
        c.fail(
            "sgmv_lora streamed",
            "coverage".into(),
            "no case ran the streamed kernel".into(),
        );
    }
    if be.lora_dense_on() && !c.results.iter().any(|r| r.op == "sgmv_lora dense") {
        c.fail(
            "sgmv_lora dense",
            "coverage".into(),
            "no case ran the dense GEMMs".into(),
        );
    }
    tracing::info!(checks = c.results.len(), "SGMV checks done");
    for dt in [DType::F32, DType::BF16, DType::F16] {
        if let Err(e) = check_elementwise_ops(&mut c, dt) {
            c.fail("elementwise", format!("{dt:?}"), e.to_string());
        }
        if let Err(e) = check_dependent_chain(&mut c, dt) {
            c.fail("chain", format!("{dt:?}"), e.to_string());
        }
        if let Err(e) = check_matmul(&mut c, dt) {
            c.fail("matmul", format!("{dt:?}"), e.to_string());
        }
        if let Err(e) = check_attention(&mut c, dt) {
            c.fail("attention", format!("{dt:?}"), e.to_string());
        }
        if let Err(e) = check_fill_random(&mut c, dt) {
            c.fail("fill_random", format!("{dt:?}"), e.to_string());
        }
        if let Err(e) = check_upload(&mut c, dt) {
            c.fail("upload", format!("{dt:?}"), e.to_string());
        }
        if let Err(e) = check_staging_region(&mut c, dt) {
            c.fail("staging", format!("{dt:?}"), e.to_string());
        }
    }
    if let Err(e) = check_sample(&mut c) {
        c.fail("sample", "f32".into(), e.to_string());
    }
    match super::graph_check::check(seed) {
        Ok(results) => c.results.extend(results),
        Err(e) => c.fail("graphs", "decode steps".into(), e.to_string()),
    }
    let report = format_report(&c.results);
    print!("{report}");
    Ok(c.results.iter().all(CaseResult::pass))
}

/// CLI entry: open GPU 0, print the header and the table. Fresh inputs unless `seed` is given.
pub fn main(seed: Option<u64>) -> Result<bool> {
    let be = CudaBackend::new(super::CudaOptions::default())?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    print!("{}", super::report_header(&be, "selftest --device cuda"));
    println!("# seed: {seed}\n");
    run(&be, seed)
}

/// The pass/fail table.
pub fn format_report(results: &[CaseResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| op | case | rel err | tol | result |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for r in results {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2e} | {:.0e} | {}{} |",
            r.op,
            r.case,
            r.err,
            r.tol,
            if r.pass() { "pass" } else { "FAIL" },
            if r.note.is_empty() {
                String::new()
            } else {
                format!(": {}", r.note)
            }
        );
    }
    let failed = results.iter().filter(|r| !r.pass()).count();
    let _ = writeln!(
        out,
        "\n{} checks, {} passed, {failed} failed",
        results.len(),
        results.len() - failed
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sgmv_grid_covers_every_width_rank_and_workload_of_the_issue() {
        let cases = sgmv_cases();
        for h in [576, 4096, 5120, 8192] {
            for h_out in [h, 11008, 14336] {
                for r in [1, 4, 8, 16, 32, 64, 128] {
                    assert!(cases.iter().any(|c| c.h_in == h
                        && c.outs == [h_out]
                        && c.ranks.contains(&vec![Some(r)])));
                }
            }
        }
        for w in Workload::ALL {
            assert!(cases.iter().any(|c| c.label.contains(w.name())));
        }
        assert!(cases.iter().any(|c| c.rows.len() == 512));
        assert!(cases.iter().any(|c| c.rows.len() == 1));
        assert!(
            cases
                .iter()
                .any(|c| c.ranks.contains(&vec![None]) && c.rows.contains(&None))
        );
        // Groups of three parts, with parts missing in some slots and unaligned part widths.
        let groups: Vec<_> = cases.iter().filter(|c| c.outs.len() == 3).collect();
        assert!(groups.iter().any(|c| {
            c.ranks
                .iter()
                .any(|rs| rs.contains(&None) && rs.iter().any(Option::is_some))
        }));
        assert!(groups.iter().any(|c| c.outs[0] % 32 != 0));
        assert!(cases.iter().any(|c| c.outs.len() == 2));
        // The long-segment expand: one part, three parts in one launch, three parts in a launch
        // each (widths off its blocks), and from v in the activations' dtype.
        let tiles = |c: &SgmvCase| {
            let mut n = 0;
            let mut run: Option<(u32, usize)> = None;
            for r in c.rows.iter().copied().chain([None]) {
                match (run, r) {
                    (Some((s, len)), Some(t)) if s == t => run = Some((s, len + 1)),
                    _ => {
                        n += run.map_or(0, |(_, len)| len.div_ceil(plan::TILE_ROWS));
                        run = r.map(|t| (t, 1));
                    }
                }
            }
            n
        };
        let long: Vec<_> = cases
            .iter()
            .filter(|c| plan::expand_long(c.rows.len(), tiles(c)))
            .collect();
        assert!(long.iter().any(|c| c.outs.len() == 1));
        let launches =
            |c: &SgmvCase| plan::expand_launches(&c.outs, plan::EXPAND_LONG_COLS / 8).len();
        assert!(long.iter().any(|c| c.outs.len() == 3 && launches(c) == 1));
        assert!(
            long.iter()
                .any(|c| launches(c) == 3 && c.arena && c.dtype == DType::F16)
        );
        assert!(
            long.iter()
                .any(|c| c.ranks.iter().flatten().any(|&r| r == Some(128)))
        );
        // The dense GEMMs: one segment long enough and of rank high enough, from row 0 and
        // after base rows, in bf16; the same shape in f16 (which keeps the kernels).
        let dense = |c: &SgmvCase| {
            let first = c.rows.iter().position(Option::is_some)?;
            let n = c.rows.iter().flatten().count();
            let slot = c.rows[first]?;
            let one = c.rows[first..first + n].iter().all(|&r| r == Some(slot));
            let rank = c.ranks[slot as usize].iter().flatten().sum();
            (one && plan::dense_lora(n, rank)).then_some((first, c.dtype, c.outs.len()))
        };
        let dense: Vec<_> = cases.iter().filter_map(dense).collect();
        assert!(dense.contains(&(0, DType::BF16, 1)) && dense.contains(&(0, DType::F16, 1)));
        assert!(
            dense
                .iter()
                .any(|&(first, dt, parts)| first > 0 && dt == DType::BF16 && parts == 3)
        );
        // The streamed kernel (one-row segments, ranks powers of two from 8): plain (once in
        // clusters of four) and on tensor cores, in both dtypes, and clusters of three in both.
        let streamed: Vec<(&SgmvCase, plan::StreamPlan)> = cases
            .iter()
            .filter(|c| tiles(c) == c.rows.iter().flatten().count())
            .filter(|c| {
                c.ranks
                    .iter()
                    .flatten()
                    .flatten()
                    .all(|r| r.is_power_of_two() && (8..=128).contains(r))
            })
            .filter_map(|c| {
                let total = |s: &Vec<Option<usize>>| s.iter().flatten().sum::<usize>();
                let max_rank = c.ranks.iter().map(total).max().unwrap_or(0);
                let max_part = c
                    .ranks
                    .iter()
                    .flatten()
                    .flatten()
                    .max()
                    .copied()
                    .unwrap_or(0);
                let bytes = 2 * max_rank * c.h_in + 2 * max_part * c.outs.iter().sum::<usize>();
                let knobs = plan::StreamKnobs::default();
                let rows = (bytes, max_part);
                plan::stream_plan(tiles(c), c.h_in, &c.outs, 132, rows, knobs).map(|p| (c, p))
            })
            .collect();
        assert!(streamed.iter().any(|(_, p)| !p.mma));
        for dt in [DType::BF16, DType::F16] {
            assert!(streamed.iter().any(|(c, p)| p.mma && c.dtype == dt));
        }
        assert!(streamed.iter().any(|(_, p)| !p.mma && p.cluster == 4));
        // Clusters of three (columns and rank rows split unevenly), in both dtypes.
        for dt in [DType::BF16, DType::F16] {
            assert!(
                streamed
                    .iter()
                    .any(|(c, p)| p.cluster == 3 && c.dtype == dt)
            );
        }
    }

    #[test]
    fn a_case_with_nan_or_a_note_fails() {
        let ok = CaseResult {
            op: "x".into(),
            case: "y".into(),
            err: 1e-3,
            tol: 1e-2,
            note: String::new(),
        };
        assert!(ok.pass());
        assert!(
            !CaseResult {
                err: f64::NAN,
                ..ok.clone()
            }
            .pass()
        );
        assert!(
            !CaseResult {
                note: "bad".into(),
                ..ok.clone()
            }
            .pass()
        );
        assert!(!CaseResult { err: 0.5, ..ok }.pass());
    }
    #[test]
    fn logprobs_are_compared_relative_to_at_least_one() {
        assert_eq!(logprob_err(f32::NEG_INFINITY, f32::NEG_INFINITY), 0.0);
        assert!((logprob_err(-10.0001, -10.0) - 1e-5).abs() < 1e-7);
        assert!((logprob_err(-0.00002, -0.00001) - 1e-5).abs() < 1e-9);
        assert!(logprob_err(f32::NAN, -1.0).is_infinite());
        assert!(logprob_err(f32::NEG_INFINITY, -1.0).is_infinite());
    }

    #[test]
    fn a_draw_on_a_cumulative_boundary_is_recognised_and_one_inside_is_not() {
        let even = [0.0f32, 0.0];
        let row = |top_p: f32, u: f32| RowSampling {
            temperature: 1.0,
            top_k: 0,
            top_p,
            u,
        };
        assert!(near_boundary(&even, &row(1.0, 0.5)));
        assert!(!near_boundary(&even, &row(1.0, 0.25)));
        // p = (0.75, 0.25): top_p 0.75 is reached exactly by the first token, so a slightly
        // larger top_p keeps the second too and a draw at 0.9 moves to it.
        let skewed = [3.0f32.ln(), 0.0];
        assert!(near_boundary(&skewed, &row(0.75, 0.9)));
        assert!(!near_boundary(&skewed, &row(0.5, 0.9)));
    }

    #[test]
    fn random_sampling_rows_mix_greedy_rows_and_valid_parameters() {
        let mut rng = StdRng::seed_from_u64(3);
        for r in 0..200 {
            let rs = random_row_sampling(&mut rng, 1000, r);
            if r.is_multiple_of(5) {
                assert_eq!(rs, RowSampling::GREEDY);
                continue;
            }
            assert!(rs.temperature > 0.0 && rs.top_k <= 1000, "{rs:?}");
            assert!(rs.top_p > 0.0 && rs.top_p <= 1.0, "{rs:?}");
            assert!((0.0..1.0).contains(&rs.u), "{rs:?}");
        }
    }
}
