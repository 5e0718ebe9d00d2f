//! `punica bench kernels`: the LoRA operator (shrink + expand, `y += x·Aᵀ·Bᵀ`) on exactly the
//! grid of ANCHORS.md section 1, timed by CUDA-graph replay over rotated input sets (150-256 MiB
//! of them, so L2 does not help), median per op, next to the best peer's time and the memory
//! floor, with a correctness check of every configuration against an f64 host reference.

use std::fmt::Write as _;

use crate::engine::backend::{Backend, BackendError, DType, Result, StepMeta};
use crate::engine::lora::segments::SegmentTable;

use super::reference::{self, HostAdapter};
use super::{CudaBackend, CudaBuf, CudaLoraTable, CudaMeta, RawLoraPart, RawLoraSlot};

/// Copy bandwidth (read + write) measured on the H200 the anchors come from, GB/s.
pub const COPY_GBPS: f64 = 4186.0;

/// Punica's batch workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// One adapter for every row.
    Identical,
    /// One adapter per row.
    Distinct,
    /// ceil(sqrt(tokens)) equal groups.
    Uniform,
    /// Zipf(1.5) group sizes.
    Skewed,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Identical => "identical",
            Workload::Distinct => "distinct",
            Workload::Uniform => "uniform",
            Workload::Skewed => "skewed",
        }
    }

    pub const ALL: [Workload; 4] = [
        Workload::Identical,
        Workload::Distinct,
        Workload::Uniform,
        Workload::Skewed,
    ];
}

/// Segment lengths of a workload over `tokens` rows, as Punica's benchmark defines them.
pub fn segment_lens(workload: Workload, tokens: usize) -> Vec<usize> {
    if tokens == 0 {
        return Vec::new();
    }
    match workload {
        Workload::Identical => vec![tokens],
        Workload::Distinct => vec![1; tokens],
        Workload::Uniform => {
            let n = (tokens as f64).sqrt().ceil() as usize;
            let mut lens = vec![tokens / n; n];
            for l in lens.iter_mut().take(tokens % n) {
                *l += 1;
            }
            lens.retain(|&l| l > 0);
            lens
        }
        Workload::Skewed => {
            let mut lens = Vec::new();
            let mut a = 1.0f64;
            let mut sum = 0usize;
            while sum + (a.floor() as usize) < tokens {
                lens.push(a.floor() as usize);
                sum += a.floor() as usize;
                a *= 1.5;
            }
            lens.push(tokens - sum);
            lens.sort_unstable_by(|x, y| y.cmp(x));
            lens
        }
    }
}

/// Per-row adapter slots for segment lengths: segment i uses slot i.
pub fn row_slots(lens: &[usize]) -> Vec<Option<u32>> {
    lens.iter()
        .enumerate()
        .flat_map(|(i, &l)| std::iter::repeat_n(Some(i as u32), l))
        .collect()
}

/// One row of ANCHORS.md section 1.
#[derive(Clone, Copy, Debug)]
pub struct Anchor {
    pub h: usize,
    pub r: usize,
    pub tokens: usize,
    pub workload: Workload,
    pub adapters: usize,
    /// Best correct peer's time, microseconds.
    pub best_us: f64,
}

const fn anchor(
    h: usize,
    r: usize,
    tokens: usize,
    workload: Workload,
    adapters: usize,
    best_us: f64,
) -> Anchor {
    Anchor {
        h,
        r,
        tokens,
        workload,
        adapters,
        best_us,
    }
}

use Workload::{Distinct as D, Identical as I, Skewed as S, Uniform as U};

/// ANCHORS.md section 1 (H200, 2026-11-28): the grid and the best anchor per configuration.
pub const ANCHORS: &[Anchor] = &[
    anchor(4096, 16, 1, I, 1, 6.9),
    anchor(4096, 16, 8, I, 1, 7.8),
    anchor(4096, 16, 8, D, 8, 8.4),
    anchor(4096, 16, 8, U, 3, 8.1),
    anchor(4096, 16, 8, S, 5, 8.2),
    anchor(4096, 16, 32, I, 1, 8.7),
    anchor(4096, 16, 32, D, 32, 12.1),
    anchor(4096, 16, 32, U, 6, 10.1),
    anchor(4096, 16, 32, S, 8, 10.4),
    anchor(4096, 16, 64, I, 1, 9.0),
    anchor(4096, 16, 64, D, 64, 16.8),
    anchor(4096, 16, 64, U, 8, 10.9),
    anchor(4096, 16, 64, S, 9, 11.5),
    anchor(4096, 16, 128, I, 1, 18.5),
    anchor(4096, 16, 128, D, 128, 26.6),
    anchor(4096, 16, 128, U, 12, 20.7),
    anchor(4096, 16, 128, S, 11, 20.1),
    anchor(4096, 16, 512, I, 1, 21.0),
    anchor(4096, 16, 512, D, 512, 84.7),
    anchor(4096, 16, 512, U, 23, 31.2),
    anchor(4096, 16, 512, S, 14, 26.9),
    anchor(4096, 64, 1, I, 1, 7.0),
    anchor(4096, 64, 8, I, 1, 8.9),
    anchor(4096, 64, 8, D, 8, 9.6),
    anchor(4096, 64, 8, U, 3, 8.9),
    anchor(4096, 64, 8, S, 5, 9.2),
    anchor(4096, 64, 32, I, 1, 9.8),
    anchor(4096, 64, 32, D, 32, 17.6),
    anchor(4096, 64, 32, U, 6, 14.2),
    anchor(4096, 64, 32, S, 8, 15.6),
    anchor(4096, 64, 64, I, 1, 10.8),
    anchor(4096, 64, 64, D, 64, 28.9),
    anchor(4096, 64, 64, U, 8, 17.4),
    anchor(4096, 64, 64, S, 9, 19.5),
    anchor(4096, 64, 128, I, 1, 18.6),
    anchor(4096, 64, 128, D, 128, 53.2),
    anchor(4096, 64, 128, U, 12, 22.0),
    anchor(4096, 64, 128, S, 11, 23.6),
    anchor(4096, 64, 512, I, 1, 21.5),
    anchor(4096, 64, 512, D, 512, 185.2),
    anchor(4096, 64, 512, U, 23, 36.0),
    anchor(4096, 64, 512, S, 14, 32.6),
    anchor(8192, 16, 64, I, 1, 9.5),
    anchor(8192, 16, 64, D, 64, 26.3),
    anchor(8192, 16, 64, U, 8, 14.6),
    anchor(8192, 16, 64, S, 9, 15.3),
    anchor(8192, 64, 64, I, 1, 11.8),
    anchor(8192, 64, 64, D, 64, 50.3),
    anchor(8192, 64, 64, U, 8, 20.7),
    anchor(8192, 64, 64, S, 9, 25.7),
];

/// Bytes the operator must move at least: the A and B of the adapters used, x, and y read and
/// written (bf16).
pub fn floor_bytes(h: usize, r: usize, tokens: usize, adapters: usize) -> usize {
    adapters * 2 * r * h * 2 + tokens * h * 2 + 2 * tokens * h * 2
}

/// Floor time in microseconds at the copy bandwidth.
pub fn floor_us(bytes: usize) -> f64 {
    bytes as f64 / (COPY_GBPS * 1e3)
}

/// How many input sets to rotate through so that they span about 200 MiB (at least 2).
pub fn rotation_sets(set_bytes: usize) -> usize {
    (200usize << 20).div_ceil(set_bytes.max(1)).clamp(2, 1024)
}

/// One configuration's measurement.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub anchor: Anchor,
    pub ours_us: f64,
    pub floor_us: f64,
    pub rel_err: f64,
    pub sets: usize,
    /// What ran the operator: "streamed" (the streamed kernel), "dense" (two cuBLAS GEMMs)
    /// or "shrink+expand" (the two kernels).
    pub path: &'static str,
}

/// One rotated input set on the device.
struct InputSet {
    x: CudaBuf,
    y: CudaBuf,
    v: CudaBuf,
    _weights: CudaBuf,
    table: CudaLoraTable,
}

fn make_set(be: &CudaBackend, a: &Anchor, lens: &[usize], seed: u32) -> Result<InputSet> {
    let (h, r, tokens) = (a.h, a.r, a.tokens);
    let n = lens.len();
    let mut x = be.alloc(DType::BF16, tokens * h)?;
    let mut y = be.alloc(DType::BF16, tokens * h)?;
    let v = be.alloc(DType::F32, tokens * r)?;
    let per = 2 * r * h;
    let mut weights = be.alloc(DType::BF16, n * per)?;
    be.fill_random(&mut x, seed.wrapping_mul(7) + 1, 1.0)?;
    be.fill_random(&mut y, seed.wrapping_mul(7) + 2, 1.0)?;
    // A entries ~ 1/sqrt(h) and B ~ 1/sqrt(r) keep the LoRA delta comparable to y.
    for i in 0..n {
        let base = weights.ptr_at(i * per);
        be.fill_random_raw(
            base,
            DType::BF16,
            r * h,
            seed.wrapping_mul(7) + 3 + 2 * i as u32,
            1.0 / (h as f32).sqrt(),
        )?;
        be.fill_random_raw(
            weights.ptr_at(i * per + r * h),
            DType::BF16,
            r * h,
            seed.wrapping_mul(7) + 4 + 2 * i as u32,
            1.0 / (r as f32).sqrt(),
        )?;
    }
    let slots: Vec<Option<RawLoraSlot>> = (0..n)
        .map(|i| {
            Some(RawLoraSlot {
                a: weights.ptr_at(i * per),
                a_len: r * h,
                voff: 0,
                parts: [
                    Some(RawLoraPart {
                        b: weights.ptr_at(i * per + r * h),
                        b_len: r * h,
                        rank: r,
                    }),
                    None,
                    None,
                ],
            })
        })
        .collect();
    let table = be.lora_table_raw(DType::BF16, &slots)?;
    // Touch `weights` mutably once so the fill above is visibly a write to it.
    let _ = &mut weights;
    Ok(InputSet {
        x,
        y,
        v,
        _weights: weights,
        table,
    })
}

fn op(be: &CudaBackend, s: &mut InputSet, meta: &CudaMeta, h: usize, r: usize) -> Result<()> {
    be.sgmv_lora(&s.x, &s.table, meta, h, (&mut s.v, r), &[h], h, 0, &mut s.y)
}

/// Check one set against the f64 reference: run the op once, compare y.
fn check(
    be: &CudaBackend,
    s: &mut InputSet,
    meta: &CudaMeta,
    a: &Anchor,
    lens: &[usize],
) -> Result<f64> {
    let (h, r) = (a.h, a.r);
    let x = be.download(&s.x)?;
    let y0 = be.download(&s.y)?;
    let w = be.download(&s._weights)?;
    let per = 2 * r * h;
    let adapters: Vec<Option<HostAdapter>> = (0..lens.len())
        .map(|i| {
            Some(HostAdapter {
                rank: r,
                a: w[i * per..i * per + r * h].to_vec(),
                b: w[i * per + r * h..(i + 1) * per].to_vec(),
            })
        })
        .collect();
    let mut segs = Vec::new();
    let mut row = 0;
    for (i, &l) in lens.iter().enumerate() {
        segs.push((row, row + l, i));
        row += l;
    }
    op(be, s, meta, h, r)?;
    let y1 = be.download(&s.y)?;
    let mut v = vec![0.0f64; a.tokens * r];
    reference::shrink(&x, h, &segs, &adapters, r, &mut v);
    let mut yref: Vec<f64> = y0.iter().map(|&e| e as f64).collect();
    reference::expand(&v, r, &segs, &adapters, h, h, 0, &mut yref);
    Ok(reference::rel_err(&y1, &yref))
}

fn meta_for(lens: &[usize]) -> StepMeta {
    let slots = row_slots(lens);
    StepMeta {
        segments: SegmentTable::from_row_slots(&slots),
        ..StepMeta::one_sequence(slots.len())
    }
}

/// Time one configuration: capture `sets` ops (one per rotated set) in a graph, replay it,
/// return the median time per op in microseconds.
fn time_config(
    be: &CudaBackend,
    sets: &mut [InputSet],
    meta: &CudaMeta,
    a: &Anchor,
    replays: usize,
) -> Result<f64> {
    use cudarc::driver::sys;
    let stream = be.stream().clone();
    // Warm-up outside the graph: loads modules and sizes the workspace.
    for s in sets.iter_mut() {
        op(be, s, meta, a.h, a.r)?;
    }
    be.synchronize()?;
    let derr =
        |what: &str, e: cudarc::driver::DriverError| BackendError::Device(format!("{what}: {e:?}"));
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| derr("begin capture", e))?;
    let mut captured = Ok(());
    for s in sets.iter_mut() {
        captured = op(be, s, meta, a.h, a.r);
        if captured.is_err() {
            break;
        }
    }
    let graph = stream
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .map_err(|e| derr("end capture", e))?;
    captured?;
    let graph = graph.ok_or_else(|| BackendError::Device("empty graph".into()))?;
    graph.upload().map_err(|e| derr("graph upload", e))?;
    graph.launch().map_err(|e| derr("graph launch", e))?;
    be.synchronize()?;
    let ctx = be.context();
    let start = ctx
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| derr("event", e))?;
    let end = ctx
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(|e| derr("event", e))?;
    let mut per_op = Vec::with_capacity(replays);
    for _ in 0..replays {
        start.record(&stream).map_err(|e| derr("record", e))?;
        graph.launch().map_err(|e| derr("graph launch", e))?;
        end.record(&stream).map_err(|e| derr("record", e))?;
        end.synchronize().map_err(|e| derr("event sync", e))?;
        let ms = start.elapsed_ms(&end).map_err(|e| derr("elapsed", e))?;
        per_op.push(ms as f64 * 1e3 / sets.len() as f64);
    }
    per_op.sort_by(|x, y| x.total_cmp(y));
    Ok(per_op[per_op.len() / 2])
}

/// Measure one configuration.
pub fn bench_one(be: &CudaBackend, a: &Anchor, replays: usize) -> Result<BenchRow> {
    let lens = segment_lens(a.workload, a.tokens);
    if lens.len() != a.adapters {
        return Err(BackendError::Shape(format!(
            "{} over {} tokens gives {} adapters, the anchor has {}",
            a.workload.name(),
            a.tokens,
            lens.len(),
            a.adapters
        )));
    }
    let bytes = floor_bytes(a.h, a.r, a.tokens, lens.len());
    let n_sets = rotation_sets(bytes);
    let meta = be.upload_meta(&meta_for(&lens))?;
    let mut sets = Vec::with_capacity(n_sets);
    for i in 0..n_sets {
        sets.push(make_set(be, a, &lens, 1000 + i as u32)?);
    }
    let rel_err = check(be, &mut sets[0], &meta, a, &lens)?;
    let s = &sets[0];
    let path = if be.dense_lora(&s.x, &s.table, &meta) {
        "dense"
    } else if be.streams_lora(&s.x, &s.table, &meta, a.h, &[a.h], (0, &s.y))? {
        "streamed"
    } else {
        "shrink+expand"
    };
    let ours_us = time_config(be, &mut sets, &meta, a, replays)?;
    Ok(BenchRow {
        anchor: *a,
        ours_us,
        floor_us: floor_us(bytes),
        rel_err,
        sets: n_sets,
        path,
    })
}

/// Format the results table, with a summary of the targets.
pub fn format_report(rows: &[BenchRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| h | r | tokens | workload | adapters | floor us | ours us | best anchor us | ours/best | ours/floor | rel err | ok | kernels |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let a = &row.anchor;
        let ratio = row.ours_us / a.best_us;
        let ok = ratio <= 0.8 && row.rel_err < 1e-2;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1e} | {} | {} |",
            a.h,
            a.r,
            a.tokens,
            a.workload.name(),
            a.adapters,
            row.floor_us,
            row.ours_us,
            a.best_us,
            ratio,
            row.ours_us / row.floor_us,
            row.rel_err,
            if ok { "yes" } else { "NO" },
            row.path
        );
    }
    let beat = rows
        .iter()
        .filter(|r| r.ours_us <= 0.8 * r.anchor.best_us && r.rel_err < 1e-2)
        .count();
    let _ = writeln!(
        out,
        "\n{beat}/{} configurations at <= 0.8x the best anchor with rel err < 1e-2",
        rows.len()
    );
    let find = |w: Workload| {
        rows.iter().find(|r| {
            r.anchor.h == 4096
                && r.anchor.r == 16
                && r.anchor.tokens == 64
                && r.anchor.workload == w
        })
    };
    if let Some(d) = find(Workload::Distinct) {
        let _ = writeln!(
            out,
            "64 distinct adapters, r=16: {:.1} us = {:.2}x the memory floor (target <= 3x)",
            d.ours_us,
            d.ours_us / d.floor_us
        );
        if let Some(i) = find(Workload::Identical) {
            let _ = writeln!(
                out,
                "64 rows identical vs distinct, r=16: {:.1} vs {:.1} us, ratio {:.2} (target <= 1.5)",
                i.ours_us,
                d.ours_us,
                d.ours_us.max(i.ours_us) / d.ours_us.min(i.ours_us)
            );
        }
    }
    out
}

/// CLI entry: open GPU 0, print the header, run the grid.
pub fn main(replays: usize, pdl: bool) -> Result<bool> {
    let mut be = CudaBackend::new(super::CudaOptions::default())?;
    be.set_pdl(pdl);
    print!("{}", super::report_header(&be, "bench kernels"));
    println!(
        "# LoRA operator y += x.A^T.B^T (shrink + expand), bf16, CUDA-graph replay over rotated inputs (~200 MiB), median of {replays} replays; floor at {COPY_GBPS} GB/s\n"
    );
    run(&be, replays.max(1))
}

/// Run the whole grid and print the report. Returns false when a configuration fails the
/// correctness check.
pub fn run(be: &CudaBackend, replays: usize) -> Result<bool> {
    let mut rows = Vec::new();
    let mut all_correct = true;
    for a in ANCHORS {
        let row = match bench_one(be, a, replays) {
            Ok(row) => row,
            Err(e) => {
                println!(
                    "| {} | {} | {} | {} | error: {e} |",
                    a.h,
                    a.r,
                    a.tokens,
                    a.workload.name()
                );
                all_correct = false;
                continue;
            }
        };
        tracing::info!(
            h = a.h,
            r = a.r,
            tokens = a.tokens,
            workload = a.workload.name(),
            ours_us = row.ours_us,
            best_us = a.best_us,
            rel_err = row.rel_err,
            sets = row.sets,
            "bench"
        );
        all_correct &= row.rel_err < 1e-2;
        rows.push(row);
    }
    print!("{}", format_report(&rows));
    Ok(all_correct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_give_the_adapter_counts_of_the_anchor_table() {
        for a in ANCHORS {
            let lens = segment_lens(a.workload, a.tokens);
            assert_eq!(lens.len(), a.adapters, "{a:?}");
            assert_eq!(lens.iter().sum::<usize>(), a.tokens, "{a:?}");
            assert!(lens.iter().all(|&l| l > 0));
        }
    }

    #[test]
    fn skewed_groups_follow_zipf_one_and_a_half_largest_first() {
        assert_eq!(segment_lens(Workload::Skewed, 8), vec![3, 2, 1, 1, 1]);
        assert_eq!(segment_lens(Workload::Uniform, 8), vec![3, 3, 2]);
    }

    #[test]
    fn floor_matches_the_anchor_table() {
        // h 4096, r 64, 512 distinct: 131.3 us in ANCHORS.md.
        let f = floor_us(floor_bytes(4096, 64, 512, 512));
        assert!((f - 131.3).abs() < 0.1, "{f}");
        let f = floor_us(floor_bytes(4096, 16, 64, 64));
        assert!((f - 4.4).abs() < 0.1, "{f}");
    }

    #[test]
    fn rotation_spans_about_two_hundred_mebibytes() {
        assert_eq!(rotation_sets(1 << 30), 2);
        assert_eq!(rotation_sets(100 << 20), 2);
        assert_eq!(rotation_sets(1 << 20), 200);
        assert_eq!(rotation_sets(1), 1024);
    }

    #[test]
    fn the_report_marks_each_configuration_and_sums_up_the_targets() {
        let row = |workload, ours_us, path| BenchRow {
            anchor: *ANCHORS
                .iter()
                .find(|a| a.h == 4096 && a.r == 16 && a.tokens == 64 && a.workload == workload)
                .unwrap(),
            ours_us,
            floor_us: 4.4,
            rel_err: 1.7e-3,
            sets: 2,
            path,
        };
        let report = format_report(&[
            row(Workload::Identical, 6.3, "shrink+expand"),
            row(Workload::Distinct, 9.2, "streamed"),
            row(Workload::Uniform, 20.0, "dense"),
        ]);
        let lines: Vec<&str> = report.lines().collect();
        assert!(lines[0].ends_with("| ok | kernels |"));
        assert!(
            lines[2].ends_with("| yes | shrink+expand |"),
            "{}",
            lines[2]
        );
        assert!(lines[3].ends_with("| yes | streamed |"), "{}", lines[3]);
        assert!(lines[4].ends_with("| NO | dense |"), "{}", lines[4]);
        assert!(report.contains("\n2/3 configurations at <= 0.8x the best anchor"));
        assert!(report.contains("64 distinct adapters, r=16: 9.2 us = 2.09x the memory floor"));
        assert!(report.contains("64 rows identical vs distinct, r=16: 6.3 vs 9.2 us, ratio 1.46"));
    }

    #[test]
    fn row_slots_number_segments_in_order() {
        assert_eq!(row_slots(&[2, 1]), vec![Some(0), Some(0), Some(1)]);
    }
}
