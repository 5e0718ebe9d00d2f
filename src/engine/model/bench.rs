//! `punica bench cpu`: decode throughput of the f32 CPU backend on a real model, next to the
//! llama.cpp figures of ANCHORS.md section 5 measured on the development machine.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::engine::backend::cpu::CpuBackend;
use crate::engine::backend::{BLOCK_SIZE, SeqStep, StepMeta};
use crate::engine::model::llama::{KvCache, Llama, LoraState, ModelError, argmax};

/// Arguments of `punica bench cpu`.
#[derive(Clone, Debug, clap::Args)]
pub struct CpuBenchArgs {
    /// Hugging Face style model folder (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8])]
    pub batches: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 64)]
    pub prompt: usize,
    /// Decode steps measured after the prefill.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
}

/// One measured batch size.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub batch: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub ms_per_decode_step: f64,
}

/// llama.cpp on the development machine (ANCHORS.md section 5): (batch, F32, F16) decode tok/s.
const LLAMA_CPP: [(usize, &str, &str); 3] = [
    (1, "53-66", "102-116"),
    (8, "216", "285"),
    (32, "370", "435"),
];

/// Prefill `batch` prompts in one step, then time `new_tokens` greedy decode steps.
pub fn measure(
    model: &Llama<CpuBackend>,
    batch: usize,
    prompt: usize,
    new_tokens: usize,
) -> Result<BenchRow, ModelError> {
    let c = model.config();
    let lora = LoraState::new(c, 0);
    let blocks = (prompt + new_tokens + 1).div_ceil(BLOCK_SIZE);
    let mut kv = KvCache::new(model.backend().as_ref(), c, batch * blocks)?;
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|i| ((i * blocks) as u32..((i + 1) * blocks) as u32).collect())
        .collect();
    // Deterministic, varied prompts that avoid the special ids at the start of the vocabulary.
    let vocab = c.vocab_size as u64;
    let prompts: Vec<Vec<u32>> = (0..batch as u64)
        .map(|i| {
            (0..prompt as u64)
                .map(|t| ((i * 7919 + t * 104_729 + 17) % (vocab - 32) + 32) as u32)
                .collect()
        })
        .collect();
    let step = |inputs: &[Vec<u32>], cached: usize, kv: &mut KvCache<CpuBackend>| {
        let seqs: Vec<SeqStep<'_>> = (0..batch)
            .map(|i| SeqStep {
                tokens: &inputs[i],
                cached,
                block_table: &tables[i],
                adapter_slot: None,
                sample: true,
            })
            .collect();
        let meta = StepMeta::build(&seqs)?;
        let logits = model.forward(&meta, kv, &lora)?;
        Ok::<_, ModelError>(
            logits
                .chunks(c.vocab_size)
                .map(|row| vec![argmax(row)])
                .collect::<Vec<_>>(),
        )
    };
    let t0 = Instant::now();
    let mut next = step(&prompts, 0, &mut kv)?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for s in 0..new_tokens {
        next = step(&next, prompt + s, &mut kv)?;
    }
    let decode = t1.elapsed().as_secs_f64();
    Ok(BenchRow {
        batch,
        prefill_tokens_per_s: (batch * prompt) as f64 / prefill,
        decode_tokens_per_s: (batch * new_tokens) as f64 / decode,
        ms_per_decode_step: decode * 1e3 / new_tokens as f64,
    })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpu}, {} rayon threads", rayon::current_num_threads())
}

fn git_revision() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Run the benchmark and return the report (markdown).
pub fn run(args: &CpuBenchArgs) -> anyhow::Result<String> {
    let backend = Arc::new(CpuBackend::new());
    let t = Instant::now();
    let model = Llama::load(backend, &args.model)?;
    let load_s = t.elapsed().as_secs_f64();
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let mut out = String::new();
    writeln!(out, "# punica bench cpu")?;
    writeln!(out)?;
    writeln!(
        out,
        "- model: {} (loaded as f32 in {load_s:.1} s)",
        args.model.display()
    )?;
    writeln!(out, "- machine: {}", machine())?;
    writeln!(out, "- date: {now}")?;
    writeln!(out, "- git revision: {}", git_revision())?;
    writeln!(
        out,
        "- workload: prompt {} tokens, then {} greedy decode steps, batch prefilled in one step",
        args.prompt, args.new_tokens
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| batch | prefill tok/s | decode tok/s | ms/decode step | llama.cpp F32 decode tok/s | llama.cpp F16 decode tok/s |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|")?;
    for &batch in &args.batches {
        let row = measure(&model, batch, args.prompt, args.new_tokens)?;
        let (f32_ref, f16_ref) = LLAMA_CPP
            .iter()
            .find(|r| r.0 == batch)
            .map_or(("-", "-"), |r| (r.1, r.2));
        writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:.2} | {f32_ref} | {f16_ref} |",
            row.batch, row.prefill_tokens_per_s, row.decode_tokens_per_s, row.ms_per_decode_step
        )?;
    }
    Ok(out)
}
