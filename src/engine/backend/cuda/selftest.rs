//! `punica selftest --device cuda`: every op of the CUDA backend on fresh random inputs against
//! host references (f64), outputs poisoned with NaN before each kernel so unwritten elements
//! show. Tolerances: relative error < 1e-2 for bf16/f16 outputs, < 1e-5 for f32, no NaN.

use std::fmt::Write as _;

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::engine::backend::{
    AttnShape, BLOCK_SIZE, Backend, DType, LoraProj, Result, RowSampling, SeqMeta, StepMeta,
};
use crate::engine::lora::segments::SegmentTable;
use crate::engine::sampling::pick_row;

use super::bench::{Workload, row_slots, segment_lens};
use super::reference::{self, HostAdapter};
use super::{CudaBackend, CudaBuf};

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

    fn poisoned(&self, dtype: DType, n: usize) -> Result<CudaBuf> {
        let mut b = self.be.alloc(dtype, n)?;
        self.be.fill(&mut b, f32::NAN)?;
        Ok(b)
    }

    fn record(&mut self, op: &str, case: String, out: &[f32], reference: &[f64], tol: f64) {
        let note = if out.len() != reference.len() {
            format!("{} outputs, {} expected", out.len(), reference.len())
        } else {
            String::new()
        };
        let err = reference::rel_err(out, reference);
        self.results.push(CaseResult {
            op: op.into(),
            case,
            err,
            tol,
            note,
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

/// One SGMV case: per-slot ranks (None = the projection has no adapter in that slot) and
/// per-row slots (None = base model row).
struct SgmvCase {
    dtype: DType,
    h_in: usize,
    h_out: usize,
    ranks: Vec<Option<usize>>,
    rows: Vec<Option<u32>>,
    /// Extra columns on each side of the expand's output (a fused projection's row).
    pad: usize,
    label: String,
}

fn sgmv_case(c: &mut Ctx<'_>, case: &SgmvCase) -> Result<()> {
    let be = c.be;
    let n_rows = case.rows.len();
    let max_rank = case.ranks.iter().flatten().copied().max().unwrap_or(1);
    let (h_in, h_out, dt) = (case.h_in, case.h_out, case.dtype);
    let x = c.rand(dt, n_rows * h_in, 1.0);
    let mut host_ads = Vec::new();
    let mut dev_ads = Vec::new();
    for r in &case.ranks {
        match r {
            None => {
                host_ads.push(None);
                dev_ads.push(None);
            }
            Some(r) => {
                let a = c.rand(dt, r * h_in, 1.0 / (h_in as f32).sqrt());
                let b = c.rand(dt, h_out * r, 1.0 / (*r as f32).sqrt());
                dev_ads.push(Some((be.upload(dt, &a)?, be.upload(dt, &b)?, *r)));
                host_ads.push(Some(HostAdapter { rank: *r, a, b }));
            }
        }
    }
    let projs: Vec<Option<LoraProj<'_, CudaBackend>>> = dev_ads
        .iter()
        .map(|d| {
            d.as_ref()
                .map(|(a, b, rank)| LoraProj { a, b, rank: *rank })
        })
        .collect();
    let table = be.lora_table(&projs)?;
    let segments = SegmentTable::from_row_slots(&case.rows);
    let segs: Vec<(usize, usize, usize)> = segments
        .iter()
        .map(|(s, e, slot)| (s, e, slot as usize))
        .collect();
    let meta = StepMeta {
        token_ids: vec![0; n_rows],
        positions: vec![0; n_rows],
        slot_mapping: vec![0; n_rows],
        segments,
        ..StepMeta::default()
    };
    let dmeta = be.upload_meta(&meta)?;

    // Shrink into a NaN-poisoned v: rows with an adapter must be fully written up to their
    // rank, all other entries must stay NaN.
    let dx = be.upload(dt, &x)?;
    let mut dv = c.poisoned(DType::F32, n_rows * max_rank)?;
    be.sgmv_shrink(&dx, &table, &dmeta, h_in, max_rank, &mut dv)?;
    let v_out = be.download(&dv)?;
    let mut v_ref = vec![f64::NAN; n_rows * max_rank];
    reference::shrink(&x, h_in, &segs, &host_ads, max_rank, &mut v_ref);
    let (mut got, mut want) = (Vec::new(), Vec::new());
    let mut stray = 0usize;
    for (o, r) in v_out.iter().zip(&v_ref) {
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

    // Expand from the device v (NaN outside each row's rank: must not be read).
    let y_stride = h_out + 2 * case.pad;
    let y0 = c.rand(dt, n_rows * y_stride, 1.0);
    let mut dy = be.upload(dt, &y0)?;
    be.sgmv_expand(
        &dv, &table, &dmeta, max_rank, h_out, y_stride, case.pad, &mut dy,
    )?;
    let y_out = be.download(&dy)?;
    let v_clean: Vec<f64> = v_ref
        .iter()
        .map(|&e| if e.is_nan() { 0.0 } else { e })
        .collect();
    let mut y_ref: Vec<f64> = y0.iter().map(|&e| e as f64).collect();
    reference::expand(
        &v_clean, max_rank, &segs, &host_ads, h_out, y_stride, case.pad, &mut y_ref,
    );
    // Elements outside the LoRA rows/columns must be bit-identical; the rest within tolerance,
    // element by element too, so a few skipped columns cannot hide in the norm.
    let mut touched_outside = 0usize;
    let mut worst = 0.0f64;
    let mean_abs = y_ref.iter().map(|e| e.abs()).sum::<f64>() / y_ref.len().max(1) as f64;
    for (i, (&o, &r)) in y_out.iter().zip(&y_ref).enumerate() {
        if r == y0[i] as f64 && o != y0[i] {
            touched_outside += 1;
        }
        let e = (o as f64 - r).abs() / (r.abs() + mean_abs);
        if !e.is_finite() || e > worst {
            worst = if e.is_finite() { e } else { f64::INFINITY };
        }
    }
    if touched_outside > 0 {
        c.fail(
            "sgmv_expand",
            label,
            format!("{touched_outside} elements changed outside the LoRA rows"),
        );
    } else if worst > 2e-2 {
        c.fail(
            "sgmv_expand",
            label,
            format!("element error {worst:.2e} > 2e-2"),
        );
    } else {
        c.record("sgmv_expand", label, &y_out, &y_ref, tol(dt));
    }
    Ok(())
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
                cases.push(SgmvCase {
                    dtype: DType::BF16,
                    h_in: h,
                    h_out,
                    ranks: vec![Some(r); n],
                    rows,
                    pad: 0,
                    label: format!("h {h}->{h_out} r {r} {} x{tokens}", w.name()),
                });
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
        cases.push(SgmvCase {
            dtype: DType::BF16,
            h_in: 4096,
            h_out: 4096,
            ranks: vec![Some(r); n],
            rows,
            pad: 0,
            label: format!("h 4096 r {r} {} x512", w.name()),
        });
    }
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
            dtype,
            h_in: 4096,
            h_out: 1024,
            ranks: ranks.clone(),
            rows: rows.clone(),
            pad: 512,
            label: "mixed ranks 1..128, empty slot, base rows, col offset".into(),
        });
    }
    let rows = workload_rows(Workload::Skewed, 64);
    let n = rows.iter().flatten().max().map_or(0, |&m| m as usize + 1);
    cases.push(SgmvCase {
        dtype: DType::F16,
        h_in: 5120,
        h_out: 14336,
        ranks: vec![Some(16); n],
        rows,
        pad: 0,
        label: "h 5120->14336 r 16 skewed x64".into(),
    });
    cases.push(SgmvCase {
        dtype: DType::BF16,
        h_in: 576,
        h_out: 576,
        ranks: vec![None, None],
        rows: vec![Some(0), Some(1), None],
        pad: 0,
        label: "only empty slots".into(),
    });
    // Odd widths exercise the scalar tails of the vector loads.
    cases.push(SgmvCase {
        dtype: DType::BF16,
        h_in: 100,
        h_out: 77,
        ranks: vec![Some(3), Some(12)],
        rows: vec![Some(0), Some(0), Some(1)],
        pad: 1,
        label: "h 100->77 r 3/12 unaligned".into(),
    });
    cases
}

fn check_elementwise_ops(c: &mut Ctx<'_>, dt: DType) -> Result<()> {
    let be = c.be;
    let t = tol(dt);
    for &(rows, hidden) in &[(5usize, 576usize), (3, 4096), (2, 8192)] {
        let x = c.rand(dt, rows * hidden, 2.0);
        let w = c.rand(dt, hidden, 1.0);
        let res0 = c.rand(dt, rows * hidden, 2.0);
        let dx = be.upload(dt, &x)?;
        let dw = be.upload(dt, &w)?;
        let eps = 1e-5f32;
        let norm = |src: &[f32]| -> Vec<f64> {
            let mut out = vec![0.0; rows * hidden];
            for r in 0..rows {
                let row = &src[r * hidden..(r + 1) * hidden];
                let ms = row.iter().map(|&e| e as f64 * e as f64).sum::<f64>() / hidden as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                for j in 0..hidden {
                    out[r * hidden + j] = row[j] as f64 * inv * w[j] as f64;
                }
            }
            out
        };
        let mut out = c.poisoned(dt, rows * hidden)?;
        be.rms_norm(&dx, &dw, eps, rows, hidden, &mut out)?;
        let got = be.download(&out)?;
        c.record(
            "rms_norm",
            format!("{dt:?} {rows}x{hidden}"),
            &got,
            &norm(&x),
            t,
        );

        let mut dres = be.upload(dt, &res0)?;
        let mut out = c.poisoned(dt, rows * hidden)?;
        be.add_rms_norm(&mut dres, &dx, &dw, eps, rows, hidden, &mut out)?;
        let mut sum: Vec<f32> = res0.iter().zip(&x).map(|(a, b)| a + b).collect();
        round(dt, &mut sum);
        let got_res = be.download(&dres)?;
        let got = be.download(&out)?;
        let sum64: Vec<f64> = sum.iter().map(|&e| e as f64).collect();
        c.record(
            "add_rms_norm.residual",
            format!("{dt:?} {rows}x{hidden}"),
            &got_res,
            &sum64,
            t,
        );
        c.record(
            "add_rms_norm.out",
            format!("{dt:?} {rows}x{hidden}"),
            &got,
            &norm(&sum),
            t,
        );

        let mut dy = be.upload(dt, &res0)?;
        be.add_assign(&mut dy, &dx)?;
        let got = be.download(&dy)?;
        let want: Vec<f64> = res0
            .iter()
            .zip(&x)
            .map(|(a, b)| *a as f64 + *b as f64)
            .collect();
        c.record(
            "add_assign",
            format!("{dt:?} {rows}x{hidden}"),
            &got,
            &want,
            t,
        );

        let n = hidden / 2;
        let mut out = c.poisoned(dt, rows * n)?;
        be.silu_mul(&dx, rows, n, &mut out)?;
        let got = be.download(&out)?;
        let mut want = vec![0.0f64; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let g = x[r * hidden + j] as f64;
                let u = x[r * hidden + n + j] as f64;
                want[r * n + j] = g / (1.0 + (-g).exp()) * u;
            }
        }
        c.record("silu_mul", format!("{dt:?} {rows}x{n}"), &got, &want, t);

        let logits: Vec<f32> = x.clone();
        let dl = be.upload(DType::F32, &logits)?;
        let picks = be.sample(&dl, hidden, &vec![RowSampling::GREEDY; rows])?;
        let bad = picks
            .iter()
            .zip(logits.chunks_exact(hidden))
            .filter(|(p, row)| p.token != pick_row(row, &RowSampling::GREEDY).token)
            .count();
        if bad > 0 || picks.len() != rows {
            c.fail(
                "sample.greedy",
                format!("{dt:?} {rows}x{hidden}"),
                format!("{bad} rows wrong"),
            );
        } else {
            c.record(
                "sample.greedy",
                format!("{dt:?} {rows}x{hidden}"),
                &[0.0],
                &[0.0],
                1.0,
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
        token_ids: ids.clone(),
        positions: vec![0; rows],
        slot_mapping: vec![0; rows],
        logit_rows: vec![6, 0, 3],
        ..StepMeta::default()
    };
    let dmeta = be.upload_meta(&meta)?;
    let dtable = be.upload(dt, &table)?;
    let mut out = c.poisoned(dt, rows * hidden)?;
    be.embedding(&dtable, &dmeta, hidden, &mut out)?;
    let got = be.download(&out)?;
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&id| {
            table[id as usize * hidden..(id as usize + 1) * hidden]
                .iter()
                .map(|&e| e as f64)
        })
        .collect();
    c.record(
        "embedding",
        format!("{dt:?} {rows} of {vocab}x{hidden}"),
        &got,
        &want,
        t,
    );
    let mut g = c.poisoned(dt, 3 * hidden)?;
    be.gather_rows(&out, &dmeta, hidden, &mut g)?;
    let got = be.download(&g)?;
    let want: Vec<f64> = [6usize, 0, 3]
        .iter()
        .flat_map(|&r| want[r * hidden..(r + 1) * hidden].to_vec())
        .collect();
    c.record(
        "gather_rows",
        format!("{dt:?} 3 of {rows}x{hidden}"),
        &got,
        &want,
        t,
    );
    Ok(())
}

fn check_matmul(c: &mut Ctx<'_>, dt: DType) -> Result<()> {
    let be = c.be;
    for &(rows, k, n) in &[
        (1usize, 576usize, 1536usize),
        (7, 4096, 4096),
        (64, 576, 576),
        (33, 1536, 11008),
    ] {
        let x = c.rand(dt, rows * k, 1.0);
        let w = c.rand(dt, n * k, 1.0 / (k as f32).sqrt());
        let dx = be.upload(dt, &x)?;
        let dw = be.upload(dt, &w)?;
        let mut out = c.poisoned(dt, rows * n)?;
        be.matmul(&dx, &dw, rows, k, n, &mut out)?;
        let got = be.download(&out)?;
        let mut want = vec![0.0f64; rows * n];
        for r in 0..rows {
            for j in 0..n {
                want[r * n + j] = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                    .sum();
            }
        }
        c.record(
            "matmul",
            format!("{dt:?} {rows}x{k}x{n}"),
            &got,
            &want,
            tol(dt),
        );
    }
    Ok(())
}

/// Paged KV write, RoPE and attention over a batch mixing decode rows, a full prefill and a
/// prefill chunk on top of cached context, with GQA.
fn check_attention(c: &mut Ctx<'_>, dt: DType) -> Result<()> {
    let be = c.be;
    for &(n_heads, n_kv, hd) in &[(9usize, 3usize, 64usize), (32, 8, 128), (4, 4, 256)] {
        let shape = AttnShape {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
        };
        let kv_width = n_kv * hd;
        // (new rows, context after the step)
        let seqs_spec = [(1usize, 37usize), (20, 20), (5, 40), (1, 1)];
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
        let q_width = n_heads * hd;
        let row_stride = q_width + 2 * kv_width;
        let qkv = c.rand(dt, rows * row_stride, 1.0);
        let cache_len = total_blocks * BLOCK_SIZE * kv_width;
        let mut kc = c.rand(dt, cache_len, 1.0);
        let mut vc = c.rand(dt, cache_len, 1.0);
        let mut dkc = be.upload(dt, &kc)?;
        let mut dvc = be.upload(dt, &vc)?;
        let mut dqkv = be.upload(dt, &qkv)?;
        let label = format!("{dt:?} heads {n_heads}/{n_kv} dim {hd} rows {rows}");

        // RoPE on q and k, llama-style inverse frequencies.
        let inv_freq: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
            .collect();
        let dfreq = be.upload(DType::F32, &inv_freq)?;
        be.rope(&mut dqkv, &dfreq, &dmeta, row_stride, 0, n_heads + n_kv, hd)?;
        let got = be.download(&dqkv)?;
        let mut roped: Vec<f64> = qkv.iter().map(|&e| e as f64).collect();
        for r in 0..rows {
            let pos = meta.positions[r] as f64;
            for h in 0..n_heads + n_kv {
                let base = r * row_stride + h * hd;
                for i in 0..hd / 2 {
                    let (s, co) = (pos * inv_freq[i] as f64).sin_cos();
                    let a = qkv[base + i] as f64;
                    let b = qkv[base + i + hd / 2] as f64;
                    roped[base + i] = a * co - b * s;
                    roped[base + i + hd / 2] = b * co + a * s;
                }
            }
        }
        c.record("rope", label.clone(), &got, &roped, tol(dt));
        // Continue from the device's values so later checks test one op each.
        let qkv_r = got;

        be.write_kv(
            &dqkv,
            row_stride,
            q_width,
            q_width + kv_width,
            &dmeta,
            shape,
            &mut dkc,
            &mut dvc,
        )?;
        for (r, &slot) in meta.slot_mapping.iter().enumerate() {
            let s = slot as usize * kv_width;
            let src = r * row_stride;
            kc[s..s + kv_width].copy_from_slice(&qkv_r[src + q_width..src + q_width + kv_width]);
            vc[s..s + kv_width]
                .copy_from_slice(&qkv_r[src + q_width + kv_width..src + q_width + 2 * kv_width]);
        }
        let got_k = be.download(&dkc)?;
        let got_v = be.download(&dvc)?;
        let exact = got_k == kc && got_v == vc;
        if exact {
            c.record("write_kv", label.clone(), &[0.0], &[0.0], 1.0);
        } else {
            c.fail(
                "write_kv",
                label.clone(),
                "cache differs from the expected copy".into(),
            );
        }

        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = c.poisoned(dt, rows * q_width)?;
        be.attention(
            &dqkv, row_stride, 0, &dkc, &dvc, &dmeta, shape, scale, &mut out,
        )?;
        let got = be.download(&out)?;
        let mut want = vec![0.0f64; rows * q_width];
        for s in &meta.seqs {
            for i in 0..s.num_rows as usize {
                let r = s.row_start as usize + i;
                let visible = s.context_len as usize - s.num_rows as usize + i + 1;
                for h in 0..n_heads {
                    let kvh = h / (n_heads / n_kv);
                    let q = &qkv_r[r * row_stride + h * hd..r * row_stride + (h + 1) * hd];
                    let mut scores = Vec::with_capacity(visible);
                    for p in 0..visible {
                        let blk = meta.block_tables[s.block_table_start as usize + p / BLOCK_SIZE]
                            as usize;
                        let off = (blk * BLOCK_SIZE + p % BLOCK_SIZE) * kv_width + kvh * hd;
                        let d: f64 = (0..hd)
                            .map(|j| q[j] as f64 * scale as f64 * kc[off + j] as f64)
                            .sum();
                        scores.push((d, off));
                    }
                    let m = scores.iter().map(|s| s.0).fold(f64::NEG_INFINITY, f64::max);
                    let l: f64 = scores.iter().map(|s| (s.0 - m).exp()).sum();
                    for j in 0..hd {
                        want[r * q_width + h * hd + j] = scores
                            .iter()
                            .map(|&(sc, off)| (sc - m).exp() * vc[off + j] as f64)
                            .sum::<f64>()
                            / l;
                    }
                }
            }
        }
        c.record("attention", label, &got, &want, tol(dt));
    }
    Ok(())
}

/// Run every check; print a pass/fail table. Returns whether all passed.
pub fn run(be: &CudaBackend, seed: u64) -> Result<bool> {
    let mut c = Ctx {
        be,
        rng: StdRng::seed_from_u64(seed),
        results: Vec::new(),
    };
    be.warm_up()?;
    // An error inside one check is that check's failure; the others still run.
    for case in sgmv_cases() {
        if let Err(e) = sgmv_case(&mut c, &case) {
            c.fail(
                "sgmv",
                format!("{:?} {}", case.dtype, case.label),
                e.to_string(),
            );
        }
    }
    tracing::info!(checks = c.results.len(), "SGMV checks done");
    for dt in [DType::F32, DType::BF16, DType::F16] {
        if let Err(e) = check_elementwise_ops(&mut c, dt) {
            c.fail("elementwise", format!("{dt:?}"), e.to_string());
        }
        if let Err(e) = check_matmul(&mut c, dt) {
            c.fail("matmul", format!("{dt:?}"), e.to_string());
        }
        if let Err(e) = check_attention(&mut c, dt) {
            c.fail("attention", format!("{dt:?}"), e.to_string());
        }
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
                    assert!(
                        cases
                            .iter()
                            .any(|c| c.h_in == h && c.h_out == h_out && c.ranks.contains(&Some(r)))
                    );
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
                .any(|c| c.ranks.contains(&None) && c.rows.contains(&None))
        );
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
}
