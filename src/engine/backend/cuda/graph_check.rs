//! The selftest's check of CUDA graphs: a small random model with two adapters decodes the
//! same teacher-forced steps twice, issuing every step op by op and then with graphs on (decode
//! steps padded to their bucket in both runs), and the logits of every step must agree. The batch
//! keeps its layout long enough for its graph to pay off ([`WORTH_REPLAYS`]), then changes
//! membership within its bucket (one sequence sits two steps out: the same graph serves), then
//! drops to a smaller bucket (three sit out: a new graph) and returns to the first, so the run
//! issues, records and replays steps, and replays a cached graph of an earlier bucket; the
//! counters must show all three. Inputs are fresh random tokens each run.
//!
//! A third run has graphs on and the adapters in a LoRA arena (as the CUDA executor runs them):
//! its decode steps take their shrinks from the base GEMMs, and its logits must agree with the
//! first run's, where shrink kernels made them.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::engine::backend::{
    BLOCK_SIZE, Backend as _, BackendError, Result, StepMeta, decode_bucket,
};
use crate::engine::lora::peft::LoraWeights;
use crate::engine::model::config::LlamaConfig;
use crate::engine::model::llama::{KvCache, Llama, LoraState, batch_step_meta};

use super::graph::{GraphStats, WORTH_REPLAYS};
use super::reference;
use super::selftest::CaseResult;
use super::{CudaBackend, CudaOptions};

/// Decode steps after the prefill.
const STEPS: usize = 32;
/// The first layout's graph is recorded at step 2 and replayed [`WORTH_REPLAYS`] times; then
/// sequence 3 sits out for two steps (5 rows: still the bucket of 8), then sequences 1, 3 and
/// 4 for three steps (3 rows: the bucket of 4), then all six decode again.
const ONE_OUT: usize = 3 + WORTH_REPLAYS as usize;
const THREE_OUT: usize = ONE_OUT + 2;

/// The sequences that sit out step `step`.
fn sitting_out(step: usize) -> &'static [usize] {
    match step {
        s if (ONE_OUT..THREE_OUT).contains(&s) => &[3],
        s if (THREE_OUT..THREE_OUT + 3).contains(&s) => &[1, 3, 4],
        _ => &[],
    }
}

/// Small shapes with grouped-query attention: fast, yet every kernel family runs.
fn config() -> LlamaConfig {
    let mut c = LlamaConfig::synthetic("llama-7b").unwrap_or_else(|| unreachable!());
    c.hidden_size = 512;
    c.intermediate_size = 1408;
    c.num_hidden_layers = 3;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 4;
    c.head_dim = 64;
    c.vocab_size = 2048;
    c
}

fn err(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Device(format!("{what}: {e}"))
}

/// The logits of every step of one run, and how the backend ran its steps.
fn run(
    graphs: bool,
    arena: bool,
    adapters: &[LoraWeights],
    requests: &[(Vec<u32>, Option<u32>)],
    forced: &[Vec<u32>],
) -> Result<(Vec<Vec<f32>>, GraphStats)> {
    let be = Arc::new(CudaBackend::new(CudaOptions::default())?);
    be.set_graphs(graphs)?;
    let mut model = Llama::random(Arc::clone(&be), config(), 11).map_err(|e| err("model", e))?;
    let b = be.as_ref();
    let longest = requests.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
    let per_seq = (longest + STEPS + 1).div_ceil(BLOCK_SIZE);
    let mut kv = KvCache::new(b, model.config(), requests.len() * per_seq)
        .map_err(|e| err("KV cache", e))?;
    let mut lora = LoraState::new(model.config(), adapters.len());
    if arena {
        model
            .reserve_lora_arena(Llama::<CudaBackend>::arena_rows_for(adapters.len(), 16))
            .map_err(|e| err("arena", e))?;
        lora.set_arena(model.arena_rows());
    }
    for (slot, w) in adapters.iter().enumerate() {
        lora.load(b, slot, w).map_err(|e| err("adapter", e))?;
        b.synchronize()?;
        if arena
            && !model
                .place_in_arena(&mut lora, slot)
                .map_err(|e| err("arena", e))?
        {
            return Err(err("arena", format!("adapter {slot} found no room")));
        }
    }
    let tables: Vec<Vec<u32>> = (0..requests.len())
        .map(|i| ((i * per_seq) as u32..((i + 1) * per_seq) as u32).collect())
        .collect();
    // A first pass sizes the arena and the split-K workspace (their growth would cut a step's
    // trace); the second, with the graph cache emptied, is the one compared.
    let mut pass = || -> Result<Vec<Vec<f32>>> {
        let mut cached = vec![0usize; requests.len()];
        let mut logits = Vec::new();
        for step in 0..=STEPS {
            let seqs: Vec<usize> = (0..requests.len())
                .filter(|i| !sitting_out(step).contains(i))
                .collect();
            let inputs: Vec<Vec<u32>> = seqs
                .iter()
                .map(|&i| match step {
                    0 => requests[i].0.clone(),
                    s => vec![forced[i][s - 1]],
                })
                .collect();
            let reqs: Vec<_> = seqs.iter().map(|&i| requests[i].clone()).collect();
            let tabs: Vec<_> = seqs.iter().map(|&i| tables[i].clone()).collect();
            let done: Vec<_> = seqs.iter().map(|&i| cached[i]).collect();
            let meta = batch_step_meta(&reqs, &inputs, &done, &tabs)?;
            // With graphs on the backend pads decode steps to their bucket; the run without
            // graphs pads them here the same way, so both compute the same rows and only how
            // the ops reach the GPU differs.
            let mut padded = StepMeta::default();
            let pads = !graphs
                && decode_bucket(meta.rows())
                    .is_some_and(|b| meta.pad_decode(b, kv.pad_block(), &mut padded));
            let mut out = model
                .forward(if pads { &padded } else { &meta }, &mut kv, &lora)
                .map_err(|e| err(&format!("step {step}"), e))?;
            out.truncate(meta.logit_rows.len() * model.config().vocab_size);
            for (&i, input) in seqs.iter().zip(&inputs) {
                cached[i] += input.len();
            }
            logits.push(out);
        }
        Ok(logits)
    };
    pass()?;
    be.set_graphs(graphs)?;
    let before = be.graph_stats();
    let logits = pass()?;
    let after = be.graph_stats();
    Ok((
        logits,
        GraphStats {
            replayed: after.replayed - before.replayed,
            recorded: after.recorded - before.recorded,
            issued: after.issued - before.issued,
            record_us: after.record_us - before.record_us,
        },
    ))
}

/// Run the check; one result per step, then one for the counters.
pub fn check(seed: u64) -> Result<Vec<CaseResult>> {
    let c = config();
    let mut rng = StdRng::seed_from_u64(seed);
    let adapters = crate::engine::synthetic::random_lora_weights(&c, &[(8, 0.2), (16, 0.1)], seed)
        .map_err(|e| err("adapter", e))?;
    // Adapters 0 and 1 and the base model, one-row segments and a longer one.
    let slots = [Some(0), Some(0), Some(1), None, Some(1), Some(0)];
    let vocab = c.vocab_size as u32;
    let requests: Vec<(Vec<u32>, Option<u32>)> = slots
        .iter()
        .map(|&slot| {
            let len = rng.random_range(3..24);
            ((0..len).map(|_| rng.random_range(0..vocab)).collect(), slot)
        })
        .collect();
    let forced: Vec<Vec<u32>> = (0..requests.len())
        .map(|_| (0..STEPS).map(|_| rng.random_range(0..vocab)).collect())
        .collect();
    let (issued, _) = run(false, false, &adapters, &requests, &forced)?;
    let (graphed, stats) = run(true, false, &adapters, &requests, &forced)?;
    let (in_arena, _) = run(true, true, &adapters, &requests, &forced)?;
    let compare = |op: &str, what: &str, got_runs: &[Vec<f32>], tol: f64| -> Vec<CaseResult> {
        issued
            .iter()
            .zip(got_runs)
            .enumerate()
            .map(|(step, (want, got))| {
                let want64: Vec<f64> = want.iter().map(|&v| v as f64).collect();
                let note = if want.len() != got.len() || want.is_empty() {
                    format!("{} logits {what}, {} issued", got.len(), want.len())
                } else {
                    String::new()
                };
                CaseResult {
                    op: op.into(),
                    case: format!("step {step}: logits {what} vs issued op by op"),
                    err: reference::rel_err(got, &want64),
                    tol,
                    note,
                }
            })
            .collect()
    };
    // Both runs issue the same kernels, but reductions that add in the order their blocks finish
    // (the shrinks' split-K f32 atomics) may change the last bits of v; one flipped bf16 rounding
    // of an output then travels through three layers of this check's large adapters. Over the
    // H200 selftests of sessions 5 to 13 (bench/results/selftest-h200-*) the worst step of a run
    // differed by 3.8e-3 to 1.13e-2 (three runs failed the former 1e-2). A graph that replays
    // stale pointers or metadata moves the logits by O(1).
    let mut results = compare("graphs", "with CUDA graphs", &graphed, 2e-2);
    // The arena's intermediate comes out of the GEMM rounded to bf16 (as PEFT's lora_A output
    // is), the shrinks' stays f32; with this check's large adapters (B uniform with std 0.1 and
    // 0.2: deltas about the size of the base output) that moves the logits by 1.4-2.2e-2 on the
    // H200. A wrong slot, column or part moves them by O(1).
    results.extend(compare(
        "arena",
        "with graphs and the LoRA arena",
        &in_arena,
        5e-2,
    ));
    // The prefill, step 1 and the first step of the smaller bucket are issued; the second
    // step of each bucket is recorded; the rest is replayed: the first graph while one
    // sequence sits out, and again when the batch returns to the bucket of 8.
    let want = GraphStats {
        issued: 3,
        recorded: 2,
        replayed: (STEPS - 4) as u64,
        record_us: stats.record_us,
    };
    results.push(CaseResult {
        op: "graphs".into(),
        case: format!(
            "steps issued / recorded / replayed: {} / {} / {} (recording took {:.1} ms)",
            stats.issued,
            stats.recorded,
            stats.replayed,
            stats.record_us as f64 / 1e3
        ),
        err: 0.0,
        tol: 1.0,
        note: if stats == want {
            String::new()
        } else {
            format!(
                "expected {} / {} / {}",
                want.issued, want.recorded, want.replayed
            )
        },
    });
    Ok(results)
}
